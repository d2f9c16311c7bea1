package capture

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestLiveLinkDownUp: the LAN interface set down and up again (ip link
// set down/up, ifdown/ifup without re-making it) keeps its index, so
// capture keeps its socket: the kernel unhooks the socket while the
// interface is down, leaves ENETDOWN pending on it (poll says POLLERR:
// afpacket.ErrPoll at every look while the ring is empty, until the
// error is read) and hooks it in again when the interface is up. Capture
// reads the packets after it; the looks stay as many as on an idle ring
// (no spinning on the pending error); Follow says the interface is down,
// and up again (LinkDown, a log line each). The same for the carrier
// lost and back (the client's end of the veth set down and up: a cable
// unplugged), which unhooks nothing. Before, capture read on, but said
// nothing: /readyz and the log did not tell the LAN was down.
func TestLiveLinkDownUp(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.New(t, "h3dna")
	srv := testnet.New(t, "h3dns")
	gw := testnet.New(t, "h3dng")
	testnet.Link(t, a, "eth0", []string{"198.18.41.10/24"}, gw, "lan1", []string{"198.18.41.1/24"})
	a.MustRun("ip", "route", "add", "default", "via", "198.18.41.1")
	testnet.Link(t, gw, "wan0", []string{"198.18.43.1/24"}, srv, "eth0", []string{"198.18.43.2/24"})
	srv.MustRun("ip", "route", "add", "default", "via", "198.18.43.1")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	udpEcho(t, srv, "198.18.43.2:7000")

	reg := prometheus.NewRegistry()
	c, err := New(Config{Interfaces: []string{"lan1"}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// up is egress_capture_interface_up{interface="lan1"} as a scrape
	// reads it (-1: no such series).
	up := func() float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatalf("gather: %v", err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "egress_capture_interface_up" {
				continue
			}
			for _, m := range mf.GetMetric() {
				if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == "lan1" {
					return m.GetGauge().GetValue()
				}
			}
		}
		return -1
	}
	if v := up(); v != 0 {
		t.Errorf("before Open: egress_capture_interface_up %v, want 0", v)
	}
	var ring tpacket
	c.openRingHook = func(name string) (packetSource, error) {
		h, err := c.openRing(name)
		if err == nil {
			ring = h.(tpacket)
		}
		return h, err
	}
	if err := gw.Do(c.Open); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	lc := &liveCapture{Capture: c, cancel: cancel, errc: make(chan error, 1)}
	go func() { lc.errc <- c.Run(ctx) }()
	polls := func() int64 {
		st, _ := ring.h.Stats()
		return st.Polls
	}
	// exchange sends a datagram from a new port until it is answered
	// (the routes come back after an interface is up), and waits until
	// capture read both ways.
	exchange := func(what string) {
		t.Helper()
		before := c.Stats().Packets
		answered := false
		for try := 0; try < 50 && !answered; try++ {
			uc, err := a.DialContext(context.Background(), "udp", "198.18.43.2:7000")
			if err != nil {
				t.Fatal(err)
			}
			answered = askWithin(uc, 200*time.Millisecond, []byte("ping")) == nil
			uc.Close()
		}
		if !answered {
			t.Fatalf("%s: no answer in 50 tries", what)
		}
		for deadline := time.Now().Add(5 * time.Second); c.Stats().Packets < before+2; {
			if time.Now().After(deadline) {
				t.Errorf("%s: capture read %d packets, want 2 or more", what, c.Stats().Packets-before)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// state calls Follow until LinkDown says want (the kernel sets the
	// operational state a little after the carrier changes).
	state := func(what string, want ...string) {
		t.Helper()
		changed := false
		for range 50 {
			gw.Do(func() error { changed = c.Follow() || changed; return nil })
			if got := c.LinkDown(); slices.Equal(got, want) {
				if changed != (what != "at start") {
					t.Errorf("%s: Follow reports change %v", what, changed)
				}
				w := 1.0 // read: up with a carrier
				if len(want) > 0 {
					w = 0
				}
				if v := up(); v != w {
					t.Errorf("%s: egress_capture_interface_up %v, want %v", what, v, w)
				}
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Errorf("%s: LinkDown %q, want %q", what, c.LinkDown(), want)
	}

	exchange("at start")
	state("at start")
	gw.MustRun("ip", "link", "set", "lan1", "down")
	state("lan1 set down", "lan1 is down")
	p0 := polls()
	time.Sleep(time.Second)
	// An idle ring is looked at every 8 to 100 ms: at most 125 looks a
	// second. A loop spinning on the pending error makes millions.
	t.Logf("%d polls in a second with lan1 down", polls()-p0)
	if n := polls() - p0; n > 200 {
		t.Errorf("%d polls in a second with lan1 down, want at most 200 (a look every 8 ms or more)", n)
	}
	gw.MustRun("ip", "link", "set", "lan1", "up")
	state("lan1 set up")
	exchange("after lan1 was set down and up")

	a.MustRun("ip", "link", "set", "eth0", "down")
	state("the client's end down", "lan1 has no carrier")
	a.MustRun("ip", "link", "set", "eth0", "up")
	a.MustRun("ip", "route", "replace", "default", "via", "198.18.41.1")
	state("the client's end up")
	exchange("after the carrier came back")
	if n := c.Stats().SocketErrors; n != 0 {
		t.Errorf("SocketErrors %d, want 0 (a pending ENETDOWN is no read failure)", n)
	}
	if err := lc.stop(); err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestLiveLinkFlapLines: a LAN interface whose carrier flaps (the
// client's end set down and up 30 times, Follow after each change) keeps
// LinkDown true to each state, and Follow reports each change, but the
// log has at most linkLines lines of the link's state per window (here
// 10 s): before, each change was a line, 60 here. Once the window ends,
// Changes asks for Follow, whose line says the link is up again with the
// changes seen since the last line.
func TestLiveLinkFlapLines(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.New(t, "h3fla")
	gw := testnet.New(t, "h3flg")
	testnet.Link(t, a, "eth0", []string{"198.18.44.10/24"}, gw, "lan1", []string{"198.18.44.1/24"})
	logs := &lockedBuffer{}
	c, err := New(Config{Interfaces: []string{"lan1"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{},
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	const window = 10 * time.Second
	c.linkWindow = window
	t.Cleanup(func() { c.Close() })
	if err := gw.Do(c.Open); err != nil {
		t.Fatal(err)
	}
	lines := func() int {
		s := logs.String()
		return strings.Count(s, "lan1 has no carrier") + strings.Count(s, "lan1 is up again")
	}
	reported := 0
	state := func(want ...string) {
		t.Helper()
		for range 50 {
			changed := false
			gw.Do(func() error { changed = c.Follow(); return nil })
			if changed {
				reported++
			}
			if slices.Equal(c.LinkDown(), want) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("LinkDown %q, want %q", c.LinkDown(), want)
	}
	start := time.Now()
	state()
	const flaps = 30
	for range flaps {
		a.MustRun("ip", "link", "set", "eth0", "down")
		state("lan1 has no carrier")
		a.MustRun("ip", "link", "set", "eth0", "up")
		state()
	}
	windows := int(time.Since(start)/window) + 1
	n := lines()
	t.Logf("%d changes reported in %d windows, %d lines for them", reported, windows, n)
	if reported < 2*flaps {
		t.Errorf("Follow reported %d changes, want %d", reported, 2*flaps)
	}
	if n < 1 || n > linkLines*windows {
		t.Errorf("%d log lines for %d changes of the carrier in %d windows, want 1 to %d", n, 2*flaps, windows, linkLines*windows)
	}
	select {
	case <-c.Changes():
	case <-time.After(2 * window):
		t.Fatal("no call for Follow once the window ended")
	}
	gw.Do(func() error { c.Follow(); return nil })
	ls := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if l := ls[len(ls)-1]; !strings.Contains(l, "lan1 is up again") || !strings.Contains(l, "changes=") {
		t.Errorf("the line after the flapping: %s; want up again, with the changes seen", l)
	}
	if got := c.LinkDown(); len(got) != 0 {
		t.Errorf("LinkDown %q after the flapping", got)
	}
}
