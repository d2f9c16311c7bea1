package e2e

import (
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// captureFlows counts the flow events capture recorded from client.
func (d *daemon) captureFlows(client string) int {
	n := 0
	for _, ev := range d.allEvents() {
		if ev.Kind == "flow" && ev.Source == "capture" && ev.Client == client {
			n++
		}
	}
	return n
}

// waitReadyz waits up to 10s for /readyz to answer code with a body that
// holds want.
func (d *daemon) waitReadyz(t *testing.T, what string, code int, want string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, body, err := d.get("/readyz")
		if err == nil && c == code && strings.Contains(body, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz %s: %d %q %v, want %d holding %q", what, c, body, err, code, want)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestCaptureLANDownUp: with two LAN interfaces (--lan lan0,cams0, in
// audit mode), lan0 is set down and up again (ip link set down/up: the
// same index, unlike TestCaptureFollowsLAN's re-made interface), and
// later loses its carrier and gets it back (the client's end of the
// veth set down and up: a cable unplugged). Each time capture says so
// (log lines, /readyz 503 naming lan0 while it is down or has no
// carrier, 200 once it is up), records the office client's flows again
// afterwards, and records the camera's flows on cams0 throughout. Before,
// capture read on after both but said nothing: /readyz stayed 200 and
// no line told the LAN was down.
func TestCaptureLANDownUp(t *testing.T) {
	tp := newTopo(t)
	camNS := testnet.New(t, "h3cam")
	testnet.Link(t, camNS, "eth0", []string{camClient4 + "/24"}, tp.gw, "cams0", []string{gwCam4 + "/24"})
	camNS.MustRun("ip", "route", "add", "default", "via", gwCam4)
	tp.inet.MustRun("ip", "route", "add", "198.18.20.0/24", "via", gwWAN4)
	cam := &topo{lan: camNS, gw: tp.gw, inet: tp.inet, dir: tp.dir, caFile: tp.caFile, pool: tp.pool, lanGW4: gwCam4}

	d := newDaemon(t, tp, "audit")
	d.extra = []string{"--lan", "lan0,cams0"}
	d.start()
	defer d.stop()

	// recorded makes an HTTPS request from c (retrying while its routes
	// come back) and waits until capture has recorded one more flow of
	// client's.
	recorded := func(what string, c *topo, client string) {
		t.Helper()
		before := d.captureFlows(client)
		var err error
		for try := 0; try < 10; try++ {
			if _, err = c.curl(dockerName, 443, dockerIP4, "/", true); err == nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			t.Errorf("%s: %v", what, err)
			return
		}
		for deadline := time.Now().Add(10 * time.Second); d.captureFlows(client) <= before; {
			if time.Now().After(deadline) {
				t.Errorf("%s: capture recorded no new flow of %s in 10s; flows:\n%s", what, client, d.events())
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	recorded("office at start", tp, lanClient4)
	recorded("camera at start", cam, camClient4)

	tp.gw.MustRun("ip", "link", "set", "lan0", "down")
	d.waitLog(t, "capture: lan0 is down", 1)
	d.waitReadyz(t, "while lan0 is down", 503, "lan0 is down")
	recorded("camera while lan0 is down", cam, camClient4)
	tp.gw.MustRun("ip", "link", "set", "lan0", "up")
	d.waitLog(t, "capture: lan0 is up again", 1)
	d.waitReadyz(t, "after lan0 is up", 200, "")
	recorded("office after lan0 was set down and up", tp, lanClient4)
	recorded("camera after lan0 was set down and up", cam, camClient4)

	noCarrier, upAgain := strings.Count(d.logs(), "capture: lan0 has no carrier"), strings.Count(d.logs(), "capture: lan0 is up again")
	tp.lan.MustRun("ip", "link", "set", "eth0", "down")
	d.waitLog(t, "capture: lan0 has no carrier", noCarrier+1)
	d.waitReadyz(t, "while lan0 has no carrier", 503, "lan0 has no carrier")
	recorded("camera while lan0 has no carrier", cam, camClient4)
	tp.lan.MustRun("ip", "link", "set", "eth0", "up")
	tp.lan.MustRun("ip", "route", "replace", "default", "via", gwLAN4)
	d.waitLog(t, "capture: lan0 is up again", upAgain+1)
	d.waitReadyz(t, "after lan0's carrier is back", 200, "")
	recorded("office after lan0's carrier came back", tp, lanClient4)
	recorded("camera after lan0's carrier came back", cam, camClient4)

	// A line per change, not per look (capture looks at an idle ring
	// about ten times a second). lan0 set up again may have no carrier
	// for a moment, until the kernel sets its operational state: a
	// "has no carrier" and an "up again" line more.
	for _, w := range []struct {
		line     string
		min, max int
	}{{`"msg":"capture: lan0 is down"`, 1, 1}, {`"msg":"capture: lan0 has no carrier"`, 1, 2}, {`"msg":"capture: lan0 is up again"`, 2, 3}} {
		if n := strings.Count(d.logs(), w.line); n < w.min || n > w.max {
			t.Errorf("egressd's output holds %s %d times, want %d to %d (a line per change, not per look):\n%s", w.line, n, w.min, w.max, d.logs())
		}
	}
	if strings.Contains(d.logs(), "capture: reading") {
		t.Errorf("a capture socket failed to read:\n%s", d.logs())
	}
}
