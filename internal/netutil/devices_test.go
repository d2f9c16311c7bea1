package netutil

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeNeigh is a neighbour table for Devices' tests: entries by address,
// counting the dumps and single lookups made.
type fakeNeigh struct {
	mu      sync.Mutex
	entries map[netip.Addr]Neighbour
	dumpErr error
	getErr  error
	dumps   atomic.Int64
	gets    atomic.Int64
	block   chan struct{} // when set, a dump waits for it
	links   []netip.Prefix
	asked   []netip.Addr // resolve's
}

func newFakeNeigh(nbs ...Neighbour) *fakeNeigh {
	f := &fakeNeigh{entries: map[netip.Addr]Neighbour{}}
	f.set(nbs...)
	return f
}

func (f *fakeNeigh) set(nbs ...Neighbour) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, nb := range nbs {
		f.entries[nb.Addr] = nb
	}
}

func (f *fakeNeigh) dump(max int, fn func(Neighbour)) (bool, error) {
	f.dumps.Add(1)
	if f.block != nil {
		<-f.block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dumpErr != nil {
		return false, f.dumpErr
	}
	n := 0
	for _, nb := range f.entries {
		if n == max {
			return true, nil
		}
		n++
		fn(nb)
	}
	return false, nil
}

func (f *fakeNeigh) get(a netip.Addr) (Neighbour, error) {
	f.gets.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.getErr != nil {
		return Neighbour{}, f.getErr
	}
	nb, ok := f.entries[a]
	if !ok {
		return Neighbour{}, ErrNoNeighbour
	}
	return nb, nil
}

func (f *fakeNeigh) prefixes() ([]netip.Prefix, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.links, nil
}

func (f *fakeNeigh) resolve(a netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked = append(f.asked, a)
	return nil
}

// clock is a settable time for Devices' tests.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

var (
	macA = MAC{0x02, 0, 0, 0, 0, 0xa}
	macB = MAC{0x02, 0, 0, 0, 0, 0xb}
)

func nb(addr string, mac MAC) Neighbour {
	return Neighbour{Addr: netip.MustParseAddr(addr), MAC: mac, State: NUDReachable}
}

func newTestDevices(f *fakeNeigh) (*Devices, *clock) {
	c := &clock{t: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}
	return newDevices(f, c.now, nil), c
}

// TestDevicesSame: addresses the neighbour table maps to one Ethernet
// address are one device's; another Ethernet address, an address the
// table lacks (a client behind a router) or holds in a state that vouches
// for nothing is another device.
func TestDevicesSame(t *testing.T) {
	f := newFakeNeigh(
		nb("192.0.2.10", macA), nb("2001:db8::10", macA), nb("2001:db8::11", macA), nb("fe80::a", macA),
		nb("192.0.2.20", macB), nb("2001:db8::20", macB),
		Neighbour{Addr: netip.MustParseAddr("2001:db8::12"), MAC: macA, State: NUDIncomplete},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::13"), MAC: macA, State: NUDFailed},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::14"), MAC: macA, State: NUDStale},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::15"), MAC: macA, State: NUDPermanent},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::16"), MAC: macA, State: NUDNoARP},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::17"), MAC: macA, State: NUDStale, Idle: DeviceActive + time.Second},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::18"), MAC: MAC{}, State: NUDReachable},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::19"), MAC: MAC{0x03, 0, 0, 0, 0, 1}, State: NUDReachable},
		Neighbour{Addr: netip.MustParseAddr("2001:db8::1a"), MAC: MAC{0x03, 0, 0, 0, 0, 1}, State: NUDReachable},
	)
	d, _ := newTestDevices(f)
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"192.0.2.10", "2001:db8::11", true},
		{"2001:db8::11", "192.0.2.10", true},
		{"2001:db8::10", "2001:db8::11", true},
		{"::ffff:192.0.2.10", "2001:db8::11", true}, // IPv4-mapped
		{"fe80::a%lan0", "192.0.2.10", true},        // zone ignored
		{"192.0.2.10", "192.0.2.10", true},
		{"192.0.2.10", "2001:db8::20", false},   // another MAC
		{"192.0.2.20", "2001:db8::20", true},    // that device's own
		{"192.0.2.10", "198.51.100.7", false},   // not on the link (routed)
		{"198.51.100.7", "198.51.100.8", false}, // neither is
		{"192.0.2.10", "2001:db8::12", false},   // incomplete
		{"192.0.2.10", "2001:db8::13", false},   // failed
		{"192.0.2.10", "2001:db8::14", true},    // stale still vouches
		{"192.0.2.10", "2001:db8::15", true},    // permanent
		{"192.0.2.10", "2001:db8::16", false},   // no ARP: no address
		{"192.0.2.10", "2001:db8::17", false},   // silent for over DeviceActive
		{"2001:db8::18", "2001:db8::18", true},  // an address is its own
		{"2001:db8::18", "192.0.2.10", false},   // zero MAC
		{"2001:db8::19", "2001:db8::1a", false}, // multicast MAC
		{"::", "::", false},                     // unspecified
		{"127.0.0.1", "127.0.0.1", false},       // loopback
		{"192.0.2.10", "", false},               // invalid
	} {
		var a, b netip.Addr
		if c.a != "" {
			a = netip.MustParseAddr(c.a)
		}
		if c.b != "" {
			b = netip.MustParseAddr(c.b)
		}
		if got := d.SameDevice(a, b); got != c.want {
			t.Errorf("SameDevice(%s, %s) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
	if n := f.dumps.Load(); n != 1 {
		t.Errorf("%d dumps for one copy's questions, want 1", n)
	}
}

// TestDevicesShared: an Ethernet address with more than one IPv4 address
// (proxy ARP, a repeater that puts its MAC on its clients' frames) or
// more than DeviceMaxAddrs addresses is no one device: none of its
// addresses vouches for another. Entries silent for over DeviceActive do
// not count.
func TestDevicesShared(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA), nb("192.0.2.11", macA), nb("2001:db8::10", macA))
	var nbs []Neighbour
	for i := range DeviceMaxAddrs - 1 {
		nbs = append(nbs, nb(fmt.Sprintf("2001:db8::b:%x", i), macB))
	}
	nbs = append(nbs, nb("192.0.2.20", macB)) // DeviceMaxAddrs in all
	// Old privacy addresses of macB, silent for a day: not counted.
	for i := range 40 {
		old := nb(fmt.Sprintf("2001:db8::b0:%x", i), macB)
		old.State, old.Idle = NUDStale, 24*time.Hour
		nbs = append(nbs, old)
	}
	f.set(nbs...)
	d, c := newTestDevices(f)
	if d.SameDevice(netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")) {
		t.Error("an Ethernet address with two IPv4 addresses taken for one device")
	}
	if d.SameDevice(netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.11")) {
		t.Error("two IPv4 addresses of one Ethernet address taken for one device")
	}
	if !d.SameDevice(netip.MustParseAddr("192.0.2.20"), netip.MustParseAddr("2001:db8::b:0")) {
		t.Errorf("%d addresses, %d of them silent for a day: not one device", DeviceMaxAddrs+40, 40)
	}
	// One more live address: too many.
	f.set(nb("2001:db8::b:ff", macB))
	c.add(DevicesRefresh)
	if d.SameDevice(netip.MustParseAddr("192.0.2.20"), netip.MustParseAddr("2001:db8::b:0")) {
		t.Errorf("%d live addresses on one Ethernet address taken for one device", DeviceMaxAddrs+1)
	}
}

// TestDevicesNewAddress: an address the copy of the table lacks (a
// privacy address a device began to use after the dump) is asked about
// alone, once per copy; one the kernel does not know is remembered so
// until the next copy, whose dump finds what came since.
func TestDevicesNewAddress(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA), nb("2001:db8::10", macA))
	d, c := newTestDevices(f)
	v4, tmp := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::11")
	if d.SameDevice(v4, tmp) {
		t.Fatal("an address the table does not have taken for the device's")
	}
	f.set(nb("2001:db8::11", macA))
	for range 3 {
		if d.SameDevice(v4, tmp) {
			t.Error("an address the kernel did not know when asked was looked up again within the copy")
		}
	}
	if n := f.gets.Load(); n != 1 {
		t.Errorf("%d single lookups of one address in one copy, want 1", n)
	}
	c.add(DevicesRefresh)
	if !d.SameDevice(v4, tmp) {
		t.Error("the next copy does not have the new address")
	}
	if n := f.dumps.Load(); n != 2 {
		t.Errorf("%d dumps, want 2", n)
	}

	// Within a copy, a new address is found by a single lookup.
	tmp2 := netip.MustParseAddr("2001:db8::12")
	f.set(nb("2001:db8::12", macA))
	if !d.SameDevice(tmp2, v4) {
		t.Error("a new address, known to the kernel, not found by a single lookup")
	}
	if n := f.dumps.Load(); n != 2 {
		t.Errorf("%d dumps after a single lookup, want 2", n)
	}
}

// TestDevicesLookupBound: single-address lookups stop at
// DevicesMaxLookups per copy (a LAN host connecting from ever new
// addresses cannot make a netlink request of each).
func TestDevicesLookupBound(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA))
	d, c := newTestDevices(f)
	v4 := netip.MustParseAddr("192.0.2.10")
	for i := range DevicesMaxLookups + 100 {
		d.SameDevice(v4, netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)}))
	}
	if n := f.gets.Load(); n != DevicesMaxLookups {
		t.Errorf("%d single lookups in one copy, want %d", n, DevicesMaxLookups)
	}
	// Past the bound, an address the copy lacks is no device's.
	f.set(nb("2001:db8::ffff", macA))
	if d.SameDevice(v4, netip.MustParseAddr("2001:db8::ffff")) {
		t.Error("a lookup past the bound")
	}
	c.add(DevicesRefresh)
	if !d.SameDevice(v4, netip.MustParseAddr("2001:db8::ffff")) {
		t.Error("the next copy does not start a new count")
	}
}

// TestDevicesTableBound: a table of more than DevicesMaxEntries entries
// is not used (the counts of addresses per device would be short): every
// address is then its own device.
func TestDevicesTableBound(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA), nb("2001:db8::10", macA))
	var nbs []Neighbour
	for i := range DevicesMaxEntries {
		nbs = append(nbs, nb(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)}).String(), MAC{0x02, 1, 0, byte(i >> 16), byte(i >> 8), byte(i)}))
	}
	f.set(nbs...)
	var warned []error
	d, _ := newTestDevices(f)
	d.warn = func(err error) { warned = append(warned, err) }
	if d.SameDevice(netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")) {
		t.Errorf("a table of %d entries was used", DevicesMaxEntries+2)
	}
	if len(warned) != 1 || !errors.Is(warned[0], errTooManyNeighbours) {
		t.Errorf("warned %v, want %v once", warned, errTooManyNeighbours)
	}
	if n := f.gets.Load(); n != 0 {
		t.Errorf("%d single lookups without a copy", n)
	}
}

// TestDevicesFailing: when the table cannot be read every address is its
// own device; a dump is not tried again before DevicesRefresh, a copy is
// used for DevicesMaxStale at most while dumps fail, and warn hears of it
// once (not at every dump: an interface that does not exist yet filled
// the log), then once (nil) when the table can be read again.
func TestDevicesFailing(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA), nb("2001:db8::10", macA))
	d, c := newTestDevices(f)
	var warned []error
	d.warn = func(err error) { warned = append(warned, err) }
	v4, v6 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")
	if !d.SameDevice(v4, v6) {
		t.Fatal("not one device")
	}
	f.mu.Lock()
	f.dumpErr = errors.New("netlink down")
	f.mu.Unlock()
	c.add(DevicesRefresh)
	for range 10 {
		if !d.SameDevice(v4, v6) {
			t.Error("the last copy not used after one failed dump")
		}
	}
	if n := f.dumps.Load(); n != 2 {
		t.Errorf("%d dumps, want 2 (one failed, not tried again within DevicesRefresh)", n)
	}
	for range int(DevicesMaxStale / DevicesRefresh) {
		c.add(DevicesRefresh)
		d.SameDevice(v4, v6)
	}
	if d.SameDevice(v4, v6) {
		t.Errorf("a copy older than DevicesMaxStale was used")
	}
	if len(warned) != 1 || warned[0] == nil {
		t.Errorf("warned %v for %d failed dumps, want the error once", warned, f.dumps.Load()-1)
	}
	// Lookups of single addresses that fail are not remembered.
	f.mu.Lock()
	f.dumpErr, f.getErr = nil, errors.New("netlink down")
	f.mu.Unlock()
	c.add(DevicesRefresh)
	if !d.SameDevice(v4, v6) {
		t.Error("not one device once the dump works again")
	}
	if len(warned) != 2 || warned[1] != nil {
		t.Errorf("warned %v, want the error, then nil once the dump works again", warned)
	}
	tmp := netip.MustParseAddr("2001:db8::11")
	f.set(nb("2001:db8::11", macA))
	if d.SameDevice(v4, tmp) {
		t.Error("a failed lookup answered")
	}
	f.mu.Lock()
	f.getErr = nil
	f.mu.Unlock()
	if !d.SameDevice(v4, tmp) {
		t.Error("a failed lookup remembered as no entry")
	}
}

// TestDevicesOneDump: callers at once share one dump: the first reads
// the table, the others wait for it (there is no copy yet) rather than
// each reading it.
func TestDevicesOneDump(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA), nb("2001:db8::10", macA))
	f.block = make(chan struct{})
	d, _ := newTestDevices(f)
	d.dumpWait = time.Hour // no timing in the test: the waiters wait for the dump
	v4, v6 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")
	var wg sync.WaitGroup
	var same atomic.Int64
	for range 8 {
		wg.Go(func() {
			if d.SameDevice(v4, v6) {
				same.Add(1)
			}
		})
	}
	for f.dumps.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	close(f.block)
	wg.Wait()
	if n := f.dumps.Load(); n != 1 {
		t.Errorf("%d dumps for 8 callers at once, want 1", n)
	}
	if same.Load() != 8 {
		t.Errorf("%d of 8 callers were answered one device", same.Load())
	}
}

// TestDevicesMAC: an address's MAC is its usable entry's; an address not
// on the link (routed), or whose entry vouches for nothing, has none.
// An Ethernet address that holds several IPv4 addresses is still theirs
// (SameDevice's counts do not apply). Lookups follow the copy's rules:
// one dump, one single lookup of an address the copy lacks, remembered.
func TestDevicesMAC(t *testing.T) {
	f := newFakeNeigh(
		nb("192.0.2.10", macA), nb("2001:db8::10", macA),
		nb("192.0.2.20", macB), nb("192.0.2.21", macB), // two IPv4 addresses: a lease that moved, proxy ARP
		Neighbour{Addr: netip.MustParseAddr("192.0.2.30"), MAC: macA, State: NUDIncomplete},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.31"), MAC: macA, State: NUDFailed},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.32"), MAC: macA, State: NUDStale},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.33"), MAC: macA, State: NUDNoARP},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.34"), MAC: macA, State: NUDStale, Idle: DeviceActive + time.Second},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.35"), MAC: MAC{}, State: NUDReachable},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.36"), MAC: MAC{0x03, 0, 0, 0, 0, 1}, State: NUDReachable},
		Neighbour{Addr: netip.MustParseAddr("192.0.2.37"), MAC: macB, State: NUDPermanent},
	)
	d, c := newTestDevices(f)
	for _, tc := range []struct {
		a    string
		want MAC // zero: none
	}{
		{"192.0.2.10", macA},
		{"::ffff:192.0.2.10", macA},
		{"2001:db8::10", macA},
		{"192.0.2.20", macB},
		{"192.0.2.21", macB},
		{"198.51.100.7", MAC{}}, // not on the link: behind a router
		{"192.0.2.30", MAC{}},   // incomplete
		{"192.0.2.31", MAC{}},   // failed
		{"192.0.2.32", macA},    // stale still vouches
		{"192.0.2.33", MAC{}},   // no ARP
		{"192.0.2.34", MAC{}},   // silent for over DeviceActive
		{"192.0.2.35", MAC{}},   // zero MAC
		{"192.0.2.36", MAC{}},   // multicast MAC
		{"192.0.2.37", macB},    // permanent
		{"127.0.0.1", MAC{}},
		{"", MAC{}},
	} {
		var a netip.Addr
		if tc.a != "" {
			a = netip.MustParseAddr(tc.a)
		}
		m, ok := d.MAC(a)
		if ok != (tc.want != MAC{}) || m != tc.want {
			t.Errorf("MAC(%s) = %v %v, want %v", tc.a, m, ok, tc.want)
		}
	}
	if n := f.dumps.Load(); n != 1 {
		t.Errorf("%d dumps for one copy's questions, want 1", n)
	}
	// The routed address was asked about alone, once; so were the entries
	// the dump skipped (unusable), once each.
	gets := f.gets.Load()
	d.MAC(netip.MustParseAddr("198.51.100.7"))
	d.MAC(netip.MustParseAddr("192.0.2.30"))
	if n := f.gets.Load(); n != gets {
		t.Errorf("%d more single lookups of addresses already asked about in this copy", n-gets)
	}
	// A client that came since the dump: one lookup finds it.
	f.set(nb("192.0.2.40", macB))
	if m, ok := d.MAC(netip.MustParseAddr("192.0.2.40")); !ok || m != macB {
		t.Errorf("a new client: MAC %v %v, want %v", m, ok, macB)
	}
	// While the table cannot be read, past DevicesMaxStale: none.
	f.mu.Lock()
	f.dumpErr = errors.New("netlink down")
	f.mu.Unlock()
	c.add(DevicesMaxStale + time.Second)
	if m, ok := d.MAC(netip.MustParseAddr("192.0.2.10")); ok {
		t.Errorf("MAC from a copy older than DevicesMaxStale: %v", m)
	}
}

// TestDevicesDevice: Device gives an address's MAC whatever the counts
// SameDevice checks (a host with many addresses is one client where
// clients share limits), and asks the kernel again about an address it
// found no entry for (a new address's first datagram comes before the
// gateway resolves it), within the lookup bound.
func TestDevicesDevice(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA), nb("192.0.2.11", macA), nb("2001:db8::10", macA))
	d, _ := newTestDevices(f)
	for _, a := range []string{"192.0.2.10", "192.0.2.11", "2001:db8::10"} {
		if m, ok := d.Device(netip.MustParseAddr(a)); !ok || m != macA {
			t.Errorf("Device(%s) = %v %v, want %v (two IPv4 addresses: not one device for SameDevice, one for limits)", a, m, ok, macA)
		}
	}
	fresh := netip.MustParseAddr("2001:db8::11")
	if _, ok := d.Device(fresh); ok {
		t.Fatal("an address the kernel does not know has a device")
	}
	f.set(nb("2001:db8::11", macA))
	if m, ok := d.Device(fresh); !ok || m != macA {
		t.Errorf("an address resolved since it was asked: %v %v, want %v", m, ok, macA)
	}
	if _, ok := d.MAC(netip.MustParseAddr("2001:db8::12")); ok {
		t.Fatal("MAC of an unknown address")
	}
	for i := range DevicesMaxLookups + 10 {
		d.Device(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 14: byte(i >> 8), 15: byte(i)}))
	}
	if n := f.gets.Load(); n > DevicesMaxLookups {
		t.Errorf("%d single lookups in one copy, bound %d", n, DevicesMaxLookups)
	}
	if _, ok := d.Device(netip.MustParseAddr("127.0.0.1")); ok {
		t.Error("loopback has a device")
	}
}

// TestDevicesDeviceLeavesNoMark: Device's finding no entry for a new
// address (its first datagram, before the gateway resolved it) does not
// keep SameDevice and MAC from finding the entry the kernel has since:
// the forwarder's limiter asks at a new address's first query, and the
// proxy then asks whether a connection from the device's other address
// is that device's (TestDualStackDevice failed so).
func TestDevicesDeviceLeavesNoMark(t *testing.T) {
	f := newFakeNeigh(nb("192.0.2.10", macA))
	d, _ := newTestDevices(f)
	v4, asked := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")
	if _, ok := d.Device(asked); ok {
		t.Fatal("an address the kernel does not know has a device")
	}
	f.set(nb("2001:db8::10", macA))
	if !d.SameDevice(v4, asked) {
		t.Error("SameDevice after Device found no entry: the kernel's entry since is not heeded")
	}
	d2, _ := newTestDevices(newFakeNeigh())
	d2.Device(asked)
	d2.src.(*fakeNeigh).set(nb("2001:db8::10", macB))
	if m, ok := d2.MAC(asked); !ok || m != macB {
		t.Errorf("MAC after Device found no entry: %v %v, want %v", m, ok, macB)
	}
}

// TestOnLink: an address is on the link when a prefix of the interface's
// addresses holds it and it is none of them; a routed client's is not.
func TestOnLink(t *testing.T) {
	f := newFakeNeigh()
	f.links = []netip.Prefix{netip.MustParsePrefix("198.18.1.1/24"), netip.MustParsePrefix("2001:db8:1::1/64"), netip.MustParsePrefix("fe80::1/64")}
	c := &clock{t: time.Unix(1e9, 0)}
	d := newDevices(f, c.now, nil)
	for a, want := range map[string]bool{
		"198.18.1.77": true, "::ffff:198.18.1.77": true, "2001:db8:1::5:1": true, "fe80::99%lan0": true,
		"198.18.1.1": false, "2001:db8:1::1": false, // the gateway's own
		"198.18.9.7": false, "2001:db8:2::7": false, "127.0.0.1": false, "ff02::1": false,
	} {
		if got := d.OnLink(netip.MustParseAddr(a)); got != want {
			t.Errorf("OnLink(%s) = %v, want %v", a, got, want)
		}
	}
	f.dumpErr = errors.New("no table")
	c.t = c.t.Add(DevicesMaxStale + time.Second)
	if d.OnLink(netip.MustParseAddr("198.18.1.77")) {
		t.Error("OnLink answered from a copy older than DevicesMaxStale")
	}
}

// TestResolve: Resolve asks the kernel about an address, within the
// lookups of a copy, and not about one that cannot be a device's or is
// off the link.
func TestResolve(t *testing.T) {
	f := newFakeNeigh()
	f.links = []netip.Prefix{netip.MustParsePrefix("198.18.1.1/24")}
	c := &clock{t: time.Unix(1e9, 0)}
	d := newDevices(f, c.now, nil)
	a := netip.MustParseAddr("198.18.1.77")
	if asked, err := d.Resolve(a); !asked || err != nil {
		t.Fatalf("Resolve(%s) = %v, %v", a, asked, err)
	}
	if asked, _ := d.Resolve(netip.MustParseAddr("ff02::1")); asked {
		t.Error("Resolve asked about a multicast address")
	}
	if asked, _ := d.Resolve(netip.MustParseAddr("198.51.100.7")); asked {
		t.Error("Resolve asked about an address off the link")
	}
	for range DevicesMaxLookups + 10 {
		d.Resolve(a)
	}
	if len(f.asked) != DevicesMaxLookups {
		t.Errorf("the kernel was asked %d times in one copy, want at most DevicesMaxLookups (%d)", len(f.asked), DevicesMaxLookups)
	}
}
