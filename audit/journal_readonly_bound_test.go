package audit

import (
	"log/slog"
	"sync/atomic"
	"testing"
	"time"
)

// TestJournalReadOnlyDirHeldWithinQueue: the events whose write failed
// during the background read (a read-only state directory at the start),
// held to be counted after it, count against the queue's bounds
// (QueueLen events, QueueBytes bytes) with the events queued: what the
// journal holds in memory stays within them, past them Emit sheds, as
// when the writer is behind. The writer is stalled with half the bound
// held, and a burst of a whole queue is emitted. It failed before: the
// held events had bounds of their own beside the queue's, so the burst
// was queued whole, twice the memory of the queue's bound (16 queued and
// 8 held of a queue of 16; 16 events' bytes queued and 8 lines held of a
// queue of 16 events' bytes).
func TestJournalReadOnlyDirHeldWithinQueue(t *testing.T) {
	const half = 8
	probe := seqEvent(1, time.Now())
	evBytes := queueBytes(&probe)
	for _, c := range []struct {
		name       string
		queueLen   int
		queueBytes int64
	}{
		{"events", 2 * half, 0},
		{"bytes", 4096, 2 * half * evBytes},
	} {
		t.Run(c.name, func(t *testing.T) {
			const old = 300
			dir, _ := roMount(t, func(dir string) { writeOldLog(t, dir, old) })
			release := make(chan struct{})
			stalled, _ := stallLoad(t, release)
			var stall atomic.Bool
			entered, gate := make(chan struct{}), make(chan struct{})
			j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true,
				QueueLen: c.queueLen, QueueBytes: c.queueBytes, Logger: slog.New(slog.DiscardHandler)}, nil)
			j.testHookPre = func() {
				if stall.CompareAndSwap(true, false) {
					entered <- struct{}{}
					<-gate
				}
			}
			runJournal(t, j)
			<-stalled
			at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
			n := 0
			emit := func(k int) {
				for range k {
					n++
					j.Emit(seqEvent(10000+n, at.Add(time.Duration(n)*time.Millisecond)))
				}
			}
			emit(half)
			for i := 0; j.WriteFailed()+j.Shed() < half && i < 10000; i++ {
				time.Sleep(time.Millisecond)
			}
			if j.WriteFailed() != half {
				t.Fatalf("%d write-failed, %d shed; want the first %d held", j.WriteFailed(), j.Shed(), half)
			}
			// The writer takes one more and stalls before its write;
			// then a whole queue's worth comes.
			stall.Store(true)
			emit(1)
			select {
			case <-entered:
			case <-time.After(time.Minute):
				t.Fatal("the writer did not take the event")
			}
			emit(2 * half)
			j.qmu.Lock()
			queued, qbytes := j.npending, j.qbytes
			j.qmu.Unlock()
			heldN, heldBytes := j.heldN, int64(len(j.held)) // the writer waits in the hook
			if queued+heldN > c.queueLen {
				t.Errorf("%d events queued and %d held, over the queue's %d", queued, heldN, c.queueLen)
			}
			if c.queueBytes > 0 {
				// The queued events, the one the writer holds, the held lines.
				if mem := int64(queued+1)*evBytes + heldBytes; mem > c.queueBytes {
					t.Errorf("%d events queued (%d bytes with the one being written, qbytes %d) and %d held lines of %d bytes: %d bytes, over the queue's %d",
						queued, int64(queued+1)*evBytes, qbytes, heldN, heldBytes, mem, c.queueBytes)
				}
			}
			close(gate)
			close(release)
			if g := j.waitLoaded(time.Minute); g != nil {
				t.Fatalf("the read did not end whole: %+v", g)
			}
			if !j.Sync(time.Minute) {
				t.Fatal("Sync after the read did not return")
			}
			// Each event once: held (write-failed, counted) or shed.
			emitted := uint64(n)
			if got := j.WriteFailed() + j.Shed(); got != emitted || j.Written() != 0 {
				t.Errorf("%d write-failed + %d shed = %d, %d written; want the %d emitted, none written", j.WriteFailed(), j.Shed(), got, j.Written(), emitted)
			}
			r := l.Report(ReportOptions{})
			if r.Totals.Flows != old+j.WriteFailed() || r.UnwrittenEvents != j.WriteFailed() || r.ShedEvents != j.Shed() {
				t.Errorf("after the read: %d flows, %d unwritten, %d shed; want %d, %d, %d",
					r.Totals.Flows, r.UnwrittenEvents, r.ShedEvents, old+j.WriteFailed(), j.WriteFailed(), j.Shed())
			}
			j.qmu.Lock()
			qbytes = j.qbytes
			j.qmu.Unlock()
			if qbytes != 0 {
				t.Errorf("after the read, %d bytes still counted against the queue", qbytes)
			}
		})
	}
}
