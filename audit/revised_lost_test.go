package audit

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

// lostFirstCases are a connection's first report and its revised one
// (Event.Revised, the same start): capture's report of a connection a
// minute in and its update at the end, and the proxy's fast path's
// allow and its cut after a reload; with where the connection counts
// (the revised report's attribution: the only report of it there is).
func lostFirstCases(t0 time.Time) []struct {
	name          string
	first, second Event
	rule, dropped uint64
} {
	allow := policy.Decision{Verdict: policy.Allow, Rule: "vendor-docs", Reason: "allowed", Mode: policy.ModeEnforce}
	cut := policy.Decision{Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce}
	capFirst := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("198.18.1.10"), ClientPort: 40200,
		Dest: netip.MustParseAddr("203.0.113.11"), DestPort: 443, Proto: "tcp", Name: "docs.example", NameSource: NameDNSLearned,
		BytesOut: 2000, BytesIn: 40000, Duration: 60}
	capFirst.Stamp(allow)
	capSecond := capFirst
	capSecond.Revised, capSecond.BytesOut, capSecond.BytesIn, capSecond.Duration, capSecond.Close = true, 9000, 900000, 240, "fin"
	fastFirst, fastSecond := fastEvents(t0, allow, cut)
	return []struct {
		name          string
		first, second Event
		rule, dropped uint64
	}{
		{"capture-update", capFirst, capSecond, 1, 0},
		{"fast-cut", fastFirst, fastSecond, 0, 1},
	}
}

// later is a revised report of ev's flow after ev: more bytes.
func later(ev Event) Event {
	ev.Revised, ev.BytesIn = true, ev.BytesIn+1000
	return ev
}

// checkOneFlow fails unless r counts the connection of lostFirstCases
// once: rule times under vendor-docs, dropped among the drops.
func checkOneFlow(t *testing.T, how string, r *Report, rule, dropped uint64) {
	t.Helper()
	var inRule, inDropped uint64
	if rr := ruleOf(r, "vendor-docs"); rr != nil {
		inRule = rr.Flows
	}
	for _, d := range r.Dropped {
		if d.Port == 443 {
			inDropped += d.Flows
		}
	}
	if inRule != rule || inDropped != dropped || r.Totals.Flows != 1 || r.Totals.Allowed+r.Totals.Dropped != 1 {
		t.Errorf("%s: the connection %d times under vendor-docs, %d among the drops, totals %+v; want %d and %d, one flow",
			how, inRule, inDropped, r.Totals, rule, dropped)
	}
}

// TestRevisedAfterShedFirst: the journal shed a connection's first report
// (its queue full: "could not keep up"); the connection's revised report
// (Event.Revised) is the only report of it there is, and counts as the
// flow, attributed as it says, live and after a restart, with the shed
// event counted as shed. It failed before: the revised report found no
// record of the flow in the ledger and counted as a duplicate, 0 flows
// and 1 shed.
func TestRevisedAfterShedFirst(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	for _, tc := range lostFirstCases(t0) {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			j, live, _ := openJournal(t, JournalConfig{Dir: dir, QueueLen: 1}, eng)
			filler := busyQueries(t0, 1, time.Second)[0] // a query: no flow
			j.Emit(filler)
			j.Emit(tc.first) // the queue is full: shed
			if j.Shed() != 1 {
				t.Fatalf("shed %d events, want the first report", j.Shed())
			}
			j.takeBatch()
			j.Emit(tc.second)
			j.takeBatch()
			j.Emit(later(tc.second)) // merges into the flow the second counted
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			r := live.Report(ReportOptions{Now: reportNow})
			checkOneFlow(t, "live", r, tc.rule, tc.dropped)
			if r.ShedEvents != 1 {
				t.Errorf("live: %d shed, want 1", r.ShedEvents)
			}
			back, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
			if err != nil {
				t.Fatal(err)
			}
			rb := back.Report(ReportOptions{Now: reportNow})
			checkOneFlow(t, "read back", rb, tc.rule, tc.dropped)
			if rb.ShedEvents != 1 {
				t.Errorf("read back: %d shed, want 1", rb.ShedEvents)
			}
		})
	}
}

// TestRevisedAfterUnwrittenFirst: the journal could not write a
// connection's first report (a full disk); the ledger counted it, and
// merges the revised report into it live. After a restart the log holds
// only the revised report, which counts as the flow (attributed as it
// says): the connection counts once. It failed before: read back, the
// revised report was a duplicate of a flow the ledger did not hold, 0
// flows.
func TestRevisedAfterUnwrittenFirst(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	for _, tc := range lostFirstCases(t0) {
		t.Run(tc.name, func(t *testing.T) {
			dir, fill, free := fullTmpfs(t)
			j, live, _ := openJournal(t, JournalConfig{Dir: dir, Logger: slog.New(slog.DiscardHandler)}, eng)
			t.Cleanup(func() { j.Close() }) // before the tmpfs's unmount
			// A page of the tmpfs taken, so that fill's 64 KiB fill it.
			if err := os.WriteFile(filepath.Join(dir, "pad"), []byte{1}, 0o600); err != nil {
				t.Fatal(err)
			}
			fill()
			j.Emit(tc.first)
			j.takeBatch()
			j.flush() // ENOSPC: the first report is not in the log
			if j.WriteFailed() != 1 {
				t.Fatalf("%d events failed to be written, want the first report", j.WriteFailed())
			}
			free()
			j.Emit(tc.second)
			j.Emit(later(tc.second)) // merges into the flow counted
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			if j.Written() != 2 {
				t.Fatalf("%d events written, want the revised reports", j.Written())
			}
			checkOneFlow(t, "live", live.Report(ReportOptions{Now: reportNow}), tc.rule, tc.dropped)
			back, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
			if err != nil {
				t.Fatal(err)
			}
			checkOneFlow(t, "read back", back.Report(ReportOptions{Now: reportNow}), tc.rule, tc.dropped)
		})
	}
}

// TestRevisedAfterShedFirstDuringRead is TestRevisedAfterShedFirst while
// the background read of the log at the start runs (JournalConfig.
// Background): the revised report is written during the read and read
// back into the ledger after it (readTail), as a first report.
func TestRevisedAfterShedFirstDuringRead(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	for _, tc := range lostFirstCases(t0) {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			queries := busyQueries(t0, 3, time.Second) // no flows
			writeLogFile(t, dir, CurrentLog, queries[:1])
			release := make(chan struct{})
			stalled, _ := stallLoad(t, release)
			j, live, _ := openJournal(t, JournalConfig{Dir: dir, Background: true, QueueLen: 1}, eng)
			entered, resume := stallWriter(j)
			runJournal(t, j)
			<-stalled
			j.Emit(queries[1]) // the writer takes it and stalls
			<-entered
			j.Emit(queries[2]) // the queue is full
			j.Emit(tc.first)   // shed
			if j.Shed() != 1 {
				t.Fatalf("shed %d events, want the first report", j.Shed())
			}
			close(resume)
			if !waitWritten(j, 2) {
				t.Fatalf("the writer wrote %d events of 2", j.Written())
			}
			j.Emit(tc.second)
			if !waitWritten(j, 3) {
				t.Fatalf("the writer wrote %d events of 3", j.Written())
			}
			close(release)
			if g := j.waitLoaded(time.Minute); g != nil {
				t.Fatalf("the read did not end whole: %+v", g)
			}
			if !j.Sync(time.Minute) {
				t.Fatal("Sync after the read did not return")
			}
			checkOneFlow(t, "live", live.Report(ReportOptions{Now: reportNow}), tc.rule, tc.dropped)
			back, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
			if err != nil {
				t.Fatal(err)
			}
			checkOneFlow(t, "read back", back.Report(ReportOptions{Now: reportNow}), tc.rule, tc.dropped)
		})
	}
}
