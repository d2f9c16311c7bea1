package capture

import (
	"testing"
	"time"

	"egressd/policy"
)

// Legitimate TCP that sends bytes twice, the same (R13): retransmissions
// in other segmentations, TSO/GRO frames, probes, wraparound, Fast Open.
// None is a stream-conflict; each flow is read and allowed by its name.

func TestLegitRetransmissions(t *testing.T) {
	hello := realClientHello(t, decoyName)
	n := uint32(len(hello))
	if n < 1200 {
		t.Fatalf("hello of %d bytes: too short for these cases", n)
	}
	ack := func(c *tcpConn) { c.seg(false, "A", c.sseq, nil) }
	cases := []struct {
		what string
		run  func(c *tcpConn)
	}{
		{"mss segments, then one coalesced retransmission", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.send(true, hello, 536, nil, nil)
			c.seg(true, "A", b, hello)
			ack(c)
		}},
		{"one TSO/GRO frame, then mss retransmissions", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.seg(true, "A", b, hello)
			c.cseq += n
			c.seg(true, "A", b+536, hello[536:1072])
			c.seg(true, "A", b, hello[:536])
			ack(c)
		}},
		{"SACK: a middle segment again, then a partial one across two", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.send(true, hello, 400, nil, nil)
			c.seg(true, "A", b+400, hello[400:800])
			c.seg(true, "A", b+200, hello[200:1000])
			ack(c)
		}},
		{"out of order, then a retransmission over the hole and beyond", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.send(true, hello, 500, []int{1, 2}, map[int]bool{0: true})
			c.seg(true, "A", b, hello[:900])
			ack(c)
		}},
		{"keepalive and zero-window probes at snd_una-1 (none and one garbage byte)", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.seg(true, "A", b-1, nil)
			c.seg(true, "A", b-1, []byte{0})
			c.send(true, hello, 1400, nil, nil)
			c.seg(true, "A", c.cseq-1, nil)
			ack(c)
			c.seg(true, "A", c.cseq-1, []byte{0}) // Windows' keepalive
			c.seg(true, "A", b-1, []byte{0})
		}},
		{"a one-byte window probe, then the rest from it", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.seg(true, "A", b, hello[:1000])
			c.seg(true, "A", b+1000, hello[1000:1001])
			c.seg(true, "A", b+1000, hello[1000:])
			c.cseq += n
			ack(c)
		}},
		{"a retransmission after the server acknowledged (spurious)", func(c *tcpConn) {
			c.handshake()
			b := c.cseq
			c.send(true, hello, 1400, nil, nil)
			ack(c)
			c.seg(true, "A", b, hello)
		}},
		{"TCP Fast Open: the hello in the SYN, the SYN-ACK takes only the SYN, sent again", func(c *tcpConn) {
			c.seg(true, "S", c.cseq, hello)
			c.seg(false, "SA", c.sseq, nil) // acknowledges isn+1
			c.cseq++
			c.sseq++
			c.seg(true, "A", c.cseq, hello)
			c.cseq += n
			ack(c)
		}},
		{"TCP Fast Open: the SYN-ACK takes the hello", func(c *tcpConn) {
			c.seg(true, "S", c.cseq, hello)
			c.cseq += 1 + n
			c.seg(false, "SA", c.sseq, nil)
			c.sseq++
			c.seg(true, "A", c.cseq, nil)
		}},
		{"TCP Fast Open: the SYN again with the hello, then in smaller pieces", func(c *tcpConn) {
			c.seg(true, "S", c.cseq, hello)
			c.seg(true, "S", c.cseq, hello)
			c.seg(false, "SA", c.sseq, nil)
			c.cseq++
			c.sseq++
			c.send(true, hello, 536, nil, nil)
			ack(c)
		}},
	}
	for _, isn := range []uint32{1000, 0xFFFFFFF0 - 1, 0xFFFFFFFF - 700} {
		var runs []func(c *tcpConn)
		for _, c := range cases {
			runs = append(runs, c.run)
		}
		got := connEvents(t, 47000, isn, runs, nil)
		for i, c := range cases {
			if ev := got[uint16(47000+i)]; ev.Reason != policy.ReasonAllowed || ev.Name != decoyName {
				t.Errorf("isn %#x: %s: %+v, want %s allowed", isn, c.what, ev, decoyName)
			}
		}
	}
}

// TestLegitHTTPRetransmissions: the same for a first request head (kept
// until acknowledged) and the requests after it (followed).
func TestLegitHTTPRetransmissions(t *testing.T) {
	head := []byte("GET /a HTTP/1.1\r\nHost: " + decoyName + "\r\nUser-Agent: x\r\n\r\n")
	head2 := []byte("GET /b HTTP/1.1\r\nHost: " + decoyName + "\r\n\r\n")
	p := newPcap(t)
	c := synthConn(p, 47100, 80, 0xFFFFFFF0)
	c.handshake()
	b := c.cseq
	c.send(true, head, 10, nil, nil)
	c.seg(true, "A", b, head)
	c.seg(true, "A", b+5, head[5:30])
	c.seg(false, "A", c.sseq, nil)
	c.seg(true, "A", c.cseq-1, []byte{0}) // Windows' keepalive
	b2 := c.cseq
	c.send(true, head2, 7, nil, nil)
	c.seg(true, "A", b2, head2)
	// A keepalive or window probe carries the last acknowledged byte
	// (snd_una-1), here head's last: head2 is not acknowledged yet.
	c.seg(true, "A", b2-1, []byte{0})
	c.p.now = c.p.now.Add(time.Second)
	c.seg(false, "A", c.sseq, nil)
	c.seg(true, "A", c.cseq-1, []byte{0}) // after the acknowledgement
	c.close()
	r := decoyRun(t, p)
	for _, ev := range r.events {
		if ev.Reason != policy.ReasonAllowed {
			t.Errorf("%+v, want allowed", ev)
		}
	}
	if len(r.events) != 2 {
		t.Errorf("%d events, want the flow and its second request: %+v", len(r.events), r.events)
	}
}
