package capture

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestRedecideAuditNamed: a reload in audit mode judges again the open
// TCP connections capture decided by name (SNI, Host) or, without one, by
// address and the names DNS gave it out for, on the facts it kept: a
// would-be deny the new policy allows (the rule --suggest proposed,
// added) is credited to the rule at once, an allow it no longer gives
// becomes a would-be deny. A connection capture denied for what the
// client sent (duplicate-sni) stays denied whatever the rules, and one
// whose path was clipped is judged on the start kept, which the new
// host/path rule's "/api/*" decides (TestRedecideAuditClippedPath; until
// session 27 it kept its record, a would-be deny). Before, none of them was judged again: the long-lived
// TLS connection stayed among what enforce would drop after the rule
// was added.
func TestRedecideAuditNamed(t *testing.T) {
	vpn := netip.MustParseAddr("203.0.113.50")
	keep := netip.MustParseAddr("203.0.113.51")
	learned := netip.MustParseAddr("203.0.113.52")
	const keepRule = `  - name: keep
    to: [keep.test]
    ports: [443/tcp]
`
	const added = `  - name: vpn
    to: [vpn.test]
    ports: [443/tcp]
  - name: learned
    to: [learned.test]
    ports: [443/tcp]
  - name: vpnpath
    to: ["vpn.test/api/*"]
    ports: [80/tcp]
`
	facts := factsMap{vpn: {"vpn.test"}, keep: {"keep.test"}, learned: {"learned.test"}}
	longPath := "/api/" + strings.Repeat("a", audit.MaxPathBytes+100)
	conns := []reloadTCP{
		{47501, vpn, 443, handHello(sniExt("vpn.test"))},
		{47502, keep, 443, handHello(sniExt("keep.test"))},
		{47503, learned, 443, handHello()},
		{47504, vpn, 443, handHello(sniExt("vpn.test", "other.test"))},
		{47505, vpn, 80, []byte("GET " + longPath + " HTTP/1.1\r\nHost: vpn.test\r\n\r\n")},
	}
	// The connections live on: the server's bytes every 10 s.
	rec, r := reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, keepRule), facts, 80*time.Second,
		keepTCP(conns, "reply", ""), redecideTo(t, policy.ModeAudit, added))
	wantFlowEvents(t, rec, map[uint16][]string{
		47501: {"capture deny no-rule audit enforced=false ", "capture allow allowed audit enforced=false ", "capture allow allowed audit enforced=false end-of-capture"},
		47502: {"capture allow allowed audit enforced=false ", "capture deny no-rule audit enforced=false ", "capture deny no-rule audit enforced=false end-of-capture"},
		47503: {"capture deny no-rule audit enforced=false ", "capture allow allowed audit enforced=false ", "capture allow allowed audit enforced=false end-of-capture"},
		47504: {"capture deny duplicate-sni audit enforced=false ", "capture deny duplicate-sni audit enforced=false end-of-capture"},
		47505: {"capture deny no-rule audit enforced=false ", "capture allow allowed audit enforced=false ", "capture allow allowed audit enforced=false end-of-capture"},
	})
	for _, ev := range rec.all() {
		if ev.ClientPort == 47503 && ev.Verdict == policy.Allow && (ev.Name != "learned.test" || ev.NameSource != audit.NameDNSLearned) {
			t.Errorf("no-SNI flow credited with name %q (%s), want learned.test (dns-learned)", ev.Name, ev.NameSource)
		}
	}
	if d := droppedAt(r, "keep.test", 443); d == nil || d.Flows != 1 {
		t.Errorf("report: drop of keep.test %+v, want the flow the reload no longer allows", d)
	}
	if d := droppedAt(r, "learned.test", 443); d != nil && d.Flows != 0 {
		t.Errorf("report: drop of the no-SNI flow %+v, want none: the reload allows it", d)
	}
	if r.Totals.Flows != 5 || r.Totals.Dropped != 2 {
		t.Errorf("report: totals %+v, want 5 flows, 2 dropped (keep, duplicate-sni)", r.Totals)
	}
	if n, m, c := ruleFlows(r, "vpn"), ruleFlows(r, "learned"), ruleFlows(r, "vpnpath"); n != 1 || m != 1 || c != 1 {
		t.Errorf("report: rule vpn %d flow(s), learned %d, vpnpath %d; want 1 each", n, m, c)
	}
}
