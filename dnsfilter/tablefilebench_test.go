package dnsfilter

import (
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fullTable returns a table of the default size (65,536 items) filled to
// its bound, every item live for an hour after start, with IPv4 and IPv6
// clients and addresses and names of a usual length.
func fullTable(tb testing.TB, start time.Time) *Table {
	t := NewTable(0)
	t.now = func() time.Time { return start }
	bound := t.perCap * tableShards
	for i := 0; t.Len() < bound; i++ {
		if i > 8*bound {
			tb.Fatalf("table at %d items after %d learns, bound %d", t.Len(), i, bound)
		}
		addr := netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)})
		client := netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 200)})
		if i%4 == 0 {
			addr = floodAddr(i)
			client = netip.MustParseAddr(fmt.Sprintf("2001:db8:c::%x", i%200))
		}
		t.Learn(Learned{Client: client, Name: fmt.Sprintf("host-%d.cdn.example.com", i), Addr: addr, Rule: "web",
			Expires: start.Add(time.Hour - time.Duration(i)*time.Millisecond)})
	}
	return t
}

// BenchmarkTableSave: writing a full table (what the state directory's
// file costs every 14 minutes while the table changes: egressd's write
// budget).
func BenchmarkTableSave(b *testing.B) {
	start := time.Unix(1_800_000_000, 0)
	t := fullTable(b, start)
	var size int64
	for b.Loop() {
		cw := &countWriter{}
		n, err := t.Save(cw)
		if err != nil || n != t.Len() {
			b.Fatalf("Save: %d, %v; table %d", n, err, t.Len())
		}
		size = cw.n
	}
	b.ReportMetric(float64(size), "file-bytes")
}

// BenchmarkTableLoad: reading a full table's file into an empty table
// (what a start costs).
func BenchmarkTableLoad(b *testing.B) {
	start := time.Unix(1_800_000_000, 0)
	t := fullTable(b, start)
	var buf bytes.Buffer
	if _, err := t.Save(&buf); err != nil {
		b.Fatal(err)
	}
	loaded := 0
	for b.Loop() {
		t2 := NewTable(0)
		t2.now = t.now
		n, err := t2.Load(bytes.NewReader(buf.Bytes()), nil)
		if err != nil || n == 0 {
			b.Fatalf("Load: %d, %v; want up to %d", n, err, t.Len())
		}
		loaded = n
	}
	// A new table hashes addresses to shards with its own seed: a full
	// table's items do not all fit its shards, and the soonest to expire
	// of a few go, as when Learn fills a shard.
	b.ReportMetric(float64(buf.Len()), "file-bytes")
	b.ReportMetric(float64(loaded), "items-kept")
}

// BenchmarkTableLearnDuringSave: Learn (a new item each time) while
// another goroutine saves the full table over and over: the slowest Learn
// is how long the DNS hot path waits on a save's shard lock (a global
// lock for the whole write would show as the whole Save's time).
func BenchmarkTableLearnDuringSave(b *testing.B) {
	for _, saving := range []bool{false, true} {
		b.Run(fmt.Sprintf("saving=%v", saving), func(b *testing.B) { benchLearnDuringSave(b, saving) })
	}
}

func benchLearnDuringSave(b *testing.B, saving bool) {
	start := time.Unix(1_800_000_000, 0)
	t := fullTable(b, start)
	var stop atomic.Bool
	var wg sync.WaitGroup
	saves := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() && saves < 10_000 {
			if saving {
				t.Save(io.Discard)
				saves++
			} else {
				time.Sleep(time.Millisecond)
			}
		}
	}()
	var worst time.Duration
	i := 1 << 20
	for b.Loop() {
		s := time.Now()
		t.Learn(Learned{Client: netip.MustParseAddr("192.0.2.1"), Name: "hot.example.com", Addr: floodAddr(i), Rule: "web", Expires: start.Add(time.Minute)})
		worst = max(worst, time.Since(s))
		i++
	}
	stop.Store(true)
	wg.Wait()
	b.ReportMetric(float64(worst.Nanoseconds()), "worst-learn-ns")
	b.ReportMetric(float64(saves), "saves")
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }
