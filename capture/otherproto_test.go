package capture

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// ip writes one IP packet of protocol proto carrying payload.
func (p *pcapWriter) ip(fromClient bool, src, dst netip.Addr, proto layers.IPProtocol, payload []byte) {
	p.frame(fromClient, ipLayer(src, dst, proto).(gopacket.SerializableLayer), gopacket.Payload(payload))
}

// icmpMsg is an ICMP or ICMPv6 message of type typ (checksum left 0:
// capture does not check it) with an identifier, a sequence number and
// data.
func icmpMsg(typ uint8, data string) []byte {
	return append([]byte{typ, 0, 0, 0, 0x12, 0x34, 0, 1}, data...)
}

// TestSyntheticOtherProtocols: packets that are neither TCP nor UDP. An
// ICMP or ICMPv6 echo request starts a flow (its replies count in it),
// as does any packet of another IP protocol (GRE, IPv6 in IPv4, an
// unassigned number), to a unicast destination; each is denied as
// protocol-not-allowed, whatever the rules say of the address, but the
// echo requests, which the policy decides with the protocol icmp: no
// rule lists icmp here, so they are denied as no-rule, or where a rule
// names the address as port-not-allowed (the lab rule allows
// 198.51.100.0/24 on any port: of TCP and UDP, not ICMP). An echo reply
// without a request, ICMP errors (destination unreachable, time
// exceeded, packet too big), IPv6 neighbour and router discovery, MLD and
// IGMP to a multicast group start none. In enforce mode the same flows
// are what the firewall dropped.
func TestSyntheticOtherProtocols(t *testing.T) {
	cli4, cli6 := netip.MustParseAddr("198.18.5.10"), netip.MustParseAddr("2001:db8::10")
	a := netip.MustParseAddr
	p := newPcap(t)
	// Recorded.
	p.ip(true, cli4, a("203.0.113.9"), layers.IPProtocolICMPv4, icmpMsg(8, "ping-data"))
	p.ip(false, a("203.0.113.9"), cli4, layers.IPProtocolICMPv4, icmpMsg(0, "ping-data"))
	p.ip(true, cli4, a("203.0.113.9"), layers.IPProtocolICMPv4, icmpMsg(8, "ping-data"))
	p.ip(false, a("203.0.113.9"), cli4, layers.IPProtocolICMPv4, icmpMsg(0, "ping-data"))
	p.ip(true, cli4, a("198.51.100.5"), layers.IPProtocolICMPv4, icmpMsg(8, "lab"))
	p.ip(true, cli4, a("203.0.113.20"), layers.IPProtocolGRE, []byte{0, 0, 0x08, 0, 0x45, 0, 0, 20})
	p.ip(true, cli4, a("203.0.113.21"), layers.IPProtocol(253), []byte("exfil-over-253"))
	inner := gopacket.NewSerializeBuffer()
	ip6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: a("2001:db8:5::10").AsSlice(), DstIP: a("2001:db8:77::1").AsSlice()}
	u := &layers.UDP{SrcPort: 40000, DstPort: 9999}
	u.SetNetworkLayerForChecksum(ip6)
	if err := gopacket.SerializeLayers(inner, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ip6, u, gopacket.Payload("tunnelled")); err != nil {
		t.Fatal(err)
	}
	p.ip(true, cli4, a("203.0.113.41"), layers.IPProtocolIPv6, inner.Bytes())
	p.ip(true, cli6, a("2001:db8:99::1"), layers.IPProtocolICMPv6, icmpMsg(128, "ping6"))
	p.ip(false, a("2001:db8:99::1"), cli6, layers.IPProtocolICMPv6, icmpMsg(129, "ping6"))
	// Not flows.
	p.ip(true, cli4, a("203.0.113.30"), layers.IPProtocolICMPv4, icmpMsg(0, "unasked reply"))
	p.ip(true, cli4, a("203.0.113.31"), layers.IPProtocolICMPv4, icmpMsg(3, "port unreachable"))
	p.ip(false, a("203.0.113.32"), cli4, layers.IPProtocolICMPv4, icmpMsg(11, "time exceeded"))
	p.ip(true, cli4, a("224.0.0.22"), layers.IPProtocolIGMP, []byte{0x22, 0, 0, 0, 0, 0, 0, 0})
	p.ip(true, cli6, a("2001:db8::1"), layers.IPProtocolICMPv6, icmpMsg(135, "neighbour solicitation"))
	p.ip(false, a("2001:db8::1"), cli6, layers.IPProtocolICMPv6, icmpMsg(136, "neighbour advertisement"))
	p.ip(true, cli6, a("ff02::2"), layers.IPProtocolICMPv6, icmpMsg(133, "router solicitation"))
	p.ip(true, cli6, a("ff02::16"), layers.IPProtocolICMPv6, icmpMsg(143, "mld report"))
	p.ip(true, cli6, a("2001:db8:99::2"), layers.IPProtocolICMPv6, icmpMsg(2, "packet too big"))
	p.ip(true, cli6, a("2001:db8:99::3"), layers.IPProtocolICMPv6, icmpMsg(129, "unasked reply"))
	path := p.close()

	want := map[string]string{ // destination: proto
		"203.0.113.9": "icmp", "198.51.100.5": "icmp", "203.0.113.20": "gre", "203.0.113.21": "253",
		"203.0.113.41": "ipv6", "2001:db8:99::1": "ipv6-icmp",
	}
	reasons := map[string]string{"203.0.113.9": policy.ReasonNoRule, "198.51.100.5": policy.ReasonPort, "2001:db8:99::1": policy.ReasonNoRule}
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := synthRunEngine(t, path, testEngine(t, testPolicy).WithMode(mode), Deps{}, Config{})
			got := map[string]audit.Event{}
			for _, ev := range r.events {
				if _, dup := got[ev.Dest.String()]; dup {
					t.Errorf("two events to %s: %+v", ev.Dest, ev)
				}
				got[ev.Dest.String()] = ev
			}
			for dest, proto := range want {
				ev, ok := got[dest]
				if !ok {
					t.Errorf("no event of the %s flow to %s", proto, dest)
					continue
				}
				delete(got, dest)
				reason := ReasonProtocol
				if r, ok := reasons[dest]; ok {
					reason = r
				}
				if ev.Proto != proto || ev.Verdict != policy.Deny || ev.Reason != reason || ev.Mode != mode ||
					ev.Enforced != (mode == policy.ModeEnforce) || ev.DestPort != 0 || ev.ClientPort != 0 || ev.Kind != audit.KindFlow {
					t.Errorf("flow to %s: %+v, want %s denied as %s in %s mode", dest, ev, proto, reason, mode)
				}
				if c := ev.Client; c != cli4 && c != cli6 {
					t.Errorf("flow to %s: client %s, want the LAN client", dest, c)
				}
			}
			for dest, ev := range got {
				t.Errorf("unwanted event to %s: %+v", dest, ev)
			}
			if r.stats.Flows != uint64(len(want)) || r.stats.Denied != uint64(len(want)) {
				t.Errorf("stats: %d flows, %d denied; want %d each", r.stats.Flows, r.stats.Denied, len(want))
			}
		})
	}
	// The echo replies count in the echo request's flow.
	r := synthRun(t, path, testPolicy, nil, Config{})
	for _, ev := range r.events {
		if ev.Dest.String() == "203.0.113.9" && (ev.BytesOut != 2*17 || ev.BytesIn != 2*17) {
			t.Errorf("ping flow: %d bytes out, %d in; want 34 each (two requests, two replies)", ev.BytesOut, ev.BytesIn)
		}
	}
}
