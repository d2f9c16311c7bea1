package audit

import (
	"log/slog"
	"testing"
	"time"
)

// TestJournalReadOnlyDirDuringRead: on a state directory read-only at the
// start, the events emitted while the background read of the earlier log
// runs (egressd's start: a full log takes seconds) cannot be written.
// They are write failures, not events the log could not keep up with:
// counted in WriteFailed (egress_audit_write_failed_events_total), not
// Shed, and in the counts after the read, with the report's
// unwritten_events, as the events emitted after the read are; past the
// queue's bound (QueueLen) they are shed, in no count. It failed before:
// they were counted as shed and were in no count.
func TestJournalReadOnlyDirDuringRead(t *testing.T) {
	const old, queue = 300, 16
	dir, _ := roMount(t, func(dir string) { writeOldLog(t, dir, old) })
	l0, _, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	oldEvents := l0.Report(ReportOptions{}).Totals.Events
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true, QueueLen: queue,
		Logger: slog.New(slog.DiscardHandler)}, nil)
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	emit := func(want uint64) {
		t.Helper()
		for range queue {
			n++
			j.Emit(seqEvent(10000+n, at.Add(time.Duration(n)*time.Millisecond)))
		}
		for i := 0; j.WriteFailed()+j.Shed() < want && i < 10000; i++ {
			time.Sleep(time.Millisecond)
		}
	}
	// The first queue's worth is held to be counted after the read.
	emit(queue)
	if j.WriteFailed() != queue || j.Shed() != 0 || j.Written() != 0 {
		t.Errorf("during the read: %d write-failed, %d shed, %d written; want the %d events write-failed", j.WriteFailed(), j.Shed(), j.Written(), queue)
	}
	if r := l.Report(ReportOptions{}); r.Loading == nil || r.Loading.Queued != queue || r.Loading.Shed != 0 {
		t.Errorf("report during the read: Loading %+v; want %d waiting to be counted, none shed", r.Loading, queue)
	}
	// Past the bound: shed.
	emit(2 * queue)
	if j.WriteFailed() != queue || j.Shed() != queue {
		t.Errorf("past the bound: %d write-failed, %d shed; want %d each", j.WriteFailed(), j.Shed(), queue)
	}
	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	r := l.Report(ReportOptions{})
	if r.Totals.Events != oldEvents+queue || r.UnwrittenEvents != queue || r.ShedEvents != queue {
		t.Errorf("after the read: %d events, %d unwritten, %d shed; want %d (%d old and %d held), %d, %d",
			r.Totals.Events, r.UnwrittenEvents, r.ShedEvents, oldEvents+queue, oldEvents, queue, queue, queue)
	}
	if got := r.Totals.Flows; got != uint64(old+queue) {
		t.Errorf("after the read: %d flows, want %d", got, old+queue)
	}
	// After the read, as before: counted, write-failed, unwritten.
	n = 100
	emit(3 * queue)
	j.Sync(time.Minute)
	if r := l.Report(ReportOptions{}); j.WriteFailed() != 2*queue || r.UnwrittenEvents != 2*queue || r.Totals.Events != oldEvents+2*queue {
		t.Errorf("after the read and %d more: %d write-failed, %d unwritten, %d events; want %d, %d, %d",
			queue, j.WriteFailed(), r.UnwrittenEvents, r.Totals.Events, 2*queue, 2*queue, oldEvents+2*queue)
	}
}
