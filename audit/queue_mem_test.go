package audit

import (
	"runtime"
	"testing"
	"unsafe"
)

// TestEmitBurstHoldsNoCopies: a burst of events beyond what the writer
// has taken (capture's flush of its 65,536 open flows at a stop, a SYN
// flood's evictions) costs the heap the queued events once. The queue
// was one slice grown by append: each doubling copied it, the last one
// held the old half and the new whole array at once, and the burst had
// allocated twice its events (the flooded daemon's peak under a 128 MiB
// limit was at its stop, e2e TestMemoryMaxUnderFlood).
func TestEmitBurstHoldsNoCopies(t *testing.T) {
	const n = 65536
	j, _, _ := openJournal(t, JournalConfig{Dir: t.TempDir(), QueueLen: n}, nil)
	defer j.Close()
	ev := seqEvent(1, t0)
	ev.Bound()
	ev.ownText()
	j.Emit(ev) // the first event's own allocations (text) aside
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n - 1 {
		j.Emit(ev)
	}
	runtime.ReadMemStats(&after)
	queued := int64(n) * int64(unsafe.Sizeof(Event{}))
	if got := int64(after.TotalAlloc - before.TotalAlloc); got > queued*5/4 {
		t.Errorf("queuing %d events of %d B allocated %d KiB, more than 1.25 times the %d KiB they take", n, unsafe.Sizeof(Event{}), got>>10, queued>>10)
	}
	if s := j.Shed(); s != 0 {
		t.Errorf("%d events shed below the queue's length", s)
	}
}
