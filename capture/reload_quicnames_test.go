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
// flow again on every name its hellos carried (Name and OtherNames), as
// enforce mode would judge it now: by its address. A QUIC flow is allowed
// by its address (DNS gave it out for a name a rule allows). Where the
// address is still allowed so, the flow stays allowed whatever rule is
// gone: the forward chain keeps it (47600). Where it is not (the rule of
// the name DNS gave it out for is gone), the names the flow carried keep
// it allowed only if the new policy allows each of them: one of the
// flow's names that no rule allows now makes it a would-be deny,
// recorded under that name (47601). A flow to the same address whose
// hello named the first name alone is a would-be deny too, recorded under
// the name its address was learned for, its hello's name in other_names:
// enforce cuts it (its mark's rule is gone), whatever its hello named
// (47602; before session 31 (Q4) it stayed allowed by its hello's name:
// TestRedecideQUICLearnedName). A flow let out by the rule of its first name (its address
// given out for it) stays allowed where that rule still allows the name
// but the answer is gone (expired at the reload) and its second name's
// rule is removed: the firewall keeps it, the rule of its mark unchanged
// (47603; before session 30 (R27) it became a would-be deny under its
// second name). Before session 30 only the first hello's name was judged: the
// flow whose second name's rule was removed stayed allowed.
func TestRedecideQUICOtherNames(t *testing.T) {
	const rules = `  - name: a
    to: [a.allowed.test]
    ports: [443/udp]
%s`
	const ruleB = `  - name: b
    to: [b.allowed.test]
    ports: [443/udp]
`
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
