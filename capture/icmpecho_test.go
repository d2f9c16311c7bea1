package capture

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

const icmpPolicy = `version: 1
mode: audit
rules:
  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
  - name: monitoring
    from: [198.18.5.10, "2001:db8::10"]
    to: [203.0.113.0/25, "2001:db8:99::/48", status.vendor.test]
    ports: [icmp]
`

// TestSyntheticICMPEcho: an ICMP or ICMPv6 echo request flow is decided
// by the policy with the protocol icmp, as the firewall's forward chain
// decides it (by address: a CIDR rule, or an address DNS gave out for a
// rule's name, recorded with that name): allowed under a rule that lists
// icmp, denied with the policy's reason otherwise (a rule on any names
// the address: port-not-allowed; another client: client-not-allowed). An
// ICMP request that is not an echo, and GRE, stay protocol-not-allowed.
func TestSyntheticICMPEcho(t *testing.T) {
	cli4, cli6, other := netip.MustParseAddr("198.18.5.10"), netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("198.18.5.11")
	a := netip.MustParseAddr
	p := newPcap(t)
	p.ip(true, cli4, a("203.0.113.9"), layers.IPProtocolICMPv4, icmpMsg(8, "ping"))
	p.ip(false, a("203.0.113.9"), cli4, layers.IPProtocolICMPv4, icmpMsg(0, "ping"))
	p.ip(true, cli6, a("2001:db8:99::1"), layers.IPProtocolICMPv6, icmpMsg(128, "ping6"))
	p.ip(true, cli4, a("192.0.2.77"), layers.IPProtocolICMPv4, icmpMsg(8, "by name"))
	p.ip(true, cli4, a("198.51.100.5"), layers.IPProtocolICMPv4, icmpMsg(8, "lab"))
	p.ip(true, cli4, a("192.0.2.78"), layers.IPProtocolICMPv4, icmpMsg(8, "nothing"))
	p.ip(true, other, a("203.0.113.10"), layers.IPProtocolICMPv4, icmpMsg(8, "other client"))
	p.ip(true, cli4, a("203.0.113.11"), layers.IPProtocolICMPv4, icmpMsg(13, "timestamp"))
	p.ip(true, cli4, a("203.0.113.20"), layers.IPProtocolGRE, []byte{0, 0, 0x08, 0, 0x45, 0, 0, 20})
	path := p.close()
	dns := grantFacts{a("192.0.2.77"): {{Client: cli4, Name: "status.vendor.test"}}}

	want := map[string]string{ // destination: verdict rule reason name
		"203.0.113.9":    "allow monitoring allowed ",
		"2001:db8:99::1": "allow monitoring allowed ",
		"192.0.2.77":     "allow monitoring allowed status.vendor.test",
		"198.51.100.5":   "deny  port-not-allowed ",
		"192.0.2.78":     "deny  no-rule ",
		"203.0.113.10":   "deny  client-not-allowed ",
		"203.0.113.11":   "deny  " + ReasonProtocol + " ",
		"203.0.113.20":   "deny  " + ReasonProtocol + " ",
	}
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := synthRunEngine(t, path, testEngine(t, icmpPolicy).WithMode(mode), Deps{DNS: dns}, Config{})
			got := map[string]audit.Event{}
			for _, ev := range r.events {
				got[ev.Dest.String()] = ev
			}
			for dest, w := range want {
				ev, ok := got[dest]
				if !ok {
					t.Errorf("no event of the flow to %s", dest)
					continue
				}
				if s := string(ev.Verdict) + " " + ev.Rule + " " + ev.Reason + " " + ev.Name; s != w {
					t.Errorf("flow to %s: %q, want %q", dest, s, w)
				}
				if ev.Enforced != (mode == policy.ModeEnforce && ev.Verdict == policy.Deny) || ev.DestPort != 0 {
					t.Errorf("flow to %s: enforced %v, port %d", dest, ev.Enforced, ev.DestPort)
				}
			}
			if len(got) != len(want) {
				t.Errorf("%d flows, want %d: %v", len(got), len(want), got)
			}
		})
	}
}
