package capture

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestRedecideQUICOtherNames: a reload in audit mode judges an open QUIC
// flow whose hellos named several hosts (Name and OtherNames) as enforce
// mode would judge it now: by its address, or the name DNS gave the
// address out for, whatever its hellos named. Where the address is still
// allowed so, the flow stays allowed whatever rule is gone: the forward
// chain keeps it (47600). Where it is not (the rule of the name DNS gave
// it out for is gone), it is a would-be deny recorded under that name,
// its hellos' other names in OtherNames (47601), and so is a flow to the
// same address whose hello named the first name alone (47602; before
// session 31 (Q4) it stayed allowed by its hello's name:
// TestRedecideQUICLearnedName). A flow let out by the rule of its first
// name (its address given out for it) stays allowed where that rule still
// allows the name but the answer is gone (expired at the reload) and its
// second name's rule is removed: the firewall keeps it, the rule of its
// mark unchanged (47603; before session 30 (R27) it became a would-be
// deny under its second name). Before session 30 only the first hello's
// name was judged: the flow whose second name's rule was removed stayed
// allowed.
func TestRedecideQUICOtherNames(t *testing.T) {
	rules := udpRule("a") + "%s"
	ruleB := udpRule("b")
	learnedA := netip.MustParseAddr("203.0.113.60") // DNS gave it out for a.allowed.test
	learnedB := netip.MustParseAddr("203.0.113.61") // and this for b.allowed.test
	expiring := netip.MustParseAddr("203.0.113.62") // for a.allowed.test, expired at the reload
	cli := netip.MustParseAddr("192.0.2.95")
	helloA := handHello(sniExt(decoyName))[5:]
	helloB := handHello(sniExt("b.allowed.test"))[5:]
	d1, d2 := []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9}
	flows := []struct {
		cport  uint16
		srv    netip.Addr
		hellos [][]byte
	}{
		{47600, learnedA, [][]byte{helloA, helloB}},
		{47601, learnedB, [][]byte{helloA, helloB}},
		{47602, learnedB, [][]byte{helloA}},
		{47603, expiring, [][]byte{helloA, helloB}},
	}
	each := func(p *pcapWriter, s int) {
		for _, f := range flows {
			if s == 0 {
				for i, h := range f.hellos {
					p.udp(true, cli, f.srv, f.cport, 443, clientInitialV(t, quicV1, [][]byte{d1, d2}[i], nil, 0, 0, h))
				}
			}
			// 1-RTT packets both ways keep the flow open.
			p.udp(true, cli, f.srv, f.cport, 443, append([]byte{0x40}, make([]byte, 40)...))
			p.udp(false, f.srv, cli, 443, f.cport, append([]byte{0x40}, make([]byte, 40)...))
		}
	}
	facts := factsMap{learnedA: {decoyName}, learnedB: {"b.allowed.test"}, expiring: {decoyName}}
	reload := redecideTo(t, policy.ModeAudit, fmt.Sprintf(rules, ""))
	rec, r := reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, fmt.Sprintf(rules, ruleB)), facts, 40*time.Second,
		each, func(c *Capture, store *policy.Store) {
			delete(facts, expiring)
			reload(c, store)
		})
	type want struct {
		verdict policy.Verdict
		name    string
		others  []string
	}
	wants := map[uint16]want{
		47600: {policy.Allow, decoyName, []string{"b.allowed.test"}},
		47601: {policy.Deny, "b.allowed.test", []string{decoyName}},
		47602: {policy.Deny, "b.allowed.test", []string{decoyName}},
		47603: {policy.Allow, decoyName, []string{"b.allowed.test"}},
	}
	for _, f := range flows {
		var last audit.Event
		for _, ev := range rec.all() {
			if ev.Kind == audit.KindFlow && ev.ClientPort == f.cport {
				last = ev
			}
		}
		w := wants[f.cport]
		if last.Verdict != w.verdict || last.Name != w.name || !slices.Equal(last.OtherNames, w.others) {
			t.Errorf("port %d: last event %s %s %q others %q; want %s %q others %q (events %q)",
				f.cport, last.Verdict, last.Reason, last.Name, last.OtherNames, w.verdict, w.name, w.others, flowEvents(rec, f.cport))
		}
	}
	if d := droppedAt(r, "b.allowed.test", 443); d == nil || d.Flows != 2 {
		t.Errorf("report: drop of b.allowed.test %+v, want the two flows the reload no longer allows", d)
	}
}

// udpRule is a rule named n that opens n.allowed.test on 443/udp, for
// ntpPolicy.
func udpRule(n string) string {
	return fmt.Sprintf("  - name: %s\n    to: [%s.allowed.test]\n    ports: [443/udp]\n", n, n)
}

// TestRedecideQUICLearnedName: a reload in audit mode judges an open QUIC
// flow as enforce mode would: the forward chain reads no hello, so the
// flow is kept while its address is allowed (a CIDR rule, a live learned
// address) or a rule still allows the name DNS gave the address out for
// (the firewall keeps the flow of its mark's rule, unchanged, however long
// ago the answer expired), whatever names its hellos carried.
//
//   - removed: the address was learned for b.allowed.test, the flow's
//     hellos named a.allowed.test and c.allowed.test (both allowed by
//     their own rules); the reload removes b's rule. Enforce cuts the flow
//     (its mark's rule is gone, no learned set or CIDR admits the
//     address): a would-be deny, recorded under b.allowed.test (the name
//     the address was learned for, so the report lists that drop), the
//     hellos' names in other_names. Before session 31 (Q4) it stayed
//     allowed: the first hello's name, still allowed, was judged instead.
//   - added: the address was learned for b.allowed.test and the flow's
//     hello named a host no rule allows (the chain goes by address); the
//     reload only adds a rule, the answer expired at it. Enforce keeps the
//     flow (its mark's rule unchanged): allowed still. Before session 31
//     (Q4) the first hello's name was judged: a reload that only adds a
//     rule made the flow a would-be deny.
func TestRedecideQUICLearnedName(t *testing.T) {
	ruleA, ruleB, ruleC, ruleD := udpRule("a"), udpRule("b"), udpRule("c"), udpRule("d")
	learnedB := netip.MustParseAddr("203.0.113.70") // DNS gave it out for b.allowed.test
	cli := netip.MustParseAddr("192.0.2.95")
	const cport = 47610
	hello := func(name string) []byte { return handHello(sniExt(name))[5:] }
	dcids := [][]byte{{1, 2, 3, 4, 5, 6, 7, 8}, {9, 9, 9, 9}}
	flow := func(hellos ...[]byte) func(p *pcapWriter, s int) {
		return func(p *pcapWriter, s int) {
			if s == 0 {
				for i, h := range hellos {
					p.udp(true, cli, learnedB, cport, 443, clientInitialV(t, quicV1, dcids[i], nil, 0, 0, h))
				}
			}
			// 1-RTT packets both ways keep the flow open.
			p.udp(true, cli, learnedB, cport, 443, append([]byte{0x40}, make([]byte, 40)...))
			p.udp(false, learnedB, cli, 443, cport, append([]byte{0x40}, make([]byte, 40)...))
		}
	}
	// The flow's first event comes after the reload (a minute open, or
	// the reload's): its last is what the reload made of it.
	last := func(rec *recorder) audit.Event { return lastFlowEvent(rec, cport) }

	t.Run("removed", func(t *testing.T) {
		facts := factsMap{learnedB: {"b.allowed.test"}}
		rec, r := reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, ruleA+ruleB+ruleC), facts, 40*time.Second,
			flow(hello(decoyName), hello("c.allowed.test")), redecideTo(t, policy.ModeAudit, ruleA+ruleC))
		ev := last(rec)
		if ev.Verdict != policy.Deny || ev.Name != "b.allowed.test" || !slices.Equal(ev.OtherNames, []string{decoyName, "c.allowed.test"}) {
			t.Errorf("last event %s %s %q (%s) others %q; want a would-be deny under b.allowed.test, others a and c (events %q)",
				ev.Verdict, ev.Reason, ev.Name, ev.NameSource, ev.OtherNames, flowEvents(rec, cport))
		}
		if d := droppedAt(r, "b.allowed.test", 443); d == nil || d.Flows != 1 {
			t.Errorf("report: drop of b.allowed.test %+v, want the flow enforce would cut", d)
		}
	})

	t.Run("added", func(t *testing.T) {
		facts := factsMap{learnedB: {"b.allowed.test"}}
		reload := redecideTo(t, policy.ModeAudit, ruleA+ruleB+ruleD)
		rec, _ := reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, ruleA+ruleB), facts, 40*time.Second,
			flow(hello("x.unlisted.test")), func(c *Capture, store *policy.Store) {
				delete(facts, learnedB) // the answer expired
				reload(c, store)
			})
		ev := last(rec)
		if ev.Verdict != policy.Allow || ev.Rule != "b" || ev.Name != "x.unlisted.test" {
			t.Errorf("last event %s %s rule %q name %q; want allowed by rule b still, under its hello's name (events %q)",
				ev.Verdict, ev.Reason, ev.Rule, ev.Name, flowEvents(rec, cport))
		}
	})
}
