package e2e

import (
	"net"
	"testing"
)

// The local-use test's NAT64 prefix, inside the local-use /48 (RFC 8215),
// and two addresses the /48 rule holds: one outside the NAT64 prefix, in
// the part of the /48 that stays guarded, and one inside it, the NAT64 form
// of a public (test) address.
const (
	localNAT64Prefix = "64:ff9b:1::/96"
	localNAT64Rest   = "64:ff9b:1:1::10"     // in the /48, outside the NAT64 prefix
	localNAT64Public = "64:ff9b:1::c612:810" // 198.18.8.16
)

const localNAT64Policy = `version: 1
mode: enforce
rules:
  - name: local48
    to: ["64:ff9b:1::/48"]
    ports: [7443/tcp, 9001/udp]
`

// TestNAT64LocalUse48: a rule naming the whole local-use /48 around a
// NAT64 prefix inside it (--nat64-prefix 64:ff9b:1::/96) opens the NAT64
// forms of public addresses, but not the rest of the /48, which stays a
// guarded range: the firewall's forward chain excludes the guarded sets
// from such a wide prefix's accept, and the proxy's guard judges a
// transparent TCP connection so too (policy.OpensHeld; firewall's
// TestProxyGuardMatchesForward as a unit). Before, the proxy let TCP to
// 64:ff9b:1:1::10 out (allowed) where forwarded UDP to it was dropped. In
// enforce mode the proxy refuses the connection; in audit mode it gets
// through and capture, which judges with the proxy's guard, records it;
// both as special-range.
func TestNAT64LocalUse48(t *testing.T) {
	tp := newIPv6OnlyTopo(t, "g1")
	u := tp.startUpstream(t)
	hits := tp.nat64Servers(t, []string{localNAT64Rest, localNAT64Public}, []int{7443},
		[]string{net.JoinHostPort(localNAT64Rest, "9001"), net.JoinHostPort(localNAT64Public, "9001")})

	// Without egressd, both are reachable: a refusal below is egressd's.
	for _, a := range []string{localNAT64Rest, localNAT64Public} {
		if _, ok := nat64Raw(tp.lan, a, 7443); !ok {
			t.Fatalf("without egressd, [%s]:7443 does not answer: the test would prove nothing", a)
		}
	}

	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			d := newDaemon(t, tp, mode)
			d.writePolicy([]byte(localNAT64Policy))
			d.extra = []string{"--upstream-dns", u.addr, "--nat64-prefix", localNAT64Prefix}
			d.start()
			d.stopAtCleanup(t)
			// In audit mode the firewall leaves TCP to forward, and
			// capture records what the proxy would decide.
			source := "proxy"
			if mode == "audit" {
				source = "capture"
			}
			for _, c := range []struct {
				what, addr, reason string
			}{
				{"the rest of the /48", localNAT64Rest, "special-range"},
				{"a public address's NAT64 form", localNAT64Public, "allowed"},
			} {
				open := c.reason == "allowed" || mode == "audit"
				before := hits.tcp(c.addr, 7443)
				port, ok := nat64Raw(tp.lan, c.addr, 7443)
				if ok != open {
					t.Errorf("%s: TCP [%s]:7443 answered %v, want %v", c.what, c.addr, ok, open)
				}
				if got := hits.tcp(c.addr, 7443) - before; (got > 0) != open {
					t.Errorf("%s: the server saw %d TCP connections", c.what, got)
				}
				ev := d.waitEvent(t, c.what, func(e flowEvent) bool {
					return e.Kind == "flow" && e.Source == source && e.Client == lanClient6 && e.ClientPort == port
				})
				if ev.Reason != c.reason {
					t.Errorf("%s: event %v, want reason %s", c.what, ev, c.reason)
				}
				if mode != "enforce" {
					continue
				}
				// The firewall's forward chain, for UDP: the same.
				before = hits.udp(c.addr, 9001)
				answered := nat64UDP(tp.lan, c.addr, 9001)
				if got := hits.udp(c.addr, 9001) - before; answered != open || (got > 0) != open {
					t.Errorf("%s: UDP [%s]:9001 answered %v, the server saw %d datagrams; want open %v", c.what, c.addr, answered, got, open)
				}
			}
		})
	}
}
