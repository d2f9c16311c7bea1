package capture

import (
	"net/netip"
	"testing"

	"egressd/policy"
)

// TestReusedTupleNewISN (R13): a client (a NAT router on the LAN, which
// reuses ports often) opens a new connection on the port pair of one
// whose hello capture had begun reading and never saw end: the new SYN,
// at another initial sequence number, starts the stream afresh. Its hello
// is read, by its name; the old bytes are no conflict.
func TestReusedTupleNewISN(t *testing.T) {
	hello := realClientHello(t, decoyName)
	other := realClientHello(t, realName)
	p := newPcap(t)
	cli, srv := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.10")
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 47400, sport: 443, cseq: 1000, sseq: 5000}
	c.handshake()
	c.send(true, other[:1000], 1000, nil, nil)
	for _, isn := range []uint32{1000 + 500, 1000 - 300} {
		c.cseq, c.sseq = isn, 90000
		c.handshake()
		c.send(true, hello, 1400, nil, nil)
		c.seg(false, "A", c.sseq, nil)
		c.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {decoyName}}, Config{})
	for _, ev := range r.events {
		if ev.Reason == ReasonStreamConflict {
			t.Errorf("%+v: a stream-conflict", ev)
		}
	}
	var named int
	for _, ev := range r.events {
		if ev.Name == decoyName && ev.Reason == policy.ReasonAllowed {
			named++
		}
	}
	if named != 2 {
		t.Errorf("%d connections read by name, want 2: %+v", named, r.events)
	}
}
