package capture

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// urgentSeg writes one client segment with the URG flag, its urgent
// pointer just past its last byte, as Linux sends a send(MSG_OOB).
func (c *tcpConn) urgentSeg(data []byte) {
	c.urgentPtr(true, data, uint16(len(data)))
}

// urgentPtr writes one segment, from the client or the server, with the
// URG flag and urgent pointer ptr (relative to the segment's sequence
// number; the urgent byte is the one at seq+ptr-1, RFC 793's reading,
// which Linux follows).
func (c *tcpConn) urgentPtr(fromClient bool, data []byte, ptr uint16) {
	src, dst, sp, dp, seq, ack := c.cli, c.srv, c.cport, c.sport, &c.cseq, c.sseq
	if !fromClient {
		src, dst, sp, dp, seq, ack = dst, src, dp, sp, &c.sseq, c.cseq
	}
	ip := ipLayer(src, dst, layers.IPProtocolTCP)
	t := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: *seq, Ack: ack, Window: 65535,
		ACK: true, PSH: true, URG: true, Urgent: ptr}
	t.SetNetworkLayerForChecksum(ip)
	c.p.frame(fromClient, ip.(gopacket.SerializableLayer), t, gopacket.Payload(data))
	*seq += uint32(len(data))
}

// TestSyntheticUrgentByte: a client that sends a byte as urgent data
// (MSG_OOB) inside its ClientHello or request head. The receiver (the
// transparent proxy, any server without SO_OOBINLINE) reads the stream
// without that byte (the one at the segment's sequence number plus the
// urgent pointer minus one), so capture parses the stream without it
// too: the hello the proxy decides on, by its SNI. Judging the bytes in
// sequence order would say hello-malformed where the proxy allows (e2e
// TestHardeningTCP/urgent-data); giving the name search up and deciding
// by address would let a client hide a name the proxy denies behind an
// allowed name DNS gave the address out for (the spoof cases).
func TestSyntheticUrgentByte(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.60")
	hello := realClientHello(t, "a.allowed.test")
	evil := realClientHello(t, "evil.test")
	head := []byte("GET /urg HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n")
	evilHead := []byte("GET /urg HTTP/1.1\r\nHost: evil.test\r\n\r\n")
	for _, tc := range []struct {
		name    string
		port    uint16
		bytes   []byte
		at      int
		verdict policy.Verdict
		src     audit.NameSource
		want    string
	}{
		{"inside the hello", 443, hello, bytes.Index(hello, []byte("allowed")), policy.Allow, audit.NameSNI, "a.allowed.test"},
		{"before the hello", 443, hello, 0, policy.Allow, audit.NameSNI, "a.allowed.test"},
		{"inside a request head", 80, head, 10, policy.Allow, audit.NameHost, "a.allowed.test"},
		{"spoof at 60", 443, evil, 60, policy.Deny, audit.NameSNI, "evil.test"},
		{"spoof inside the hello", 443, evil, bytes.Index(evil, []byte("evil.test")) + 2, policy.Deny, audit.NameSNI, "evil.test"},
		{"spoof before the hello", 443, evil, 0, policy.Deny, audit.NameSNI, "evil.test"},
		{"spoof inside a request head", 80, evilHead, 10, policy.Deny, audit.NameHost, "evil.test"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPcap(t)
			c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.70"), srv: srv, cport: 41000, sport: tc.port, cseq: 100, sseq: 9}
			c.handshake()
			c.send(true, tc.bytes[:tc.at], 1400, nil, nil)
			c.urgentSeg([]byte{0x16})
			c.send(true, tc.bytes[tc.at:], 1400, nil, nil)
			c.send(false, bytes.Repeat([]byte{0x17}, 100), 1400, nil, nil)
			c.close()
			r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
			if len(r.events) == 0 {
				t.Fatal("no event")
			}
			ev := r.events[0]
			if ev.Verdict != tc.verdict || ev.NameSource != tc.src || ev.Name != tc.want {
				t.Errorf("event %+v: want %s %s by %s, as the proxy reads the stream without the urgent byte", ev, tc.verdict, tc.want, tc.src)
			}
		})
	}
}

// TestSyntheticUrgentPointer: which byte leaves the stream. A send of two
// bytes with MSG_OOB marks the second (the pointer is just past it: the
// first stays in line); a pointer beyond the segment marks a byte of a
// later one; a segment with URG whose byte was received already (a
// retransmission that adds the flag) marks nothing, as Linux does not
// replay an urgent pointer behind what it received; the same mark carried
// by several segments is one mark.
func TestSyntheticUrgentPointer(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.62")
	hello := realClientHello(t, "evil.test")
	// n: a byte inside the server name, where a byte more or less
	// changes the name (the session ID before it is random bytes).
	n := bytes.Index(hello, []byte("evil.test")) + 2
	for _, tc := range []struct {
		name string
		send func(c *tcpConn)
	}{
		{"two-byte send", func(c *tcpConn) {
			c.send(true, hello[:n], 1400, nil, nil)
			c.urgentSeg([]byte{hello[n], 0x16}) // the 0x16 is the urgent byte
			c.send(true, hello[n+1:], 1400, nil, nil)
		}},
		{"pointer into a later segment", func(c *tcpConn) {
			// The urgent byte (0x16) is the (n+1)th byte from here, in
			// the next segment.
			c.urgentPtr(true, hello[:40], uint16(n+1))
			c.send(true, withUrgentByte(hello[40:n], hello[n:]), 1400, nil, nil)
		}},
		{"flag on a retransmission", func(c *tcpConn) {
			c.send(true, hello[:n], 1400, nil, nil)
			c.cseq -= 10
			c.urgentSeg(hello[n-10 : n]) // received already: no mark
			c.send(true, hello[n:], 1400, nil, nil)
		}},
		{"one mark in two segments", func(c *tcpConn) {
			// A send(MSG_OOB) of n+1 bytes in two segments: both carry
			// the pointer to its last byte (0x16).
			c.urgentPtr(true, hello[:20], uint16(n+1))
			c.urgentPtr(true, withUrgentByte(hello[20:n], nil), uint16(n+1-20))
			c.send(true, hello[n:], 1400, nil, nil)
		}},
		{"one mark, its segment again before a gap fills", func(c *tcpConn) {
			// The segment with the urgent byte comes out of order, and
			// again: one mark still.
			start := c.cseq
			c.cseq = start + 20
			c.urgentSeg(withUrgentByte(hello[20:n], nil))
			c.cseq = start + 20
			c.urgentSeg(withUrgentByte(hello[20:n], nil))
			c.cseq = start
			c.send(true, hello[:20], 1400, nil, nil)
			c.cseq = start + uint32(n) + 1
			c.send(true, hello[n:], 1400, nil, nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev := urgentHelloEvent(t, "192.0.2.72", 41002, srv, 100, tc.send)
			if ev.Verdict != policy.Deny || ev.NameSource != audit.NameSNI || ev.Name != "evil.test" {
				t.Errorf("event %+v: want evil.test denied by its SNI", ev)
			}
		})
	}
}

// TestSyntheticUrgentTwice: a second urgent mark after the first urgent
// byte arrived. Linux keeps only the newest mark: the older byte is back
// in line unless the reader had read past it already, which depends on
// when the proxy read. What the proxy parsed cannot be known, so capture
// neither parses nor decides by address: it denies the flow (urgent-data).
// A second mark that comes before the first byte does (the reader cannot
// have passed it) puts that byte back in line for sure, and the flow is
// judged on the stream with only the newest mark's byte taken out.
func TestSyntheticUrgentTwice(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.63")
	hello := realClientHello(t, "a.allowed.test")
	t.Run("undetermined", func(t *testing.T) {
		p := newPcap(t)
		c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.73"), srv: srv, cport: 41003, sport: 443, cseq: 100, sseq: 9}
		c.handshake()
		c.send(true, hello[:30], 1400, nil, nil)
		c.urgentSeg([]byte{0x16})
		c.send(true, hello[30:60], 1400, nil, nil)
		c.urgentSeg([]byte{0x16})
		c.send(true, hello[60:], 1400, nil, nil)
		c.send(false, bytes.Repeat([]byte{0x17}, 100), 1400, nil, nil)
		c.close()
		r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
		if len(r.events) == 0 {
			t.Fatal("no event")
		}
		if ev := r.events[0]; ev.Verdict != policy.Deny || ev.Reason != ReasonUrgentData {
			t.Errorf("event %+v: want denied %s", ev, ReasonUrgentData)
		}
	})
	t.Run("first byte not yet arrived", func(t *testing.T) {
		p := newPcap(t)
		c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.74"), srv: srv, cport: 41004, sport: 443, cseq: 100, sseq: 9}
		c.handshake()
		// A mark on the 51st byte (hello[50], stays in line: the
		// second mark comes before it), then the second on the 0x16
		// inserted after hello[:60].
		c.urgentPtr(true, hello[:20], 51)
		c.send(true, hello[20:40], 1400, nil, nil)
		c.urgentPtr(true, hello[40:50], 21)
		c.send(true, append(append(append([]byte(nil), hello[50:60]...), 0x16), hello[60:]...), 1400, nil, nil)
		c.send(false, bytes.Repeat([]byte{0x17}, 100), 1400, nil, nil)
		c.close()
		r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
		if len(r.events) == 0 {
			t.Fatal("no event")
		}
		if ev := r.events[0]; ev.Verdict != policy.Allow || ev.NameSource != audit.NameSNI || ev.Name != "a.allowed.test" {
			t.Errorf("event %+v: want a.allowed.test allowed by its SNI", ev)
		}
	})
}

// TestSyntheticUrgentByteFollowed: urgent data in a later request of a
// followed plain-HTTP flow. The proxy's request parser reads the stream
// without the urgent byte; capture follows that stream, so the request
// it records is the one the proxy decides (Host evil.test, denied). With
// a second mark the stream the parser read is not known: a request event
// denied urgent-data, and the flow is no longer followed.
func TestSyntheticUrgentByteFollowed(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.61")
	for _, twice := range []bool{false, true} {
		p := newPcap(t)
		c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.71"), srv: srv, cport: 41001, sport: 80, cseq: 100, sseq: 9}
		c.handshake()
		c.send(true, []byte("GET /one HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n"), 1400, nil, nil)
		c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
		second := []byte("GET /two HTTP/1.1\r\nHost: evil.test\r\n\r\n")
		c.send(true, second[:5], 1400, nil, nil)
		c.urgentSeg([]byte{'X'})
		if twice {
			c.send(true, second[5:10], 1400, nil, nil)
			c.urgentSeg([]byte{'Y'})
			c.send(true, second[10:], 1400, nil, nil)
		} else {
			c.send(true, second[5:], 1400, nil, nil)
		}
		c.send(true, []byte("GET /three HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n"), 1400, nil, nil)
		c.close()
		r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
		if r.stats.Unfollowed != 0 {
			t.Errorf("twice %v: unfollowed %d, want 0", twice, r.stats.Unfollowed)
		}
		var reqs []audit.Event
		for _, ev := range r.events {
			if ev.Kind == audit.KindRequest {
				reqs = append(reqs, ev)
			}
		}
		switch {
		case !twice && (len(reqs) != 2 || reqs[0].Name != "evil.test" || reqs[0].Verdict != policy.Deny ||
			reqs[1].Name != "a.allowed.test" || reqs[1].Verdict != policy.Allow):
			t.Errorf("requests %+v: want evil.test denied, then a.allowed.test allowed", reqs)
		case twice && (len(reqs) != 1 || reqs[0].Verdict != policy.Deny || reqs[0].Reason != ReasonUrgentData):
			t.Errorf("two marks: requests %+v: want one, denied %s", reqs, ReasonUrgentData)
		}
	}
}

// TestSyntheticUrgentHeldOutOfOrder: a mark that arrives after bytes at or
// past its byte were held out of order. Capture placed those bytes before
// it knew of the mark (at their own sequence numbers, or one back for an
// older mark a newer one replaces), so the stream it holds is not the one
// the receiver reads: Linux takes the marked byte out even where it came
// before the mark (TCP_URG_NOTYET, skipped by recvmsg), and puts an older
// byte that had not come back in line. Capture reports the name the proxy
// reads or denies urgent-data; never a name from a stream the proxy does
// not read.
func TestSyntheticUrgentHeldOutOfOrder(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.64")
	hello := realClientHello(t, "evil.test")
	n := bytes.Index(hello, []byte("evil.test")) + 2
	for _, tc := range []struct {
		name string
		send func(c *tcpConn)
	}{
		{"byte held before its mark", func(c *tcpConn) {
			// The wire: hello[:n], 0x16 (urgent), hello[n:]. The
			// segment holding 0x16 comes first, without URG; then the
			// first one, with the pointer to 0x16; then the gap.
			start := c.cseq
			c.cseq = start + uint32(n)
			c.send(true, withUrgentByte(nil, hello[n:]), 1400, nil, nil)
			end := c.cseq
			c.cseq = start
			c.urgentPtr(true, hello[:20], uint16(n+1))
			c.send(true, hello[20:n], 1400, nil, nil)
			c.cseq = end
		}},
		{"older mark replaced after later bytes held", func(c *tcpConn) {
			// The wire: hello[:n], 0x16, hello[n:]. The first mark,
			// on hello[20], comes on a segment before it; bytes after
			// hello[20] come, then the second mark (0x16), then
			// hello[10:21]: Linux puts hello[20] back in line and
			// takes 0x16 out, the proxy reads the hello.
			start := c.cseq
			c.urgentPtr(true, hello[:10], 21) // marks start+20 (hello[20])
			c.cseq = start + 21
			c.send(true, hello[21:n-5], 1400, nil, nil)             // held, past hello[20]
			c.urgentPtr(true, withUrgentByte(hello[n-5:n], nil), 6) // second mark: 0x16
			c.send(true, hello[n:], 1400, nil, nil)
			end := c.cseq
			c.cseq = start + 10
			c.send(true, hello[10:21], 1400, nil, nil)
			c.cseq = end
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev := urgentHelloEvent(t, "192.0.2.75", 41005, srv, 100, tc.send)
			sni := ev.Verdict == policy.Deny && ev.NameSource == audit.NameSNI && ev.Name == "evil.test"
			urg := ev.Verdict == policy.Deny && ev.Reason == ReasonUrgentData
			if !sni && !urg {
				t.Errorf("event %+v: want evil.test denied by its SNI (the stream the proxy reads) or denied %s", ev, ReasonUrgentData)
			}
		})
	}
}

// withUrgentByte is a followed by the urgent byte 0x16, then b.
func withUrgentByte(a, b []byte) []byte {
	return append(append(append([]byte(nil), a...), 0x16), b...)
}

// urgentHelloEvent runs one TLS connection from cli:cport to srv:443
// (client ISN isn, srv learned for a.allowed.test) whose client bytes
// send writes, with a server reply, and returns capture's first event of
// it.
func urgentHelloEvent(t *testing.T, cli string, cport uint16, srv netip.Addr, isn uint32, send func(c *tcpConn)) audit.Event {
	t.Helper()
	p := newPcap(t)
	c := &tcpConn{p: p, cli: netip.MustParseAddr(cli), srv: srv, cport: cport, sport: 443, cseq: isn, sseq: 9}
	c.handshake()
	send(c)
	c.send(false, bytes.Repeat([]byte{0x17}, 100), 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	if len(r.events) == 0 {
		t.Fatal("no event")
	}
	return r.events[0]
}
