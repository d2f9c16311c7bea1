package capture

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestUnspecSource: Linux forwards nothing from IPv6's unspecified
// address :: (kernel 6.18: an ICMPv6 echo request, a UDP datagram and a
// TCP SYN from :: to a server's address, and a UDP datagram from :: to
// ::, passed the gateway's prerouting chain, where `fib saddr . iif oif
// missing` matched them, but reached neither its forward nor its input
// chain, nor the server: Ip6InAddrErrors counted them), in either mode, so capture records no flow for such a
// packet to an address it would forward and asks the routing table
// nothing (Stats.Martian), as for IPv4's 0.0.0.0. Sent to the gateway's
// own address the kernel takes it (audit mode; the UDP datagram was
// delivered, Udp6NoPorts) and enforce mode's antispoof chain drops it:
// still recorded forged-source. Duplicate address detection from :: to a
// link-local group is no flow and not checked. Before, each of the three
// to the server was looked up and recorded forged-source, a would-drop
// of enforce mode that audit mode drops as well (and the one to ::).
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
			evs := r.events()
			es := evs["::"]
			if len(es) != 1 || es[0].Dest != netip.MustParseAddr("2001:db8:5::1") || es[0].Verdict != policy.Deny || es[0].Reason != ReasonForgedSource {
				t.Errorf("from ::: %+v, want one flow, forged-source to the gateway's 2001:db8:5::1", es)
			}
			if len(evs) != 1 {
				t.Errorf("flows of %d clients, want 1: %v", len(evs), evs)
			}
			if st := r.c.Stats(); st.Martian != 4 {
				t.Errorf("Stats.Martian %d, want 4", st.Martian)
			}
			if n := r.asked[netip.IPv6Unspecified()]; n != 1 {
				t.Errorf(":: looked up %d times, want once (for the gateway's address)", n)
			}
		})
	}
}
