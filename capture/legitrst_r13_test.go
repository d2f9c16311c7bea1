package capture

import (
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// lostRun writes, for each of runs, a connection whose hello's second
// segment capture lost (a kernel drop), then what run writes, then lets
// classifyWait pass (another flow's packet 11 s on, which sweeps), and
// returns the events by client port.
func lostRun(t *testing.T, runs ...func(c *tcpConn, hello []byte)) map[uint16]audit.Event {
	t.Helper()
	hello := realClientHello(t, decoyName)
	conns := make([]func(c *tcpConn), len(runs))
	for i, run := range runs {
		conns[i] = func(c *tcpConn) {
			c.handshake()
			c.send(true, hello, 1000, nil, map[int]bool{1: true})
			run(c, hello)
		}
	}
	return connEvents(t, 47200, 1000, conns, func(p *pcapWriter) { classifyWaitPasses(p, 47299) })
}

// lostFollowed writes a followed plain-HTTP connection (client port
// 47300 to port 80) whose first request head the server answered, then
// a second head of which capture lost the second segment.
func lostFollowed(t *testing.T) (*pcapWriter, *tcpConn) {
	p := newPcap(t)
	c := synthConn(p, 47300, 80, 1000)
	c.handshake()
	c.send(true, []byte("GET /a HTTP/1.1\r\nHost: "+decoyName+"\r\n\r\n"), 1400, nil, nil)
	c.seg(false, "A", c.sseq, []byte("HTTP/1.1 204 No Content\r\n\r\n"))
	c.sseq += 28
	c.send(true, []byte("GET /b HTTP/1.1\r\nHost: "+decoyName+"\r\nX: 1\r\n\r\n"), 20, nil, map[int]bool{1: true})
	return p, c
}

// TestLostSegmentThenReset: a client's reset at the byte after its
// hello, of which capture lost a segment the server got, is taken when
// the server could not acknowledge the hello first (its delayed ACK,
// cancelled by the reset; the FIN it acknowledged neither): the flow ends
// there, decided by address, as before 83df94d. Not taken, it waited for
// the lost bytes and classifyWait denied it as hello-timeout, a
// connection the proxy would have read whole and allowed.
func TestLostSegmentThenReset(t *testing.T) {
	cases := []struct {
		what string
		run  func(c *tcpConn, hello []byte)
	}{
		{"reset at the end, no ack", func(c *tcpConn, _ []byte) {
			c.seg(true, "RA", c.cseq, nil)
		}},
		{"fin, then reset after it, no ack", func(c *tcpConn, _ []byte) {
			c.seg(true, "FA", c.cseq, nil)
			c.seg(true, "RA", c.cseq+1, nil)
		}},
		{"the server's ack of the whole, then reset at the end", func(c *tcpConn, _ []byte) {
			c.seg(false, "A", c.sseq, nil) // taken at once (resetTaken)
			c.seg(true, "RA", c.cseq, nil)
		}},
		{"the server's ack of what capture has, then reset at the end", func(c *tcpConn, hello []byte) {
			end := c.cseq
			c.cseq -= uint32(len(hello)) - 1000
			c.seg(false, "A", c.sseq, nil)
			c.cseq = end
			c.seg(true, "RA", c.cseq, nil)
		}},
	}
	var runs []func(c *tcpConn, hello []byte)
	for _, c := range cases {
		runs = append(runs, c.run)
	}
	// Past the reset the server did not take, the missing bytes: the
	// hello is read whole, by its name.
	runs = append(runs, func(c *tcpConn, hello []byte) {
		c.seg(true, "RA", c.cseq, nil)
		c.seg(true, "A", c.cseq-uint32(len(hello))+1000, hello[1000:])
	})
	got := lostRun(t, runs...)
	for i, c := range cases {
		if ev := got[uint16(47200+i)]; ev.Reason != policy.ReasonAllowed || ev.Close != "rst" {
			t.Errorf("%s: %+v, want allowed (by address), closed by rst", c.what, ev)
		}
	}
	if ev := got[uint16(47200+len(cases))]; ev.Name != decoyName || ev.NameSource != audit.NameSNI {
		t.Errorf("the missing bytes after the reset: %+v, want the hello read", ev)
	}
}

// TestLostSegmentThenResetFollowed: the same for a later request head of
// a followed plain-HTTP flow: the reset at the client's last byte ends
// the flow, with no request event; not taken, the head waited for the
// lost bytes and was recorded denied as hello-timeout.
func TestLostSegmentThenResetFollowed(t *testing.T) {
	p, c := lostFollowed(t)
	c.seg(true, "RA", c.cseq, nil)
	classifyWaitPasses(p, 47399)
	for _, ev := range decoyRun(t, p).events {
		if ev.ClientPort != 47300 {
			continue
		}
		if ev.Kind != audit.KindFlow || ev.Reason != policy.ReasonAllowed || ev.Close != "rst" {
			t.Errorf("%+v, want only the flow, allowed, closed by rst", ev)
		}
	}
}

// TestLostSegmentServerAnswers: with a segment of its hello lost to
// capture and no reset, the server's acknowledgement past the bytes
// capture has shows it got the hello whole: when classifyWait passes the
// flow is decided by address, as a flow that ends with a segment missing
// is, not denied as hello-timeout (it was, before and after 83df94d: any
// connection longer than 10 s whose hello capture lost a piece of). A
// server that acknowledges only what capture has is waiting for the rest,
// as the proxy would: hello-timeout.
func TestLostSegmentServerAnswers(t *testing.T) {
	got := lostRun(t,
		func(c *tcpConn, _ []byte) {
			c.seg(false, "A", c.sseq, []byte("server hello bytes"))
		},
		func(c *tcpConn, hello []byte) {
			end := c.cseq
			c.cseq -= uint32(len(hello)) - 1000
			c.seg(false, "A", c.sseq, nil)
			c.cseq = end
		})
	if ev := got[47200]; ev.Reason != policy.ReasonAllowed {
		t.Errorf("the server acknowledged the hello: %+v, want allowed by address", ev)
	}
	if ev := got[47201]; ev.Reason != ReasonHelloTimeout {
		t.Errorf("the server acknowledged what capture has: %+v, want %s", ev, ReasonHelloTimeout)
	}
}

// TestLostSegmentServerAnswersFollowed: the same for a later request
// head of a followed plain-HTTP flow: no request event denied as
// hello-timeout, the follow ends (Stats.Unfollowed).
func TestLostSegmentServerAnswersFollowed(t *testing.T) {
	p, c := lostFollowed(t)
	c.seg(false, "A", c.sseq, []byte("HTTP/1.1 204 No Content\r\n\r\n"))
	c.sseq += 28
	p.now = p.now.Add(11 * time.Second)
	c.seg(false, "A", c.sseq, nil)
	c.close()
	for _, ev := range decoyRun(t, p).events {
		if ev.Reason != policy.ReasonAllowed {
			t.Errorf("%+v, want allowed", ev)
		}
	}
}
