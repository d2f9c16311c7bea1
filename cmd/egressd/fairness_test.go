package main

import (
	"net"
	"net/netip"
	"testing"

	"egressd/internal/netutil"
	"egressd/internal/testnet"
)

// TestLanMACsClientDevice: where clients share limits, a MAC's addresses
// are one client however many it has (two IPv4 addresses and an IPv6
// one here, which SameDevice does not take for one device: that is for
// vouching); a link-local address is looked up on its zone's LAN only;
// an address without an entry (routed) has no device.
func TestLanMACsClientDevice(t *testing.T) {
	ns := testnet.New(t, "r3h4dev")
	ns.MustRun("ip", "link", "add", "l0", "type", "veth", "peer", "name", "l1")
	for _, c := range [][]string{
		{"ip", "link", "set", "l0", "up"},
		{"ip", "link", "set", "l1", "up"},
		{"ip", "neigh", "replace", "192.0.2.5", "lladdr", "02:00:00:00:00:05", "dev", "l0", "nud", "permanent"},
		{"ip", "neigh", "replace", "192.0.2.6", "lladdr", "02:00:00:00:00:05", "dev", "l0", "nud", "permanent"},
		{"ip", "neigh", "replace", "2001:db8::5", "lladdr", "02:00:00:00:00:05", "dev", "l0", "nud", "permanent"},
		{"ip", "neigh", "replace", "fe80::5", "lladdr", "02:00:00:00:00:06", "dev", "l1", "nud", "permanent"},
	} {
		ns.MustRun(c...)
	}
	macs := lanDeviceSet{netutil.NewDevices("l0", nil), netutil.NewDevices("l1", nil)}.macs([]string{"l0", "l1"})
	for _, c := range []struct {
		addr, want string
	}{
		{"192.0.2.5", "02:00:00:00:00:05"},
		{"192.0.2.6", "02:00:00:00:00:05"},
		{"2001:db8::5", "02:00:00:00:00:05"},
		{"fe80::5%l1", "02:00:00:00:00:06"},
		{"fe80::5%l0", ""},
		{"198.51.100.9", ""},
	} {
		var got net.HardwareAddr
		var same bool
		if err := ns.Do(func() error {
			got = macs.ClientDevice(netip.MustParseAddr(c.addr))
			same = macs.SameDevice(netip.MustParseAddr("192.0.2.5"), netip.MustParseAddr(c.addr))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if got.String() != c.want {
			t.Errorf("ClientDevice(%s) = %q, want %q", c.addr, got, c.want)
		}
		if c.addr == "192.0.2.6" && same {
			t.Errorf("SameDevice(192.0.2.5, 192.0.2.6): a MAC with two IPv4 addresses taken for one device for vouching")
		}
	}
}
