package capture

import (
	"fmt"
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestPrivateRelayClassified (THREATS.md B3, B4): a TLS flow whose SNI is
// iCloud Private Relay's ingress, or a plain HTTP request with its Host,
// to an address a CIDR rule allows is reported denied (private-relay), in
// audit mode as in enforce mode, as the proxy refuses it in enforce mode
// (policy's relay.go, which both ask); another name to the same address is
// allowed by the CIDR rule (control).
func TestPrivateRelayClassified(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.60")
	apple := netip.MustParseAddr("198.51.100.17") // the lab rule's CIDR stands in for 17.0.0.0/8
	cases := []struct {
		what    string
		port    uint16
		name    string
		verdict policy.Verdict
		reason  string
		src     audit.NameSource
	}{
		{"SNI mask-h2.icloud.com", 443, "mask-h2.icloud.com", policy.Deny, policy.ReasonPrivateRelay, audit.NameSNI},
		{"SNI mask.icloud.com", 443, "mask.icloud.com", policy.Deny, policy.ReasonPrivateRelay, audit.NameSNI},
		{"Host mask-h2.icloud.com", 80, "mask-h2.icloud.com", policy.Deny, policy.ReasonPrivateRelay, audit.NameHost},
		{"control: another name", 443, "a.allowed.test", policy.Allow, policy.ReasonAllowed, audit.NameSNI},
	}
	p := newPcap(t)
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: apple, cport: uint16(41000 + i), sport: tc.port, cseq: 1, sseq: 1}
		c.namedConn(t, tc.name)
	}
	path := p.close()
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := synthRun(t, path, fmt.Sprintf(mismatchPolicy, mode), nil, Config{})
			for i, tc := range cases {
				var ev *audit.Event
				for j := range r.events {
					if e := &r.events[j]; e.ClientPort == uint16(41000+i) && e.Kind == audit.KindFlow {
						ev = e
					}
				}
				if ev == nil {
					t.Errorf("%s: no event", tc.what)
					continue
				}
				if ev.Verdict != tc.verdict || ev.Reason != tc.reason || ev.Name != tc.name || ev.NameSource != tc.src || ev.Mode != mode ||
					ev.Enforced != (mode == policy.ModeEnforce && tc.verdict == policy.Deny) {
					t.Errorf("%s: %+v, want %s %s (%s)", tc.what, *ev, tc.verdict, tc.reason, tc.src)
				}
			}
		})
	}
}
