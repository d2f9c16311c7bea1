package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// Rules b and b2 of the learned-flow reload tests: b2 opens b's name
// too; b widened by a port, by a name.
const (
	ruleB2    = "  - name: b2\n    to: [b.allowed.test]\n    ports: [443/udp]\n"
	ruleBWide = "  - name: b\n    to: [b.allowed.test]\n    ports: [443/udp, 8443/udp]\n"
	ruleBC    = "  - name: b\n    to: [b.allowed.test, c.allowed.test]\n    ports: [443/udp]\n"
)

// TestRedecideLearnedRuleRemoved: a reload in audit mode keeps a
// forwarded flow let out by a learned address as the firewall's sweep
// does in enforce mode (firewall/sweep.go, keeps): its mark's rule
// unchanged (or the rule of that name, its names kept: a port added),
// however long ago the answer expired; else only by a CIDR rule or a
// learned set live now. Two rules b and b2 open b.allowed.test; the flow
// was let out by b (the lowest); the reload removes b:
//
//   - the answer (the forwarder's, or one seen on the wire) expired
//     before the reload: b2's learned set no longer holds the address,
//     the sweep cuts the flow: a would-be deny. Before session 31 (R31)
//     it stayed allowed, by b2 allowing the learned name, or by the
//     answer live when the flow began.
//   - the answer is live: b2's set holds the address: allowed, by b2,
//     whose tag the sweep gives the mark; a second reload (adding a rule)
//     once the answer expired keeps it so (b2 unchanged). Before session
//     31 (R31) that second reload looked for b's rule alone.
//   - the reload only adds a port to b, the answer expired: the sweep
//     keeps the flow by the rule of the same name whose names it kept.
//   - the reload takes c.allowed.test from b (b named b and c), the
//     answer expired: b is changed and keeps not all its old names, the
//     sweep cuts the flow: a would-be deny; where it only adds a name,
//     kept. Before session 31 (Q5) capture, which knew no former rule's
//     content, kept it while b still allowed the learned name.
//   - the flow's address is in a CIDR rule ranked after b, whose learned
//     set admitted it too: the chain's first accept, b's, marked it. The
//     reload removes the CIDR rule, the answer expired: the sweep keeps
//     the flow by b, unchanged. Before session 31 (Q5) capture, which
//     recorded the CIDR rule, made it a would-be deny.
func TestRedecideLearnedRuleRemoved(t *testing.T) {
	ruleB := udpRule("b")
	ruleBCD := "  - name: b\n    to: [b.allowed.test, c.allowed.test, d.allowed.test]\n    ports: [443/udp]\n"
	ruleNet := "  - name: net\n    to: [203.0.113.0/24]\n    ports: [443/udp]\n"
	srv := netip.MustParseAddr("203.0.113.80")
	cli := netip.MustParseAddr("192.0.2.95")
	resolver := netip.MustParseAddr("192.0.2.53")
	const cport = 47620
	flow := func(wire bool) func(p *pcapWriter, s int) {
		return func(p *pcapWriter, s int) {
			if s == 0 && wire {
				p.udp(false, resolver, cli, 53, 40198, dnsResponseTTL(t, "b.allowed.test", []netip.Addr{srv}, 10))
			}
			p.udp(true, cli, srv, cport, 443, append([]byte{0x40}, make([]byte, 40)...))
			p.udp(false, srv, cli, 443, cport, append([]byte{0x40}, make([]byte, 40)...))
		}
	}
	for _, tc := range []struct {
		name    string
		base    string // the rules before the reload; ruleB+ruleB2 when empty
		wire    bool   // the answer seen on the wire (TTL 10 s), not the forwarder's
		expire  bool   // the forwarder's answer expired at the reload
		rules   string
		then    string // a second reload's rules, once the answer expired
		verdict policy.Verdict
		rule    string
	}{
		{"forwarder-expired", "", false, true, ruleB2, "", policy.Deny, ""},
		{"wire-expired", "", true, false, ruleB2, "", policy.Deny, ""},
		{"forwarder-live", "", false, false, ruleB2, "", policy.Allow, ""},
		{"forwarder-live-then-expired", "", false, false, ruleB2, ruleB2 + udpRule("a"), policy.Allow, ""},
		{"port-added", "", false, true, ruleBWide, "", policy.Allow, "b"},
		{"name-dropped", ruleBC, false, true, ruleB, "", policy.Deny, ""},
		{"name-added", ruleBC, false, true, ruleBCD, "", policy.Allow, ""},
		{"cidr-after-learned-removed", ruleB + ruleNet, false, true, ruleB, "", policy.Allow, ""},
		{"cidr-after-learned-removed-then-b-narrowed", ruleBC + ruleNet, false, true, ruleBC, ruleB, policy.Deny, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			facts := factsMap{}
			if !tc.wire {
				facts[srv] = []string{"b.allowed.test"}
			}
			reload := redecideTo(t, policy.ModeAudit, tc.rules)
			steps := []reloadStep{{80 * time.Second, func(c *Capture, store *policy.Store) {
				if tc.expire {
					delete(facts, srv)
				}
				reload(c, store)
			}}}
			if tc.then != "" {
				steps[0].after = 40 * time.Second
				then := redecideTo(t, policy.ModeAudit, tc.then)
				steps = append(steps, reloadStep{80 * time.Second, func(c *Capture, store *policy.Store) {
					delete(facts, srv)
					then(c, store)
				}})
			}
			base := tc.base
			if base == "" {
				base = ruleB + ruleB2
			}
			rec, _ := reloadRunSteps(t, Config{}, fmt.Sprintf(ntpPolicy, policy.ModeAudit, base), facts, flow(tc.wire), steps...)
			ev := lastFlowEvent(rec, cport)
			if ev.Verdict != tc.verdict || (tc.rule != "" && ev.Rule != tc.rule) {
				t.Errorf("last event %s %s rule %q name %q; want %s rule %q (events %q)",
					ev.Verdict, ev.Reason, ev.Rule, ev.Name, tc.verdict, tc.rule, flowEvents(rec, cport))
			}
		})
	}
}
