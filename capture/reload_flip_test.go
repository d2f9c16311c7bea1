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
	cli := netip.MustParseAddr("192.0.2.95")
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
	conns := []struct {
		port uint16
		dst  netip.Addr
		sni  string
	}{
		{47601, vpn, "vpn.test"},
		{47602, other, "other.test"},
	}
	tcs := make([]*tcpConn, len(conns))
	cfg := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
	rec, r := reloadRunSteps(t, cfg, fmt.Sprintf(ntpPolicy, policy.ModeAudit, vpnRule), facts, func(p *pcapWriter, s int) {
		for i, c := range conns {
			if s == 0 {
				tcs[i] = &tcpConn{p: p, cli: cli, srv: c.dst, cport: c.port, sport: 443, cseq: 1, sseq: 1}
				tcs[i].handshake()
				tcs[i].send(true, handHello(sniExt(c.sni)), 1400, nil, nil)
			}
			tcs[i].send(false, []byte("reply"), 1400, nil, nil)
			tcs[i].send(true, []byte("ack"), 1400, nil, nil)
		}
	}, reloadStep{30 * time.Second, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, vpnRule+otherRule)))
		c.Redecide()
	}}, reloadStep{60 * time.Second, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, cdnRule)))
		c.Redecide()
	}})
	for port, want := range map[uint16][]string{
		47601: {"capture deny no-rule audit enforced=false ", "capture deny no-rule audit enforced=false end-of-capture"},
		47602: {"capture allow allowed enforce enforced=false ", "capture deny no-rule audit enforced=false ", "capture deny no-rule audit enforced=false end-of-capture"},
	} {
		if got := flowEvents(rec, port); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("port %d: events\n got %q\nwant %q", port, got, want)
		}
	}
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
