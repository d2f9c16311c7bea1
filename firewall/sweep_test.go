package firewall

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/netutil"
	"egressd/policy"

	"github.com/prometheus/client_golang/prometheus"
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
	// withA: rules a and b, a opening what b opens, on its own addresses.
	const withA = `
version: 1
mode: enforce
rules:
  - name: a
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp, 2000/tcp]
` + b
	if err := fw.Install(compile(t, withA)); err != nil {
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
	if err := fw.Replace(compile(t, withA)); err != nil {
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
	flows := namedAndOtherFlows(t, tp, fw, time.Second)
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
	var es []netutil.ConntrackEntry
	err = ct.Marked(CTMarkEnforced, CTMarkEnforced, func(e netutil.ConntrackEntry) { es = append(es, e) })
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

// TestCutFlowsAreDecisions: every flow a reload cuts is a decision of its
// own: one canonical line (client, destination, port, protocol, the rule
// it ran under, the new decision's reason, close policy-revoked) and one
// event to Deps.Sink, a drop enforced, so that the report shows what was
// cut. Before, only the counts of the "firewall replace" line told of it.
// A rule's expiry cuts its flows the same way, with reason expired.
func TestCutFlowsAreDecisions(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	tp.echoTCP(t, "[::]:2000")
	logs := &syncWriter{w: new(bytes.Buffer)}
	var mu sync.Mutex
	var events []audit.Event
	sink := audit.SinkFunc(func(ev audit.Event) {
		mu.Lock()
		events = append(events, ev)
		mu.Unlock()
	})
	fw := tp.firewallWith(t, Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}},
		Deps{Logger: slog.New(slog.NewJSONHandler(logs, nil)), Sink: sink})
	const b = `
  - name: b
    to: [198.18.2.3/32]
    ports: [9000/udp]
`
	until := time.Now().Add(4 * time.Second).UTC().Format(time.RFC3339)
	if err := fw.Install(compile(t, `
version: 1
mode: enforce
rules:
  - name: a
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp, 2000/tcp]
  - name: c
    to: [198.18.2.3/32]
    ports: [2000/tcp]
    expires: `+until+`
`+b)); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{
		"a-udp4": dialFlow(t, tp, "udp", "198.18.2.2:9000"),
		"a-tcp6": dialFlow(t, tp, "tcp", "[2001:db8:2::2]:2000"),
		"b-udp4": dialFlow(t, tp, "udp", "198.18.2.3:9000"),
		"c-tcp4": dialFlow(t, tp, "tcp", "198.18.2.3:2000"),
	}
	local := map[string]netip.AddrPort{}
	for name, f := range flows {
		local[name] = netip.MustParseAddrPort(f.c.LocalAddr().String())
	}
	checkFlows(t, "installed", flows)
	mu.Lock()
	if len(events) != 0 {
		t.Errorf("events before any cut: %+v", events)
	}
	mu.Unlock()

	if err := fw.Replace(compile(t, `
version: 1
mode: enforce
rules:
  - name: c
    to: [198.18.2.3/32]
    ports: [2000/tcp]
    expires: `+until+`
`+b)); err != nil {
		t.Fatal(err)
	}
	// Rule c expires: the firewall re-renders on its own and cuts c's flow.
	deadline := time.Now().Add(10 * time.Second)
	for flowsMetric(fw, "cut") < 3 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	checkFlows(t, "a removed, c expired", flows, "a-udp4", "a-tcp6", "c-tcp4")

	want := map[string]struct {
		dest, proto, rule, reason string
		port                      uint16
	}{
		"a-udp4": {"198.18.2.2", "udp", "a", policy.ReasonNoRule, 9000},
		"a-tcp6": {"2001:db8:2::2", "tcp", "a", policy.ReasonNoRule, 2000},
		"c-tcp4": {"198.18.2.3", "tcp", "c", policy.ReasonExpired, 2000},
	}
	mu.Lock()
	got := slices.Clone(events)
	mu.Unlock()
	if len(got) != len(want) {
		t.Errorf("%d events, want %d: %+v", len(got), len(want), got)
	}
	for name, w := range want {
		l := local[name]
		i := slices.IndexFunc(got, func(ev audit.Event) bool { return ev.ClientPort == l.Port() && ev.Proto == w.proto })
		if i < 0 {
			t.Errorf("%s: no event", name)
			continue
		}
		ev := got[i]
		if ev.Kind != audit.KindFlow || ev.Source != audit.SourceFirewall || ev.Client != l.Addr().Unmap() ||
			ev.Dest != netip.MustParseAddr(w.dest) || ev.DestPort != w.port || ev.Verdict != policy.Deny ||
			ev.Reason != w.reason || ev.Mode != policy.ModeEnforce || !ev.Enforced || ev.Close != "policy-revoked" || ev.Time.IsZero() {
			t.Errorf("%s: event %+v", name, ev)
		}
		if w.reason == policy.ReasonExpired && ev.Rule != "c" {
			t.Errorf("%s: event's rule %q, want the expired rule c", name, ev.Rule)
		}
		line := ""
		for _, s := range strings.Split(logs.String(), "\n") {
			if strings.Contains(s, fmt.Sprintf(`"client":"%s"`, l.Addr().Unmap())) && strings.Contains(s, fmt.Sprintf(`"client_port":%d`, l.Port())) {
				line = s
			}
		}
		for _, attr := range []string{`"level":"WARN"`, `"kind":"flow"`, `"dest":"` + w.dest + `"`, fmt.Sprintf(`"dest_port":%d`, w.port),
			`"proto":"` + w.proto + `"`, `"prev_rule_id":"` + w.rule + `"`, `"reason":"` + w.reason + `"`, `"close":"policy-revoked"`,
			`"verdict":"deny"`, `"enforced":true`, `"component":"firewall"`} {
			if !strings.Contains(line, attr) {
				t.Errorf("%s: line without %s: %q", name, attr, line)
			}
		}
	}
}

// syncWriter serialises writes to w.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.String()
}

func (s *syncWriter) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(b)
}

// namedAndOtherFlows learns 198.18.2.3 and 2001:db8:2::3 for rule named
// (for ttl) in fw, opens a UDP flow to port 9000 of each and of rule
// other's 198.18.2.2 and 2001:db8:2::2, and checks they flow.
func namedAndOtherFlows(t *testing.T, tp *topo, fw *Firewall, ttl time.Duration) map[string]*flow {
	t.Helper()
	for _, a := range []string{"198.18.2.3", "2001:db8:2::3"} {
		if err := fw.Learn("named", netip.MustParseAddr(a), ttl); err != nil {
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
	return flows
}

// enforceRules is an enforce-mode policy of rules (each a rule's YAML
// lines, in order).
func enforceRules(t *testing.T, rules ...string) *policy.Engine {
	t.Helper()
	return compile(t, "version: 1\nmode: enforce\nrules:\n"+strings.Join(rules, ""))
}

// ruleC is rule c<i>, which opens UDP 9001 to 203.0.113.9 (no flow of
// the tests): tagTwin's rule for a tag no flow's rule keeps.
func ruleC(i int) string {
	return fmt.Sprintf("  - {name: c%d, to: [203.0.113.9/32], ports: [9001/udp]}\n", i)
}

// tagTwin finds a rule, built by rule from a number, whose tag is want in
// the ruleset of the rules before it and itself.
func tagTwin(t *testing.T, cfg Config, before string, want uint32, rule func(i int) string) string {
	t.Helper()
	for i := range 50000 {
		r := rule(i)
		rs, err := Render(cfg, compile(t, "version: 1\nmode: enforce\nrules:\n"+before+r))
		if err != nil {
			t.Fatal(err)
		}
		if rs.flows[len(rs.flows)-1].tag == want {
			return r
		}
	}
	t.Fatal("no rule gets the tag")
	return ""
}

// TestReloadStaleTags: a mark's tag means a rule of the ruleset that
// wrote it. A flow that a reload keeps because another rule (b) admits
// it gets b's tag, so that a later reload that removes b cuts it, even
// where a new rule (c) drew the tag of the rule that let it out (a); and
// a check skipped (a later ruleset went in first) leaves the tags of the
// rulesets before it in play: the next check does not read them as the
// skipped ruleset's.
func TestReloadStaleTags(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	fw := tp.firewall(t, Config{})
	cfg := fw.cfg
	const (
		a = "  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}\n"
		b = "  - {name: b, to: [198.18.2.0/24], ports: [9000/udp]}\n"
	)
	r0, err := Render(cfg, enforceRules(t, a))
	if err != nil {
		t.Fatal(err)
	}
	ta := r0.flows[0].tag
	// c has a's tag, beside b, and lets nothing of the flows out.
	c := tagTwin(t, cfg, b, ta, ruleC)

	if err := fw.Install(enforceRules(t, a)); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{"f": dialFlow(t, tp, "udp", "198.18.2.2:9000")}
	checkFlows(t, "installed", flows)
	if err := fw.Replace(enforceRules(t, b, c)); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "a replaced by b and c", flows)
	if err := fw.Replace(enforceRules(t, c)); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "b removed, c unchanged", flows, "f")

	// A skipped check: a's flow, then c goes in without a look at the
	// flows (as when a later ruleset went in before it), then c again.
	c2 := tagTwin(t, cfg, "", ta, ruleC)
	if err := fw.Replace(enforceRules(t, a)); err != nil {
		t.Fatal(err)
	}
	flows["g"] = dialFlow(t, tp, "udp", "198.18.2.2:9000")
	checkFlows(t, "a again", flows)
	if _, _, _, err := fw.swapIn(enforceRules(t, c2), "replace", nil); err != nil {
		t.Fatal(err)
	}
	if err := fw.Replace(enforceRules(t, c2)); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "a replaced by c, its check skipped", flows, "g")
}

// TestReloadCutsBeforeRemarking: a reload's look at the flows cuts the
// ones the new ruleset denies before it re-marks the ones it keeps under
// another rule. The cuts are what the policy asks for; the re-marks are
// bookkeeping, and the look's time budget (10 s) must not go to them
// while denied flows still flow. Rule a's flow is kept by b (re-marked
// with b's tag), rule d's flow is cut: when the cut's event arrives, a's
// flow must still carry a's tag.
func TestReloadCutsBeforeRemarking(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9001")
	const (
		a = "  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}\n"
		b = "  - {name: b, to: [198.18.2.0/24], ports: [9000/udp]}\n"
		d = "  - {name: d, to: [198.18.2.3/32], ports: [9001/udp]}\n"
	)
	var mu sync.Mutex
	var marksAtCut []uint32 // the marks of a's flow when each cut is reported
	var cuts int
	sink := audit.SinkFunc(func(ev audit.Event) {
		ct, err := netutil.OpenConntrackTable(tp.nsPath)
		if err != nil {
			t.Error(err)
			return
		}
		defer ct.Close()
		var marks []uint32
		err = ct.Marked(CTMarkEnforced, CTMarkEnforced, func(e netutil.ConntrackEntry) {
			if e.Orig.Dst.Addr() == netip.MustParseAddr("198.18.2.2") {
				marks = append(marks, e.Mark)
			}
		})
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		cuts++
		marksAtCut = append(marksAtCut, marks...)
		mu.Unlock()
	})
	fw := tp.firewallWith(t, Config{}, Deps{Logger: slog.New(slog.DiscardHandler), Sink: sink})
	if err := fw.Install(enforceRules(t, a, d)); err != nil {
		t.Fatal(err)
	}
	var ta uint32
	for _, fr := range fw.Ruleset().flows {
		if fr.name == "a" {
			ta = fr.tag
		}
	}
	flows := map[string]*flow{"a": dialFlow(t, tp, "udp", "198.18.2.2:9000"), "d": dialFlow(t, tp, "udp", "198.18.2.3:9001")}
	checkFlows(t, "installed", flows)
	if err := fw.Replace(enforceRules(t, b)); err != nil {
		t.Fatal(err)
	}
	checkFlows(t, "a and d replaced by b", flows, "d")
	mu.Lock()
	defer mu.Unlock()
	if cuts != 1 || len(marksAtCut) != 1 {
		t.Fatalf("%d cuts reported, a's flow seen %d times at them; want 1, 1", cuts, len(marksAtCut))
	}
	if got := marksAtCut[0] & CTMarkTag >> ctTagShift; got != ta {
		t.Errorf("when d's flow was cut, a's flow had tag %d, not a's %d: it was re-marked first", got, ta)
	}
}

// TestRestartStaleTags: egressd stopped, its policy edited while it was
// down (rule a removed, rule c added), and started again: the flow rule
// a let out must be cut, even where c drew a's tag. The ruleset stays in
// the kernel while egressd is down, and so do the marks of the flows it
// let out; the new process is told the policy before (Deps.Previous,
// egressd run: the state directory's copy). A start that read every tag
// as the rule of its own ruleset that has it kept a's flow as c's, a
// flow no rule allows, until it ended. b's flow, of an unchanged rule, is
// kept. Without Deps.Previous (no copy) that is still what a start does.
func TestRestartStaleTags(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	fw := tp.firewall(t, Config{})
	cfg := fw.cfg
	const (
		a = "  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}\n"
		b = "  - {name: b, to: [198.18.2.3/32], ports: [9000/udp]}\n"
	)
	r0, err := Render(cfg, enforceRules(t, a, b))
	if err != nil {
		t.Fatal(err)
	}
	// c has a's tag, beside b, and lets nothing of a's flow out.
	c := tagTwin(t, cfg, b, r0.flows[0].tag, ruleC)
	before := enforceRules(t, a, b)
	if err := fw.Install(before); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{"a": dialFlow(t, tp, "udp", "198.18.2.2:9000"), "b": dialFlow(t, tp, "udp", "198.18.2.3:9000")}
	checkFlows(t, "installed", flows)
	if err := fw.Detach(); err != nil {
		t.Fatal(err)
	}
	fw2 := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Previous: before})
	if err := fw2.Install(enforceRules(t, b, c)); err != nil {
		t.Fatal(err)
	}
	if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 1 || kept != 1 {
		t.Errorf("restart without a, c with a's tag: %v cut, %v kept, want 1 and 1", cut, kept)
	}
	checkFlows(t, "restart without a, c with a's tag", flows, "a")
}
