package firewall

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"egressd/internal/netutil"
	"egressd/policy"
)

// echoTCP answers every line with "echo LINE" on addr in the server
// namespace, until the test ends.
func (tp *topo) echoTCP(t *testing.T, addr string) {
	t.Helper()
	ln, err := tp.server.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			fmt.Fprintf(c, "echo %s", line)
		}
	})
}

// flowsMetric is the value of egress_firewall_reload_flows_total{result}.
func flowsMetric(fw *Firewall, result string) float64 {
	return counterValue(fw.m.flows.WithLabelValues(result))
}

// checkFlows asks every flow once: those in cut must get no answer, the
// others must.
func checkFlows(t *testing.T, when string, flows map[string]*flow, cut ...string) {
	t.Helper()
	isCut := map[string]bool{}
	for _, c := range cut {
		isCut[c] = true
	}
	for name, f := range flows {
		if isCut[name] {
			if err := f.ask(700 * time.Millisecond); err == nil {
				t.Errorf("%s: the %s flow %s (%s) still gets through", when, f.network, name, f.addr)
			}
			delete(flows, name)
			continue
		}
		if err := f.ask(3 * time.Second); err != nil {
			t.Errorf("%s: the %s flow %s (%s): %v", when, f.network, name, f.addr, err)
		}
	}
}

// TestReloadCutsFlowsItNoLongerAllows: UDP flows and TCP sessions let out
// under rule a and under rule b, IPv4 and IPv6, through a masquerading
// gateway. A reload that takes a port out of rule a cuts a's sessions on
// that port and nothing else; a reload without rule a cuts a's other
// flows; b's flows carry on through both, and through a reload that
// changes nothing. A restart with rule b narrowed cuts b's sessions on
// the port it lost.
func TestReloadCutsFlowsItNoLongerAllows(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000")
	tp.echoTCP(t, "[::]:2000")
	fw := tp.firewall(t, Config{Masquerade: true, TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}})
	const b = `
  - name: b
    to: [198.18.2.3/32, "2001:db8:2::3/128"]
    ports: [9000/udp, 2000/tcp]
`
	if err := fw.Install(compile(t, `
version: 1
mode: enforce
rules:
  - name: a
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp, 2000/tcp]
`+b)); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{
		"a-udp4": dialFlow(t, tp, "udp", "198.18.2.2:9000"),
		"a-udp6": dialFlow(t, tp, "udp", "[2001:db8:2::2]:9000"),
		"a-tcp4": dialFlow(t, tp, "tcp", "198.18.2.2:2000"),
		"a-tcp6": dialFlow(t, tp, "tcp", "[2001:db8:2::2]:2000"),
		"b-udp4": dialFlow(t, tp, "udp", "198.18.2.3:9000"),
		"b-udp6": dialFlow(t, tp, "udp", "[2001:db8:2::3]:9000"),
		"b-tcp4": dialFlow(t, tp, "tcp", "198.18.2.3:2000"),
		"b-tcp6": dialFlow(t, tp, "tcp", "[2001:db8:2::3]:2000"),
	}
	checkFlows(t, "installed", flows)

	// The same policy again: nothing to cut.
	if err := fw.Replace(compile(t, `
version: 1
mode: enforce
rules:
  - name: a
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp, 2000/tcp]
`+b)); err != nil {
		t.Fatal(err)
	}
	if cut := flowsMetric(fw, "cut"); cut != 0 {
		t.Errorf("a reload that changes nothing cut %v flows", cut)
	}
	checkFlows(t, "unchanged", flows)

	// Rule a loses 2000/tcp.
	if err := fw.Replace(compile(t, `
version: 1
mode: enforce
rules:
  - name: a
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp]
`+b)); err != nil {
		t.Fatal(err)
	}
	if cut := flowsMetric(fw, "cut"); cut != 2 {
		t.Errorf("port removed: %v flows cut, want 2 (a's TCP sessions)", cut)
	}
	checkFlows(t, "a without 2000/tcp", flows, "a-tcp4", "a-tcp6")

	// Rule a goes.
	if err := fw.Replace(compile(t, "version: 1\nmode: enforce\nrules:"+b)); err != nil {
		t.Fatal(err)
	}
	if cut := flowsMetric(fw, "cut"); cut != 4 {
		t.Errorf("rule removed: %v flows cut in all, want 4", cut)
	}
	checkFlows(t, "a removed", flows, "a-udp4", "a-udp6")
	if len(flows) != 4 {
		t.Errorf("%d flows left, want b's 4", len(flows))
	}
	// A new flow under the new policy still goes out, and a new one under
	// the removed rule does not.
	if _, err := udpAsk(tp.client, "198.18.2.3:9000", 3*time.Second); err != nil {
		t.Errorf("a new flow under rule b: %v", err)
	}
	if _, err := udpAsk(tp.client, "198.18.2.2:9000", 700*time.Millisecond); err == nil {
		t.Error("a new flow to rule a's address went out")
	}

	// egressd restarts (the ruleset stays in the kernel meanwhile) with
	// rule b narrowed to UDP: the new process knows nothing of the old
	// policy, and still cuts b's TCP sessions.
	if err := fw.Detach(); err != nil {
		t.Fatal(err)
	}
	fw2 := tp.firewall(t, Config{Masquerade: true, TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}})
	if err := fw2.Install(compile(t, `
version: 1
mode: enforce
rules:
  - name: b
    to: [198.18.2.3/32, "2001:db8:2::3/128"]
    ports: [9000/udp]
`)); err != nil {
		t.Fatal(err)
	}
	// Kept: b's UDP flows and the new one above.
	if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 2 || kept != 3 {
		t.Errorf("restart with b narrowed: %v cut, %v kept, want 2 and 3", cut, kept)
	}
	checkFlows(t, "restart, b without 2000/tcp", flows, "b-tcp4", "b-tcp6")
}

// TestReloadKeepsFlowsOfLearnedAddresses: a flow to an address DNS gave
// out for a rule's name keeps going through a reload that leaves its rule
// alone, or only widens it, long after the answer's TTL ran out of the
// learned set; a reload that changes the rule's names cuts it (the
// address is no longer known to be one of them), and one that removes
// another rule cuts that rule's flows.
func TestReloadKeepsFlowsOfLearnedAddresses(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000")
	fw := tp.firewall(t, Config{MinTTL: time.Second})
	const named = `
  - name: named
    to: [ntp.test]
    ports: [9000/udp]
`
	const other = `
  - name: other
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp]
`
	policyOf := func(rules ...string) *policy.Engine {
		return compile(t, "version: 1\nmode: enforce\nrules:"+strings.Join(rules, ""))
	}
	if err := fw.Install(policyOf(named, other)); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"198.18.2.3", "2001:db8:2::3"} {
		if err := fw.Learn("named", netip.MustParseAddr(a), time.Second); err != nil {
			t.Fatal(err)
		}
	}
	flows := map[string]*flow{
		"named4": dialFlow(t, tp, "udp", "198.18.2.3:9000"),
		"named6": dialFlow(t, tp, "udp", "[2001:db8:2::3]:9000"),
		"other4": dialFlow(t, tp, "udp", "198.18.2.2:9000"),
		"other6": dialFlow(t, tp, "udp", "[2001:db8:2::2]:9000"),
	}
	checkFlows(t, "installed", flows)
	// The answers expire: the sets no longer hold the addresses, and a
	// new flow to them is dropped, but the established ones go on.
	time.Sleep(2500 * time.Millisecond)
	for _, set := range []string{"dns4_named", "dns6_named"} {
		if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", set); strings.Contains(out, "2.3") || strings.Contains(out, "2::3") {
			t.Fatalf("the learned address has not expired:\n%s", out)
		}
	}
	if _, err := udpAsk(tp.client, "198.18.2.3:9000", 700*time.Millisecond); err == nil {
		t.Fatal("a new flow to an expired learned address went out")
	}
	checkFlows(t, "expired", flows)

	if err := fw.Replace(policyOf(named)); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "other removed", flows, "other4", "other6")

	// Widened: another port, another name.
	widened := `
  - name: named
    to: [ntp.test, time.test]
    ports: [9000/udp, 9001/udp]
`
	if err := fw.Replace(policyOf(widened)); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "named widened", flows)

	// Its names changed: what DNS gave out for ntp.test is not known to
	// be time.test's.
	if err := fw.Replace(policyOf("\n  - name: named\n    to: [time.test]\n    ports: [9000/udp, 9001/udp]\n")); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "named's names changed", flows, "named4", "named6")
	if got := flowsMetric(fw, "cut"); got != 4 {
		t.Errorf("%v flows cut in all, want 4", got)
	}
}

// TestMarkKeepsOtherBits: the accept rule writes the enforced bit and its
// rule's tag into the conntrack mark with a masked set: bits another
// table set (the operator's) stay, and the tag is the rule's.
func TestMarkKeepsOtherBits(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000")
	rules := t.TempDir() + "/operator.nft"
	if err := os.WriteFile(rules, []byte(`table inet operator_test {
	chain pre {
		type filter hook prerouting priority -150; policy accept;
		iifname "lan0" udp dport 9000 ct mark set ct mark | 0x80000005
	}
}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	tp.gw.MustRun("nft", "-f", rules)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	if _, err := udpAsk(tp.client, "198.18.2.2:9000", 3*time.Second); err != nil {
		t.Fatal(err)
	}
	ct, err := netutil.OpenConntrackTable(tp.nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	es, err := ct.Marked(CTMarkEnforced, CTMarkEnforced)
	if err != nil {
		t.Fatal(err)
	}
	var tag uint32
	for _, fr := range fw.Ruleset().flows {
		if fr.name == "udp-net" {
			tag = fr.tag
		}
	}
	if len(es) != 1 || es[0].Mark != 0x80000005|CTMarkEnforced|tag<<ctTagShift {
		t.Fatalf("marked entries %+v, want one with mark 0x%08x", es, 0x80000005|CTMarkEnforced|tag<<ctTagShift)
	}
}
