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
	ip := ipLayer(c.cli, c.srv, layers.IPProtocolTCP)
	t := &layers.TCP{SrcPort: layers.TCPPort(c.cport), DstPort: layers.TCPPort(c.sport), Seq: c.cseq, Ack: c.sseq, Window: 65535,
		ACK: true, PSH: true, URG: true, Urgent: uint16(len(data))}
	t.SetNetworkLayerForChecksum(ip)
	c.p.frame(true, ip.(gopacket.SerializableLayer), t, gopacket.Payload(data))
	c.cseq += uint32(len(data))
}

// TestSyntheticUrgentByte: a client that sends a byte as urgent data
// (MSG_OOB) inside its ClientHello or request head. The receiver (the
// transparent proxy, any server without SO_OOBINLINE) reads the stream
// without that byte, so the bytes on the wire in sequence order are not
// the stream it parses: capture judging them says hello-malformed for a
// hello the proxy allows by its SNI (e2e TestHardeningTCP/urgent-data),
// and an attacker can choose the byte so that capture reads another name
// than the server does. Capture gives the name search up at the urgent
// byte, as at a missing segment, and decides by address.
func TestSyntheticUrgentByte(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.60")
	hello := realClientHello(t, "a.allowed.test")
	head := []byte("GET /urg HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n")
	for _, tc := range []struct {
		name  string
		port  uint16
		bytes []byte
		at    int
	}{
		{"inside the hello", 443, hello, 60},
		{"before the hello", 443, hello, 0},
		{"inside a request head", 80, head, 10},
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
			if ev.Verdict != policy.Allow || ev.NameSource != audit.NameDNSLearned || ev.Name != "a.allowed.test" {
				t.Errorf("event %+v: want allowed by address (a.allowed.test from DNS), not judged on bytes the receiver does not read", ev)
			}
		})
	}
}

// TestSyntheticUrgentByteFollowed: urgent data in a later request of a
// followed plain-HTTP flow. The proxy's request parser never reads the
// urgent byte; capture stops following rather than record requests from
// bytes the parser does not see.
func TestSyntheticUrgentByteFollowed(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.61")
	p := newPcap(t)
	c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.71"), srv: srv, cport: 41001, sport: 80, cseq: 100, sseq: 9}
	c.handshake()
	c.send(true, []byte("GET /one HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n"), 1400, nil, nil)
	c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	second := []byte("GET /two HTTP/1.1\r\nHost: evil.test\r\n\r\n")
	c.send(true, second[:5], 1400, nil, nil)
	c.urgentSeg([]byte{'X'})
	c.send(true, second[5:], 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	if r.stats.Unfollowed != 1 {
		t.Errorf("unfollowed %d, want 1", r.stats.Unfollowed)
	}
	for _, ev := range r.events {
		if ev.Kind == audit.KindRequest {
			t.Errorf("a request recorded from bytes with an urgent byte in them: %+v", ev)
		}
	}
}
