package capture

import (
	"testing"

	"egressd/audit"
)

// TestPortPairReusedAfterClose: a client opens a new connection on the
// port pair of one that ended (both FINs) moments before, while the
// closed flow lingers in the table. The new SYN starts a new flow, whose
// hello is read by its name (port 47500); one left unanswered is a flow
// of its own too, recorded (47501). tcpPacket looks the flow up once and
// hands it to lookupAt: a flow it dropped from the table must not be
// handed on (the SYN was counted in the closed flow, and a lone one was
// in no report).
func TestPortPairReusedAfterClose(t *testing.T) {
	p := newPcap(t)
	c := synthConn(p, 47500, 443, 1000)
	c.namedConn(t, realName)
	c.cseq, c.sseq = 500000, 900000
	c.namedConn(t, decoyName)
	lone := synthConn(p, 47501, 443, 1000)
	lone.namedConn(t, realName)
	lone.seg(true, "S", 700000, nil)
	r := decoyRun(t, p)
	got := map[uint16][]string{}
	for _, ev := range r.events {
		got[ev.ClientPort] = append(got[ev.ClientPort], ev.Name+"/"+string(ev.NameSource))
	}
	sni := "/" + string(audit.NameSNI)
	if g := got[47500]; len(g) != 2 || g[0] != realName+sni || g[1] != decoyName+sni {
		t.Errorf("events of port 47500: %v, want [%s %s]", g, realName+sni, decoyName+sni)
	}
	if g := got[47501]; len(g) != 2 || g[0] != realName+sni {
		t.Errorf("events of port 47501: %v, want 2, the first %s (the lone SYN's its own)", g, realName+sni)
	}
}
