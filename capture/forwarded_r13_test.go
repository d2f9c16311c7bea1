package capture

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// TestForwardedNotSkipped (R13): frames the gateway forwards or takes,
// which capture must not count as unforwarded or skip: IPv4 with options
// (its header checksum covers them), TTL 1 to multicast and to the
// limited broadcast (IGMP, SSDP, a DHCP discover), hop limit 1 to
// link-local and multicast IPv6 (MLD, neighbour discovery), and the
// gateway's own frames toward a client with a TTL of 1 (a server's answer
// that arrived with 2).
func TestForwardedNotSkipped(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	udp := func(sp, dp uint16) []gopacket.SerializableLayer {
		return []gopacket.SerializableLayer{&layers.UDP{SrcPort: layers.UDPPort(sp), DstPort: layers.UDPPort(dp)}, gopacket.Payload("x")}
	}
	ip4 := func(src, dst string, ttl uint8, proto layers.IPProtocol, opts ...layers.IPv4Option) *layers.IPv4 {
		return &layers.IPv4{Version: 4, TTL: ttl, Protocol: proto, SrcIP: netip.MustParseAddr(src).AsSlice(), DstIP: netip.MustParseAddr(dst).AsSlice(), Options: opts}
	}
	ip6 := func(src, dst string, hl uint8, proto layers.IPProtocol) *layers.IPv6 {
		return &layers.IPv6{Version: 6, HopLimit: hl, NextHeader: proto, SrcIP: netip.MustParseAddr(src).AsSlice(), DstIP: netip.MustParseAddr(dst).AsSlice()}
	}
	routerAlert := layers.IPv4Option{OptionType: 148, OptionLength: 4, OptionData: []byte{0, 0}}
	r.liveIP(false, ip4("198.18.5.10", "224.0.0.22", 1, layers.IPProtocolIGMP, routerAlert), gopacket.Payload([]byte{0x22, 0, 0, 0, 0, 0, 0, 0}))
	r.liveIP(false, ip4("198.18.5.10", "239.255.255.250", 1, layers.IPProtocolUDP), udp(50000, 1900)...)
	r.liveIP(false, ip4("198.18.5.10", "224.0.0.251", 255, layers.IPProtocolUDP), udp(5353, 5353)...)
	r.liveIP(false, ip4("0.0.0.0", "255.255.255.255", 1, layers.IPProtocolUDP), udp(68, 67)...)
	r.liveIP(false, ip6("fe80::10", "ff02::16", 1, layers.IPProtocolUDP), udp(5000, 5000)...)
	r.liveIP(false, ip6("fe80::10", "fe80::1", 1, layers.IPProtocolUDP), udp(5000, 5000)...)
	if n := r.c.Stats().Unforwarded; n != 0 {
		t.Errorf("unforwarded: %d frames, want none", n)
	}

	// A TLS connection whose every client frame carries IPv4 options,
	// and whose server frames the gateway sends with a TTL of 1.
	hello := realClientHello(t, realName)
	cli, srv := "198.18.5.10", "203.0.113.10"
	ts := layers.IPv4Option{OptionType: 68, OptionLength: 12, OptionData: []byte{13, 0, 0, 0, 0, 0, 0, 0, 0, 0}}
	tcp := func(fromGW bool, flags string, seq, ack uint32, data []byte) {
		src, dst, sp, dp, o := cli, srv, uint16(49000), uint16(443), []layers.IPv4Option{ts}
		ttl := uint8(64)
		if fromGW {
			src, dst, sp, dp, o, ttl = srv, cli, 443, 49000, nil, 1
		}
		t := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Ack: ack, Window: 65535,
			SYN: flags == "S" || flags == "SA", ACK: flags != "S"}
		r.liveIP(fromGW, ip4(src, dst, ttl, layers.IPProtocolTCP, o...), t, gopacket.Payload(data))
	}
	tcp(false, "S", 100, 0, nil)
	tcp(true, "SA", 500, 101, nil)
	tcp(false, "A", 101, 501, nil)
	tcp(false, "A", 101, 501, hello)
	tcp(true, "A", 501, 101+uint32(len(hello)), nil)
	if n := r.c.Stats().Unforwarded; n != 0 {
		t.Errorf("unforwarded: %d frames, want none", n)
	}
	r.c.proc.flush("shutdown")
	var ev audit.Event
	for _, e := range r.rec.all() {
		if e.ClientPort == 49000 {
			ev = e
		}
	}
	if ev.Name != realName || ev.Reason == ReasonStreamConflict {
		t.Errorf("%+v, want %s read", ev, realName)
	}
}
