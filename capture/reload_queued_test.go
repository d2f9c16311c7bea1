package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestRedecideQueuedReloads: two reloads in audit mode queued before the
// capture applies either (A→B→C in quick succession, the answer expired)
// are judged as the firewall's sweep judges them in enforce mode, each
// against the policy it replaced and the one it put in (A→B, then B→C),
// not both against the policy the store holds when they are applied
// (A→C, then B→C). Flow let out by rule b's learned set:
//
//   - b drops c.allowed.test (A→B), then takes it back (B→C): the sweep
//     cut the flow at B (a name dropped): a would-be deny. Before session
//     31 (R35) the first reload compared A's b with C's, equal: kept.
//   - b removed (A→B), then restored (B→C): the sweep cut it at B (no
//     rule of its name, no live answer): a would-be deny. Before session
//     31 (R35) the first reload found b in C: kept.
//   - b gains a port (A→B), then a name (B→C): kept all along.
func TestRedecideQueuedReloads(t *testing.T) {
	ruleB := udpRule("b")
	ruleBWideC := "  - name: b\n    to: [b.allowed.test, c.allowed.test]\n    ports: [443/udp, 8443/udp]\n"
	srv := netip.MustParseAddr("203.0.113.80")
	cli := netip.MustParseAddr("192.0.2.95")
	const cport = 47621
	each := func(p *pcapWriter, s int) {
		p.udp(true, cli, srv, cport, 443, append([]byte{0x40}, make([]byte, 40)...))
		p.udp(false, srv, cli, 443, cport, append([]byte{0x40}, make([]byte, 40)...))
	}
	for _, tc := range []struct {
		name    string
		a, b, c string
		verdict policy.Verdict
	}{
		{"name-dropped-then-restored", ruleBC, ruleB, ruleBC, policy.Deny},
		{"rule-removed-then-restored", ruleB + ruleB2, ruleB2, ruleB + ruleB2, policy.Deny},
		{"port-then-name-added", ruleB, ruleBWide, ruleBWideC, policy.Allow},
	} {
		t.Run(tc.name, func(t *testing.T) {
			facts := factsMap{srv: []string{"b.allowed.test"}}
			toB := redecideTo(t, policy.ModeAudit, tc.b)
			toC := redecideTo(t, policy.ModeAudit, tc.c)
			// Both at the same packet: queued together, applied together.
			rec, _ := reloadRunSteps(t, Config{}, fmt.Sprintf(ntpPolicy, policy.ModeAudit, tc.a), facts, each,
				reloadStep{80 * time.Second, func(c *Capture, store *policy.Store) {
					delete(facts, srv)
					toB(c, store)
				}},
				reloadStep{80 * time.Second, toC})
			ev := lastFlowEvent(rec, cport)
			if ev.Verdict != tc.verdict {
				t.Errorf("last event %s %s rule %q name %q; want %s (events %q)",
					ev.Verdict, ev.Reason, ev.Rule, ev.Name, tc.verdict, flowEvents(rec, cport))
			}
		})
	}
}
