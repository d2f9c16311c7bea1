package capture

import (
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// destOpts6 is an empty IPv6 Destination Options header (PadN), its next
// header filled in by ipFragments.
var destOpts6 = []byte{0, 0, 1, 4, 0, 0, 0, 0}

// ipFragments writes dgram, the payload of an IP packet of protocol proto
// from src to dst, as fragments of at most size bytes in the order given
// (indexes; nil = in order). IPv6 fragments carry p.afterFrag6, when set,
// after their Fragment header (it is part of what is fragmented).
func (p *pcapWriter) ipFragments(fromClient bool, src, dst netip.Addr, proto layers.IPProtocol, dgram []byte, size int, order []int) {
	p.t.Helper()
	next := proto
	if src.Is6() && p.afterFrag6 != nil {
		ext := append([]byte{byte(proto)}, p.afterFrag6[1:]...)
		dgram = append(ext, dgram...)
		next = layers.IPProtocolIPv6Destination
	}
	chunks, order := pieces(dgram, size, order)
	for _, i := range order {
		if i >= len(chunks) {
			continue
		}
		off := uint16(i * size / 8)
		more := i < len(chunks)-1
		if src.Is4() {
			flags := layers.IPv4Flag(0)
			if more {
				flags = layers.IPv4MoreFragments
			}
			h := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice(), Id: 0x4242, Flags: flags, FragOffset: off}
			p.frame(fromClient, h, gopacket.Payload(chunks[i]))
		} else {
			h := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolIPv6Fragment, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
			fh := &layers.IPv6Fragment{NextHeader: next, FragmentOffset: off, MoreFragments: more, Identification: 0x4242}
			p.frame(fromClient, h, fh, gopacket.Payload(chunks[i]))
		}
	}
}

// fragSeg writes one TCP segment of c, IP-fragmented as ipFragments does.
func (c *tcpConn) fragSeg(fromClient bool, seq uint32, data []byte, size int, order []int) {
	c.p.t.Helper()
	src, dst, sp, dp := c.cli, c.srv, c.cport, c.sport
	ack := c.sseq
	if !fromClient {
		src, dst, sp, dp = dst, src, dp, sp
		ack = c.cseq
	}
	ip := ipLayer(src, dst, layers.IPProtocolTCP)
	t := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Ack: ack, Window: 65535, ACK: true, PSH: true}
	t.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, t, gopacket.Payload(data)); err != nil {
		c.p.t.Fatal(err)
	}
	c.p.ipFragments(fromClient, src, dst, layers.IPProtocolTCP, buf.Bytes(), size, order)
}

// A client that IP-fragments the segment carrying its ClientHello does
// not hide the SNI from capture: the kernel reassembles before nftables
// and the proxy reads the SNI, so capture must too, not judge the flow by
// the DNS-vouched address. IPv4, IPv6, and IPv6 with a Destination
// Options header after the Fragment header.
func TestSyntheticFragmentedClientHello(t *testing.T) {
	cases := []struct {
		name     string
		cli, srv netip.Addr
		ext      bool
	}{
		{"IPv4", netip.MustParseAddr("192.0.2.20"), netip.MustParseAddr("203.0.113.80"), false},
		{"IPv6", netip.MustParseAddr("2001:db8::20"), netip.MustParseAddr("2001:db8:113::80"), false},
		{"IPv6 DestOpts", netip.MustParseAddr("2001:db8::20"), netip.MustParseAddr("2001:db8:113::80"), true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newPcap(t)
			if tc.ext {
				p.afterFrag6 = destOpts6
			}
			c := &tcpConn{p: p, cli: tc.cli, srv: tc.srv, cport: 40001, sport: 443, cseq: 1, sseq: 1}
			c.handshake()
			hello := handHello(sniExt("evil.test"))
			c.fragSeg(true, c.cseq, hello, 48, []int{2, 0, 1})
			c.cseq += uint32(len(hello))
			c.send(false, make([]byte, 1000), 1400, nil, nil)
			c.close()
			facts := factsMap{tc.srv: {"cdn.allowed.test"}}
			r := synthRun(t, p.close(), testPolicy, facts, Config{})
			if len(r.events) != 1 {
				t.Fatalf("%d events, want 1: %+v", len(r.events), r.events)
			}
			ev := r.events[0]
			if ev.Name != "evil.test" || ev.NameSource != audit.NameSNI || ev.Verdict != policy.Deny {
				t.Errorf("flow whose hello was IP-fragmented: name %q (%s) %s rule %q reason %q, want evil.test from the SNI, denied",
					ev.Name, ev.NameSource, ev.Verdict, ev.Rule, ev.Reason)
			}
			if r.stats.Reassembled != 1 {
				t.Errorf("reassembled %d datagrams, want 1", r.stats.Reassembled)
			}
			if ev.BytesOut < uint64(len(hello)) {
				t.Errorf("bytes out %d, want at least the hello's %d", ev.BytesOut, len(hello))
			}
		})
	}
}

// A fragmented DNS answer whose IPv6 Fragment header is followed by a
// Destination Options header still teaches the name of its addresses.
func TestSyntheticFragmentedDNSAfterDestOpts(t *testing.T) {
	cli, res := netip.MustParseAddr("2001:db8::20"), netip.MustParseAddr("2001:db8:53::53")
	var addrs []netip.Addr
	for i := 1; i <= 120; i++ {
		addrs = append(addrs, netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0x01, 0x13, 15: byte(i)}))
	}
	p := newPcap(t)
	p.afterFrag6 = destOpts6
	p.udp(true, cli, res, 5353, 53, dnsQuery(t, "cdn.allowed.test"))
	p.udpFragments(false, res, cli, 53, 5353, dnsResponse(t, "cdn.allowed.test", addrs), 600, []int{2, 0, 3, 1})
	r := synthRun(t, p.close(), testPolicy, nil, Config{})
	if r.stats.Reassembled != 1 || r.stats.DNSAnswers != 1 {
		t.Errorf("fragments %d reassembled %d answers %d, want the answer reassembled and read", r.stats.Fragments, r.stats.Reassembled, r.stats.DNSAnswers)
	}
}

// Overlapping fragments are treated as Linux's reassembly (IPv4 and IPv6,
// also netfilter's) treats them, since enforce mode sees what it rebuilt:
// a fragment wholly inside data already held is a duplicate, dropped (the
// first copy wins); one that overlaps partly discards the whole datagram.
func TestDefragOverlapsAsLinux(t *testing.T) {
	now := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	for _, v6 := range []bool{false, true} {
		k := fragKey{src: netip.MustParseAddr("192.0.2.1"), dst: netip.MustParseAddr("203.0.113.1"), id: 7, proto: 6}
		if v6 {
			k = fragKey{src: netip.MustParseAddr("2001:db8::1"), dst: netip.MustParseAddr("2001:db8::2"), id: 7}
		}
		fill := func(b byte, n int) []byte {
			s := make([]byte, n)
			for i := range s {
				s[i] = b
			}
			return s
		}
		// A duplicate with other bytes: the first copy's stay.
		d := newDefragger()
		d.add(k, 6, 0, true, fill('a', 16), now)
		d.add(k, 6, 16, true, fill('b', 16), now)
		d.add(k, 6, 8, true, fill('X', 8), now) // inside [0,16)
		full, proto := d.add(k, 6, 32, false, fill('c', 8), now)
		if string(full) != string(fill('a', 16))+string(fill('b', 16))+string(fill('c', 8)) || proto != 6 {
			t.Errorf("v6 %v: duplicate fragment: got %q proto %d, want the first copy's bytes", v6, full, proto)
		}
		// A partial overlap: the datagram is given up, and its last
		// fragment completes nothing.
		d = newDefragger()
		d.add(k, 6, 0, true, fill('a', 16), now)
		d.add(k, 6, 8, true, fill('X', 16), now) // [8,24) overlaps [0,16) partly
		d.add(k, 6, 16, true, fill('b', 16), now)
		if full, _ := d.add(k, 6, 32, false, fill('c', 8), now); full != nil {
			t.Errorf("v6 %v: a datagram with partly overlapping fragments was rebuilt: %q", v6, full)
		}
		if d.dropped == 0 {
			t.Errorf("v6 %v: overlapping datagram not counted as given up", v6)
		}
		// Overlapping the last run from below while reaching past it:
		// also an overlap.
		d = newDefragger()
		d.add(k, 6, 0, true, fill('a', 16), now)
		d.add(k, 6, 8, true, fill('X', 16), now)
		if full, _ := d.add(k, 6, 16, false, fill('c', 8), now); full != nil {
			t.Errorf("v6 %v: rebuilt across an overlap past the end: %q", v6, full)
		}
	}
}

// A fragmented echo request of another protocol than TCP and UDP counts
// as one flow of that protocol from its first fragment, its later
// fragments in it, also when an IPv6 Destination Options header follows
// the Fragment header (not a flow of protocol 60).
func TestSyntheticFragmentedOtherProtocol(t *testing.T) {
	cases := []struct {
		name     string
		cli, dst netip.Addr
		proto    layers.IPProtocol
		typ      uint8
		ext      bool
	}{
		{"ICMP", netip.MustParseAddr("198.18.5.10"), netip.MustParseAddr("203.0.113.9"), layers.IPProtocolICMPv4, 8, false},
		{"ICMPv6", netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("2001:db8:99::1"), layers.IPProtocolICMPv6, 128, false},
		{"ICMPv6 DestOpts", netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("2001:db8:99::1"), layers.IPProtocolICMPv6, 128, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newPcap(t)
			if tc.ext {
				p.afterFrag6 = destOpts6
			}
			msg := icmpMsg(tc.typ, string(make([]byte, 200)))
			p.ipFragments(true, tc.cli, tc.dst, tc.proto, msg, 64, nil)
			r := synthRun(t, p.close(), testPolicy, nil, Config{})
			if len(r.events) != 1 {
				t.Fatalf("%d events, want 1: %+v", len(r.events), r.events)
			}
			ev := r.events[0]
			// An echo request is decided by the policy (protocol icmp),
			// which has no icmp rule: no-rule.
			if ev.Proto != protoName(uint8(tc.proto)) || ev.Dest != tc.dst || ev.Verdict != policy.Deny || ev.Reason != policy.ReasonNoRule {
				t.Errorf("flow %s to %s: %s %q, want %s denied as %s", ev.Proto, ev.Dest, ev.Verdict, ev.Reason, protoName(uint8(tc.proto)), policy.ReasonNoRule)
			}
			if ev.BytesOut < uint64(len(msg)) {
				t.Errorf("bytes out %d, want at least the message's %d", ev.BytesOut, len(msg))
			}
		})
	}
}
