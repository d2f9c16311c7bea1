package proxy

import (
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// TestLimitHitsResolvedOnce: a connection refused for a limit (the
// proxy's connection caps, acquire; the peek budget, peekRefused) counts
// egress_proxy_limit_rejections_total under its own scope, through the
// series resolved once (metrics.limitOf; before, a look-up of the vec at
// each refusal), and the refusals after the first allocate nothing (the
// one line a second they write aside: at most one in the runs, within
// the average's rounding; true of the look-up too, whose labels do not
// escape: what it cost was the labels' hash and the vec's lock, which
// BenchmarkLimitRefused measures).
func TestLimitHitsResolvedOnce(t *testing.T) {
	eng, err := policy.Compile("p", []byte("version: 1\nmode: enforce\nrules: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p, err := New(Config{MaxConns: 2, MaxConnsPerClient: 1}, Deps{Policy: policy.NewStore(eng), Registerer: reg,
		Logger: slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelError + 1}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	// a's and b's refusals keep their slots' entries (a client without
	// one has its entry made and dropped at each refusal: the slots'
	// allocation, not the counter's).
	a, b := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.11")
	if !p.acquire(a) {
		t.Fatal("the first connection of a client was refused")
	}
	const runs = 1000
	refused := 0
	for _, r := range []struct {
		scope string
		fn    func()
	}{
		{"client", func() { // a holds its one slot
			if !p.acquire(a) {
				refused++
			}
		}},
		{"peek", func() { p.peekRefused(a); refused++ }},
		{"global", func() { // a's and b's slots: the global cap of 2
			if !p.acquire(a) {
				refused++
			}
		}},
	} {
		if r.scope == "global" && !p.acquire(b) {
			t.Fatal("the second client's first connection was refused")
		}
		refused = 0
		if n := testing.AllocsPerRun(runs, r.fn); n != 0 {
			t.Errorf("scope %s: a refusal allocates %v times, want 0 (the series resolved once)", r.scope, n)
		}
		if refused != runs+1 { // AllocsPerRun's warm-up run too
			t.Fatalf("scope %s: %d of %d tries refused", r.scope, refused, runs+1)
		}
		if got := seriesOf(t, reg, "egress_proxy_limit_rejections_total")[r.scope]; got != runs+1 {
			t.Errorf("limit_rejections_total{scope=%q} = %v, want %d", r.scope, got, runs+1)
		}
		i := slices.Index(limitScopeLabels[:], r.scope)
		if i < 0 || p.met.limitOf[i].c.Load() == nil {
			t.Errorf("scope %s: counted with its series never resolved (limitOf): a look-up of the vec per refusal", r.scope)
		}
	}
}
