package firewall

import (
	"fmt"
	"net/netip"
	"testing"

	"egressd/policy"
)

// TestFastKeepsOnlyFastFlows: the mark fast-allowed (the enforced bit and
// the last tag) is a rule's mark in a ruleset without the fast path,
// which draws from every tag. A UDP flow of such a rule, carried over to
// a ruleset with the fast path (a restart with --fast-path), is not a
// fast-allowed connection: once its rule is gone it is decided again and
// cut, not kept because the TCP rules are unchanged.
func TestFastKeepsOnlyFastFlows(t *testing.T) {
	const web = "  - {name: web, to: [\"*.example.test\"], ports: [443/tcp]}\n"
	var rule string
	var old *Ruleset
	for i := range 20000 {
		r := fmt.Sprintf("  - {name: r%d, to: [198.51.100.9], ports: [9/udp]}\n", i)
		rs := renderEnforce(t, r+web)
		if rs.flows[0].tag == rs.mark.count {
			rule, old = r, rs
			break
		}
	}
	if old == nil {
		t.Fatal("no rule drew the last tag")
	}
	cfg := siteConfig
	cfg.FastPath = true
	now, err := Render(cfg, compile(t, "version: 1\nmode: enforce\nrules:\n"+web))
	if err != nil {
		t.Fatal(err)
	}
	oldFast, err := Render(cfg, compile(t, "version: 1\nmode: enforce\nrules:\n"+rule+web))
	if err != nil {
		t.Fatal(err)
	}
	k := flowKey{client: netip.MustParseAddr("198.18.1.2"), dst: netip.MustParseAddr("198.51.100.9"), port: 9, proto: policy.UDP}
	mark := old.mark.marked(old.mark.count)
	if mark != now.mark.fastAllowed() {
		t.Fatalf("the last tag's mark 0x%08x is not fast-allowed's 0x%08x", mark, now.mark.fastAllowed())
	}
	// As the marks were written (without the fast path), and as a start
	// renders the previous policy (with this run's Config).
	noLive := func(string, netip.Addr) bool { return false }
	for _, since := range [][]*Ruleset{{old, now}, {oldFast, now}} {
		if keep, _ := now.keeps(since, mark, k, noLive); keep {
			t.Errorf("a UDP flow of removed rule %q, whose tag is the fast tag, is kept (previous ruleset fast: %v)", rule, since[0].fast)
		}
	}
}
