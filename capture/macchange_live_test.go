package capture

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestLiveMACChanged: the LAN interface's MAC address changed while
// capture runs (a bridge takes the lowest of its ports' when one joins, a
// bond with fail_over_mac=active takes its new active port's, an
// operator's ip link set address) keeps its index and its socket, and
// the clients' frames come to the new address. Capture skips a client's
// frame toward a routed address sent to a MAC address not the gateway's
// (the kernel routes none: 95ca27c), so it must know the new one: Follow,
// called on the link change (netlink), takes it. Before R18 capture kept
// the address it read at opening and skipped every client frame after
// the change: no flow of the LAN was recorded (in audit mode an allowed
// and a denied connection alike missing from the report).
func TestLiveMACChanged(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.New(t, "macca")
	srv := testnet.New(t, "maccs")
	gw := testnet.New(t, "maccg")
	testnet.Link(t, a, "eth0", []string{"198.18.46.10/24"}, gw, "lan1", []string{"198.18.46.1/24"})
	a.MustRun("ip", "route", "add", "default", "via", "198.18.46.1")
	testnet.Link(t, gw, "wan0", []string{"198.18.47.1/24"}, srv, "eth0", []string{"198.18.47.2/24"})
	srv.MustRun("ip", "route", "add", "default", "via", "198.18.47.1")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	udpEcho(t, srv, "198.18.47.2:7000")
	rec := &recorder{}
	lc := startLive(t, gw, Config{Interfaces: []string{"lan1"}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy).WithMode(policy.ModeAudit)), Sink: rec})
	// exchange sends a datagram from a new port until it is answered,
	// waits until capture read both ways and returns the port.
	exchange := func(what string) uint16 {
		t.Helper()
		for try := 0; try < 50; try++ {
			uc, err := a.DialContext(context.Background(), "udp", "198.18.47.2:7000")
			if err != nil {
				t.Fatal(err)
			}
			before := lc.Stats().Packets
			ok := askWithin(uc, 200*time.Millisecond, []byte("ping")) == nil
			uc.Close()
			if !ok {
				continue
			}
			for deadline := time.Now().Add(5 * time.Second); lc.Stats().Packets < before+2; {
				if time.Now().After(deadline) {
					t.Fatalf("%s: capture read %d packets, want 2 or more", what, lc.Stats().Packets-before)
				}
				time.Sleep(20 * time.Millisecond)
			}
			return uint16(uc.LocalAddr().(*net.UDPAddr).Port)
		}
		t.Fatalf("%s: no answer in 50 tries", what)
		return 0
	}
	before := exchange("before the change")
	gw.MustRun("ip", "link", "set", "lan1", "address", "02:00:5e:18:46:01")
	if err := gw.Do(func() error { lc.Follow(); return nil }); err != nil {
		t.Fatal(err)
	}
	a.MustRun("ip", "neigh", "flush", "dev", "eth0")
	after := exchange("after the change")
	if err := lc.stop(); err != nil {
		t.Errorf("Run: %v", err)
	}
	got := map[uint16]bool{}
	for _, ev := range rec.all() {
		if ev.Client == netip.MustParseAddr("198.18.46.10") && ev.DestPort == 7000 {
			got[ev.ClientPort] = true
		}
	}
	if !got[before] {
		t.Errorf("the flow before the change (port %d) not recorded", before)
	}
	if !got[after] {
		t.Errorf("the flow after lan1's MAC address changed (port %d) not recorded: capture took its frames as sent to another host's", after)
	}
}
