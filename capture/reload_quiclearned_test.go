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
	const ruleA = `  - name: a
    to: [a.allowed.test]
    ports: [443/udp]
`
	const ruleB = `  - name: b
    to: [b.allowed.test]
    ports: [443/udp]
`
	const ruleC = `  - name: c
    to: [c.allowed.test]
    ports: [443/udp]
`
	const ruleD = `  - name: d
    to: [d.allowed.test]
    ports: [443/udp]
`
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
	last := func(rec *recorder) (last audit.Event) {
		for _, ev := range rec.all() {
			if ev.Kind == audit.KindFlow && ev.ClientPort == cport {
				last = ev
			}
		}
		return last
	}

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
