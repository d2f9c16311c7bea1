package capture

import (
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestReusedTupleNewISN (R13): a client (a NAT router on the LAN, which
// reuses ports often) opens a new connection on the port pair of one
// whose hello capture had begun reading and never saw end: the new SYN,
// at another initial sequence number, starts the stream afresh. Its hello
// is read, by its name, once the server answers it; the old bytes are no
// conflict, and the old connection ends ("reused").
func TestReusedTupleNewISN(t *testing.T) {
	hello := realClientHello(t, decoyName)
	other := realClientHello(t, realName)
	p := newPcap(t)
	c := synthConn(p, 47400, 443, 1000)
	c.handshake()
	c.send(true, other[:1000], 1000, nil, nil)
	for _, isn := range []uint32{1000 + 500, 1000 - 300} {
		c.cseq, c.sseq = isn, 90000
		c.seg(true, "S", c.cseq, nil)
		c.cseq++
		c.seg(false, "SA", c.sseq, nil) // acknowledges isn+1
		c.sseq++
		c.seg(true, "A", c.cseq, nil)
		c.send(true, hello, 1400, nil, nil)
		c.seg(false, "A", c.sseq, nil)
		c.close()
	}
	// A SYN the server does not answer (it holds the old connection, and
	// sends a challenge ACK) leaves the old stream as it was: its hello
	// is read whole after it.
	o := synthConn(p, 47401, 443, 1000)
	o.handshake()
	o.send(true, other[:1000], 1000, nil, nil)
	o.seg(true, "S", 77777, nil)
	o.seg(false, "A", o.sseq, nil)
	o.send(true, other[1000:], 1400, nil, nil)
	o.close()
	r := decoyRun(t, p)
	for _, ev := range r.events {
		if ev.ClientPort == 47401 && (ev.Name != realName || ev.Verdict != policy.Deny) {
			t.Errorf("the SYN the server did not answer: %+v, want %s read, denied", ev, realName)
		}
	}
	for _, ev := range r.events {
		if ev.Reason == ReasonStreamConflict {
			t.Errorf("%+v: a stream-conflict", ev)
		}
	}
	var named int
	for _, ev := range r.events {
		if ev.Name == decoyName && ev.NameSource == audit.NameSNI && ev.Reason == policy.ReasonAllowed {
			named++
		}
	}
	if named != 2 {
		t.Errorf("%d connections read by name, want 2: %+v", named, r.events)
	}
}
