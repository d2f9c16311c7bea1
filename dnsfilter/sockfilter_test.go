package dnsfilter

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"

	"egressd/internal/testnet"
)

// TestDropFrom: a forwarder whose sockets drop what arrives on one
// interface ("wan") answers dig over the other ("lan") and over loopback,
// and gives dig over "wan" nothing, UDP and TCP, IPv4 and IPv6; its UDP
// readers in batches and outside the netpoller (UDPRawReads) alike.
// SetDropFrom takes the filters off the open sockets and puts them back.
func TestDropFrom(t *testing.T) {
	needTool(t, "dig", "dnsutils")
	procsAtLeast(t, 3)
	peer := testnet.New(t, "dfp")
	host := testnet.New(t, "dfh")
	testnet.Link(t, peer, "eth0", []string{"198.18.20.1/24", "2001:db8:20::1/64"}, host, "lan", []string{"198.18.20.2/24", "2001:db8:20::2/64"})
	testnet.Link(t, peer, "eth1", []string{"198.18.21.1/24", "2001:db8:21::1/64"}, host, "wan", []string{"198.18.21.2/24", "2001:db8:21::2/64"})
	var wan int
	if err := host.Do(func() error {
		i, err := net.InterfaceByName("wan")
		wan = i.Index
		return err
	}); err != nil {
		t.Fatal(err)
	}

	// Run binds in the goroutine that calls it: that goroutine's thread
	// is in the host namespace. The answers to the canary are the
	// forwarder's own: no upstream is asked.
	s, err := New(Config{Listen: []string{":5353"}, Upstreams: []string{"127.0.0.1:9"}, UDPReaders: 2, UDPRawReads: true, ClientRate: -1,
		DropUDPFrom: wan, DropTCPFrom: wan}, Deps{Policy: compile(t, enforcePolicy), Sink: &recSink{}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- host.Do(func() error { return s.Run(context.Background()) }) }()
	select {
	case <-s.Ready():
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(func() {
		_ = s.Close()
		if err := <-done; err != nil && !errors.Is(err, net.ErrClosed) {
			t.Errorf("run: %v", err)
		}
	})
	s.mu.Lock()
	raw := 0
	for _, c := range s.udp {
		if isRawUDP(c) {
			raw++
		}
	}
	s.mu.Unlock()
	if raw == 0 {
		t.Error("no UDP listener socket outside the netpoller: the test does not cover them")
	}

	check := func(dropped bool) {
		t.Helper()
		for _, c := range []struct {
			ns   *testnet.NS
			to   string
			want bool
		}{
			{peer, "198.18.20.2", true},
			{peer, "2001:db8:20::2", true},
			{peer, "198.18.21.2", !dropped},
			{peer, "2001:db8:21::2", !dropped},
			{host, "127.0.0.1", true},
			{host, "::1", true},
			{host, "198.18.21.2", true}, // the host's own query: over loopback
		} {
			for _, tr := range []string{"+notcp", "+tcp"} {
				out, err := c.ns.Run("dig", "@"+c.to, "-p", "5353", "+tries=2", "+time=1", tr, canaryName, "A")
				answered := err == nil && strings.Contains(out, "status: NXDOMAIN")
				if answered != c.want {
					t.Errorf("dig %s from %s to %s: answered %v, want %v (%v)\n%s", tr, c.ns.Name, c.to, answered, c.want, err, out)
				}
			}
		}
	}
	check(true)
	if err := s.SetDropFrom(0, 0); err != nil {
		t.Fatal(err)
	}
	check(false)
	if err := s.SetDropFrom(wan, wan); err != nil {
		t.Fatal(err)
	}
	check(true)
	if err := s.SetDropFrom(-1, 0); err == nil {
		t.Error("SetDropFrom(-1, 0): no error")
	}
}
