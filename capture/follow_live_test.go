package capture

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestLiveFollowInterfaces: capture on lan1, which is deleted and made
// again while it runs (another index: the old socket hears nothing), and
// on lan2, which does not exist at start. Follow says lan1 went away,
// listens on it again, and on lan2 once it appears; a UDP exchange from
// each LAN's client afterwards is one flow. Run runs meanwhile with no
// socket at all, waiting, rather than failing.
func TestLiveFollowInterfaces(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.New(t, "h7fola")
	b := testnet.New(t, "h7folb")
	srv := testnet.New(t, "h7fols")
	gw := testnet.New(t, "h7folg")
	linkA := func() {
		testnet.Link(t, a, "eth0", []string{"198.18.31.10/24"}, gw, "lan1", []string{"198.18.31.1/24"})
		a.MustRun("ip", "route", "add", "default", "via", "198.18.31.1")
	}
	linkA()
	testnet.Link(t, gw, "wan0", []string{"198.18.33.1/24"}, srv, "eth0", []string{"198.18.33.2/24"})
	srv.MustRun("ip", "route", "add", "default", "via", "198.18.33.1")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	udpEcho(t, srv, "198.18.33.2:7000")

	rec := &recorder{}
	c, err := New(Config{Interfaces: []string{"lan1", "lan2"}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := gw.Do(c.Open); !errors.Is(err, ErrNoInterface) || !strings.Contains(err.Error(), "lan2 does not exist") {
		t.Errorf("Open: %v; want lan2 does not exist", err)
	}
	follow := func() bool {
		var changed bool
		gw.Do(func() error { changed = c.Follow(); return nil })
		return changed
	}
	state := func() string {
		var not []string
		for _, err := range c.NotListening() {
			not = append(not, err.Error())
		}
		return strings.Join(c.Listening(), ",") + " | " + strings.Join(not, "; ")
	}
	if got, want := state(), "lan1 | capture: lan2 does not exist (yet)"; got != want {
		t.Errorf("after Open: %q, want %q", got, want)
	}
	if follow() {
		t.Errorf("Follow with nothing changed reports a change: %s", state())
	}
	ctx, cancel := context.WithCancel(context.Background())
	lc := &liveCapture{Capture: c, cancel: cancel, errc: make(chan error, 1)}
	go func() { lc.errc <- c.Run(ctx) }()

	gw.MustRun("ip", "link", "del", "lan1")
	if !follow() {
		t.Errorf("Follow after lan1 was deleted reports no change")
	}
	if got, want := state(), " | capture: lan1 does not exist (yet); capture: lan2 does not exist (yet)"; got != want {
		t.Errorf("lan1 deleted: %q, want %q", got, want)
	}
	linkA()
	testnet.Link(t, b, "eth0", []string{"198.18.32.10/24"}, gw, "lan2", []string{"198.18.32.1/24"})
	b.MustRun("ip", "route", "add", "default", "via", "198.18.32.1")
	if !follow() {
		t.Errorf("Follow after lan1 and lan2 were made reports no change")
	}
	if got, want := state(), "lan1,lan2 | "; got != want {
		t.Errorf("lan1 made again, lan2 made: %q, want %q", got, want)
	}

	for _, ns := range []*testnet.NS{a, b} {
		uc, err := ns.DialContext(context.Background(), "udp", "198.18.33.2:7000")
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if err := askWithin(uc, 3*time.Second, []byte("ping")); err != nil {
				t.Fatalf("UDP from %s: %v", ns.Name, err)
			}
		}
		uc.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().Packets < 12 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // TPACKET_V3 hands blocks over after 64 ms
	if err := lc.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	var clients []string
	for _, ev := range rec.all() {
		if ev.Kind == audit.KindFlow && ev.DestPort == 7000 {
			clients = append(clients, ev.Client.String())
		}
	}
	slices.Sort(clients)
	if want := []string{"198.18.31.10", "198.18.32.10"}; !slices.Equal(clients, want) {
		t.Errorf("UDP flows from %v, want one from each of %v (stats %+v)", clients, want, c.Stats())
	}
}
