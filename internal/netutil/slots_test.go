package netutil

import (
	"net"
	"net/netip"
	"testing"

	"egressd/internal/fakemac"
)

// TestClientSlotsPerDevice: the addresses of one device share one
// client's cap, however many there are (before, 10 addresses took a cap
// of 100 at 10 each); another device and an address without one keep
// their own; an address whose device is found only after its first
// connections joins the device's count with them; the device table is
// asked at doubling counts; every release leaves nothing behind.
func TestClientSlotsPerDevice(t *testing.T) {
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	c := NewClientSlots(100, 10, devs.ClientDevice)
	flooder := net.HardwareAddr{2, 0, 0, 0, 0, 0xf}
	var addrs []netip.Addr
	for i := range 40 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 15: byte(i)})
		devs.Set(a, flooder)
		addrs = append(addrs, a)
	}
	var held []netip.Addr
	var last SlotRefusal
	for range 5 {
		for _, a := range addrs {
			if ok, why := c.Acquire(a); ok {
				held = append(held, a)
			} else {
				last = why
			}
		}
	}
	if len(held) != 10 {
		t.Errorf("one device's 40 addresses hold %d slots, want one client's cap (10)", len(held))
	}
	if last.Scope != "client" || last.Client != 10 || last.MAC.String() != flooder.String() {
		t.Errorf("refusal %+v, want scope client, 10 held, the device's MAC", last)
	}
	if k := c.Key(addrs[3]); k.MAC != string(flooder) || k.Addr.IsValid() {
		t.Errorf("Key of a device's address: %+v", k)
	}

	other := netip.MustParseAddr("192.0.2.40")
	devs.Set(other, net.HardwareAddr{2, 0, 0, 0, 0, 0x40})
	routed := netip.MustParseAddr("198.51.100.9")
	for _, a := range []netip.Addr{other, routed} {
		n := 0
		for range 15 {
			if ok, _ := c.Acquire(a); ok {
				n++
				held = append(held, a)
			}
		}
		if n != 10 {
			t.Errorf("%s holds %d of 15, want its own cap 10", a, n)
		}
	}
	if k := c.Key(routed); k.Addr != routed || k.MAC != "" {
		t.Errorf("Key of an address without a device: %+v", k)
	}

	// An address the table learns after its first connections: they
	// join the device's count when it is found (at its second).
	late := netip.MustParseAddr("192.0.2.50")
	lateMAC := net.HardwareAddr{2, 0, 0, 0, 0, 0x50}
	if ok, _ := c.Acquire(late); !ok {
		t.Fatal("a new address's first slot")
	}
	devs.Set(late, lateMAC)
	late2 := netip.MustParseAddr("2001:db8:1::50")
	devs.Set(late2, lateMAC)
	n := 1
	for range 20 {
		for _, a := range []netip.Addr{late, late2} {
			if ok, _ := c.Acquire(a); ok {
				n++
				held = append(held, a)
			}
		}
	}
	held = append(held, late)
	if n != 10 {
		t.Errorf("a device found after its address's first slot holds %d, want 10", n)
	}

	// Doubling: an address without a device that holds slots asks the
	// table a few times, not per slot.
	asks := devs.Asked()
	for range 5 {
		c.Release(routed)
	}
	for range 100 {
		if ok, _ := c.Acquire(routed); ok {
			c.Release(routed)
		}
	}
	if d := devs.Asked() - asks; d > 4 {
		t.Errorf("100 slots of an address holding 5 asked the device table %d times", d)
	}
	for range 5 {
		c.Release(routed)
	}
	for _, a := range held {
		if a != routed {
			c.Release(a)
		}
	}
	if total, a, d := c.Counts(); total != 0 || a != 0 || d != 0 {
		t.Errorf("after every release: %d slots, %d addresses, %d devices", total, a, d)
	}

	// The global cap still holds, and a refused new address leaves
	// nothing behind.
	g := NewClientSlots(3, 0, nil)
	for i := range 5 {
		g.Acquire(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}))
	}
	if total, a, _ := g.Counts(); total != 3 || a != 3 {
		t.Errorf("global cap 3: %d slots, %d addresses", total, a)
	}
}

// TestClientSlotsRefusedDeviceLeavesNothing: a new address of a device
// that holds no slot, refused at the global cap, leaves no count of its
// device behind (before, its device stayed in the map at 0: one entry
// per MAC ever refused, never removed).
func TestClientSlotsRefusedDeviceLeavesNothing(t *testing.T) {
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	c := NewClientSlots(1, 0, devs.ClientDevice)
	holder := netip.MustParseAddr("192.0.2.1")
	devs.Set(holder, net.HardwareAddr{2, 0, 0, 0, 0, 1})
	if ok, _ := c.Acquire(holder); !ok {
		t.Fatal("the first slot refused")
	}
	for i := range 50 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 2, 15: byte(i)})
		devs.Set(a, net.HardwareAddr{2, 0, 0, 0, 1, byte(i)})
		if ok, why := c.Acquire(a); ok || why.Scope != "global" {
			t.Fatalf("%s past the global cap: ok %v, %+v", a, ok, why)
		}
	}
	if total, a, d := c.Counts(); total != 1 || a != 1 || d != 1 {
		t.Errorf("one slot held, 50 refused: %d slots, %d addresses, %d devices; want 1, 1, 1", total, a, d)
	}
	c.Release(holder)
	if total, a, d := c.Counts(); total != 0 || a != 0 || d != 0 {
		t.Errorf("after every release: %d slots, %d addresses, %d devices", total, a, d)
	}
}

// TestAcquireDevice: AcquireDevice says the device's MAC as text where
// DeviceOf named one, taken or refused, without asking DeviceOf more
// than Acquire does (here: once, the address then holds a slot).
func TestAcquireDevice(t *testing.T) {
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	a, routed := netip.MustParseAddr("192.0.2.23"), netip.MustParseAddr("198.51.100.9")
	devs.Set(a, net.HardwareAddr{0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff})
	c := NewClientSlots(0, 2, devs.ClientDevice)
	for i, want := range []bool{true, true, false} {
		ok, dev, _ := c.AcquireDevice(a)
		if ok != want || dev != "aa:bb:cc:dd:ee:ff" {
			t.Errorf("acquire %d: ok %v, device %q; want %v, aa:bb:cc:dd:ee:ff", i, ok, dev, want)
		}
	}
	if devs.Asked() != 1 {
		t.Errorf("DeviceOf asked %d times, want 1", devs.Asked())
	}
	if ok, dev, _ := c.AcquireDevice(routed); !ok || dev != "" {
		t.Errorf("routed: ok %v, device %q; want a slot and no device", ok, dev)
	}
}
