package capture

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestOtherToRoutedOddDest: Linux forwards a LAN host's packet of
// another protocol than TCP and UDP to destinations capture had taken for
// on-link (kernel 6.18, counted in the gateway namespace's forward
// chain): IPv6's unspecified ::, an IPv4-mapped ::ffff:a.b.c.d in an
// IPv6 header (an IPv6 address to the kernel, whatever it carries: the
// mapped loopback, unspecified address, multicast group or metadata
// address), and IPv4's link-local 169.254/16, the metadata address
// 169.254.169.254 (answered in the upstream namespace). Audit mode lets
// them out; enforce mode's forward chain judges them. Capture records
// their flows as policy explain and audit --replay judge them
// (Engine.LANRefuses): an echo request is denied special-range unless a
// CIDR rule inside the guarded range names the destination, any other
// protocol protocol-not-allowed. What the kernel does not forward it
// still does not record: an echo to 0.0.0.0 (a martian destination), one
// to :: or 169.254.169.254 with a hop limit (TTL) of 1 (time exceeded,
// before the forward chain), or sent to another host's MAC address.
// Before, none of the echoes and the GRE packet was recorded (NotIP).
func TestOtherToRoutedOddDest(t *testing.T) {
	const base = "version: 1\nmode: audit\nrules:\n  - {name: ping, to: %s, ports: [icmp, 80/udp, 53/udp]}\n"
	for _, pc := range []struct {
		name, to string
		opens    bool
	}{
		{"named", `["::/128", "169.254.169.254/32", "::ffff:169.254.169.254/128", "::ffff:0.0.0.0/128", "::ffff:127.0.0.1/128", "::ffff:224.0.0.1/128"]`, true},
		{"wide", `["*", "0.0.0.0/0", "::/0"]`, false},
	} {
		for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
			t.Run(pc.name+"/"+string(mode), func(t *testing.T) {
				r := newGuardRigPolicy(t, fmt.Sprintf(base, pc.to), mode, false, nil)
				eng := r.c.deps.Policy.Load()
				cli4, cli6 := "198.18.5.10", "2001:db8:5::10"
				echoes := map[string]string{
					"::": cli6, "::ffff:169.254.169.254": cli6, "::ffff:0.0.0.0": cli6,
					"::ffff:127.0.0.1": cli6, "::ffff:224.0.0.1": cli6, "169.254.169.254": cli4,
				}
				for dst, cli := range echoes {
					r.icmp(cli, dst, map[bool]uint8{true: 8, false: 128}[netip.MustParseAddr(cli).Is4()])
				}
				r.send(false, "2001:db8:5::11", "::", layers.IPProtocolGRE, gopacket.Payload("gre-body"))
				// UDP to a mapped address a rule names: forwarded, and
				// dropped by enforce's forward chain as the echo is.
				r.udp("2001:db8:5::13", 40000, "::ffff:169.254.169.254", 80)
				// DNS to one is redirected to the forwarder, as to any
				// address: not the forward chain's.
				r.udp("2001:db8:5::14", 40001, "::ffff:169.254.169.254", 53)
				// Not forwarded by the kernel: none recorded.
				r.icmp("198.18.5.12", "0.0.0.0", 8)
				for _, dst := range []string{"::", "169.254.169.254"} {
					cli := "2001:db8:5::12"
					if netip.MustParseAddr(dst).Is4() {
						cli = "198.18.5.12"
					}
					ip := ipLayer(netip.MustParseAddr(cli), netip.MustParseAddr(dst), layers.IPProtocolICMPv6)
					typ := uint8(128)
					if v4, ok := ip.(*layers.IPv4); ok {
						v4.TTL, v4.Protocol, typ = 1, layers.IPProtocolICMPv4, 8
					} else {
						ip.(*layers.IPv6).HopLimit = 1
					}
					r.liveIP(false, ip, gopacket.Payload(icmpMsg(typ, "ttl1")))
				}
				evs := r.events()
				for dst, cli := range echoes {
					a := netip.MustParseAddr(dst)
					var got []string
					for _, ev := range evs[cli] {
						// The event carries a mapped destination
						// unmapped, as the proxy's do.
						if ev.Dest == a.Unmap() {
							got = append(got, fmt.Sprintf("%s %s %s %s", ev.Proto, ev.Verdict, ev.Rule, ev.Reason))
						}
					}
					proto := "ipv6-icmp"
					if a.Is4() {
						proto = "icmp"
					}
					want := proto + " deny  " + ReasonSpecialRange
					if pc.opens && !a.Is4In6() {
						want = proto + " allow ping allowed"
					}
					// A mapped destination in an IPv6 header no rule
					// opens: the policy reads "::ffff:169.254.169.254/128"
					// as 169.254.169.254/32, which the forward chain
					// matches in IPv4 headers only (ip daddr @net4_R),
					// and its IPv6 accepts leave out the guarded
					// ::ffff:0:0/96, so enforce drops the echo whatever
					// the rules. Before, capture judged it as the IPv4
					// address it carries: allowed under ping.
					if len(got) != 1 || got[0] != want {
						t.Errorf("echo from %s to %s: %q, want one flow %q", cli, dst, got, want)
					}
					if a.Is4In6() {
						continue
					}
					// As explain and audit --replay judge it.
					in := policy.Input{Client: netip.MustParseAddr(cli), Dest: a.Unmap(), Proto: policy.ICMP, Now: r.now}
					if _, refused := eng.LANRefuses(in, nil, nil); refused == pc.opens || !eng.Decide(in).Allowed() {
						t.Errorf("echo to %s: the policy's guard refuses %v, the rules allow %v: the test's want is wrong", dst, refused, eng.Decide(in).Allowed())
					}
				}
				if es := evs["2001:db8:5::11"]; len(es) != 1 || es[0].Dest != netip.IPv6Unspecified() || es[0].Proto != "gre" || es[0].Verdict != policy.Deny || es[0].Reason != ReasonProtocol {
					t.Errorf("GRE to ::: %+v, want one protocol-not-allowed flow", es)
				}
				for _, cli := range []string{"198.18.5.12", "2001:db8:5::12"} {
					if es := evs[cli]; len(es) != 0 {
						t.Errorf("%s: recorded %+v, which the kernel does not forward", cli, es)
					}
				}
				if es := evs["2001:db8:5::13"]; len(es) != 1 || es[0].Proto != "udp" || es[0].Verdict != policy.Deny || es[0].Reason != ReasonSpecialRange {
					t.Errorf("UDP to ::ffff:169.254.169.254: %+v, want one special-range flow", es)
				}
				if es := evs["2001:db8:5::14"]; len(es) != 1 || es[0].Verdict != policy.Allow {
					t.Errorf("DNS to ::ffff:169.254.169.254: %+v, want one flow, the forwarder's", es)
				}
				if len(evs) != 5 {
					t.Errorf("flows of %d clients, want 5: %v", len(evs), evs)
				}
			})
		}
	}
}
