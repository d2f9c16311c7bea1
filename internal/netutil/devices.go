package netutil

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// Devices tells whether two addresses of the LAN are one device's: the
// kernel's neighbour table on the LAN interface (ARP and NDP) maps both to
// the same Ethernet address, and that address is one device's; and which
// Ethernet address a LAN address has (MAC), for policies that name
// clients by MAC. A dual-stack device asks DNS from one address (IPv4,
// whose DHCP named the gateway as resolver; or one IPv6 address) and
// connects from another (a SLAAC or privacy address): egressd counts what
// its DNS gave one of them as given to the device (see README, "Which
// client DNS vouched for").
//
// An Ethernet address stands for one device only while the table holds at
// most DeviceMaxIPv4 IPv4 and DeviceMaxAddrs addresses in all for it,
// counting the entries alive within DeviceActive: a router that answers
// ARP for the hosts behind it (proxy ARP), or a wireless repeater that puts
// its own MAC on its clients' frames, holds several IPv4 addresses and is
// not taken for one device. Clients behind a router are not in the table
// at all (their packets come from the router's MAC, their addresses are
// not on the link): each of their addresses stays a client of its own.
//
// Only entries in a state that vouches for the link-layer address count
// (reachable, stale, delay, probe, permanent), with an Ethernet unicast
// address. The table is read whole (a dump) when first needed and again
// when the copy is older than DevicesRefresh, by the one caller that finds
// it so (the others go on with the copy); an address the copy lacks is
// asked about alone (a new privacy address, seconds old), at most
// DevicesMaxLookups times per copy, and an address the kernel does not
// know is remembered so until the next copy. A copy that could not be
// refreshed for DevicesMaxStale is not used: every address is then its
// own device. Each wait for the kernel is bounded (200 ms an answer, 1 s
// a dump). It is safe for concurrent use.
type Devices struct {
	src      neighSource
	now      func() time.Time
	warn     func(error)   // nil: none
	dumpWait time.Duration // bounds a wait for another caller's first dump

	mu      sync.Mutex    // guards following and the maps of snap
	snap    *devSnapshot  // nil until a dump succeeded
	dumping chan struct{} // closed when the dump under way ends; nil: none
	tried   time.Time     // when the last dump began
	failing string        // the error warn was last told of; "": none since the last dump that worked
}

// The bounds of Devices.
const (
	// DeviceMaxIPv4 is how many IPv4 addresses an Ethernet address may
	// have and still be one device's: a device has one on a LAN; more is
	// a box answering for others.
	DeviceMaxIPv4 = 1
	// DeviceMaxAddrs bounds all the addresses (IPv4, IPv6 link-local,
	// SLAAC, privacy) an Ethernet address may have and still be one
	// device's.
	DeviceMaxAddrs = 16
	// DeviceActive is how recently an entry must have shown its neighbour
	// alive to count: a small LAN's table keeps stale entries (the
	// privacy addresses of past days) until it is nearly full.
	DeviceActive = time.Hour
	// DevicesRefresh is how old the copy of the table may get.
	DevicesRefresh = 5 * time.Second
	// DevicesMaxStale is how old a copy may be used while dumps fail.
	DevicesMaxStale = time.Minute
	// DevicesMaxEntries bounds the entries a copy holds: a dump of more
	// (the kernel keeps 1024 per family by default) is refused, as its
	// counts of addresses per device would be short.
	DevicesMaxEntries = 16384
	// DevicesMaxLookups bounds the single-address lookups per copy.
	DevicesMaxLookups = 1024
	// devicesDumpWait bounds a wait for another caller's first dump (a
	// dump's own bound, 1 s, and one answer's).
	devicesDumpWait = 1200 * time.Millisecond
)

// neighSource is where Devices reads the neighbour table: the kernel's
// (netlinkNeigh), or a test's.
type neighSource interface {
	// dump calls fn for at most max entries of the interface; more says
	// there were more.
	dump(max int, fn func(Neighbour)) (more bool, err error)
	// get returns the entry for addr, ErrNoNeighbour if there is none.
	get(addr netip.Addr) (Neighbour, error)
	// prefixes returns the prefixes of the interface's addresses: the
	// addresses on its link.
	prefixes() ([]netip.Prefix, error)
	// resolve asks the kernel to resolve addr (ARP, NDP), not waiting
	// for its answer.
	resolve(addr netip.Addr) error
}

// devSnapshot is a copy of the table: the usable entries, by address, and
// how many of them each Ethernet address has.
type devSnapshot struct {
	at      time.Time
	mac     map[netip.Addr]MAC
	none    map[netip.Addr]struct{} // asked about alone since the dump: no usable entry
	v4, all map[MAC]int
	lookups int            // single-address lookups since the dump
	links   []netip.Prefix // the interface's prefixes when the copy was read (OnLink)
}

var errTooManyNeighbours = errors.New("netutil: neighbour table larger than DevicesMaxEntries")

// Neighbour is one entry of the kernel's neighbour table (ARP for IPv4,
// NDP for IPv6) on one interface: the link-layer address the host has for
// Addr, the entry's NUD state (NUD*), and how long ago the entry
// last showed the neighbour alive (the least of the times since it was
// confirmed, used and updated; zero for a permanent entry).
type Neighbour struct {
	Addr  netip.Addr
	MAC   MAC
	State uint16
	Idle  time.Duration
}

// MAC is an Ethernet (EUI-48) address.
type MAC [6]byte

func (m MAC) String() string {
	return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5])
}

// The NUD states of a neighbour entry (linux/neighbour.h).
const (
	NUDIncomplete = 0x01
	NUDReachable  = 0x02
	NUDStale      = 0x04
	NUDDelay      = 0x08
	NUDProbe      = 0x10
	NUDFailed     = 0x20
	NUDNoARP      = 0x40
	NUDPermanent  = 0x80
)

// ErrNoNeighbour means the neighbour table has no entry for the address
// asked.
var ErrNoNeighbour = errors.New("netutil: no neighbour entry")

// NewDevices returns the devices of the LAN interface named iface, read
// from the kernel's neighbour table in the network namespace of the
// caller's thread at each read. warn, when not nil, is told the error
// when the table cannot be read, once until it can again (or the error
// changes: an interface that does not exist yet fails at every read), and
// nil once a dump works again.
func NewDevices(iface string, warn func(error)) *Devices {
	return newDevices(&netlinkNeigh{iface: iface}, time.Now, warn)
}

func newDevices(src neighSource, now func() time.Time, warn func(error)) *Devices {
	return &Devices{src: src, now: now, warn: warn, dumpWait: devicesDumpWait}
}

// SameDevice reports whether a and b are addresses of one device of the
// LAN (see Devices); an address is its own device. IPv4-mapped addresses
// count as IPv4, IPv6 zones are ignored. It may read the neighbour table
// (bounded waits), so callers ask only when an answer by address alone
// did not do.
func (d *Devices) SameDevice(a, b netip.Addr) bool {
	a, b = deviceAddr(a), deviceAddr(b)
	if !a.IsValid() || !b.IsValid() {
		return false
	}
	if a == b {
		return true
	}
	s := d.snapshot()
	if s == nil {
		return false
	}
	ma, ok := d.macOf(s, a, true)
	if !ok {
		return false
	}
	mb, ok := d.macOf(s, b, true)
	if !ok || ma != mb {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return s.v4[ma] <= DeviceMaxIPv4 && s.all[ma] <= DeviceMaxAddrs
}

// MAC returns the Ethernet address of a's usable entry in the neighbour
// table (see Devices: a state that vouches for it, a unicast address,
// alive within DeviceActive): the source address of a's frames when a is
// on the LAN's link. It reports false when there is none: a client behind
// a router (its address is not on the link: its frames carry the
// router's MAC, which is not its own), an address the table lacks or
// holds in a state that vouches for nothing, a lookup past
// DevicesMaxLookups, and while the table cannot be read (a copy older
// than DevicesMaxStale). IPv4-mapped addresses count as IPv4, zones are
// ignored.
//
// The counts SameDevice checks do not apply: an Ethernet address with
// several IPv4 addresses (a device whose DHCP lease moved and whose old
// entry lingers, a proxy-ARP box answering for the hosts behind it) is
// still the one its frames carry, and the one a policy names. It may read
// the table (bounded waits), as SameDevice does, so callers ask only
// when a policy names MAC addresses.
func (d *Devices) MAC(a netip.Addr) (MAC, bool) {
	a = deviceAddr(a)
	if !a.IsValid() {
		return MAC{}, false
	}
	s := d.snapshot()
	if s == nil {
		return MAC{}, false
	}
	return d.macOf(s, a, true)
}

// Device returns the Ethernet address a's frames carry, as MAC does, for
// counting the addresses of one MAC as one client where clients share
// limits (the forwarder's rate, the proxy's connections): the counts
// SameDevice checks do not apply (a host can give itself any number of
// addresses; a box answering for others is then one client, as a NAT
// router always was). Unlike MAC it asks the kernel again about an
// address it found no entry for since the copy was read (within the
// DevicesMaxLookups bound), and leaves no mark of such an answer for MAC
// and SameDevice: a new address's first datagram comes before the
// gateway has resolved it, and its next ones after.
func (d *Devices) Device(a netip.Addr) (MAC, bool) {
	a = deviceAddr(a)
	if !a.IsValid() {
		return MAC{}, false
	}
	s := d.snapshot()
	if s == nil {
		return MAC{}, false
	}
	return d.macOf(s, a, false)
}

// OnLink reports whether a is an address of the interface's link: in the
// prefix of one of the interface's addresses (as they were when the copy
// of the table was read), and not one of them. A device of the LAN has
// such an address, and the gateway resolves it (ARP, NDP) to reach it; a
// client behind a router has not. Where limits count a device (Device),
// an address on the link without a usable entry is one the gateway has
// not resolved: a new address of a device, or a source nobody holds
// (forged). It reports false while the table cannot be read, and for
// every address of a link that resolves no neighbours (WireGuard, tun,
// PPP, `arp off`: no entry is ever usable there, so its clients stay a
// client per address).
func (d *Devices) OnLink(a netip.Addr) bool {
	a = deviceAddr(a)
	if !a.IsValid() {
		return false
	}
	s := d.snapshot()
	return s != nil && s.onLink(a)
}

// onLink reports whether a is in one of the copy's prefixes and not the
// interface's own address.
func (s *devSnapshot) onLink(a netip.Addr) bool {
	for _, p := range s.links {
		if p.Addr() != a && p.Contains(a) {
			return true
		}
	}
	return false
}

// Resolve asks the kernel to resolve a, an address of the link without a
// usable entry (OnLink, no Device), as it would for a packet to it: a
// host that holds a answers, and its entry is then usable (Device finds
// its MAC); for a forged source the entry fails. Callers ask when they
// would otherwise send nothing to a (a query dropped over the limit of
// the sources the gateway has not resolved), so that a device's new
// address is resolved all the same. At most DevicesMaxLookups requests
// per copy, shared with the single-address lookups (asked false past
// that, for an address not OnLink, and while the table cannot be read); err is the kernel's
// refusal (it needs CAP_NET_ADMIN).
func (d *Devices) Resolve(a netip.Addr) (asked bool, err error) {
	a = deviceAddr(a)
	if !a.IsValid() {
		return false, nil
	}
	s := d.snapshot()
	if s == nil || !s.onLink(a) {
		return false, nil
	}
	d.mu.Lock()
	if s.lookups >= DevicesMaxLookups {
		d.mu.Unlock()
		return false, nil
	}
	s.lookups++
	d.mu.Unlock()
	return true, d.src.resolve(a)
}

// deviceAddr returns a as a device address (unmapped, without zone), or
// the zero Addr when it cannot be one (unspecified, loopback, multicast).
func deviceAddr(a netip.Addr) netip.Addr {
	a = a.Unmap().WithZone("")
	if !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
		return netip.Addr{}
	}
	return a
}

// snapshot returns the copy of the table to answer from, reading the
// table first when the copy is too old and no other caller is reading
// it; nil when there is none to use.
func (d *Devices) snapshot() *devSnapshot {
	now := d.now()
	d.mu.Lock()
	s := d.snap
	if s != nil && now.Sub(s.at) > DevicesMaxStale {
		s = nil
	}
	if now.Sub(d.tried) < DevicesRefresh && d.dumping == nil {
		d.mu.Unlock()
		return s
	}
	if ch := d.dumping; ch != nil {
		d.mu.Unlock()
		if s != nil {
			return s // while another caller reads the table
		}
		t := time.NewTimer(d.dumpWait)
		defer t.Stop()
		select {
		case <-ch:
		case <-t.C:
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.snap
	}
	ch := make(chan struct{})
	d.dumping, d.tried = ch, now
	d.mu.Unlock()

	ns, err := d.load(now)

	d.mu.Lock()
	defer d.mu.Unlock()
	d.dumping = nil
	close(ch)
	if err != nil {
		d.warnLocked(err)
		return s
	}
	if d.failing != "" {
		d.failing = ""
		if d.warn != nil {
			d.warn(nil)
		}
	}
	d.snap = ns
	return ns
}

// load reads the table into a new copy taken at now.
func (d *Devices) load(now time.Time) (*devSnapshot, error) {
	s := &devSnapshot{at: now, mac: map[netip.Addr]MAC{}, none: map[netip.Addr]struct{}{}, v4: map[MAC]int{}, all: map[MAC]int{}}
	more, err := d.src.dump(DevicesMaxEntries, func(nb Neighbour) { s.add(nb) })
	if err == nil && more {
		err = errTooManyNeighbours
	}
	if err != nil {
		return nil, err
	}
	s.links, _ = d.src.prefixes() // none: no address is on the link (OnLink)
	return s, nil
}

// macOf returns the Ethernet address of a's usable entry: from the copy,
// else asking the kernel about a alone. With remember, an address the
// kernel had no entry for is remembered so until the next copy (and not
// asked about again); without, that mark is neither heeded nor left
// (Device: its callers ask again at their own pace).
func (d *Devices) macOf(s *devSnapshot, a netip.Addr, remember bool) (MAC, bool) {
	d.mu.Lock()
	if m, ok := s.mac[a]; ok {
		d.mu.Unlock()
		return m, true
	}
	if _, ok := s.none[a]; ok && remember || s.lookups >= DevicesMaxLookups {
		d.mu.Unlock()
		return MAC{}, false
	}
	s.lookups++
	d.mu.Unlock()

	nb, err := d.src.get(a)

	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil && !errors.Is(err, ErrNoNeighbour) {
		d.warnLocked(err)
		return MAC{}, false // not remembered: it may pass
	}
	if err == nil && nb.Addr == a && s.add(nb) {
		return s.mac[a], true
	}
	if remember {
		s.none[a] = struct{}{}
	}
	return MAC{}, false
}

// warnLocked tells warn of err, unless it was told of it last.
func (d *Devices) warnLocked(err error) {
	if msg := err.Error(); msg != d.failing {
		d.failing = msg
		if d.warn != nil {
			d.warn(err)
		}
	}
}

// add counts nb if it is usable; it reports whether the copy now has an
// entry for nb's address.
func (s *devSnapshot) add(nb Neighbour) bool {
	a := deviceAddr(nb.Addr)
	if !a.IsValid() || !usableNeighbour(nb) {
		return false
	}
	if _, ok := s.mac[a]; ok {
		return true
	}
	s.mac[a] = nb.MAC
	s.all[nb.MAC]++
	if a.Is4() {
		s.v4[nb.MAC]++
	}
	return true
}

// usableNeighbour reports whether an entry vouches for its neighbour's
// Ethernet address: a state that holds one, a unicast address, alive
// within DeviceActive.
func usableNeighbour(nb Neighbour) bool {
	const states = NUDReachable | NUDStale | NUDDelay | NUDProbe | NUDPermanent
	return nb.State&states != 0 && nb.MAC != (MAC{}) && nb.MAC[0]&1 == 0 && nb.Idle <= DeviceActive
}
