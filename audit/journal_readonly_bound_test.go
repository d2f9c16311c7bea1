package audit

import (
	"log/slog"
	"reflect"
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
			heldN := j.heldN // the writer waits in the hook
			used, _ := heldSizes(reflect.ValueOf(j).Elem().FieldByName("held"))
			heldBytes := int64(used)
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

// TestJournalReadOnlyDirHeldMemory: the memory of the held events is
// their lines' bytes (what counts against QueueBytes) and at most one
// chunk more, not an array append grew (up to 1.25 times the bytes, and
// the old array with the new at each growth, as the queue was before
// session 26). 20,000 events are held during the stalled read. It failed
// before: the lines were in one slice grown by append.
func TestJournalReadOnlyDirHeldMemory(t *testing.T) {
	const old, fresh = 300, 20000
	dir, _ := roMount(t, func(dir string) { writeOldLog(t, dir, old) })
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	var stall atomic.Bool
	entered, gate := make(chan struct{}), make(chan struct{})
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true,
		Logger: slog.New(slog.DiscardHandler)}, nil)
	j.testHookPre = func() {
		if stall.CompareAndSwap(true, false) {
			entered <- struct{}{}
			<-gate
		}
	}
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Microsecond)))
	}
	for i := 0; j.WriteFailed()+j.Shed() < fresh && i < 60000; i++ {
		time.Sleep(time.Millisecond)
	}
	if j.WriteFailed() != fresh {
		t.Fatalf("%d write-failed, %d shed; want the %d held", j.WriteFailed(), j.Shed(), fresh)
	}
	stall.Store(true)
	j.Emit(seqEvent(1, at))
	select {
	case <-entered:
	case <-time.After(time.Minute):
		t.Fatal("the writer did not take the event")
	}
	// The writer waits in the hook: its held lines may be read.
	used, capacity := heldSizes(reflect.ValueOf(j).Elem().FieldByName("held"))
	if used == 0 || capacity > used+64<<10 {
		t.Errorf("%d events held in %d bytes of lines, %d allocated; want at most 64 KiB more", j.heldN, used, capacity)
	}
	close(gate)
	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	if r := l.Report(ReportOptions{}); r.Totals.Flows != old+fresh+1 || r.UnwrittenEvents != fresh+1 {
		t.Errorf("after the read: %d flows, %d unwritten; want %d, %d", r.Totals.Flows, r.UnwrittenEvents, old+fresh+1, fresh+1)
	}
}

// heldSizes sums the lengths and capacities of the byte slices in v (a
// []byte, or a slice of them).
func heldSizes(v reflect.Value) (used, capacity int) {
	if v.Type().Elem().Kind() == reflect.Uint8 {
		return v.Len(), v.Cap()
	}
	for i := range v.Len() {
		u, c := heldSizes(v.Index(i))
		used, capacity = used+u, capacity+c
	}
	return used, capacity
}
