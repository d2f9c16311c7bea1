package capture

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestGTPOversizeDatagram (THREATS.md section 2.4, GHSA-8mcr-459q-5mx2):
// gopacket's GTPv1-U decoder (v1.7.7, after that advisory's fixes) still
// computes extension-header offsets in 16 bits: in a GTP-U datagram of
// about 64 KiB they wrap, and it panics slicing backwards. Capture decodes
// through a DecodingLayerParser, which turns a decoder's panic into an
// error: such a datagram (a jumbo or GRO-merged frame, or a crafted
// capture file) is counted malformed, not as a panic capture had to
// recover from (FuzzPacket fails on one), and an ordinary GTP-U frame is
// still decoded after it.
func TestGTPOversizeDatagram(t *testing.T) {
	c, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}})
	if err != nil {
		t.Fatal(err)
	}
	gtp := make([]byte, 65400)
	gtp[0] = 0x34 // version 1, protocol type GTP, E: extension headers follow
	gtp[1] = 0xff // T-PDU
	binary.BigEndian.PutUint16(gtp[2:4], uint16(len(gtp)-8))
	gtp[11] = 0x85 // the next extension header's type
	for i := 12; i < len(gtp); i += 1020 {
		gtp[i] = 255 // 255 words: 1,020 bytes
		if end := i + 1020; end-1 < len(gtp) {
			gtp[end-1] = 0x85 // and another follows
		}
	}
	src, dst := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.51.100.20")
	frame := func(payload []byte) []byte {
		buf := gopacket.NewSerializeBuffer()
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		udp := &layers.UDP{SrcPort: 2152, DstPort: 2152}
		udp.SetNetworkLayerForChecksum(ip)
		err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true},
			&layers.Ethernet{SrcMAC: macClient, DstMAC: macGW, EthernetType: layers.EthernetTypeIPv4}, ip, udp, gopacket.Payload(payload))
		if err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	now := time.Unix(1e9, 0)
	c.proc.packet(frame(gtp), now, layers.LinkTypeEthernet)
	// The decoder does panic on it (gopacket.NewPacket reports the
	// panic as a DecodeFailure layer): the test shows the frame it feeds.
	if pk := gopacket.NewPacket(frame(gtp), layers.LayerTypeEthernet, gopacket.Default); pk.ErrorLayer() == nil {
		t.Log("gopacket's GTPv1-U decoder no longer fails on this datagram")
	}
	if s := c.Stats(); s.Panics != 0 || s.Malformed != 1 {
		t.Errorf("a %d-byte GTP-U datagram: %d malformed, %d decoder panics reached capture's recover", len(gtp), s.Malformed, s.Panics)
	}
	// An ordinary GTP-U frame (no extension header) carrying UDP.
	inner := gopacket.NewSerializeBuffer()
	iip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: []byte{10, 0, 0, 1}, DstIP: []byte{203, 0, 113, 5}}
	iudp := &layers.UDP{SrcPort: 40000, DstPort: 9999}
	iudp.SetNetworkLayerForChecksum(iip)
	if err := gopacket.SerializeLayers(inner, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, iip, iudp, gopacket.Payload("hi")); err != nil {
		t.Fatal(err)
	}
	small := append([]byte{0x30, 0xff, 0, 0, 0, 0, 0, 1}, inner.Bytes()...)
	binary.BigEndian.PutUint16(small[2:4], uint16(len(small)-8))
	before := c.Stats().Flows
	c.proc.packet(frame(small), now.Add(time.Second), layers.LinkTypeEthernet)
	c.proc.flush("end-of-capture")
	if s := c.Stats(); s.Flows == before || s.Panics != 0 {
		t.Errorf("an ordinary GTP-U frame: flows %d -> %d, %d panics", before, s.Flows, s.Panics)
	}
}
