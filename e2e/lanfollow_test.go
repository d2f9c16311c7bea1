package e2e

import (
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// waitLog waits up to 10s for egressd's output to hold want n times.
func (d *daemon) waitLog(t *testing.T, want string, n int) bool {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); strings.Count(d.logs(), want) < n; {
		if time.Now().After(deadline) {
			t.Errorf("egressd's output holds %q %d times after 10s, want %d:\n%s", want, strings.Count(d.logs(), want), n, d.logs())
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// TestCaptureFollowsLAN: a LAN interface deleted and made again while
// egressd runs (a VLAN subinterface a network manager re-makes, ifdown
// and ifup, a USB NIC replugged) gets another index; the AF_PACKET
// socket bound to the old one hears nothing more. Capture says the
// interface went away, listens on the new one, and records the client's
// flows again; /readyz says capture does not run while the interface is
// gone. Before, capture stayed deaf on it, silently: in audit mode the
// report stopped seeing that segment.
func TestCaptureFollowsLAN(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()
	defer d.stop()
	if _, err := tp.curl(dockerName, 443, dockerIP4, "/", true); err != nil {
		t.Fatalf("HTTPS before the LAN interface is re-made: %v", err)
	}
	d.waitEvent(t, "HTTPS before the LAN interface is re-made", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.Source == "capture" && ev.Client == lanClient4 && ev.Name == dockerName
	})

	tp.gw.MustRun("ip", "link", "del", "lan0") // its peer, the client's eth0, goes with it
	d.waitLog(t, "capture: lan0 went away", 1)
	if code, body, err := d.get("/readyz"); err != nil || code != 503 || !strings.Contains(body, "lan0") {
		t.Errorf("/readyz while lan0 is gone: %d %q %v, want 503 naming lan0", code, body, err)
	}
	testnet.Link(t, tp.lan, "eth0", []string{lanClient4 + "/24", lanClient6 + "/64"}, tp.gw, "lan0", []string{gwLAN4 + "/24", gwLAN6 + "/64"})
	tp.lan.MustRun("ip", "route", "add", "default", "via", gwLAN4)
	tp.lan.MustRun("ip", "-6", "route", "add", "default", "via", gwLAN6)
	d.waitLog(t, "capture: listening on lan0", 2) // the start-up line, then this one
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body, err := d.get("/readyz")
		if err == nil && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz after lan0 came back: %d %q %v, want 200", code, body, err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}

	if _, err := tp.curl(trackerName, 443, trackerIP, "/", true); err != nil {
		t.Fatalf("HTTPS after the LAN interface is re-made (audit mode blocks nothing): %v", err)
	}
	d.waitEvent(t, "HTTPS after the LAN interface is re-made", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.Source == "capture" && ev.Client == lanClient4 && ev.Name == trackerName
	})
}

// TestCaptureLANAppearsLater: a LAN interface named in --lan that does
// not exist at start (a VLAN a network manager makes later) is reported
// (the start-up summary and /readyz), and captured once it appears: its
// client's flows are recorded. Before, capture left it out until a
// restart.
func TestCaptureLANAppearsLater(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.extra = []string{"--lan", "lan0,lan1"}
	d.unready = true
	d.start()
	defer d.stop()
	for _, w := range []string{"capture: listening on lan0; not on lan1", "NOT RUNNING: capture: "} {
		if !strings.Contains(d.logs(), w) {
			t.Errorf("egressd's start-up lines lack %q:\n%s", w, d.logs())
		}
	}
	if code, body, err := d.get("/readyz"); err != nil || code != 503 || !strings.Contains(body, "lan1") {
		t.Errorf("/readyz before lan1 exists: %d %q %v, want 503 naming lan1", code, body, err)
	}

	const cli1, gw1 = "198.18.5.10", "198.18.5.1"
	lan1 := testnet.New(t, "h7lan1")
	testnet.Link(t, lan1, "eth0", []string{cli1 + "/24"}, tp.gw, "lan1", []string{gw1 + "/24"})
	lan1.MustRun("ip", "route", "add", "default", "via", gw1)
	tp.inet.MustRun("ip", "route", "add", "198.18.5.0/24", "via", gwWAN4)
	d.waitLog(t, "capture: listening on lan1", 1)
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body, err := d.get("/readyz")
		if err == nil && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz after lan1 appeared: %d %q %v, want 200", code, body, err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	cli := &topo{lan: lan1, gw: tp.gw, inet: tp.inet, dir: tp.dir, caFile: tp.caFile, pool: tp.pool, lanGW4: gw1}
	if _, err := cli.curl(trackerName, 443, trackerIP, "/", true); err != nil {
		t.Fatalf("HTTPS from lan1's client: %v", err)
	}
	d.waitEvent(t, "HTTPS from lan1's client", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.Source == "capture" && ev.Client == cli1 && ev.Name == trackerName
	})
}
