package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestRedecideAuditEnforceAudit: TCP connections capture decided by name
// in audit mode, judged again at a reload to enforce (the forward chain
// lets them go on: --tcp-ports, the forwarder's answer), then at a reload
// back to audit whose policy no longer allows them: the report after the
// third policy says what that policy would drop. Before, the reload to
// enforce marked them as no longer opened in audit mode, and the reload
// back to audit passed them over: the first stayed under its rule, the
// second under the rule the enforce policy had credited it to.
func TestRedecideAuditEnforceAudit(t *testing.T) {
	vpn := netip.MustParseAddr("203.0.113.60")
	other := netip.MustParseAddr("203.0.113.61")
	const vpnRule = `  - name: vpn
    to: [vpn.test]
    ports: [443/tcp]
`
	const otherRule = `  - name: other
    to: [other.test]
    ports: [443/tcp]
`
	const cdnRule = `  - name: cdn
    to: [cdn.test]
    ports: [443/tcp]
`
	// The forwarder gave vpn's address out for cdn.test too (a CDN):
	// by address the third policy lets it out, by its name (SNI, which
	// the proxy reads in enforce mode) not.
	facts := factsMap{vpn: {"vpn.test", "cdn.test"}, other: {"other.test"}}
	conns := []reloadTCP{
		{47601, vpn, 443, handHello(sniExt("vpn.test"))},
		{47602, other, 443, handHello(sniExt("other.test"))},
	}
	cfg := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
	rec, r := reloadRunSteps(t, cfg, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule), facts, keepTCP(conns, "reply", "ack"),
		reloadStep{30 * time.Second, redecideTo(t, policy.ModeEnforce, vpnRule+otherRule)},
		reloadStep{60 * time.Second, redecideTo(t, policy.ModeAudit, cdnRule)})
	wantFlowEvents(t, rec, map[uint16][]string{
		47601: {"capture deny no-rule audit enforced=false ", "capture deny no-rule audit enforced=false end-of-capture"},
		47602: {"capture allow allowed enforce enforced=false ", "capture deny no-rule audit enforced=false ", "capture deny no-rule audit enforced=false end-of-capture"},
	})
	for _, ev := range rec.all() {
		if ev.ClientPort == 47601 && ev.Verdict == policy.Deny && ev.Name != "vpn.test" {
			t.Errorf("the vpn connection's deny names %q, want its SNI vpn.test", ev.Name)
		}
	}
	for _, name := range []string{"vpn.test", "other.test"} {
		if d := droppedAt(r, name, 443); d == nil || d.Flows != 1 || d.EnforcedFlows != 0 {
			t.Errorf("report: drop of %s %+v, want the open connection the third policy would drop (not enforced)", name, d)
		}
	}
	if r.Totals.Flows != 2 || r.Totals.Allowed != 0 || ruleFlows(r, "cdn")+ruleFlows(r, "vpn")+ruleFlows(r, "other") != 0 {
		t.Errorf("report: totals %+v, rules cdn %d vpn %d other %d; want 2 flows, none allowed", r.Totals, ruleFlows(r, "cdn"), ruleFlows(r, "vpn"), ruleFlows(r, "other"))
	}
}
