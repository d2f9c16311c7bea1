package capture

import (
	"maps"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestZeroSource: Linux drops what a LAN host sends from 0.0.0.0 as a
// martian source (kernel 6.18, client, gateway and server namespaces,
// the gateway's default route toward the server: an echo request, a UDP
// datagram and a TCP SYN to the server, to the gateway's own address on
// either interface and to a subnet the gateway routes via a LAN host
// passed prerouting, where `fib saddr . iif oif missing` matched them,
// and reached neither the forward nor the input chain), unlike IPv6's
// ::, which it forwards back out of the LAN interface
// (TestUnspecSource): none is recorded, none looked up (Stats.Martian).
// But for DHCP's destinations, what it takes from 0.0.0.0 is what is
// sent to 0.0.0.0 itself (ip_route_input_slow's broadcast input: a UDP
// datagram and an echo request reached the input chain,
// IpExtInBcastPkts), which enforce mode's antispoof chain drops where
// the route to 0.0.0.0 (the default one) does not leave by the LAN
// interface (nft_fib looks 0.0.0.0 up; `fib saddr . iif oif missing`
// matched): recorded forged-source, as :: to the gateway's own address.
// Before, that one was taken for a martian too (no flow, Martian 6, no
// lookup); the rest pins what capture did: it fails if a route back out
// of the LAN lets 0.0.0.0 through, as for ::.
func TestZeroSource(t *testing.T) {
	const pol = "version: 1\nmode: audit\nrules:\n  - {name: r, to: [\"0.0.0.0/0\"], ports: [icmp, 9000/udp, 80/tcp]}\n"
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := newGuardRigPolicy(t, pol, mode, false, nil)
			r.icmp("0.0.0.0", "203.0.113.9", 8)
			r.udp("0.0.0.0", 40000, "203.0.113.9", 9000)
			r.send(false, "0.0.0.0", "203.0.113.9", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: 80, SYN: true, Seq: 1, Window: 1024})
			r.udp("0.0.0.0", 40002, "198.18.5.1", 9000)  // the gateway's
			r.udp("0.0.0.0", 40003, "198.18.7.20", 9000) // routed back out of the LAN
			r.udp("0.0.0.0", 40004, "0.0.0.0", 9000)
			evs := r.events()
			es := evs["0.0.0.0"]
			if len(es) != 1 || es[0].Dest != netip.IPv4Unspecified() || es[0].Verdict != policy.Deny || es[0].Reason != ReasonForgedSource {
				t.Errorf("from 0.0.0.0: %+v, want one flow, forged-source to 0.0.0.0", es)
			}
			if st := r.c.Stats(); st.Martian != 5 {
				t.Errorf("Stats.Martian %d, want 5", st.Martian)
			}
			if want := map[netip.Addr]int{netip.IPv4Unspecified(): 1}; !maps.Equal(r.asked, want) {
				t.Errorf("route lookups %v, want %v", r.asked, want)
			}
		})
	}
}
