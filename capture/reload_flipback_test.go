package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestRedecideEnforceDropBackToAudit: without --tcp-ports every TCP port
// is the proxy's in enforce mode, so a TCP connection capture decided by
// its SNI in audit mode and live at a reload to enforce is dropped by the
// forward chain (opened-before-enforce, enforced, policy-revoked). A
// reload back to audit mode leaves that record as it is: the connection
// was dropped while enforce mode was on, and its later packets (which the
// audit ruleset lets through again) are the same flow, still that drop,
// not a new flow nor an allow. A connection opened after the switch back
// is judged in audit mode: one no rule allows is a would-be drop, not
// enforced; one the rule allows is allowed.
func TestRedecideEnforceDropBackToAudit(t *testing.T) {
	vpn := netip.MustParseAddr("203.0.113.60")
	const vpnRule = `  - name: vpn
    to: [vpn.test]
    ports: [443/tcp]
`
	conns := []reloadTCP{
		{47801, vpn, 443, handHello(sniExt("vpn.test"))},
		{47802, vpn, 443, handHello(sniExt("vpn.test"))},
		{47803, vpn, 443, handHello(sniExt("nope.test"))},
	}
	from := []int{0, 70, 70} // second each connection opens
	rec, r := reloadRunSteps(t, Config{}, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule), factsMap{vpn: {"vpn.test", "nope.test"}},
		keepTCPFrom(conns, from, func(c *tcpConn) {
			c.send(false, []byte("reply"), 1400, nil, nil)
			c.send(true, []byte("ack"), 1400, nil, nil)
		}),
		reloadStep{30 * time.Second, redecideTo(t, policy.ModeEnforce, vpnRule)},
		reloadStep{60 * time.Second, redecideTo(t, policy.ModeAudit, vpnRule)})
	wantFlowEvents(t, rec, map[uint16][]string{
		47801: {"capture deny opened-before-enforce enforce enforced=true policy-revoked", "capture deny opened-before-enforce enforce enforced=true policy-revoked"},
		47802: {"capture allow allowed audit enforced=false end-of-capture"},
		47803: {"capture deny no-rule audit enforced=false end-of-capture"},
	})
	if d := droppedAt(r, "vpn.test", 443); d == nil || d.Flows != 1 || d.EnforcedFlows != 1 {
		t.Errorf("report: drop of vpn.test %+v, want the connection dropped while enforce mode was on, enforced", d)
	}
	if d := droppedAt(r, "nope.test", 443); d == nil || d.Flows != 1 || d.EnforcedFlows != 0 {
		t.Errorf("report: drop of nope.test %+v, want the connection opened after the switch back, not enforced", d)
	}
	if n := ruleFlows(r, "vpn"); n != 1 || r.Totals.Flows != 3 {
		t.Errorf("report: rule vpn %d flow(s), totals %+v; want 1 (the connection after the switch back), 3 flows", n, r.Totals)
	}
}

// TestRedecideForwardedDropBackToAudit: with --tcp-ports, TCP to a port
// not given to the proxy is forwarded by nftables and judged by capture by
// address. Opened in audit mode (allowed: the forwarder gave its address
// out for a rule's name) and live at a reload to enforce whose policy no
// longer has the rule, it is dropped (no-rule, enforced, policy-revoked);
// the reload back to audit mode, with the rule again, leaves that record:
// it was dropped while enforce mode was on, and is not credited to the
// rule afterwards (audit.Ledger's recredited keeps a deny enforced). A
// connection opened after the switch back is judged in audit mode: to
// the rule's address allowed, to another a would-be drop, not enforced.
func TestRedecideForwardedDropBackToAudit(t *testing.T) {
	vpn := netip.MustParseAddr("203.0.113.62")
	other := netip.MustParseAddr("203.0.113.63")
	const vpnRule = `  - name: vpn
    to: [vpn.test]
    ports: [8443/tcp]
`
	conns := []reloadTCP{
		{47811, vpn, 8443, nil},
		{47812, vpn, 8443, nil},
		{47813, other, 8443, nil},
	}
	from := []int{0, 70, 70}
	cfg := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
	rec, r := reloadRunSteps(t, cfg, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule), factsMap{vpn: {"vpn.test"}},
		keepTCPFrom(conns, from, func(c *tcpConn) {
			c.send(true, []byte("ping"), 1400, nil, nil)
			c.send(false, []byte("pong"), 1400, nil, nil)
		}),
		reloadStep{30 * time.Second, redecideTo(t, policy.ModeEnforce, "")},
		reloadStep{60 * time.Second, redecideTo(t, policy.ModeAudit, vpnRule)})
	wantFlowEvents(t, rec, map[uint16][]string{
		47811: {"capture deny no-rule enforce enforced=true policy-revoked", "capture deny no-rule enforce enforced=true policy-revoked"},
		47812: {"capture allow allowed audit enforced=false end-of-capture"},
		47813: {"capture deny no-rule audit enforced=false end-of-capture"},
	})
	if d := droppedAt(r, "vpn.test", 8443); d == nil || d.Flows != 1 || d.EnforcedFlows != 1 {
		t.Errorf("report: drop of vpn.test %+v, want the connection dropped while enforce mode was on, enforced", d)
	}
	if d := droppedAt(r, other.String(), 8443); d == nil || d.Flows != 1 || d.EnforcedFlows != 0 {
		t.Errorf("report: drop of %s %+v, want the connection opened after the switch back, not enforced", other, d)
	}
	if n := ruleFlows(r, "vpn"); n != 1 || r.Totals.Flows != 3 {
		t.Errorf("report: rule vpn %d flow(s), totals %+v; want 1 (the connection after the switch back), 3 flows", n, r.Totals)
	}
}
