package netutil

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// TestRoutesBack asks a gateway namespace's routing table, with a LAN and
// a WAN interface and default routes via the WAN, which sources its LAN
// interface routes back to: what nft's `fib saddr . iif oif missing`
// lets pass. The LAN's subnets, a subnet routed via a LAN router and
// IPv6 link-local addresses do; an internet address, another site's,
// 169.254/16 without a route, the gateway's own address and loopback do
// not.
func TestRoutesBack(t *testing.T) {
	testnet.RequireRoot(t)
	g, _ := routedGateway(t, "rb")
	g.MustRun("ip", "route", "add", "198.18.7.0/24", "via", "198.18.1.2", "dev", "lan0")
	g.MustRun("ip", "-6", "route", "add", "2001:db8:7::/64", "via", "2001:db8:1::2", "dev", "lan0")
	lan, r := lanAsker(t, g)
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

// TestRoutesBackAsNftFib sends from a LAN host, from each of several
// sources, to a gateway whose routes for them differ, and compares
// RoutesBack with what the gateway's `fib saddr . iif oif missing` says
// of each (nft counters): nft_fib takes the gateway's best route for the
// source and asks whether it leaves by the incoming interface, so a
// source whose best route leaves by another interface (a second LAN's
// subnet, a subnet routed via the WAN) is missing even where a less
// specific route via the LAN interface covers it. An IPv4-mapped source
// in an IPv6 header (::ffff:198.18.5.5, sent as a raw frame) is looked up
// in the IPv6 table, where only an IPv6 route for it (::ffff:0:0/96 has
// none but the default) sends it back; before session 26 RoutesBack
// unmapped it and asked the IPv4 table. And 0.0.0.0 to a unicast address
// is looked up as the address 0.0.0.0 (nft_fib's exceptions are only the
// broadcast address and local multicast): the default route's, which
// passes where that is via the LAN interface; RoutesBack said no route
// (the kernel's answer to `ip route get 0.0.0.0 fibmatch`).
func TestRoutesBackAsNftFib(t *testing.T) {
	testnet.RequireRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("nft (Debian package nftables) is not installed: %v", err)
	}
	g, l := routedGateway(t, "rf")
	l2 := testnet.New(t, "rfm")
	testnet.Link(t, l2, "eth0", []string{"198.18.3.2/24", "2001:db8:3::2/64"}, g, "lan1", []string{"198.18.3.1/24", "2001:db8:3::1/64"})
	// A broad route via a router on the first LAN, more specific ones
	// via the second LAN and via the WAN inside it.
	g.MustRun("ip", "route", "add", "198.18.0.0/16", "via", "198.18.1.2", "dev", "lan0")
	g.MustRun("ip", "route", "add", "198.18.8.0/24", "via", "198.18.3.2", "dev", "lan1")
	g.MustRun("ip", "route", "add", "198.18.9.0/24", "via", "198.18.2.2")
	g.MustRun("ip", "-6", "route", "add", "2001:db8::/32", "via", "2001:db8:1::2", "dev", "lan0")
	g.MustRun("ip", "-6", "route", "add", "2001:db8:8::/48", "via", "2001:db8:3::2", "dev", "lan1")
	g.MustRun("ip", "-6", "route", "add", "2001:db8:9::/48", "via", "2001:db8:2::2")
	g.MustRun("ip", "-6", "route", "add", "::ffff:198.18.6.0/120", "via", "2001:db8:1::2", "dev", "lan0")
	srcs := []string{"198.18.5.5", "198.18.8.8", "198.18.9.9", "198.18.3.7", "198.18.2.9", "169.254.3.4", "2001:db8:5::5", "2001:db8:8::8", "2001:db8:9::9", "2001:db8:3::7",
		"::ffff:198.18.5.5", "::ffff:198.18.6.6", "0.0.0.0"}
	raw := func(s string) bool { return strings.HasPrefix(s, "::ffff:") || s == "0.0.0.0" }
	g.MustRun("nft", "add", "table", "inet", "rbf")
	g.MustRun("nft", "add", "chain", "inet", "rbf", "pre", "{ type filter hook prerouting priority -300; policy accept; }")
	for i, s := range srcs {
		fam := "ip"
		if strings.Contains(s, ":") {
			fam = "ip6"
		}
		g.MustRun("nft", "add", "rule", "inet", "rbf", "pre", "iifname", "lan0", fam, "saddr", s, "counter", "comment", fmt.Sprintf(`"all%d"`, i))
		g.MustRun("nft", "add", "rule", "inet", "rbf", "pre", "iifname", "lan0", fam, "saddr", s, "fib", "saddr", ".", "iif", "oif", "missing", "counter", "comment", fmt.Sprintf(`"miss%d"`, i))
	}
	l.MustRun("ip", "route", "add", "default", "via", "198.18.1.1")
	l.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
	for _, s := range srcs {
		if !raw(s) {
			l.MustRun("ip", "addr", "add", s, "dev", "lo")
			l.WaitAddr(t, s)
		}
	}
	gwMAC := strings.TrimSpace(g.MustRun("cat", "/sys/class/net/lan0/address"))
	send := func(s string) {
		dst := "198.18.1.1:9"
		if strings.Contains(s, ":") {
			dst = "[2001:db8:1::1]:9"
		}
		if raw(s) {
			if err := sendRawUDP(l, "eth0", gwMAC, netip.MustParseAddr(s), netip.MustParseAddrPort(dst)); err != nil {
				t.Fatal(err)
			}
			return
		}
		l.Do(func() error {
			c, err := (&net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP(s)}}).Dial("udp", dst)
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("x"))
			return err
		})
	}
	for range 3 {
		for _, s := range srcs {
			send(s)
		}
		time.Sleep(50 * time.Millisecond)
	}
	counted := regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "(\w+)"`)
	counters := func() map[string]int {
		n := map[string]int{}
		for _, m := range counted.FindAllStringSubmatch(g.MustRun("nft", "list", "chain", "inet", "rbf", "pre"), -1) {
			n[m[2]], _ = strconv.Atoi(m[1])
		}
		return n
	}
	n := counters()
	lan, r := lanAsker(t, g)
	for i, s := range srcs {
		all, miss := n[fmt.Sprintf("all%d", i)], n[fmt.Sprintf("miss%d", i)]
		if all == 0 {
			t.Errorf("%s: no packet reached the gateway's prerouting", s)
			continue
		}
		nftBack := miss == 0
		got, err := r.RoutesBack(lan, netip.MustParseAddr(s))
		if err != nil || got != nftBack {
			t.Errorf("RoutesBack(lan0, %s) = %v, %v; nft_fib: routes back %v (%d of %d packets missing)", s, got, err, nftBack, miss, all)
		}
	}
	// 0.0.0.0 again with the default route via a router on the LAN.
	g.MustRun("ip", "route", "replace", "default", "via", "198.18.1.2", "dev", "lan0")
	zero := len(srcs) - 1
	for range 3 {
		send(srcs[zero])
	}
	time.Sleep(50 * time.Millisecond)
	n2 := counters()
	all, miss := n2[fmt.Sprintf("all%d", zero)]-n[fmt.Sprintf("all%d", zero)], n2[fmt.Sprintf("miss%d", zero)]-n[fmt.Sprintf("miss%d", zero)]
	if all == 0 {
		t.Fatalf("0.0.0.0 with the default route via lan0: no packet reached the gateway's prerouting")
	}
	got, err := r.RoutesBack(lan, netip.IPv4Unspecified())
	if err != nil || got != (miss == 0) {
		t.Errorf("RoutesBack(lan0, 0.0.0.0), default route via lan0 = %v, %v; nft_fib: routes back %v (%d of %d packets missing)", got, err, miss == 0, miss, all)
	}
}

// routedGateway makes a gateway namespace g (prefix+"g") with a LAN
// host l (prefix+"l") on its lan0, 198.18.1.0/24 and 2001:db8:1::/64,
// and a WAN router (prefix+"w") on its wan0, 198.18.2.0/24 and
// 2001:db8:2::/64, its default routes via the WAN router.
func routedGateway(t *testing.T, prefix string) (g, l *testnet.NS) {
	t.Helper()
	g, l, w := testnet.New(t, prefix+"g"), testnet.New(t, prefix+"l"), testnet.New(t, prefix+"w")
	testnet.Link(t, l, "eth0", []string{"198.18.1.2/24", "2001:db8:1::2/64"}, g, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	testnet.Link(t, w, "eth0", []string{"198.18.2.2/24", "2001:db8:2::2/64"}, g, "wan0", []string{"198.18.2.1/24", "2001:db8:2::1/64"})
	g.MustRun("ip", "route", "add", "default", "via", "198.18.2.2")
	g.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:2::2")
	return g, l
}

// lanAsker returns g's lan0 interface index and a RouteAsker opened in
// g, closed when the test ends.
func lanAsker(t *testing.T, g *testnet.NS) (int, *RouteAsker) {
	t.Helper()
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
	t.Cleanup(func() { r.Close() })
	return lan, r
}

// sendRawUDP sends from ns's interface dev, in an Ethernet frame to mac,
// one UDP datagram from src port 5000 to dst whatever src is (AF_PACKET:
// a socket would not send from 0.0.0.0 nor put an IPv4-mapped address in
// an IPv6 header). The UDP checksum is left 0: the datagram only has to
// reach prerouting.
func sendRawUDP(ns *testnet.NS, dev, mac string, src netip.Addr, dst netip.AddrPort) error {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return err
	}
	udp := []byte{0x13, 0x88, byte(dst.Port() >> 8), byte(dst.Port()), 0, 9, 0, 0, 'x'}
	var pkt []byte
	proto := uint16(unix.ETH_P_IP)
	if dst.Addr().Is4() {
		ip := []byte{0x45, 0, 0, byte(20 + len(udp)), 0, 1, 0, 0, 64, unix.IPPROTO_UDP, 0, 0}
		ip = append(append(ip, src.AsSlice()...), dst.Addr().AsSlice()...)
		var sum uint32
		for i := 0; i < 20; i += 2 {
			sum += uint32(ip[i])<<8 | uint32(ip[i+1])
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		ip[10], ip[11] = byte(^sum>>8), byte(^sum)
		pkt = append(ip, udp...)
	} else {
		proto = unix.ETH_P_IPV6
		ip := []byte{0x60, 0, 0, 0, 0, byte(len(udp)), unix.IPPROTO_UDP, 64}
		s16, d16 := src.As16(), dst.Addr().As16()
		pkt = append(append(append(ip, s16[:]...), d16[:]...), udp...)
	}
	be := proto<<8 | proto>>8
	return ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, int(be))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Protocol: be, Ifindex: ifi.Index, Halen: 6}
		copy(sa.Addr[:], hw)
		return unix.Sendto(fd, pkt, 0, sa)
	})
}
