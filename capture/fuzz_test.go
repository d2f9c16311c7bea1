package capture

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"egressd/audit"
	"egressd/internal/httpwire"
	"egressd/internal/tlshello"
	"egressd/policy"
)

// firstPackets returns up to n frames of a real capture, as fuzz seeds.
func firstPackets(f *testing.F, file string, n int, keep func([]byte) bool) [][]byte {
	f.Helper()
	fh, err := os.Open(filepath.Join(pcapDir, file))
	if err != nil {
		f.Fatalf("real capture missing: %v", err)
	}
	defer fh.Close()
	var out [][]byte
	var next func() ([]byte, error)
	if r, err := pcapgo.NewReader(fh); err == nil {
		next = func() ([]byte, error) { d, _, err := r.ReadPacketData(); return d, err }
	} else {
		fh.Seek(0, 0)
		r, err := pcapgo.NewNgReader(fh, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			f.Fatal(err)
		}
		next = func() ([]byte, error) { d, _, err := r.ReadPacketData(); return d, err }
	}
	for len(out) < n {
		d, err := next()
		if err != nil {
			break
		}
		if keep == nil || keep(d) {
			out = append(out, d)
		}
	}
	return out
}

// FuzzPacket feeds arbitrary frames through the whole pipeline (decode,
// defragment, reassemble, name, classify). Invariants: no panic escapes
// (decoders are recovered), no panic is even recovered for the frames of
// the pipeline's own parsers, and every flow is emitted once.
func FuzzPacket(f *testing.F) {
	// Seeds: real frames (Ethernet) of a TLS hello over two segments, a
	// QUIC v2 Initial, fragmented DNS, malformed DNS, GTP-tunnelled TLS.
	for _, file := range []string{"ndpi/tls_2_reasms.pcapng", "ndpi/quic-v2.pcapng", "ndpi/dns_fragmented.pcap", "ndpi/malformed_dns.pcap", "ndpi/tls_invalid_reads.pcap"} {
		for _, p := range firstPackets(f, file, 6, nil) {
			f.Add(p, uint8(1))
		}
	}
	// A raw IPv4 header claiming 5 words of options but only 20 bytes long.
	f.Add([]byte{0x46, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2}, uint8(101))
	// A Linux cooked header that ends before its protocol field.
	f.Add([]byte{0, 0, 0, 1, 0, 6}, uint8(113))
	eng, err := policy.Compile("fuzz.yaml", []byte(testPolicy))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, frame []byte, link uint8) {
		rec := &recorder{}
		c, err := New(Config{MaxFlows: 4}, Deps{Policy: policy.NewStore(eng), Sink: rec})
		if err != nil {
			t.Fatal(err)
		}
		now := time.Unix(1e9, 0)
		lt := layers.LinkType(link)
		// The same frame twice (a retransmission), then a truncated copy.
		c.proc.packet(frame, now, lt)
		c.proc.packet(frame, now.Add(time.Second), lt)
		c.proc.packet(frame[:len(frame)/2], now.Add(2*time.Second), lt)
		c.proc.flush("end-of-capture")
		s := c.Stats()
		flows, requests := 0, 0
		for _, ev := range rec.all() {
			if ev.Kind == audit.KindRequest {
				requests++
			} else {
				flows++
			}
		}
		if uint64(flows) != s.Flows || uint64(requests) != s.Requests {
			t.Fatalf("flow events %d, request events %d; counted %d flows, %d requests", flows, requests, s.Flows, s.Requests)
		}
		if s.Panics != 0 {
			t.Fatalf("a decoder panicked (recovered): %d", s.Panics)
		}
	})
}

// FuzzQUICInitial feeds arbitrary datagrams to the Initial opener and the
// CRYPTO frame walker. Invariants: no panic; CRYPTO data handed out always
// lies within the datagram's bounds.
func FuzzQUICInitial(f *testing.F) {
	// Seeds: the UDP payloads of real client Initials (v1 split over
	// packets, v2), as they are on the wire.
	for _, file := range []string{"ndpi/quic-v2.pcapng", "ndpi/quic_frags_ch_in_multiple_packets.pcapng", "ndpi/doq.pcapng"} {
		for _, p := range firstPackets(f, file, 3, nil) {
			// Skip Ethernet (14) + IP (20 or 40) + UDP (8).
			off := 14 + 20 + 8
			if len(p) > 14 && p[12] == 0x86 && p[13] == 0xdd {
				off = 14 + 40 + 8
			}
			if len(p) > off {
				f.Add(p[off:])
			}
		}
	}
	// A long header Initial with a DCID length of 255 (over the limit).
	f.Add([]byte{0xc0, 0, 0, 0, 1, 0xff, 1, 2, 3})
	// A decrypted-looking frame list: ACK with a huge range count.
	f.Add([]byte{0x02, 0x00, 0x00, 0xbf, 0xff, 0xff, 0xff, 0x00})
	f.Fuzz(func(t *testing.T, dgram []byte) {
		var o quicOpener
		o.open(dgram, func(off uint64, data []byte) {
			if len(data) > len(dgram) {
				t.Fatalf("CRYPTO frame of %d bytes from a %d-byte datagram", len(data), len(dgram))
			}
		})
		// The frame walker on its own, as if dgram were a decrypted payload.
		quicFrames(dgram, func(uint64, []byte) {})
		var s stream
		quicFrames(dgram, func(off uint64, data []byte) {
			if off < maxStream {
				s.add(uint32(off), data)
			}
		})
		if len(s.buf) > maxStream || s.pendLen > maxPendingLen {
			t.Fatalf("stream over its bounds: %d, %d pending", len(s.buf), s.pendLen)
		}
	})
}

// FuzzHelloReason holds capture's reading of a TLS flow to the proxy's:
// the client's first bytes (a TCP stream starting with a handshake record)
// go through the pipeline, and the flow's reason is what the proxy's peek
// maps tlshello.Read's verdict on the same bytes to: hello-too-large,
// duplicate-sni, hello-malformed, or, for a hello it takes, a decision by
// its name. The client then ends its stream, so a hello left short is
// hello-malformed too (the proxy reads to the end of stream).
// tlshello's own FuzzReadAgreesWithCryptoTLS holds the parser to
// crypto/tls.
func FuzzHelloReason(f *testing.F) {
	f.Add(realClientHello(f, "seed.allowed.test"))
	sni := sniExt("a.allowed.test")
	f.Add(helloBody([]byte{0x13, 0x01}, sni, nil))
	f.Add(helloBody([]byte{0x13, 0x01}, append(append([]byte{}, sni...), sni...), nil))
	f.Add(helloBody([]byte{0x13, 0x01}, append(append([]byte{}, sni...), tlsExt(16, []byte{0, 3, 2, 'h', '2'})...), nil))
	f.Add(helloBody([]byte{0x13, 0x01}, append(append([]byte{}, sni...), tlsExt(0xfe0d, []byte{0, 0, 1, 0, 1, 7, 0, 1, 9, 0, 1, 8})...), nil))
	f.Add([]byte{0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x00})
	cli := netip.MustParseAddr("192.0.2.84")
	srv := netip.MustParseAddr("203.0.113.84")
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 || b[0] != 22 || len(b) > 20000 {
			return
		}
		h, err := tlshello.Read(b, nil)
		p := newPcap(t)
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: 46100, sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, b, 1400, nil, nil)
		c.close()
		r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
		if len(r.events) != 1 {
			t.Fatalf("%d events", len(r.events))
		}
		got := r.events[0].Reason
		helloReason := got == ReasonHelloTooLarge || got == ReasonDuplicateSNI || got == ReasonHelloBad
		var want string
		switch {
		case err == tlshello.ErrTooLarge:
			want = ReasonHelloTooLarge
		case err != nil && h.DupSNI:
			want = ReasonDuplicateSNI
		case err != nil:
			want = ReasonHelloBad
		}
		if want != "" && got != want || want == "" && helloReason {
			t.Fatalf("reason %q; tlshello %+v, %v: want %q", got, h, err, want)
		}
	})
}

// FuzzFollowAgreesWithProxy: capture finds the same later requests of a
// plain-HTTP connection as the proxy's follower does on the whole stream
// (the proxy reads the connection in order; capture gets it in segments
// of any size, two of them swapped), and refuses the stream where the
// proxy does, with the proxy's reason.
func FuzzFollowAgreesWithProxy(f *testing.F) {
	f.Add([]byte(keepAliveStream), uint8(7), uint8(3))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\n\r\n"), uint8(1), uint8(0))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\nGET /x HTTP/1.1\r\nHost: b\r\n\r\n\x81\x80"), uint8(20), uint8(1))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\r\n0\r\n\r\n"), uint8(9), uint8(2))
	eng, err := policy.Compile("fuzz.yaml", []byte(testPolicy))
	if err != nil {
		f.Fatal(err)
	}
	cli, srv := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("203.0.113.1")
	f.Fuzz(func(t *testing.T, stream []byte, mss, swap uint8) {
		if len(stream) > 8<<10 {
			return
		}
		if yes, _ := httpStart(stream); !yes {
			return
		}
		h, err := httpwire.ParseHead(stream)
		if err != nil {
			return // refused on its first head: not followed by either
		}
		// The proxy's view.
		var want []string
		s := httpwire.ReqStream{MaxHead: maxStream}
		s.Start(&h)
		rest := stream[h.Len:]
		for len(rest) > 0 && !s.Tunnel() {
			n, rh, err := s.Next(rest)
			if errors.Is(err, httpwire.ErrNeedMore) {
				break
			}
			if err != nil {
				want = append(want, "!"+headReason(err))
				break
			}
			if rh != nil {
				p, _, _ := strings.Cut(rh.Path, "?")
				want = append(want, p)
			}
			rest = rest[n:]
		}
		// Capture's, from segments.
		var segs [][]byte
		size := int(mss)%64 + 1
		for b := stream; len(b) > 0; {
			k := min(size, len(b))
			segs = append(segs, b[:k])
			b = b[k:]
		}
		order := make([]int, len(segs))
		for i := range order {
			order[i] = i
		}
		if i := int(swap); i+1 < len(order) {
			order[i], order[i+1] = order[i+1], order[i]
		}
		rec := &recorder{}
		c, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Sink: rec})
		if err != nil {
			t.Fatal(err)
		}
		now := time.Unix(1e9, 0)
		const isn = 1000
		send := func(fromClient bool, flags string, seq uint32, data []byte) {
			now = now.Add(time.Millisecond)
			c.proc.packet(tcpFrame(t, cli, srv, 40000, 80, fromClient, flags, seq, data), now, layers.LinkTypeEthernet)
		}
		send(true, "S", isn-1, nil)
		send(false, "SA", 5000, nil)
		send(true, "A", isn, nil)
		offs := make([]uint32, len(segs))
		for i, o := 0, uint32(isn); i < len(segs); i++ {
			offs[i], o = o, o+uint32(len(segs[i]))
		}
		for _, i := range order {
			send(true, "A", offs[i], segs[i])
		}
		c.proc.flush("end-of-capture")
		var got []string
		for _, ev := range rec.all() {
			if ev.Kind != audit.KindRequest {
				continue
			}
			switch ev.Reason {
			case ReasonHTTPBad, ReasonHTTPFraming, ReasonHostMismatch, ReasonHelloTooLarge, ReasonHelloTimeout:
				got = append(got, "!"+ev.Reason)
			default:
				got = append(got, ev.Path)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("capture found requests %q, the proxy's follower %q", got, want)
		}
	})
}

// tcpFrame builds one Ethernet frame of a TCP segment between cli and srv.
func tcpFrame(t *testing.T, cli, srv netip.Addr, cport, sport uint16, fromClient bool, flags string, seq uint32, data []byte) []byte {
	src, dst, sp, dp := cli, srv, cport, sport
	if !fromClient {
		src, dst, sp, dp = srv, cli, sport, cport
	}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Window: 65535,
		SYN: strings.Contains(flags, "S"), ACK: strings.Contains(flags, "A"), FIN: strings.Contains(flags, "F")}
	tcp.SetNetworkLayerForChecksum(ip)
	eth := &layers.Ethernet{SrcMAC: macClient, DstMAC: macGW, EthernetType: layers.EthernetTypeIPv4}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, tcp, gopacket.Payload(bytes.Clone(data))); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
