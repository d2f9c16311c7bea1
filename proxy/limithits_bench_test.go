package proxy

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"egressd/policy"
)

// BenchmarkLimitRefused: connections refused for a limit under a flood
// (the per-client cap, from every core at once): the slots' look-up,
// the count of limit_rejections_total{scope}, the line's once-a-second
// check.
func BenchmarkLimitRefused(b *testing.B) {
	eng, err := policy.Compile("p", []byte("version: 1\nmode: enforce\nrules: []\n"))
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Config{MaxConnsPerClient: 1}, Deps{Policy: policy.NewStore(eng),
		Logger: slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelError + 1}))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	a := netip.MustParseAddr("192.0.2.10")
	if !p.acquire(a) {
		b.Fatal("the first connection was refused")
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if p.acquire(a) {
				b.Error("a connection over the client's cap was let in")
				return
			}
		}
	})
}
