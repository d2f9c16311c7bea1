package audit

import (
	"testing"
	"time"
)

// TestJournalSync: Sync returns once the events queued before it are in
// the ledger and the log, so that the daemon's live report, which lists
// capture's open flows and then the ledger, never misses a flow capture
// reported just before (its event queued, not yet taken by the writer:
// the flow was in neither, and a report could count fewer flows than the
// one before it). Sync before Run, or after Close, returns false at once.
func TestJournalSync(t *testing.T) {
	j, l, _ := openJournal(t, JournalConfig{Dir: t.TempDir(), FlushInterval: time.Second, DetailBurst: -1}, nil)
	if j.Sync(time.Second) {
		t.Error("Sync before Run: true")
	}
	runJournal(t, j)
	for i := 0; !j.running.Load() && i < 500; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	for i := range 20 {
		j.Emit(seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
		if !j.Sync(5 * time.Second) {
			t.Fatalf("event %d: Sync gave up", i)
		}
		if got := l.Report(ReportOptions{}).Totals.Flows; got != uint64(i+1) {
			t.Fatalf("after Sync: %d flows in the ledger, want %d", got, i+1)
		}
		if j.Written() != uint64(i+1) {
			t.Fatalf("after Sync: %d events written, want %d", j.Written(), i+1)
		}
	}
	j.Close()
	if j.Sync(time.Second) {
		t.Error("Sync after Close: true")
	}
}
