package capture

import (
	"bytes"
	"fmt"
	"maps"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestZeroDest: Linux forwards nothing a LAN host sends to IPv4's 0.0.0.0
// and takes none of it but what the firewall redirects (kernel 6.18,
// client, gateway and server namespaces, the gateway's default route
// toward the server: an echo request, a UDP datagram to port 9000 and a
// TCP SYN to port 80, none redirected, passed the gateway's prerouting
// chain, where `fib daddr type` said broadcast, and reached neither its
// forward nor its input chain: ip_route_input_slow's martian
// destination; a SYN to port 443, which a nat rule redirected, reached
// the input chain, and the gateway answered it). So capture records no
// flow for a live one that enforce mode does not redirect (Stats.Martian),
// in either mode, and asks the routing table nothing: what no mode lets
// out is no would-drop. TCP to a port the proxy takes
// (Config.TCPPorts) is the proxy's, which refuses 0.0.0.0 whatever the
// rules (special-range, policy.LANThisHost), and DNS the forwarder's.
// 0.0.0.5, the rest of 0.0.0.0/8, Linux forwards (each of the three
// crossed the forward chain and reached the server): a rule naming it
// opens it. Before, UDP and the SYN to port 80 to 0.0.0.0 were recorded
// special-range denials (Martian 0; the echo was no flow already,
// TestOtherToRoutedOddDest, and not counted); the rest pins what capture
// did: it fails if redirected TCP or DNS to 0.0.0.0 is taken for a
// martian, or 0.0.0.5 for 0.0.0.0.
func TestZeroDest(t *testing.T) {
	const pol = "version: 1\nmode: audit\nrules:\n  - {name: r, to: [\"0.0.0.0/32\", \"0.0.0.5/32\"], ports: [icmp, 9000/udp, 80/tcp, 443/tcp, 53/udp]}\n"
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := newGuardRigPolicy(t, pol, mode, false, nil)
			r.c.cfg.TCPPorts = []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
			syn := func(cli, dst string, port uint16) {
				r.send(false, cli, dst, layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: layers.TCPPort(port), SYN: true, Seq: 1, Window: 1024})
			}
			r.icmp("198.18.5.10", "0.0.0.0", 8)
			r.udp("198.18.5.11", 40000, "0.0.0.0", 9000)
			syn("198.18.5.12", "0.0.0.0", 80)  // not redirected
			syn("198.18.5.13", "0.0.0.0", 443) // the proxy's
			r.udp("198.18.5.14", 40002, "0.0.0.0", 53)
			r.icmp("198.18.5.20", "0.0.0.5", 8)
			r.udp("198.18.5.21", 40003, "0.0.0.5", 9000)
			syn("198.18.5.22", "0.0.0.5", 80)
			evs := r.events()
			for _, cli := range []string{"198.18.5.10", "198.18.5.11", "198.18.5.12"} {
				if es := evs[cli]; len(es) != 0 {
					t.Errorf("from %s to 0.0.0.0: %+v, want no flow (a martian destination)", cli, es)
				}
			}
			for _, c := range []struct {
				cli, dst, proto string
				port            uint16
				want            string
			}{
				{"198.18.5.13", "0.0.0.0", "tcp", 443, "deny  " + ReasonSpecialRange},
				{"198.18.5.20", "0.0.0.5", "icmp", 0, "allow r allowed"},
				{"198.18.5.21", "0.0.0.5", "udp", 9000, "allow r allowed"},
				{"198.18.5.22", "0.0.0.5", "tcp", 80, "allow r allowed"},
			} {
				es := evs[c.cli]
				if len(es) != 1 || es[0].Dest != netip.MustParseAddr(c.dst) || es[0].Proto != c.proto || es[0].DestPort != c.port ||
					fmt.Sprintf("%s %s %s", es[0].Verdict, es[0].Rule, es[0].Reason) != c.want {
					t.Errorf("%s to %s:%d from %s: %+v, want one flow %q", c.proto, c.dst, c.port, c.cli, es, c.want)
				}
			}
			if es := evs["198.18.5.14"]; len(es) != 1 || es[0].Dest != netip.IPv4Unspecified() || es[0].DestPort != 53 {
				t.Errorf("DNS to 0.0.0.0: %+v, want one flow (the forwarder's)", es)
			}
			if st := r.c.Stats(); st.Martian != 3 {
				t.Errorf("Stats.Martian %d, want 3", st.Martian)
			}
			for _, a := range []string{"198.18.5.10", "198.18.5.11", "198.18.5.12", "0.0.0.0"} {
				if n := r.asked[netip.MustParseAddr(a)]; n != 0 {
					t.Errorf("%s looked up %d times, want none (route lookups %v)", a, n, r.asked)
				}
			}
		})
	}
}

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

// TestZeroDestFragments: a UDP datagram to 0.0.0.0 sent in IP fragments
// is decided by its port as a whole one is (TestZeroDest): enforce mode's
// conntrack reassembles it before the nat chain, which redirects DNS to
// the forwarder, and the kernel drops the rest as a martian destination.
// The first fragment carries the ports (the decoder takes it for a bare
// fragment, without a UDP layer). Before, the first fragment of each was
// taken for a martian whatever its port: the DNS query was no flow
// (Martian 2); it fails too if the datagram to port 9000, whose later
// fragment comes first, is recorded or not counted.
func TestZeroDestFragments(t *testing.T) {
	const pol = "version: 1\nmode: audit\nrules:\n  - {name: r, to: [\"0.0.0.0/32\"], ports: [9000/udp, 53/udp]}\n"
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := newGuardRigPolicy(t, pol, mode, false, nil)
			frags := func(cli string, dp uint16, id uint16, laterFirst bool) {
				t.Helper()
				src, dst := netip.MustParseAddr(cli), netip.IPv4Unspecified()
				udp := &layers.UDP{SrcPort: 40000, DstPort: layers.UDPPort(dp)}
				udp.SetNetworkLayerForChecksum(ipLayer(src, dst, layers.IPProtocolUDP))
				buf := gopacket.NewSerializeBuffer()
				if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, udp, gopacket.Payload(bytes.Repeat([]byte("q"), 40))); err != nil {
					t.Fatal(err)
				}
				dgram := buf.Bytes()
				first := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice(), Id: id, Flags: layers.IPv4MoreFragments}
				later := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice(), Id: id, FragOffset: 2}
				if laterFirst {
					r.liveIP(false, later, gopacket.Payload(dgram[16:]))
					r.liveIP(false, first, gopacket.Payload(dgram[:16]))
					return
				}
				r.liveIP(false, first, gopacket.Payload(dgram[:16]))
				r.liveIP(false, later, gopacket.Payload(dgram[16:]))
			}
			frags("198.18.5.14", 53, 0x101, false)
			frags("198.18.5.11", 9000, 0x102, true)
			evs := r.events()
			if es := evs["198.18.5.14"]; len(es) != 1 || es[0].Dest != netip.IPv4Unspecified() || es[0].DestPort != 53 || es[0].Proto != "udp" {
				t.Errorf("DNS to 0.0.0.0 in fragments: %+v, want one flow (the forwarder's)", es)
			}
			if es := evs["198.18.5.11"]; len(es) != 0 {
				t.Errorf("UDP to 0.0.0.0:9000 in fragments: %+v, want no flow (a martian destination)", es)
			}
			if st := r.c.Stats(); st.Martian != 1 || st.Fragments != 3 {
				t.Errorf("Stats.Martian %d, Fragments %d, want 1 and 3 (the first of those to port 9000 a martian)", st.Martian, st.Fragments)
			}
		})
	}
}
