package e2e

import (
	"context"
	"net"
	"testing"
	"time"
)

// TestSYNRetransmittedAfterAnswerAllowed: with --tcp-ports 80 the forward
// chain lets a connection to 10516 out by health-logging's learned set. A
// device connects to the intake's address before it asked the gateway for
// it (a stale cache, its connect racing its own lookup): the first SYN is
// dropped. It asks; its kernel retransmits the SYN a second later, which
// the set now admits (no conntrack entry was confirmed for the dropped
// one), and the connection works. Capture reports the flow allowed by
// health-logging, not dropped: before, it judged the flow at its first SYN
// alone and the report listed a working connection as blocked.
func TestSYNRetransmittedAfterAnswerAllowed(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = append(d.extra, "--tcp-ports", "80")
	d.start()
	d.dumpOnFailure()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	type dialed struct {
		c   net.Conn
		err error
		at  time.Time
	}
	done := make(chan dialed, 1)
	go func() {
		c, err := tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(intakeIP, "10516"))
		done <- dialed{c, err, time.Now()}
	}()
	time.Sleep(300 * time.Millisecond) // the first SYN is out (and dropped)
	tp.dig(t, intakeName, "A")
	answered := time.Now()
	r := <-done
	if r.err != nil {
		t.Fatalf("connect to %s:10516, asked for before its retransmitted SYN: %v (want the retransmission let out)", intakeIP, r.err)
	}
	if r.at.Before(answered) {
		r.c.Close()
		t.Fatalf("the connection to %s:10516 was set up before the DNS answer: the first SYN was not dropped, the test tests nothing", intakeIP)
	}
	r.c.Close()

	ev := d.waitEvent(t, "the capture of the retransmitted connection", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Source == "capture" && e.Dest == intakeIP && e.DestPort == 10516
	})
	if ev.Verdict != "allow" || ev.Rule != "health-logging" || ev.Enforced {
		t.Errorf("capture reported %v; want allowed by health-logging (its retransmitted SYN got out, the connection worked)", ev)
	}
	for _, dr := range d.report().Dropped {
		if dr.Dest == intakeIP || dr.Dest == intakeName {
			t.Errorf("report lists %s:%d/%s dropped (%d flows); the connection worked", dr.Dest, dr.Port, dr.Proto, dr.Flows)
		}
	}
}
