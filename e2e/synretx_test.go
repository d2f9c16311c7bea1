package e2e

import (
	"context"
	"net"
	"net/netip"
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

// TestFlowBeforeAnswerSameSocketAfterDecision: as
// TestFlowBeforeAnswerSameSocketAllowed, but the device asks DNS, and
// sends its NTP request again from the same socket, only after capture
// decided the flow (10 s after it began, dropped: no answer had come).
// The datagram after the answer is a new packet to the forward chain,
// which the ntp rule's learned set admits, and the server answers: the
// report counts the flow under ntp, not dropped. Before, capture kept the
// drop it decided at 10 s.
func TestFlowBeforeAnswerSameSocketAfterDecision(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	d.dumpOnFailure()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	const name, ip = "2.pool.ntp.org", "198.51.100.126"
	addr := netip.MustParseAddr(ip)
	c, err := tp.lan.DialContext(ctx, "udp", netip.AddrPortFrom(addr, 123).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := ntpRequest()
	answers := func(r []byte) bool { return ntpAnswers(req, r) }
	began := time.Now()
	if err := askWithin(c, time.Second, req, answers); err == nil {
		t.Fatalf("NTP to %s before any DNS answer for %s was answered; want it dropped", ip, name)
	}
	// Capture decides the flow 10 s after it began: dropped.
	if ntpFlows, dropped := ntpCounts(t, d, name, ip, 1); ntpFlows != 0 || dropped != 1 {
		t.Fatalf("report before the answer: ntp rule %d flows, dropped %s:123/udp %d flows; want 0 and 1", ntpFlows, ip, dropped)
	}
	// Past classifyWait and the sweep after it (every 5 s): decided.
	time.Sleep(time.Until(began.Add(17 * time.Second)))
	if ntpFlows, dropped := ntpCounts(t, d, name, ip, 1); ntpFlows != 0 || dropped != 1 {
		t.Fatalf("report once the flow is decided, before the answer: ntp rule %d flows, dropped %s:123/udp %d flows; want 0 and 1", ntpFlows, ip, dropped)
	}
	if got := tp.resolve4(t, ctx, name); got != addr {
		t.Fatalf("%s resolved to %v, want %s", name, got, ip)
	}
	if err := askWithin(c, 2*time.Second, req, answers); err != nil {
		t.Fatalf("NTP to %s from the same socket after the answer: %v (want it let out: a new packet to the forward chain)", ip, err)
	}
	// Capture reads the datagram a moment after the server answered it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ntpFlows, dropped := ntpCounts(t, d, name, ip, 1)
		if ntpFlows == 1 && dropped == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("report 10s after the answer: ntp rule %d flows, dropped %s:123/udp %d flows; want 1 and 0 (its datagram after the answer was let out and answered)", ntpFlows, ip, dropped)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
