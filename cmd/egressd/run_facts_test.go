package main

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/dnsfilter"
	"egressd/internal/netutil"
	"egressd/internal/testnet"
)

// TestCaptureFactsHeld: capture asks the forwarder's table who was given
// an address for as long as the enforce firewall keeps it in its learned
// sets (at least a minute), not only for the answer's TTL. Before, an
// answer of a one-second TTL was gone from Given a second later, and
// audit mode reported a flow enforce mode forwards as would-be dropped.
func TestCaptureFactsHeld(t *testing.T) {
	tb := dnsfilter.NewTable(16)
	client, addr := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.7")
	tb.Learn(dnsfilter.Learned{Client: client, Name: "ntp.example.test", Addr: addr, Rule: "ntp", Expires: time.Now().Add(time.Second)})
	time.Sleep(1500 * time.Millisecond)
	if got := tb.NamesFor(client, addr); got != nil {
		t.Fatalf("NamesFor after the TTL: %v (the test would prove nothing)", got)
	}
	got := captureFacts{lanFacts{Table: tb}}.Given(addr)
	if len(got) != 1 || got[0].Client != client || got[0].Name != "ntp.example.test" {
		t.Errorf("Given after the TTL, within the firewall's minute: %v, want the answer", got)
	}
}

// fakeDevices groups addresses into devices by number, and counts the
// questions.
type fakeDevices struct {
	dev   map[netip.Addr]int
	asked int
}

func (f *fakeDevices) SameDevice(a, b netip.Addr) bool {
	f.asked++
	da, ok1 := f.dev[a]
	db, ok2 := f.dev[b]
	return ok1 && ok2 && da == db
}

// TestLanFactsDevice: the proxy and capture are told the names the
// forwarder gave an address out for to the client, or else to another
// address of its device (a dual-stack device asks over IPv4 and connects
// over IPv6), never to another device. The devices are asked only when
// the client itself was given nothing and another client was given the
// address: not on the fast path.
func TestLanFactsDevice(t *testing.T) {
	tb := dnsfilter.NewTable(0)
	v4, v6, tmp6 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("2001:db8::11")
	other := netip.MustParseAddr("2001:db8::20")
	cdn, cdn6, lone := netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("2001:db8:2::7"), netip.MustParseAddr("203.0.113.8")
	exp := time.Now().Add(time.Minute)
	tb.Learn(dnsfilter.Learned{Client: v4, Name: "mtalk.google.com", Addr: cdn6, Rule: "fcm", Expires: exp})
	tb.Learn(dnsfilter.Learned{Client: v4, Name: "alt1-mtalk.google.com", Addr: cdn6, Rule: "fcm", Expires: exp})
	tb.Learn(dnsfilter.Learned{Client: v6, Name: "mtalk.google.com", Addr: cdn, Rule: "fcm", Expires: exp})
	tb.Learn(dnsfilter.Learned{Client: other, Name: "other.example", Addr: cdn, Rule: "x", Expires: exp})
	devs := &fakeDevices{dev: map[netip.Addr]int{v4: 1, v6: 1, tmp6: 1, other: 2}}
	f := lanFacts{Table: tb, devices: devs}

	for _, c := range []struct {
		what         string
		client, addr netip.Addr
		want         []string
		asks         bool
	}{
		{"the client that asked", v4, cdn6, []string{"mtalk.google.com", "alt1-mtalk.google.com"}, false},
		{"another address of its device", tmp6, cdn6, []string{"mtalk.google.com", "alt1-mtalk.google.com"}, true},
		{"its IPv4 address, given over IPv6", v4, cdn, []string{"mtalk.google.com"}, true},
		{"another device", other, cdn6, nil, true},
		{"the other device's own answer", other, cdn, []string{"other.example"}, false},
		{"an address given to nobody", tmp6, lone, nil, false},
		{"any client", netip.Addr{}, cdn6, []string{"mtalk.google.com", "alt1-mtalk.google.com"}, false},
	} {
		before := devs.asked
		got := f.NamesFor(c.client, c.addr)
		slices.Sort(got)
		want := slices.Clone(c.want)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s: NamesFor(%v, %v) = %v, want %v", c.what, c.client, c.addr, got, want)
		}
		if asked := devs.asked > before; asked != c.asks {
			t.Errorf("%s: devices asked %v, want %v", c.what, asked, c.asks)
		}
	}
	// Without devices, each address is its own client.
	if got := (lanFacts{Table: tb}).NamesFor(tmp6, cdn6); got != nil {
		t.Errorf("without devices: %v", got)
	}
	// Capture is told the same.
	if got := (captureFacts{f}).NamesFor(tmp6, cdn6); len(got) != 2 {
		t.Errorf("capture's facts: %v", got)
	}
}

// TestLanMACs: a client's MAC is the neighbour table's on the first LAN
// interface that has a usable entry for its address; a client behind a
// router (no entry) has none; without LAN interfaces there is nothing to
// ask.
func TestLanMACs(t *testing.T) {
	if lanDeviceSet(nil).macs(nil) != nil {
		t.Error("MACs without LAN interfaces")
	}
	ns := testnet.New(t, "h6macs")
	ns.MustRun("ip", "link", "add", "l0", "type", "veth", "peer", "name", "l1")
	for _, c := range [][]string{
		{"ip", "addr", "add", "192.0.2.1/24", "dev", "l0"},
		{"ip", "addr", "add", "198.51.100.1/24", "dev", "l1"},
		{"ip", "link", "set", "l0", "up"},
		{"ip", "link", "set", "l1", "up"},
		{"ip", "neigh", "replace", "192.0.2.5", "lladdr", "02:00:00:00:00:05", "dev", "l0", "nud", "permanent"},
		{"ip", "neigh", "replace", "198.51.100.6", "lladdr", "02:00:00:00:00:06", "dev", "l1", "nud", "permanent"},
		{"ip", "neigh", "replace", "192.0.2.7", "lladdr", "02:00:00:00:00:07", "dev", "l0", "nud", "noarp"},
	} {
		ns.MustRun(c...)
	}
	macs := lanDeviceSet{netutil.NewDevices("l0", nil), netutil.NewDevices("l1", nil)}.macs([]string{"l0", "l1"})
	for _, c := range []struct {
		addr, want string
	}{
		{"192.0.2.5", "02:00:00:00:00:05"},
		{"198.51.100.6", "02:00:00:00:00:06"}, // the second LAN's
		{"203.0.113.9", ""},                   // behind a router: no entry
		{"192.0.2.7", ""},                     // an entry that vouches for no MAC
	} {
		var got net.HardwareAddr
		if err := ns.Do(func() error { got = macs.ClientMAC(netip.MustParseAddr(c.addr)); return nil }); err != nil {
			t.Fatal(err)
		}
		if got.String() != c.want {
			t.Errorf("ClientMAC(%s) = %q, want %q", c.addr, got, c.want)
		}
	}
}

// TestLanMACsZone: a link-local address is one of its link: the same
// fe80:: address on two LAN interfaces is two devices, and a client's MAC
// is the table's of the interface its zone names, not the first LAN
// interface's (a host on a second LAN that took a kiosk's link-local
// address on the first would be given the kiosk's MAC).
func TestLanMACsZone(t *testing.T) {
	ns := testnet.New(t, "r3maczone")
	ns.MustRun("ip", "link", "add", "l0", "type", "veth", "peer", "name", "l1")
	for _, c := range [][]string{
		{"ip", "link", "set", "l0", "up"},
		{"ip", "link", "set", "l1", "up"},
		{"ip", "neigh", "replace", "fe80::5", "lladdr", "02:00:00:00:00:05", "dev", "l0", "nud", "permanent"},
		{"ip", "neigh", "replace", "fe80::5", "lladdr", "02:00:00:00:00:06", "dev", "l1", "nud", "permanent"},
		{"ip", "neigh", "replace", "fe80::7", "lladdr", "02:00:00:00:00:07", "dev", "l0", "nud", "permanent"},
	} {
		ns.MustRun(c...)
	}
	macs := lanDeviceSet{netutil.NewDevices("l0", nil), netutil.NewDevices("l1", nil)}.macs([]string{"l0", "l1"})
	for _, c := range []struct {
		addr, want string
	}{
		{"fe80::5%l0", "02:00:00:00:00:05"},
		{"fe80::5%l1", "02:00:00:00:00:06"}, // the second LAN's, though the first has one
		{"fe80::7%l1", ""},                  // only the first LAN has it
		{"fe80::7%l0", "02:00:00:00:00:07"},
	} {
		var got net.HardwareAddr
		if err := ns.Do(func() error { got = macs.ClientMAC(netip.MustParseAddr(c.addr)); return nil }); err != nil {
			t.Fatal(err)
		}
		if got.String() != c.want {
			t.Errorf("ClientMAC(%s) = %q, want %q", c.addr, got, c.want)
		}
	}
	// One device: the first LAN's fe80::5 and its ULA address, on l0.
	// The second LAN's fe80::5 is another device, whose DNS answers are
	// not the first's (lanFacts asks SameDevice).
	ns.MustRun("ip", "neigh", "replace", "fd00::5", "lladdr", "02:00:00:00:00:05", "dev", "l0", "nud", "permanent")
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"fe80::5%l0", "fd00::5", true},
		{"fd00::5", "fe80::5%l0", true},
		{"fe80::5%l1", "fd00::5", false}, // another link's fe80::5
		{"fe80::5%l1", "fe80::5%l0", false},
	} {
		var got bool
		if err := ns.Do(func() error {
			got = macs.SameDevice(netip.MustParseAddr(c.a), netip.MustParseAddr(c.b))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if got != c.want {
			t.Errorf("SameDevice(%s, %s) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}

// TestLanMACsLinks: with several LAN interfaces, an address is on a LAN
// link (the forwarder's unresolved sources) when one interface's prefixes
// hold it (a link-local one: the interface its zone names), never on a
// link without ARP (a tun: its clients keep a bucket each); a resolve is
// asked on the interface whose link it is, not on the others.
func TestLanMACsLinks(t *testing.T) {
	ns := testnet.New(t, "r3maclinks")
	for _, c := range [][]string{
		{"ip", "link", "add", "l0", "type", "veth", "peer", "name", "p0"},
		{"ip", "link", "add", "l1", "type", "veth", "peer", "name", "p1"},
		{"ip", "tuntap", "add", "mode", "tun", "name", "w0"},
		{"sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"},
		{"ip", "addr", "add", "198.18.1.1/24", "dev", "l0"},
		{"ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", "l0", "nodad"},
		{"ip", "addr", "add", "198.18.3.1/24", "dev", "l1"},
		{"ip", "addr", "add", "198.18.2.1/24", "dev", "w0"},
	} {
		ns.MustRun(c...)
	}
	for _, dev := range []string{"l0", "p0", "l1", "p1", "w0"} {
		ns.MustRun("ip", "link", "set", dev, "up")
	}
	names := []string{"l0", "l1", "w0"}
	macs := lanDeviceSet{netutil.NewDevices("l0", nil), netutil.NewDevices("l1", nil), netutil.NewDevices("w0", nil)}.macs(names)
	// The interfaces' link-local addresses come with the links up.
	ns.WaitAddr(t, "2001:db8:1::1")
	ns.LinkLocal(t, "l1")
	for a, want := range map[string]bool{
		"198.18.1.50": true, "2001:db8:1::50": true, "198.18.3.50": true, "fe80::50%l1": true,
		"198.18.2.9": false, "fe80::50%w0": false, // a tun: no ARP, no NDP
		"203.0.113.5": false, "198.18.1.1": false,
	} {
		var got bool
		ns.Do(func() error { got = macs.ClientOnLink(netip.MustParseAddr(a)); return nil })
		if got != want {
			t.Errorf("ClientOnLink(%s) = %v, want %v", a, got, want)
		}
	}
	for a, dev := range map[string]string{"198.18.1.50": "l0", "198.18.3.50": "l1", "fe80::50%l1": "l1"} {
		addr := netip.MustParseAddr(a)
		if err := ns.Do(func() error { return macs.ResolveClient(addr) }); err != nil {
			t.Fatalf("ResolveClient(%s): %v", a, err)
		}
		for _, d := range names {
			out := ns.MustRun("ip", "neigh", "show", addr.WithZone("").String(), "dev", d)
			if has := strings.TrimSpace(out) != ""; has != (d == dev) {
				t.Errorf("ResolveClient(%s): an entry on %s: %v (%q), want only on %s", a, d, has, out, dev)
			}
		}
	}
}
