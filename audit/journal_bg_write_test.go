package audit

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

// waitWritten waits (bounded in count) until the journal's writer wrote
// want events and left nothing queued; it reports whether it did.
func waitWritten(j *Journal, want uint64) bool {
	for range 10000 {
		if j.Written() >= want && j.queued.Load() == 0 {
			return true
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// TestJournalBackgroundWritesDuringRead: events emitted while the
// background read of the log is stalled reach the log file before the
// read ends, so a crash then (the directory read fresh, as a restart
// does) loses none of them, and `egressd report --state-dir` (LoadDir)
// sees them; nothing is rotated meanwhile, though the file outgrows
// MaxFileBytes; after the read the ledger counts the old and the new
// events once each.
func TestJournalBackgroundWritesDuringRead(t *testing.T) {
	dir := t.TempDir()
	const old, fresh = 300, 200
	writeOldLog(t, dir, old)
	filesBefore, _ := LogFiles(dir)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true, MaxFileBytes: 8000}, nil)
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	if !waitWritten(j, fresh) {
		t.Fatalf("during the stalled read the writer wrote %d of the %d events emitted", j.Written(), fresh)
	}
	if files, _ := LogFiles(dir); len(files) != len(filesBefore) {
		t.Errorf("the log was rotated during the read: %d files, was %d", len(files), len(filesBefore))
	}
	// A crash now: what a restart (or report --state-dir) reads.
	l2, st, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := l2.Report(ReportOptions{}).Totals; st.Events != old+fresh || got.Flows != old+fresh || got.Duplicates != 0 {
		t.Errorf("the log during the read holds %d events (%d flows, %d duplicates); want %d old and %d new, once each", st.Events, got.Flows, got.Duplicates, old, fresh)
	}
	if r := l.Report(ReportOptions{}); r.Loading == nil || r.Loading.Queued != fresh || r.Loading.Shed != 0 {
		t.Errorf("report during the read: Loading %+v; want %d waiting to be counted, none shed", r.Loading, fresh)
	}
	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	if got := l.Report(ReportOptions{}).Totals; got.Events != old+fresh || got.Flows != old+fresh || got.Duplicates != 0 {
		t.Errorf("after the read the ledger counts %d events, %d flows, %d duplicates; want %d each, none twice", got.Events, got.Flows, got.Duplicates, old+fresh)
	}
	// Counting goes on as usual after the read, and the file that grew
	// past its size during the read is rotated now.
	for i := 1; i <= 10; i++ {
		j.Emit(seqEvent(20000+i, at.Add(time.Hour+time.Duration(i)*time.Millisecond)))
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync did not return")
	}
	if got := l.Report(ReportOptions{}).Totals; got.Flows != old+fresh+10 || got.Duplicates != 0 {
		t.Errorf("after the read and 10 more: %d flows, %d duplicates; want %d", got.Flows, got.Duplicates, old+fresh+10)
	}
	if files, _ := LogFiles(dir); len(files) <= len(filesBefore) {
		t.Errorf("the file that outgrew its size during the read was not rotated after it: %d files", len(files))
	}
}

// TestJournalBackgroundReadLongerThanQueue: a read during which more
// events are emitted than the queue holds loses none (the writer keeps
// writing them to the log; none waits in memory for the read's end), and
// the ledger counts each once after it.
func TestJournalBackgroundReadLongerThanQueue(t *testing.T) {
	dir := t.TempDir()
	const old, queue, rounds = 300, 16, 10
	writeOldLog(t, dir, old)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true, QueueLen: queue}, nil)
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	for range rounds {
		for range queue {
			n++
			j.Emit(seqEvent(10000+n, at.Add(time.Duration(n)*time.Millisecond)))
		}
		if !waitWritten(j, uint64(n)) {
			t.Fatalf("during the stalled read the writer wrote %d of the %d events emitted", j.Written(), n)
		}
	}
	if j.Shed() != 0 {
		t.Fatalf("%d events shed", j.Shed())
	}
	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	if r := l.Report(ReportOptions{}); r.Totals.Events != old+uint64(n) || r.Totals.Duplicates != 0 || r.ShedEvents != 0 {
		t.Errorf("after the read: %d events, %d duplicates, %d shed; want %d old and %d new, none twice or shed", r.Totals.Events, r.Totals.Duplicates, r.ShedEvents, old, n)
	}
}

// TestJournalBackgroundWriteFails: when every write fails during the
// background read (the log is /dev/full), the events emitted meanwhile
// are in the log for no read back: they are write failures (WriteFailed,
// not Shed), held and counted after the read, once, as unwritten
// (before session 38 they were shed, in no count:
// TestJournalReadOnlyDirDuringRead); the read back of the current file
// does not read the device (zeros without end).
func TestJournalBackgroundWriteFails(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Fatalf("/dev/full, which every Linux has (and a container's runtime makes): %v", err)
	}
	dir := t.TempDir()
	const fresh = 30
	writeOldLog(t, dir, 300)
	cur := filepath.Join(dir, CurrentLog)
	if err := os.Remove(cur); err != nil {
		t.Fatal(err)
	}
	l0, _, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	old := l0.Report(ReportOptions{}).Totals.Events
	if err := os.Symlink("/dev/full", cur); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true}, nil)
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	for i := 0; j.WriteFailed()+j.Shed() < fresh && i < 10000; i++ {
		time.Sleep(time.Millisecond)
	}
	if j.WriteFailed() != fresh || j.Shed() != 0 || j.Written() != 0 {
		t.Fatalf("during the read: %d write-failed, %d shed, %d written; want the %d events write-failed", j.WriteFailed(), j.Shed(), j.Written(), fresh)
	}
	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	if r := l.Report(ReportOptions{}); r.Totals.Events != old+fresh || r.ShedEvents != 0 || r.UnwrittenEvents != fresh {
		t.Errorf("after the read: %d events, %d shed, %d unwritten; want the %d old ones and %d unwritten, none shed", r.Totals.Events, r.ShedEvents, r.UnwrittenEvents, old, fresh)
	}
}

// TestJournalBackgroundDetailBudget: during the background read a
// device's repeated denials are written whole (the detail budget decides
// with the ledger's record of each flow, which lacks the log until the
// read ends); after it the budget holds them back into summary records
// again; the live counts and a restart's count each once.
func TestJournalBackgroundDetailBudget(t *testing.T) {
	dir := t.TempDir()
	const old, burst, each = 300, 2, 50
	writeOldLog(t, dir, old)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, Background: true}, nil)
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	deny := func(i int) Event {
		return Event{Kind: KindFlow, Source: SourceProxy, Time: at.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.168.10.5"), ClientPort: uint16(1000 + i),
			Dest: netip.MustParseAddr("198.18.9.9"), DestPort: 443, Proto: "tcp", Name: "blocked.example",
			Verdict: policy.Deny, Mode: policy.ModeEnforce, Enforced: true, Reason: "not allowed"}
	}
	for i := 1; i <= each; i++ {
		j.Emit(deny(i))
	}
	if !waitWritten(j, each) {
		t.Fatalf("during the read %d of %d denials were written", j.Written(), each)
	}
	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	for i := each + 1; i <= 2*each; i++ {
		j.Emit(deny(i))
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync did not return")
	}
	if j.Written() >= 2*each || j.summarized.Load() == 0 {
		t.Errorf("after the read %d lines written of %d denials, %d held back; want the budget to hold some back", j.Written(), 2*each, j.summarized.Load())
	}
	if got := l.Report(ReportOptions{}).Totals; got.Flows != old+2*each || got.Duplicates != 0 {
		t.Errorf("live: %d flows, %d duplicates; want %d, none", got.Flows, got.Duplicates, old+2*each)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	testHookLoadFile = nil
	_, l2, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1}, nil)
	if got := l2.Report(ReportOptions{}).Totals; got.Flows != old+2*each || got.Duplicates != 0 {
		t.Errorf("restart: %d flows, %d duplicates; want %d, none", got.Flows, got.Duplicates, old+2*each)
	}
}
