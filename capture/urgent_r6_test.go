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

// TestSyntheticUrgentEdges: the urgent byte taken out across the wrap of
// the sequence space, a mark the server sends (the client's stream keeps
// its bytes), a pointer far past the data sent (no byte taken).
func TestSyntheticUrgentEdges(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.65")
	hello := realClientHello(t, "evil.test")
	n := bytes.Index(hello, []byte("evil.test")) + 2
	for _, tc := range []struct {
		name string
		isn  uint32
		send func(c *tcpConn)
	}{
		{"mark across the wrap", 0xffffffff - uint32(n) + 5, func(c *tcpConn) {
			c.urgentPtr(true, hello[:20], uint16(n+1))
			c.send(true, withUrgentByte(hello[20:n], hello[n:]), 7, nil, nil)
		}},
		{"urgent byte at 2^32-1", 0xffffffff - uint32(n) - 1, func(c *tcpConn) {
			c.send(true, hello[:n], 1400, nil, nil)
			c.urgentSeg([]byte{0x16})
			c.send(true, hello[n:], 1400, nil, nil)
		}},
		{"mark from the server", 9, func(c *tcpConn) {
			// The server's mark points at the byte n+1 bytes on: in
			// the client's stream (its ISN the server's, so the two
			// number their bytes alike) that is hello[n], inside the
			// name. Taken from the client, or in the client's
			// stream, the mark would cut the name (the client's own
			// send of "x" marked hello[n-1]); from the server it
			// marks nothing the proxy reads, and the hello stays whole.
			c.urgentPtr(false, []byte("x"), uint16(n+1))
			c.send(true, hello, 1400, nil, nil)
		}},
		{"pointer far ahead", 100, func(c *tcpConn) {
			c.urgentPtr(true, hello[:20], 0xffff)
			c.send(true, hello[20:], 1400, nil, nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if ev := urgentHelloEvent(t, "192.0.2.76", 41006, srv, tc.isn, tc.send); ev.Verdict != policy.Deny || ev.NameSource != audit.NameSNI || ev.Name != "evil.test" {
				t.Errorf("event %+v: want evil.test denied by its SNI", ev)
			}
		})
	}
}

// TestSyntheticUrgentThenEnd: a client that ends its stream (FIN, RST)
// after an urgent byte inside a head or hello it never completes: the
// proxy reads the stream without the byte to its end and refuses it, and
// capture, its end mapped past the byte, says so too.
func TestSyntheticUrgentThenEnd(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.66")
	hello := realClientHello(t, "a.allowed.test")
	head := []byte("GET /u HTTP/1.1\r\nHost: a.allowed.test\r\n")
	for _, tc := range []struct {
		name   string
		port   uint16
		bytes  []byte
		rst    bool
		reason string
	}{
		{"head then FIN", 80, head, false, ReasonHTTPBad},
		{"head then RST", 80, head, true, ReasonHTTPBad},
		{"hello then FIN", 443, hello[:len(hello)-10], false, ReasonHelloBad},
		{"hello then RST", 443, hello[:len(hello)-10], true, ReasonHelloBad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPcap(t)
			c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.77"), srv: srv, cport: 41007, sport: tc.port, cseq: 100, sseq: 9}
			c.handshake()
			c.send(true, tc.bytes[:10], 1400, nil, nil)
			c.urgentSeg([]byte{'Z'})
			c.send(true, tc.bytes[10:], 1400, nil, nil)
			if tc.rst {
				c.seg(true, "RA", c.cseq, nil)
			} else {
				c.close()
			}
			r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
			if len(r.events) == 0 {
				t.Fatal("no event")
			}
			if ev := r.events[0]; ev.Verdict != policy.Deny || ev.Reason != tc.reason {
				t.Errorf("event %+v: want denied %s", ev, tc.reason)
			}
		})
	}
}

// TestSyntheticUrgentByteCutOff: the urgent byte of a followed flow in the
// part of a segment the capture cut off (a snap length; the live filter
// keeps 16 KiB). The bytes cut off are body, skipped; the proxy's body
// has one byte fewer than the wire, so the next head starts one byte
// sooner than the cut's length says, and capture records the request the
// proxy reads there.
func TestSyntheticUrgentByteCutOff(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.67")
	p := newPcap(t)
	p.snap = 300
	c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.78"), srv: srv, cport: 41008, sport: 80, cseq: 100, sseq: 9}
	c.handshake()
	c.send(true, []byte("POST /up HTTP/1.1\r\nHost: a.allowed.test\r\nContent-Length: 1000\r\n\r\n"), 1400, nil, nil)
	c.send(false, []byte("HTTP/1.1 100 Continue\r\n\r\n"), 1400, nil, nil)
	// The body: 1000 bytes with an urgent byte after the 900th, in one
	// segment the snap length cuts at about 250 bytes of payload.
	body := append(append(bytes.Repeat([]byte{'b'}, 900), 'U'), bytes.Repeat([]byte{'b'}, 100)...)
	c.urgentPtr(true, body, 901)
	c.send(true, []byte("GET /two HTTP/1.1\r\nHost: evil.test\r\n\r\n"), 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	var reqs []audit.Event
	for _, ev := range r.events {
		if ev.Kind == audit.KindRequest {
			reqs = append(reqs, ev)
		}
	}
	if len(reqs) != 1 || reqs[0].Name != "evil.test" || reqs[0].Verdict != policy.Deny {
		t.Errorf("requests %+v, unfollowed %d: want one, evil.test denied", reqs, r.stats.Unfollowed)
	}
}

// TestSyntheticUrgentOnSYN: a client SYN with the URG flag and a pointer
// into the data that follows. Linux takes no urgent mark from a SYN (a
// listening socket only queues the connection request; the mark of the
// handshake's last ACK counts, as any segment's), so the proxy reads the
// hello whole; capture must not take a byte out of it.
func TestSyntheticUrgentOnSYN(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.68")
	hello := realClientHello(t, "evil.test")
	n := bytes.Index(hello, []byte("evil.test")) + 2
	p := newPcap(t)
	c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.79"), srv: srv, cport: 41009, sport: 443, cseq: 100, sseq: 9}
	ip := ipLayer(c.cli, c.srv, layers.IPProtocolTCP)
	syn := &layers.TCP{SrcPort: layers.TCPPort(c.cport), DstPort: layers.TCPPort(c.sport), Seq: c.cseq, Window: 65535,
		SYN: true, URG: true, Urgent: uint16(n + 2)} // the byte at ISN+1+n, RFC 793's reading
	syn.SetNetworkLayerForChecksum(ip)
	c.p.frame(true, ip.(gopacket.SerializableLayer), syn, gopacket.Payload(nil))
	c.seg(false, "SA", c.sseq, nil)
	c.cseq++
	c.sseq++
	c.seg(true, "A", c.cseq, nil)
	c.send(true, hello, 1400, nil, nil)
	c.send(false, bytes.Repeat([]byte{0x17}, 100), 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	if len(r.events) == 0 {
		t.Fatal("no event")
	}
	if ev := r.events[0]; ev.Verdict != policy.Deny || ev.NameSource != audit.NameSNI || ev.Name != "evil.test" {
		t.Errorf("event %+v: want evil.test denied by its SNI", ev)
	}
}
