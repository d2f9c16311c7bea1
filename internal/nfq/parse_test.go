package nfq

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

var (
	c4 = netip.MustParseAddrPort("192.0.2.1:40000")
	s4 = netip.MustParseAddrPort("198.51.100.2:443")
	c6 = netip.MustParseAddrPort("[fd00:33::1]:40000")
	s6 = netip.MustParseAddrPort("[2001:db8::2]:443")
)

// TestBuildParse: what BuildTCP builds ParseTCP reads back, and gopacket
// (an independent decoder) finds its checksums right.
func TestBuildParse(t *testing.T) {
	for _, c := range []struct {
		from, to netip.AddrPort
		flags    uint8
		payload  []byte
	}{
		{c4, s4, SYN, nil},
		{s4, c4, PSH | ACK, []byte("HTTP/1.1 403 Forbidden\r\n\r\n")},
		{c6, s6, RST | ACK, nil},
		{s6, c6, PSH | ACK, []byte("odd")},
	} {
		pkt, err := BuildTCP(c.from, c.to, 0xfffffff0, 12345, c.flags, c.payload)
		if err != nil {
			t.Fatal(err)
		}
		seg, err := ParseTCP(pkt)
		if err != nil {
			t.Fatal(err)
		}
		if seg.Src != c.from || seg.Dst != c.to || seg.Seq != 0xfffffff0 || seg.Ack != 12345 || seg.Flags != c.flags || !bytes.Equal(seg.Payload, c.payload) {
			t.Errorf("%v > %v: parsed %+v", c.from, c.to, seg)
		}
		if !ChecksumOK(pkt) {
			t.Errorf("%v > %v: checksum", c.from, c.to)
		}
		first := layers.LayerTypeIPv4
		if c.from.Addr().Is6() {
			first = layers.LayerTypeIPv6
		}
		gp := gopacket.NewPacket(pkt, first, gopacket.Default)
		tcp, _ := gp.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if tcp == nil {
			t.Fatalf("gopacket: %v", gp.ErrorLayer())
		}
		want := tcp.Checksum
		nl := gp.NetworkLayer().(gopacket.NetworkLayer)
		tcp.SetNetworkLayerForChecksum(nl)
		buf := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, tcp, gopacket.Payload(c.payload)); err != nil {
			t.Fatal(err)
		}
		if got := binary.BigEndian.Uint16(buf.Bytes()[16:]); got != want {
			t.Errorf("%v > %v: tcp checksum %#x, gopacket computes %#x", c.from, c.to, want, got)
		}
		if ip4, ok := nl.(*layers.IPv4); ok {
			h := append([]byte(nil), pkt[:20]...)
			h[10], h[11] = 0, 0
			if fold(sum(h, 0)) != ^ip4.Checksum {
				t.Errorf("ipv4 header checksum %#x", ip4.Checksum)
			}
		}
	}
	if _, err := BuildTCP(c4, s6, 1, 1, SYN, nil); err == nil {
		t.Error("mixed families built")
	}
}

// TestParseRefuses: what ParseTCP must not read.
func TestParseRefuses(t *testing.T) {
	v4, _ := BuildTCP(c4, s4, 1, 2, ACK, []byte("data"))
	v6, _ := BuildTCP(c6, s6, 1, 2, ACK, []byte("data"))
	mod := func(b []byte, f func([]byte)) []byte { b = append([]byte(nil), b...); f(b); return b }
	for name, pkt := range map[string][]byte{
		"empty":           nil,
		"v4 short":        v4[:19],
		"v4 truncated":    v4[:len(v4)-1],
		"v4 ihl 4":        mod(v4, func(b []byte) { b[0] = 0x44 }),
		"v4 ihl past":     mod(v4, func(b []byte) { b[0] = 0x4f }),
		"v4 more frags":   mod(v4, func(b []byte) { b[6] |= 0x20 }),
		"v4 frag offset":  mod(v4, func(b []byte) { b[7] = 1 }),
		"v4 udp":          mod(v4, func(b []byte) { b[9] = 17 }),
		"v4 doff 4":       mod(v4, func(b []byte) { b[32] = 0x40 }),
		"v4 doff past":    mod(v4, func(b []byte) { b[32] = 0xf0 }),
		"v4 total < tcp":  mod(v4, func(b []byte) { binary.BigEndian.PutUint16(b[2:], 30) }),
		"v6 short":        v6[:39],
		"v6 truncated":    v6[:len(v6)-1],
		"v6 jumbo":        mod(v6, func(b []byte) { b[4], b[5] = 0, 0 }),
		"v6 hop-by-hop":   mod(v6, func(b []byte) { b[6] = 0 }),
		"v6 fragment":     mod(v6, func(b []byte) { b[6] = 44 }),
		"v6 dest options": mod(v6, func(b []byte) { b[6] = 60 }),
		"version 5":       mod(v4, func(b []byte) { b[0] = 0x55 }),
	} {
		if seg, err := ParseTCP(pkt); err == nil {
			t.Errorf("%s: parsed %+v", name, seg)
		}
	}
	// Bytes after the IP length are not the segment's.
	seg, err := ParseTCP(append(append([]byte(nil), v4...), 0, 0))
	if err != nil || string(seg.Payload) != "data" {
		t.Errorf("trailing bytes: %q %v", seg.Payload, err)
	}
}

// FuzzParseTCP: ParseTCP never panics, and what it accepts fits the
// packet's header fields.
func FuzzParseTCP(f *testing.F) {
	for _, a := range [][2]netip.AddrPort{{c4, s4}, {c6, s6}} {
		p, _ := BuildTCP(a[0], a[1], 7, 9, PSH|ACK, []byte("payload"))
		f.Add(p)
		p, _ = BuildTCP(a[0], a[1], 7, 9, SYN, nil)
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, ip []byte) {
		seg, err := ParseTCP(ip)
		if err != nil {
			return
		}
		var l4 int // the TCP segment's length by the IP header
		var hdr int
		switch ip[0] >> 4 {
		case 4:
			hdr = int(ip[0]&15) * 4
			l4 = int(binary.BigEndian.Uint16(ip[2:])) - hdr
			if ip[9] != 6 || binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
				t.Fatal("accepted a fragment or not tcp")
			}
		case 6:
			hdr = 40
			l4 = int(binary.BigEndian.Uint16(ip[4:]))
			if ip[6] != 6 {
				t.Fatal("accepted an extension header")
			}
		default:
			t.Fatalf("accepted version %d", ip[0]>>4)
		}
		doff := int(ip[hdr+12]>>4) * 4
		if doff < 20 || len(seg.Payload) != l4-doff || hdr+l4 > len(ip) {
			t.Fatalf("payload %d bytes, ip says %d - %d", len(seg.Payload), l4, doff)
		}
		if len(seg.Payload) > 0 && &seg.Payload[0] != &ip[hdr+doff] {
			t.Fatal("payload is not the packet's")
		}
	})
}
