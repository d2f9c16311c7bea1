package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestDropFrom: the transparent and the explicit listener, each with the
// filter for one interface ("wan"), complete no handshake with a client
// over it, IPv4 and IPv6, and do with one over the other ("lan") and over
// loopback; SetDropFrom takes the filters off and puts them back, and
// attaches them to listeners opened without (plain TCP, not MPTCP, which
// refuses filters).
func TestDropFrom(t *testing.T) {
	peer := testnet.New(t, "pdp")
	host := testnet.New(t, "pdh")
	testnet.Link(t, peer, "eth0", []string{"198.18.30.1/24", "2001:db8:30::1/64"}, host, "lan", []string{"198.18.30.2/24", "2001:db8:30::2/64"})
	testnet.Link(t, peer, "eth1", []string{"198.18.31.1/24", "2001:db8:31::1/64"}, host, "wan", []string{"198.18.31.2/24", "2001:db8:31::2/64"})
	var wan int
	if err := host.Do(func() error {
		i, err := net.InterfaceByName("wan")
		wan = i.Index
		return err
	}); err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile("drop.yaml", []byte(fmt.Sprintf(testPolicy, "audit")))
	if err != nil {
		t.Fatal(err)
	}
	for _, initial := range []int{wan, 0} {
		t.Run(map[bool]string{true: "filtered-at-start", false: "filtered-later"}[initial != 0], func(t *testing.T) {
			p, err := New(Config{TransparentAddr: "[::]:15001", ExplicitAddr: "[::]:3128", DropTransparentFrom: initial, DropExplicitFrom: initial},
				Deps{Policy: policy.NewStore(eng)})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			// Run binds in the goroutine that calls it, here in the host
			// namespace.
			go func() { done <- host.Do(func() error { return p.Run(ctx) }) }()
			select {
			case <-p.Ready():
			case err := <-done:
				t.Fatalf("run: %v", err)
			}
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil && !errors.Is(err, net.ErrClosed) {
					t.Errorf("run: %v", err)
				}
			})
			check := func(dropped bool) {
				t.Helper()
				for _, port := range []string{"15001", "3128"} {
					for _, c := range []struct {
						ns   *testnet.NS
						to   string
						want bool
					}{
						{peer, "198.18.30.2", true},
						{peer, "2001:db8:30::2", true},
						{peer, "198.18.31.2", !dropped},
						{peer, "2001:db8:31::2", !dropped},
						{host, "127.0.0.1", true},
						{host, "::1", true},
					} {
						to := net.JoinHostPort(c.to, port)
						ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
						conn, err := c.ns.DialContext(ctx, "tcp", to)
						cancel()
						if err == nil {
							conn.Close()
						} else if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
							t.Fatalf("connect from %s to %s: %v (want a connection or a timeout)", c.ns.Name, to, err)
						}
						if got := err == nil; got != c.want {
							t.Errorf("connect from %s to %s: connected %v, want %v", c.ns.Name, to, got, c.want)
						}
					}
				}
			}
			if initial == 0 {
				// No filter at start (the WAN interface did not exist yet):
				// SetDropFrom attaches them to the open listeners.
				check(false)
				if err := p.SetDropFrom(wan, wan); err != nil {
					t.Fatal(err)
				}
			}
			check(true)
			if err := p.SetDropFrom(0, 0); err != nil {
				t.Fatal(err)
			}
			check(false)
			if err := p.SetDropFrom(wan, wan); err != nil {
				t.Fatal(err)
			}
			check(true)
		})
	}
}
