package netutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// TestNeighbourTable reads a real neighbour table: a gateway namespace
// with a dual-stack client (an IPv4 and two IPv6 addresses on one veth)
// and a second device on the same link (a macvlan, its own MAC). The dump
// and single lookups give each address the MAC of its device, an address
// not on the link is ErrNoNeighbour, and Devices groups the client's
// addresses and keeps the other device apart.
func TestNeighbourTable(t *testing.T) {
	testnet.RequireRoot(t)
	c, g, o := testnet.New(t, "nbc"), testnet.New(t, "nbg"), testnet.New(t, "nbo")
	testnet.Link(t, c, "c0", []string{"198.18.1.2/24", "2001:db8:1::2/64", "2001:db8:1::3/64"},
		g, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	c.MustRun("ip", "link", "add", "m0", "link", "c0", "type", "macvlan", "mode", "bridge")
	c.MustRun("ip", "link", "set", "m0", "netns", o.Name)
	o.MustRun("sysctl", "-qw", "net.ipv6.conf.m0.accept_dad=0")
	o.MustRun("ip", "addr", "add", "198.18.1.9/24", "dev", "m0")
	o.MustRun("ip", "-6", "addr", "add", "2001:db8:1::9/64", "dev", "m0", "nodad")
	o.MustRun("ip", "link", "set", "m0", "up")
	o.WaitAddr(t, "2001:db8:1::9")
	// Each address connects to the gateway once: the gateway answers it,
	// and its table learns the address.
	ln, err := g.Listen("tcp", "[::]:15002")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			a, err := ln.Accept()
			if err != nil {
				return
			}
			a.Close()
		}
	}()
	for _, p := range []struct {
		ns       *testnet.NS
		src, dst string
	}{{c, "198.18.1.2", "198.18.1.1"}, {c, "2001:db8:1::2", "2001:db8:1::1"}, {c, "2001:db8:1::3", "2001:db8:1::1"},
		{o, "198.18.1.9", "198.18.1.1"}, {o, "2001:db8:1::9", "2001:db8:1::1"}} {
		err := p.ns.Do(func() error {
			d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(p.src)}}
			conn, err := d.Dial("tcp", net.JoinHostPort(p.dst, "15002"))
			if err == nil {
				conn.Close()
			}
			return err
		})
		if err != nil {
			t.Fatalf("from %s to the gateway: %v", p.src, err)
		}
	}
	macOf := func(ns *testnet.NS, dev string) MAC {
		t.Helper()
		f := strings.Fields(ns.MustRun("cat", "/sys/class/net/"+dev+"/address"))
		hw, err := net.ParseMAC(f[0])
		if err != nil || len(hw) != 6 {
			t.Fatalf("%s's MAC %q: %v", dev, f, err)
		}
		return MAC(hw)
	}
	clientMAC, otherMAC := macOf(c, "c0"), macOf(o, "m0")
	want := map[netip.Addr]MAC{
		netip.MustParseAddr("198.18.1.2"): clientMAC, netip.MustParseAddr("2001:db8:1::2"): clientMAC, netip.MustParseAddr("2001:db8:1::3"): clientMAC,
		netip.MustParseAddr("198.18.1.9"): otherMAC, netip.MustParseAddr("2001:db8:1::9"): otherMAC,
	}

	var ifindex int
	got := map[netip.Addr]Neighbour{}
	err = g.Do(func() error {
		ifi, err := net.InterfaceByName("lan0")
		if err != nil {
			return err
		}
		ifindex = ifi.Index
		more, err := NeighbourDump(ifindex, 100, func(nb Neighbour) { got[nb.Addr] = nb })
		if more {
			t.Errorf("a dump of %d entries says there were more than 100", len(got))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for a, m := range want {
		nb, ok := got[a]
		if !ok || nb.MAC != m || !usableNeighbour(nb) {
			t.Errorf("dump: %s is %+v (present %v), want MAC %s in a usable state", a, nb, ok, m)
		}
	}
	// A dump bounded below the table's size says so.
	g.Do(func() error {
		n := 0
		more, err := NeighbourDump(ifindex, 2, func(Neighbour) { n++ })
		if err != nil || !more || n != 2 {
			t.Errorf("a dump bounded to 2: %d entries, more %v, %v; want 2, true", n, more, err)
		}
		return nil
	})

	g.Do(func() error {
		for a, m := range want {
			nb, err := NeighbourGet(ifindex, a)
			if err != nil || nb.MAC != m || nb.Addr != a {
				t.Errorf("get %s: %+v %v, want MAC %s", a, nb, err, m)
			}
		}
		if nb, err := NeighbourGet(ifindex, netip.MustParseAddr("198.18.1.77")); !errors.Is(err, ErrNoNeighbour) {
			t.Errorf("get of an address never on the link: %+v %v, want ErrNoNeighbour", nb, err)
		}
		if nb, err := NeighbourGet(ifindex, netip.MustParseAddr("::ffff:198.18.1.2")); err != nil || nb.MAC != clientMAC {
			t.Errorf("get of an IPv4-mapped address: %+v %v", nb, err)
		}
		return nil
	})

	// Devices over the real table (its sockets opened in the gateway's
	// namespace, where each question is asked).
	d := NewDevices("lan0", func(err error) { t.Errorf("devices: %v", err) })
	g.Do(func() error {
		for _, c := range []struct {
			a, b string
			want bool
		}{
			{"198.18.1.2", "2001:db8:1::3", true},
			{"2001:db8:1::2", "2001:db8:1::3", true},
			{"198.18.1.2", "2001:db8:1::9", false},
			{"198.18.1.9", "2001:db8:1::9", true},
			{"198.18.1.2", "198.51.100.7", false},
		} {
			if got := d.SameDevice(netip.MustParseAddr(c.a), netip.MustParseAddr(c.b)); got != c.want {
				t.Errorf("SameDevice(%s, %s) = %v, want %v", c.a, c.b, got, c.want)
			}
		}
		return nil
	})
}

// TestParseNeighbour: malformed entries are skipped, times are read in
// USER_HZ ticks (the least of the three), and a permanent entry is never
// idle.
func TestParseNeighbour(t *testing.T) {
	entry := func(state uint16, dst, ll []byte, ci []uint32) []byte {
		b := make([]byte, unix.SizeofNdMsg)
		b[0] = unix.AF_INET
		binary.NativeEndian.PutUint32(b[4:8], 7)
		binary.NativeEndian.PutUint16(b[8:10], state)
		if dst != nil {
			putAttr(&b, unix.NDA_DST, dst)
		}
		if ll != nil {
			putAttr(&b, unix.NDA_LLADDR, ll)
		}
		if ci != nil {
			var v []byte
			for _, x := range ci {
				v = binary.NativeEndian.AppendUint32(v, x)
			}
			putAttr(&b, unix.NDA_CACHEINFO, v)
		}
		return b
	}
	mac := []byte{2, 0, 0, 0, 0, 1}
	nb, ifi, ok := parseNeighbour(entry(NUDStale, []byte{198, 18, 1, 2}, mac, []uint32{500, 250, 9000, 1}))
	if !ok || ifi != 7 || nb.Addr != netip.MustParseAddr("198.18.1.2") || nb.MAC != MAC(mac) || nb.State != NUDStale || nb.Idle.Seconds() != 2.5 {
		t.Errorf("stale entry: %+v %d %v", nb, ifi, ok)
	}
	if nb, _, ok := parseNeighbour(entry(NUDPermanent, []byte{198, 18, 1, 2}, mac, []uint32{500, 250, 9000, 1})); !ok || nb.Idle != 0 {
		t.Errorf("permanent entry: %+v %v, want idle 0", nb, ok)
	}
	if _, _, ok := parseNeighbour(entry(NUDReachable, nil, mac, nil)); ok {
		t.Error("an entry without NDA_DST parsed")
	}
	if _, _, ok := parseNeighbour(entry(NUDReachable, []byte{1, 2, 3}, mac, nil)); ok {
		t.Error("an entry with a 3-byte NDA_DST parsed")
	}
	if nb, _, ok := parseNeighbour(entry(NUDReachable, []byte{198, 18, 1, 2}, []byte{1, 2, 3, 4, 5, 6, 7, 8}, nil)); !ok || nb.MAC != (MAC{}) {
		t.Errorf("an 8-byte link-layer address: %+v %v, want a zero MAC", nb, ok)
	}
	if _, _, ok := parseNeighbour(make([]byte, unix.SizeofNdMsg-1)); ok {
		t.Error("a short ndmsg parsed")
	}
}

// TestNeighbourResolve: asked to resolve an address it has no entry for,
// the kernel resolves a host's (its entry becomes usable, without a
// packet to it) and fails a source nobody holds; and the gateway's
// OnLink takes the link's addresses, not a routed one.
func TestNeighbourResolve(t *testing.T) {
	testnet.RequireRoot(t)
	c, g := testnet.New(t, "nrc"), testnet.New(t, "nrg")
	testnet.Link(t, c, "c0", []string{"198.18.1.2/24", "2001:db8:1::2/64"},
		g, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	c.MustRun("sysctl", "-qw", "net.ipv6.conf.c0.accept_dad=0")
	var ifindex int
	var devs *Devices
	if err := g.Do(func() error {
		i, err := net.InterfaceByName("lan0")
		if err != nil {
			return err
		}
		ifindex, devs = i.Index, NewDevices("lan0", nil)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for a, want := range map[string]bool{"198.18.1.2": true, "2001:db8:1::2": true, "198.18.1.200": true, "198.18.1.1": false, "198.51.100.2": false} {
		var got bool
		g.Do(func() error { got = devs.OnLink(netip.MustParseAddr(a)); return nil })
		if got != want {
			t.Errorf("OnLink(%s) = %v, want %v", a, got, want)
		}
	}
	for a, held := range map[string]bool{"198.18.1.2": true, "2001:db8:1::2": true, "198.18.1.200": false, "2001:db8:1::200": false} {
		addr := netip.MustParseAddr(a)
		if err := g.Do(func() error { return NeighbourResolve(ifindex, addr) }); err != nil {
			t.Fatalf("resolve %s: %v", a, err)
		}
		// The kernel probes: 3 tries a second apart before it fails an
		// entry. Poll its state, at most 50 times.
		var nb Neighbour
		for range 50 {
			g.Do(func() (err error) { nb, err = NeighbourGet(ifindex, addr); return })
			if usableNeighbour(nb) || nb.State&NUDFailed != 0 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if usableNeighbour(nb) != held {
			t.Errorf("%s (held: %v) after a resolve: state %#x, MAC %v", a, held, nb.State, nb.MAC)
		}
		if !held && nb.State&NUDPermanent != 0 {
			t.Errorf("%s: the resolve made a permanent entry", a)
		}
	}
}

// TestOnLinkWithoutNeighbours: a LAN interface that resolves no neighbour
// (ARP off: a WireGuard, tun or PPP link, IFF_NOARP or no hardware
// address) never has a usable entry, so an address of its link without
// one is not a source the gateway failed to resolve: OnLink says no, and
// the limits keep a client per address there (else its whole LAN shared
// one client's rate). Resolve asks nothing there.
func TestOnLinkWithoutNeighbours(t *testing.T) {
	testnet.RequireRoot(t)
	c, g := testnet.New(t, "nrac"), testnet.New(t, "nrag")
	testnet.Link(t, c, "c0", []string{"198.18.1.2/24", "2001:db8:1::2/64"},
		g, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	g.MustRun("ip", "link", "set", "lan0", "arp", "off")
	g.MustRun("ip", "tuntap", "add", "mode", "tun", "name", "tun0")
	g.MustRun("ip", "addr", "add", "198.18.2.1/24", "dev", "tun0")
	g.MustRun("ip", "link", "set", "tun0", "up")
	// Traffic to the client leaves an entry in the table (NOARP: not
	// usable), as a client's answers would.
	g.Run("ping", "-c", "1", "-W", "1", "198.18.1.2")
	for _, tc := range []struct{ iface, addr string }{{"lan0", "198.18.1.2"}, {"lan0", "2001:db8:1::2"}, {"lan0", "198.18.1.77"}, {"tun0", "198.18.2.9"}} {
		var on, asked bool
		var dev bool
		if err := g.Do(func() error {
			d := NewDevices(tc.iface, nil)
			a := netip.MustParseAddr(tc.addr)
			_, dev = d.Device(a)
			on = d.OnLink(a)
			var err error
			asked, err = d.Resolve(a)
			return err
		}); err != nil {
			t.Errorf("%s %s: %v", tc.iface, tc.addr, err)
		}
		if dev || on || asked {
			t.Errorf("%s (ARP off) %s: Device %v, OnLink %v, Resolve asked %v; want all false", tc.iface, tc.addr, dev, on, asked)
		}
	}
}

// TestResolveProbes counts what a resolve ask sends to the LAN for a
// source nobody holds (the forwarder asks once per dropped query of an
// unresolved source at a doubling count, within a copy's
// DevicesMaxLookups): the kernel's probes, mcast_solicit of them (3 by
// default) per ask, ARP broadcasts or neighbour solicitations to the
// address's solicited-node group; nothing more once the entry failed.
func TestResolveProbes(t *testing.T) {
	testnet.RequireRoot(t)
	c, g := testnet.New(t, "nrpc"), testnet.New(t, "nrpg")
	testnet.Link(t, c, "c0", []string{"198.18.1.2/24", "2001:db8:1::2/64"},
		g, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	c.MustRun("nft", "add table netdev r3t; add chain netdev r3t in { type filter hook ingress device c0 priority 0; }; "+
		"add rule netdev r3t in arp operation request counter; add rule netdev r3t in icmpv6 type nd-neighbor-solicit counter")
	var ifindex int
	if err := g.Do(func() error {
		i, err := net.InterfaceByName("lan0")
		ifindex = i.Index
		return err
	}); err != nil {
		t.Fatal(err)
	}
	counts := func() (arp, ns int) {
		out := c.MustRun("nft", "list", "chain", "netdev", "r3t", "in")
		for _, line := range strings.Split(out, "\n") {
			var n int
			if i := strings.Index(line, "packets "); i >= 0 {
				fmt.Sscanf(line[i+len("packets "):], "%d", &n)
			}
			switch {
			case strings.Contains(line, "arp operation"):
				arp = n
			case strings.Contains(line, "nd-neighbor-solicit"):
				ns = n
			}
		}
		return
	}
	arp0, ns0 := counts()
	const forged = 16
	var addrs []netip.Addr
	for i := range forged {
		addrs = append(addrs, netip.AddrFrom4([4]byte{198, 18, 1, byte(100 + i)}), netip.MustParseAddr(fmt.Sprintf("2001:db8:1::%x:1", 0x100+i)))
	}
	for _, a := range addrs {
		if err := g.Do(func() error { return NeighbourResolve(ifindex, a) }); err != nil {
			t.Fatalf("resolve %s: %v", a, err)
		}
	}
	// Wait until every entry failed (3 probes a second apart), at most
	// 60 polls; then a while for a straggler.
	for range 60 {
		failed := 0
		for _, a := range addrs {
			var nb Neighbour
			g.Do(func() (err error) { nb, err = NeighbourGet(ifindex, a); return })
			if nb.State&NUDFailed != 0 {
				failed++
			}
		}
		if failed == len(addrs) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(1500 * time.Millisecond)
	arp1, ns1 := counts()
	arp, ns := arp1-arp0, ns1-ns0
	t.Logf("%d resolve asks for forged IPv4 sources: %d ARP requests; %d for IPv6: %d solicitations", forged, arp, forged, ns)
	if arp == 0 || arp > 3*forged || ns == 0 || ns > 3*forged {
		t.Errorf("probes per ask: ARP %d, NS %d for %d asks each; want 1 to 3 each (mcast_solicit)", arp, ns, forged)
	}
}
