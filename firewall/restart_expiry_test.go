package firewall

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"
)

// TestRestartRuleExpiredWhileDown: egressd ran a policy with rule e
// (expires 2020-01-01) and f, whose fingerprint gives it e's tag (f, after
// e, took the next free one), and stopped before e expired; it starts
// again with the same policy after e expired. The kernel's marks are of
// the ruleset with e. The start renders the copy (Deps.Previous) as of
// now, without e: f then draws e's tag, and e's flow, read as f's (an
// unchanged rule), was kept, though no rule of the new policy lets it out.
// It must be decided again, and cut.
func TestRestartRuleExpiredWhileDown(t *testing.T) {
	const e = "  - {name: e, to: [198.51.100.7/32], ports: [9/udp], expires: 2020-01-01}\n"
	withE := func(rules string) *Ruleset {
		t.Helper()
		rs, err := render(siteConfig, compile(t, "version: 1\nmode: enforce\nrules:\n"+rules), time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC))
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	eTag := withE(e).flows[0].tag
	// f's fingerprint gives it e's tag: where e is, it takes the next.
	var f string
	for i := range 50000 {
		r := fmt.Sprintf("  - {name: f%d, to: [203.0.113.9/32], ports: [9/udp]}\n", i)
		if withE(r).flows[0].tag == eTag {
			f = r
			break
		}
	}
	if f == "" {
		t.Fatal("no rule draws e's tag")
	}
	src := "version: 1\nmode: enforce\nrules:\n" + e + f
	before := withE(e + f)
	if before.flows[1].tag == eTag {
		t.Fatalf("f has e's tag %d beside e", eTag)
	}
	after := time.Now()
	fw, err := New(siteConfig, Deps{Previous: compile(t, src), Now: func() time.Time { return after }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := render(siteConfig, compile(t, src), after)
	if err != nil {
		t.Fatal(err)
	}
	since := append(fw.since, rs)
	k := flowKey{client: netip.MustParseAddr("198.18.1.5"), dst: netip.MustParseAddr("198.51.100.7"), port: 9, proto: 17}
	noLive := func(string, netip.Addr) bool { return false }
	if keep, tag := rs.keeps(since, defaultMark(eTag), k, noLive); keep {
		t.Errorf("e's flow (e expired while egressd was down) kept under tag %d", tag)
	}
	// f's own flow, under the tag it had beside e, is kept.
	kf := flowKey{client: netip.MustParseAddr("198.18.1.5"), dst: netip.MustParseAddr("203.0.113.9"), port: 9, proto: 17}
	if keep, _ := rs.keeps(since, defaultMark(before.flows[1].tag), kf, noLive); !keep {
		t.Error("f's flow cut")
	}
}
