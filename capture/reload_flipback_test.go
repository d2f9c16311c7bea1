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
	cli := netip.MustParseAddr("192.0.2.95")
	vpn := netip.MustParseAddr("203.0.113.60")
	const vpnRule = `  - name: vpn
    to: [vpn.test]
    ports: [443/tcp]
`
	conns := []struct {
		port uint16
		sni  string
		from int // second the connection opens
	}{
		{47801, "vpn.test", 0},
		{47802, "vpn.test", 70},
		{47803, "nope.test", 70},
	}
	tcs := make([]*tcpConn, len(conns))
	rec, r := reloadRunSteps(t, Config{}, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule), factsMap{vpn: {"vpn.test", "nope.test"}}, func(p *pcapWriter, s int) {
		for i, c := range conns {
			switch {
			case s < c.from:
				continue
			case s == c.from:
				tcs[i] = &tcpConn{p: p, cli: cli, srv: vpn, cport: c.port, sport: 443, cseq: 1, sseq: 1}
				tcs[i].handshake()
				tcs[i].send(true, handHello(sniExt(c.sni)), 1400, nil, nil)
			}
			tcs[i].send(false, []byte("reply"), 1400, nil, nil)
			tcs[i].send(true, []byte("ack"), 1400, nil, nil)
		}
	}, reloadStep{30 * time.Second, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, vpnRule)))
		c.Redecide()
	}}, reloadStep{60 * time.Second, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule)))
		c.Redecide()
	}})
	for port, want := range map[uint16][]string{
		47801: {"capture deny opened-before-enforce enforce enforced=true policy-revoked", "capture deny opened-before-enforce enforce enforced=true policy-revoked"},
		47802: {"capture allow allowed audit enforced=false end-of-capture"},
		47803: {"capture deny no-rule audit enforced=false end-of-capture"},
	} {
		if got := flowEvents(rec, port); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("port %d: events\n got %q\nwant %q", port, got, want)
		}
	}
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
	cli := netip.MustParseAddr("192.0.2.95")
	vpn := netip.MustParseAddr("203.0.113.62")
	other := netip.MustParseAddr("203.0.113.63")
	const vpnRule = `  - name: vpn
    to: [vpn.test]
    ports: [8443/tcp]
`
	conns := []struct {
		port uint16
		dst  netip.Addr
		from int
	}{
		{47811, vpn, 0},
		{47812, vpn, 70},
		{47813, other, 70},
	}
	tcs := make([]*tcpConn, len(conns))
	cfg := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
	rec, r := reloadRunSteps(t, cfg, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule), factsMap{vpn: {"vpn.test"}}, func(p *pcapWriter, s int) {
		for i, c := range conns {
			switch {
			case s < c.from:
				continue
			case s == c.from:
				tcs[i] = &tcpConn{p: p, cli: cli, srv: c.dst, cport: c.port, sport: 8443, cseq: 1, sseq: 1}
				tcs[i].handshake()
			}
			tcs[i].send(true, []byte("ping"), 1400, nil, nil)
			tcs[i].send(false, []byte("pong"), 1400, nil, nil)
		}
	}, reloadStep{30 * time.Second, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, "")))
		c.Redecide()
	}}, reloadStep{60 * time.Second, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule)))
		c.Redecide()
	}})
	for port, want := range map[uint16][]string{
		47811: {"capture deny no-rule enforce enforced=true policy-revoked", "capture deny no-rule enforce enforced=true policy-revoked"},
		47812: {"capture allow allowed audit enforced=false end-of-capture"},
		47813: {"capture deny no-rule audit enforced=false end-of-capture"},
	} {
		if got := flowEvents(rec, port); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("port %d: events\n got %q\nwant %q", port, got, want)
		}
	}
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
