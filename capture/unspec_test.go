package capture

import (
	"fmt"
	"maps"
	"net/netip"
	"sort"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestUnspecDest: Linux forwards a LAN host's ICMPv6 echo request, UDP
// datagram and TCP SYN to IPv6's unspecified address :: as to any
// unicast address (kernel 6.18, client, gateway and server namespaces,
// the gateway's default route toward the server: each crossed the
// gateway's forward chain and reached the server; with a hop limit of 1
// the gateway answered time exceeded instead). Capture records each as
// a flow: forwarded by nftables (the echo, UDP, TCP to a port not
// redirected, Config.TCPPorts), it is the special-range guard's, opened
// by a CIDR rule inside the guarded range (::/128), not by ::/0, as the
// forward chain's guarded sets judge it (Engine.GuardRefuses; the echo
// and UDP as policy explain and audit --replay too); TCP to a port
// enforce mode redirects is the transparent proxy's, which refuses ::
// (the gateway itself) whatever the rules (policy.LANThisHost). Live or
// offline alike; a hop limit of 1 records nothing (live). Before, TCP to
// a port not redirected was refused as the proxy refuses it, under
// ::/128 too, where enforce lets it out; the rest pins what capture
// already did (the echo since TestOtherToRoutedOddDest): it fails if ::
// is taken for on-link (routed) or left out of the guard.
func TestUnspecDest(t *testing.T) {
	const base = "version: 1\nmode: audit\nrules:\n  - {name: r, to: %s, ports: [icmp, 80/udp, 80/tcp, 443/tcp]}\n"
	for _, pc := range []struct {
		name, to string
		opens    bool
	}{
		{"named", `["::/128"]`, true},
		{"wide", `["::/0"]`, false},
	} {
		for _, live := range []bool{true, false} {
			for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
				t.Run(fmt.Sprintf("%s/live=%v/%s", pc.name, live, mode), func(t *testing.T) {
					r := newGuardRigPolicy(t, fmt.Sprintf(base, pc.to), mode, false, nil)
					r.c.cfg.TCPPorts = []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
					if !live {
						r.c.proc.src = 0
					}
					eng := r.c.deps.Policy.Load()
					syn := func(cli string, port uint16) {
						r.send(false, cli, "::", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: layers.TCPPort(port), SYN: true, Seq: 1, Window: 1024})
					}
					r.icmp("2001:db8:5::10", "::", 128)
					r.udp("2001:db8:5::11", 40000, "::", 80)
					syn("2001:db8:5::12", 80)  // forwarded
					syn("2001:db8:5::13", 443) // redirected to the proxy in enforce mode
					if live {
						ip := ipLayer(netip.MustParseAddr("2001:db8:5::14"), netip.IPv6Unspecified(), layers.IPProtocolUDP)
						ip.(*layers.IPv6).HopLimit = 1
						r.liveIP(false, ip, &layers.UDP{SrcPort: 40002, DstPort: 80}, gopacket.Payload("hl1"))
					}
					evs := r.events()
					fwdWant := "deny  " + ReasonSpecialRange
					if pc.opens {
						fwdWant = "allow r allowed"
					}
					for _, c := range []struct {
						cli, proto string
						port       uint16
						pp         policy.Proto
						want       string
					}{
						{"2001:db8:5::10", "ipv6-icmp", 0, policy.ICMP, fwdWant},
						{"2001:db8:5::11", "udp", 80, policy.UDP, fwdWant},
						{"2001:db8:5::12", "tcp", 80, policy.TCP, fwdWant},
						{"2001:db8:5::13", "tcp", 443, policy.TCP, "deny  " + ReasonSpecialRange},
					} {
						es := evs[c.cli]
						if len(es) != 1 || es[0].Dest != netip.IPv6Unspecified() || es[0].Proto != c.proto || es[0].DestPort != c.port ||
							fmt.Sprintf("%s %s %s", es[0].Verdict, es[0].Rule, es[0].Reason) != c.want {
							t.Errorf("%s to [::]:%d from %s: %+v, want one flow %q", c.proto, c.port, c.cli, es, c.want)
						}
						if c.port == 443 {
							continue
						}
						// As the forward chain's guarded sets judge it.
						in := policy.Input{Client: netip.MustParseAddr(c.cli), Dest: netip.IPv6Unspecified(), Port: c.port, Proto: c.pp, Now: r.now}
						if _, refused := eng.GuardRefuses(in, nil, nil); refused == pc.opens || !eng.Decide(in).Allowed() {
							t.Errorf("%s to ::: the policy's guard refuses %v, the rules allow %v: the test's want is wrong", c.proto, refused, eng.Decide(in).Allowed())
						}
					}
					if es := evs["2001:db8:5::14"]; len(es) != 0 {
						t.Errorf("hop limit 1 to :: recorded: %+v", es)
					}
					if len(evs) != 4 {
						t.Errorf("flows of %d clients, want 4: %v", len(evs), evs)
					}
				})
			}
		}
	}
}

// TestUnspecSource: Linux forwards nothing from IPv6's unspecified
// address :: (kernel 6.18: an ICMPv6 echo request, a UDP datagram and a
// TCP SYN from :: to a server's address, and a UDP datagram from :: to
// ::, passed the gateway's prerouting chain, where `fib saddr . iif oif
// missing` matched them, but reached neither its forward nor its input
// chain, nor the server: Ip6InAddrErrors counted them), in either
// mode, so capture records no flow for such a packet to an address the
// gateway routes out of another interface (Stats.Martian), as for IPv4's
// 0.0.0.0, asking the routing table for the destination's route only. Sent to the gateway's
// own address the kernel takes it (audit mode; the UDP datagram was
// delivered, Udp6NoPorts) and enforce mode's antispoof chain drops it:
// still recorded forged-source, and so is one to an address routed back
// out of the LAN interface, which the kernel forwards (kernel 6.18: an
// echo, UDP and a TCP SYN from :: to a subnet routed via a LAN host
// crossed the forward chain, where `fib saddr . iif oif missing` had
// matched them). Duplicate address detection from :: to a link-local
// group is no flow and not checked. Before, each of the three to the
// server was looked up and recorded forged-source, a would-drop of
// enforce mode that audit mode drops as well (and the one to ::); in
// session 40 the one routed back out of the LAN was first taken for a
// martian too (no flow, where audit mode forwards it).
func TestUnspecSource(t *testing.T) {
	const pol = "version: 1\nmode: audit\nrules:\n  - {name: r, to: [\"2001:db8:d::/64\", \"2001:db8:5::/64\"], ports: [icmp, 80/udp, 80/tcp, 9000/udp]}\n"
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := newGuardRigPolicy(t, pol, mode, false, nil)
			r.icmp("::", "2001:db8:d::20", 128)
			r.udp("::", 40000, "2001:db8:d::20", 80)
			r.send(false, "::", "2001:db8:d::20", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: 80, SYN: true, Seq: 1, Window: 1024})
			r.udp("::", 40003, "::", 80)
			r.icmp("::", "ff02::1:ff00:10", 135) // DAD
			r.udp("::", 40002, "2001:db8:5::1", 9000)
			r.udp("::", 40004, "2001:db8:5::20", 80) // routed back out of the LAN
			evs := r.events()
			es := evs["::"]
			sort.Slice(es, func(i, j int) bool { return es[i].Dest.Less(es[j].Dest) })
			if len(es) != 2 || es[0].Dest != netip.MustParseAddr("2001:db8:5::1") || es[1].Dest != netip.MustParseAddr("2001:db8:5::20") ||
				es[0].Verdict != policy.Deny || es[0].Reason != ReasonForgedSource || es[1].Verdict != policy.Deny || es[1].Reason != ReasonForgedSource {
				t.Errorf("from ::: %+v, want two flows, forged-source to the gateway's 2001:db8:5::1 and to 2001:db8:5::20", es)
			}
			if st := r.c.Stats(); st.Martian != 4 {
				t.Errorf("Stats.Martian %d, want 4", st.Martian)
			}
			// Each destination forwarded to once (:: as one and as the
			// source, to the gateway's address: one answer), DAD none.
			want := map[netip.Addr]int{netip.MustParseAddr("2001:db8:d::20"): 1, netip.IPv6Unspecified(): 1, netip.MustParseAddr("2001:db8:5::20"): 1}
			if !maps.Equal(r.asked, want) {
				t.Errorf("route lookups %v, want %v", r.asked, want)
			}
		})
	}
}
