package proxy

import (
	"testing"
	"time"
)

// BenchmarkFastSweep: one sweep of a full flow table (16,384 flows, the
// default Config.FastFlows, decided and marked, kept fastKeep) when none
// is due, as at most of the sweep's once-a-second looks.
func BenchmarkFastSweep(b *testing.B) {
	const n = defaultFastFlows
	bf := newBenchFast(b, n)
	for i := range n {
		bf.flow(b, i)
	}
	if len(bf.s.flows) != n {
		b.Fatalf("the table has %d flows, want %d", len(bf.s.flows), n)
	}
	b.ReportAllocs()
	for b.Loop() {
		bf.s.sweepOnce(time.Now())
	}
	if len(bf.s.flows) != n {
		b.Fatalf("the table has %d flows after the sweeps, want %d", len(bf.s.flows), n)
	}
}
