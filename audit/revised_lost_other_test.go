package audit

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

// otherReportCase is capture's report of a proxied connection a minute in
// and its update at the end, with the proxy's report of the same
// connection (counted, written), and flows enough after it that a ledger
// of maxFlows forgets the proxy's record before the update comes.
func otherReportCase(t0 time.Time) (proxy, capFirst, capSecond Event, fillers []Event) {
	c := lostFirstCases(t0)[0]
	capFirst, capSecond = c.first, c.second
	proxy = capFirst
	proxy.Source, proxy.Time, proxy.NameSource = SourceProxy, t0.Add(3*time.Millisecond), ""
	proxy.BytesOut, proxy.BytesIn, proxy.Duration = 0, 0, 0
	for i := range otherFillers {
		f := capFirst
		f.ClientPort = uint16(41000 + i)
		fillers = append(fillers, f)
	}
	return proxy, capFirst, capSecond, fillers
}

const otherFillers, otherMaxFlows = 4, 2

// checkFlows fails unless r counts want flows.
func checkFlows(t *testing.T, how string, r *Report, want uint64) {
	t.Helper()
	if r.Totals.Flows != want {
		t.Errorf("%s: %d flows, want %d (the connection once, and %d others): totals %+v",
			how, r.Totals.Flows, want, otherFillers, r.Totals)
	}
}

// TestRevisedAfterShedFirstOfAFlowCounted: capture's first report of a
// connection the proxy's report counted is shed; its update (revised) is
// not the connection's only report, and counts as a duplicate, live and
// read back, even where the ledger forgot the proxy's record by then (a
// busy LAN). It failed with the lost first reports kept without the
// ledger's word: the update was written unmarked and counted the
// connection a second time.
func TestRevisedAfterShedFirstOfAFlowCounted(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	proxy, capFirst, capSecond, fillers := otherReportCase(t0)
	dir := t.TempDir()
	live := NewLedger(eng, LedgerOptions{MaxFlows: otherMaxFlows})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, QueueLen: 1}, live)
	if err != nil {
		t.Fatal(err)
	}
	j.Emit(proxy)
	j.takeBatch()
	j.Emit(busyQueries(t0, 1, time.Second)[0]) // a query: the queue is full
	j.Emit(capFirst)                           // shed
	if j.Shed() != 1 {
		t.Fatalf("shed %d events, want capture's first report", j.Shed())
	}
	j.takeBatch()
	for _, f := range fillers {
		j.Emit(f)
		j.takeBatch()
	}
	j.Emit(capSecond)
	j.takeBatch()
	closeAndCount(t, j, live, dir, eng)
}

// TestRevisedAfterUnwrittenFirstOfAFlowCounted: capture's first report of
// a connection the proxy's report counted could not be written (a full
// disk); the ledger merged it into the proxy's, which the log holds. Its
// update is not the connection's only report in the log, and counts as a
// duplicate read back, where the proxy's record is forgotten by then. It
// failed with every unwritten first report kept: the update was written
// unmarked and counted the connection twice read back.
func TestRevisedAfterUnwrittenFirstOfAFlowCounted(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	proxy, capFirst, capSecond, fillers := otherReportCase(t0)
	dir, fill, free := fullTmpfs(t)
	// The proxy's report in the log, which fills a page of the tmpfs
	// (a blank line after it), so that the next line needs another.
	line, err := jsonLine(proxy)
	if err != nil {
		t.Fatal(err)
	}
	page := append(line, bytes.Repeat([]byte{' '}, 4095-len(line))...)
	if err := os.WriteFile(filepath.Join(dir, CurrentLog), append(page, '\n'), 0o640); err != nil {
		t.Fatal(err)
	}
	live := NewLedger(eng, LedgerOptions{MaxFlows: otherMaxFlows})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, Logger: slog.New(slog.DiscardHandler)}, live)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() }) // before the tmpfs's unmount
	fill()
	j.Emit(capFirst)
	j.takeBatch()
	j.flush() // ENOSPC
	if j.WriteFailed() != 1 {
		t.Fatalf("%d events failed to be written, want capture's first report", j.WriteFailed())
	}
	free()
	for _, f := range fillers {
		j.Emit(f)
	}
	j.Emit(capSecond)
	j.takeBatch()
	closeAndCount(t, j, live, dir, eng)
}

// TestRevisedAfterShedFirstOfAFlowQueued is
// TestRevisedAfterShedFirstOfAFlowCounted with the proxy's report queued,
// not yet counted, when capture's first report is shed: the update, when
// it comes, finds the proxy's record and stays a duplicate in the log,
// read back where the proxy's record is forgotten before it. It failed
// with the note of the shed report taken as the ledger's word: the
// update was written unmarked, and counted the connection twice read
// back.
func TestRevisedAfterShedFirstOfAFlowQueued(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	proxy, capFirst, capSecond, fillers := otherReportCase(t0)
	dir := t.TempDir()
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, QueueLen: 2}, eng)
	j.Emit(proxy)
	j.Emit(busyQueries(t0, 1, time.Second)[0]) // a query: the queue is full
	j.Emit(capFirst)                           // shed, the proxy's report queued
	if j.Shed() != 1 {
		t.Fatalf("shed %d events, want capture's first report", j.Shed())
	}
	j.takeBatch()
	for _, f := range fillers {
		j.Emit(f)
		j.takeBatch()
	}
	j.Emit(capSecond)
	j.takeBatch()
	closeAndCount(t, j, live, dir, eng)
}

// closeAndCount closes j and checks that the connection and the fillers
// count once each, live and read back from dir.
func closeAndCount(t *testing.T, j *Journal, live *Ledger, dir string, eng *policy.Engine) {
	t.Helper()
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "live", live.Report(ReportOptions{Now: reportNow}), 1+otherFillers)
	back, _, err := LoadDir(dir, eng, LedgerOptions{MaxFlows: otherMaxFlows}, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "read back", back.Report(ReportOptions{Now: reportNow}), 1+otherFillers)
}
