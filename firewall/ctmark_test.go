package firewall

import (
	"os"
	"testing"
	"time"

	"egressd/internal/netutil"
)

// operatorUplinks is an operator's own table on the gateway, as a
// multi-WAN setup writes it: the connection's uplink in bits 0x00f00000
// of its conntrack mark (a masked write, on every packet of it from
// either side, before egressd's forward chain), and packets routed by it
// (ip rule fwmark 0x00100000/0x00f00000). Those bits overlap egressd's
// default ones (0x007ff000).
const operatorUplinks = `table inet operator_uplinks {
	chain pre {
		type filter hook prerouting priority mangle; policy accept;
		iifname { "lan0", "wan0" } ct mark set ct mark and 0xff0fffff or 0x00100000
		meta mark set ct mark and 0x00f00000
	}
}
`

// operatorUplink is the uplink the operator's table writes, under
// operatorMask.
const (
	operatorUplink uint32 = 0x00100000
	operatorMask   uint32 = 0x00f00000
)

func (tp *topo) operatorTable(t *testing.T) {
	t.Helper()
	f := t.TempDir() + "/operator.nft"
	if err := os.WriteFile(f, []byte(operatorUplinks), 0o644); err != nil {
		t.Fatal(err)
	}
	tp.gw.MustRun("nft", "-f", f)
}

// marks returns the conntrack marks of the connections to dst (any mark).
func (tp *topo) marks(t *testing.T, dst string) []uint32 {
	t.Helper()
	ct, err := netutil.OpenConntrackTable(tp.nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	var out []uint32
	err = ct.Marked(0, 0, func(e netutil.ConntrackEntry) {
		if e.Orig.Dst.String() == dst {
			out = append(out, e.Mark)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestOperatorMarkOverlapBreaksEnforce: the conflict with egressd's
// default mark bits. An operator table that writes its uplink into
// bits overlapping egressd's clears the enforced bit on the reply's way
// in: the reply of a flow the policy allows meets the forward chain
// without it and is dropped, so nothing the policy allows works in
// enforce mode.
func TestOperatorMarkOverlapBreaksEnforce(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000")
	tp.operatorTable(t)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, "version: 1\nmode: enforce\nrules:\n  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := udpAsk(tp.client, "198.18.2.2:9000", 1500*time.Millisecond); err == nil {
		t.Fatal("the allowed flow got its answer: the operator's bits did not overlap egressd's")
	}
	ms := tp.marks(t, "198.18.2.2:9000")
	if len(ms) != 1 {
		t.Fatalf("conntrack marks of the flow %#x, want one entry", ms)
	}
	if ms[0]&CTMarkEnforced != 0 || ms[0]&operatorMask != operatorUplink {
		t.Errorf("mark 0x%08x: want the operator's uplink 0x%08x written over egressd's enforced bit", ms[0], operatorUplink)
	}
}

// apartBits are egressd's mark bits placed clear of operatorMask: the
// enforced bit 0x40000000, a tag of 6 bits (63 tags) under it.
const apartBits uint32 = 0x7f000000

// TestOperatorMarkApart: with Config.CTMarkBits clear of the operator's
// bits, the operator's table and egressd coexist. Allowed flows get their
// answers, again and again (established passes on egressd's enforced
// bit at its new place); every flow's mark holds the operator's uplink,
// egressd's enforced bit and its rule's tag at their new places, and
// nothing in egressd's default bits; a reload that removes a rule cuts
// its flow (the sweep reads the tag at its new place) and keeps the
// others; a flow kept under another rule is re-marked with that rule's
// tag, the operator's bits still kept.
func TestOperatorMarkApart(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	tp.operatorTable(t)
	fw := tp.firewall(t, Config{CTMarkBits: apartBits})
	const (
		a = "  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}\n"
		b = "  - {name: b, to: [198.18.2.3/32], ports: [9000/udp]}\n"
		c = "  - {name: c, to: [198.18.2.0/24], ports: [9000/udp]}\n"
	)
	policyOf := func(rules ...string) string {
		s := "version: 1\nmode: enforce\nrules:\n"
		for _, r := range rules {
			s += r
		}
		return s
	}
	if err := fw.Install(compile(t, policyOf(a, b))); err != nil {
		t.Fatal(err)
	}
	tagOf := func(rule string) uint32 {
		for _, fr := range fw.Ruleset().flows {
			if fr.name == rule {
				return fr.tag
			}
		}
		t.Fatalf("no rule %s", rule)
		return 0
	}
	wantMark := func(when, dst string, tag uint32) {
		t.Helper()
		want := operatorUplink | 0x40000000 | tag<<24
		if ms := tp.marks(t, dst); len(ms) != 1 || ms[0] != want {
			t.Errorf("%s: conntrack marks of the flow to %s %#x, want one: 0x%08x (the operator's uplink, egressd's enforced bit and tag %d)", when, dst, ms, want, tag)
		}
	}
	flows := map[string]*flow{"a": dialFlow(t, tp, "udp", "198.18.2.2:9000"), "b": dialFlow(t, tp, "udp", "198.18.2.3:9000")}
	for range 3 {
		checkFlows(t, "installed", flows)
	}
	wantMark("installed", "198.18.2.2:9000", tagOf("a"))
	wantMark("installed", "198.18.2.3:9000", tagOf("b"))

	if err := fw.Replace(compile(t, policyOf(b))); err != nil {
		t.Fatal(err)
	}
	if cut, kept := flowsMetric(fw, "cut"), flowsMetric(fw, "kept"); cut != 1 || kept != 1 {
		t.Errorf("a removed: %v flows cut, %v kept; want 1 and 1", cut, kept)
	}
	checkFlows(t, "a removed", flows, "a")
	wantMark("a removed", "198.18.2.3:9000", tagOf("b"))

	// b gives way to c, which covers b's flow: kept, under c's tag.
	if err := fw.Replace(compile(t, policyOf(c))); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "b replaced by c", flows)
	wantMark("b replaced by c", "198.18.2.3:9000", tagOf("c"))
	// And c's removal cuts it: its tag is read where it was written.
	if err := fw.Replace(compile(t, policyOf(a))); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "c removed", flows, "b")
}
