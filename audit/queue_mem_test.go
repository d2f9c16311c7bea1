package audit

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"
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

// TestEmitQueueBoundedInBytes: events of the longest text an event keeps
// (a 255-byte name and front, a 2 KiB path: a request of a hostile
// client, 3 KiB an event queued against some 550 B) fill the queue while
// the writer is behind to its byte bound, not to its 65,536 events
// (some 200 MiB at this shape): the rest are shed and counted.
func TestEmitQueueBoundedInBytes(t *testing.T) {
	const n = 65536
	j, _, _ := openJournal(t, JournalConfig{Dir: t.TempDir(), QueueLen: n}, nil)
	defer j.Close()
	ev := seqEvent(1, t0)
	ev.Kind, ev.Name, ev.Front = KindRequest, strings.Repeat("a", 255), strings.Repeat("b", 255)
	ev.Path = "/" + strings.Repeat("c", MaxPathBytes-1)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range n {
		j.Emit(ev) // each its own copy of the text (ownText)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	held := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	if limit := int64(defaultQueueBytes) * 9 / 8; held > limit {
		t.Errorf("%d queued events of %d B of text hold %d MiB, more than the queue's %d MiB bound (and an eighth)",
			n-int(j.Shed()), len(ev.Name)+len(ev.Path)+len(ev.Front), held>>20, defaultQueueBytes>>20)
	}
	if j.Shed() == 0 {
		t.Errorf("no event shed: %d events of the longest text queued", n)
	}
}

// TestEmitQueueBytesHoldWhileWriting: the byte bound holds for the
// events the writer has taken but not yet written too. The writer takes
// the whole queue as its batch; a disk that stalls in the batch's write
// (the writer behind, what the bound is for) kept the batch while Emit,
// the queue's count reset at the take, queued the bound's bytes again:
// 128 MiB of events held at a 64 MiB bound.
func TestEmitQueueBytesHoldWhileWriting(t *testing.T) {
	j, _, _ := openJournal(t, JournalConfig{Dir: t.TempDir()}, nil)
	entered, release := stallWriter(j)
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	defer func() {
		close(release)
		j.Close()
		if err := <-runDone; err != nil {
			t.Error(err)
		}
	}()
	ev := seqEvent(1, t0)
	ev.Kind, ev.Name, ev.Front = KindRequest, strings.Repeat("a", 255), strings.Repeat("b", 255)
	ev.Path = "/" + strings.Repeat("c", MaxPathBytes-1)
	size := queueBytes(&ev)
	limit := int(defaultQueueBytes/size) + 1 // the most the bound lets in
	accepted := 0
	fill := func() {
		shed := j.Shed()
		for range 4 * limit {
			j.Emit(ev)
			if j.Shed() > shed {
				return
			}
			accepted++
		}
	}
	fill() // the queue full: the writer takes it at its tick and stalls
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer took no batch")
	}
	fill() // the writer holds the batch: the queue takes more while it does
	if held := int64(accepted) * size; accepted > limit {
		t.Errorf("%d events of %d B held (%d MiB) while the writer stalled in its batch, more than the %d MiB bound",
			accepted, size, held>>20, defaultQueueBytes>>20)
	}
}
