package netutil

import (
	"net"
	"net/netip"
	"testing"

	"egressd/internal/testnet"
)

// TestRoutesBack asks a gateway namespace's routing table, with a LAN and
// a WAN interface and default routes via the WAN, which sources its LAN
// interface routes back to: what nft's `fib saddr . iif oif missing`
// lets pass. The LAN's subnets, a subnet routed via a LAN router and
// IPv6 link-local addresses do; an internet address, another site's,
// 169.254/16 without a route, the gateway's own address and loopback do
// not. Without RTM_F_FIB_MATCH every IPv4 address would (the kernel
// assumes one with no route on the interface is on its link).
func TestRoutesBack(t *testing.T) {
	testnet.RequireRoot(t)
	g, l, w := testnet.New(t, "rbg"), testnet.New(t, "rbl"), testnet.New(t, "rbw")
	testnet.Link(t, l, "eth0", []string{"198.18.1.2/24", "2001:db8:1::2/64"}, g, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	testnet.Link(t, w, "eth0", []string{"198.18.2.2/24", "2001:db8:2::2/64"}, g, "wan0", []string{"198.18.2.1/24", "2001:db8:2::1/64"})
	g.MustRun("ip", "route", "add", "default", "via", "198.18.2.2")
	g.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:2::2")
	g.MustRun("ip", "route", "add", "198.18.7.0/24", "via", "198.18.1.2", "dev", "lan0")
	g.MustRun("ip", "-6", "route", "add", "2001:db8:7::/64", "via", "2001:db8:1::2", "dev", "lan0")
	var lan int
	var r *RouteAsker
	if err := g.Do(func() error {
		ifi, err := net.InterfaceByName("lan0")
		if err == nil {
			lan = ifi.Index
			r, err = OpenRouteAsker()
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, c := range []struct {
		addr string
		want bool
	}{
		{"198.18.1.77", true}, {"2001:db8:1::77", true},
		{"198.18.7.9", true}, {"2001:db8:7::9", true},
		{"fe80::1234", true},
		{"198.51.100.77", false}, {"2001:db8:99::77", false},
		{"198.18.2.9", false}, {"2001:db8:2::9", false},
		{"169.254.3.4", false},
		{"198.18.1.1", false}, {"2001:db8:1::1", false},
		{"127.0.0.1", false}, {"0.0.0.0", false},
	} {
		// Asked from this thread, not the namespace's: the socket is
		// of the namespace it was opened in.
		got, err := r.RoutesBack(lan, netip.MustParseAddr(c.addr))
		if err != nil || got != c.want {
			t.Errorf("RoutesBack(lan0, %s) = %v, %v; want %v", c.addr, got, err, c.want)
		}
	}
	g.MustRun("ip", "route", "add", "169.254.0.0/16", "dev", "lan0")
	if got, err := r.RoutesBack(lan, netip.MustParseAddr("169.254.3.4")); err != nil || !got {
		t.Errorf("169.254.3.4 with a link-local route on lan0: %v, %v; want true", got, err)
	}
}
