package netutil

import (
	"net"
	"net/netip"
	"sync"
)

// ClientSlots counts the connections open at once, in all and per client,
// for a server that caps both (the proxy, the DNS forwarder's TCP). A
// client is a device of the LAN where DeviceOf names one for the address
// (its MAC in the neighbour table: Devices.Device), else the address: a
// host can give itself any number of addresses of the LAN (IPv6 privacy
// addresses, free IPv4 ones), and with a cap per address its share came
// once per address, and ten or sixteen addresses took every slot.
//
// DeviceOf is asked when an address holds no connection yet, and again
// at doubling counts of its connections while it has no device (it may
// have come before the gateway resolved it): not per connection of a
// busy client, never under the lock. An address's connections join its
// device's count when the device is found. It is safe for concurrent use.
type ClientSlots struct {
	max, perClient int                               // 0: no limit
	deviceOf       func(netip.Addr) net.HardwareAddr // nil: each address is a client of its own

	mu     sync.Mutex // guards following
	perIP  map[netip.Addr]*addrSlots
	perDev map[string]int // a device's connections, by its MAC as a string
	total  int
}

// addrSlots are one address's connections.
type addrSlots struct {
	n    int    // connections of the address
	mac  string // its device's MAC; "": none (found) yet
	text string // mac as text (net.HardwareAddr.String), for events
	next int    // ask deviceOf again when n reaches it, while mac is ""
}

// ClientKey is what a per-client limit counts: a LAN device (MAC, as a
// string of its bytes) or an address without one (Addr; MAC "").
type ClientKey struct {
	Addr netip.Addr // the zero Addr for a device
	MAC  string
}

// NewClientSlots returns slots capped at max in all and perClient per
// client (0: no cap), with deviceOf telling an address's device (nil:
// none has one).
func NewClientSlots(max, perClient int, deviceOf func(netip.Addr) net.HardwareAddr) *ClientSlots {
	return &ClientSlots{max: max, perClient: perClient, deviceOf: deviceOf, perIP: map[netip.Addr]*addrSlots{}, perDev: map[string]int{}}
}

// SlotRefusal tells why Acquire refused a slot: the cap hit ("global" or
// "client") and the counts then (the client's, with its device's MAC when
// it has one, and the total).
type SlotRefusal struct {
	Scope         string
	Limit         int
	Client, Total int
	MAC           net.HardwareAddr // nil: the client is the address
}

// Acquire takes a slot for client; ok false when a cap is hit, with why.
func (c *ClientSlots) Acquire(client netip.Addr) (ok bool, why SlotRefusal) {
	ok, _, why = c.AcquireDevice(client)
	return ok, why
}

// AcquireDevice is Acquire, and returns the MAC of client's device as
// text ("aa:bb:cc:dd:ee:ff"), when DeviceOf named one for the address,
// whether a slot was taken or refused: "" when it has none (found). It
// asks DeviceOf no more than Acquire does, and the text is made once per
// address that holds slots, not per call.
func (c *ClientSlots) AcquireDevice(client netip.Addr) (ok bool, dev string, why SlotRefusal) {
	c.mu.Lock()
	s := c.perIP[client]
	if c.deviceOf != nil && (s == nil || s.mac == "" && s.n+1 >= s.next) {
		if s != nil {
			s.next <<= 1
		}
		c.mu.Unlock()
		mac := string(c.deviceOf(client)) // it may wait for the kernel
		c.mu.Lock()
		s = c.perIP[client] // it may have come or gone meanwhile
		if s == nil {
			s = &addrSlots{next: 2}
			c.perIP[client] = s
		}
		if s.mac == "" && mac != "" {
			s.mac, s.text = mac, net.HardwareAddr(mac).String()
			if s.n > 0 { // a device's count is kept only while it holds a slot
				c.perDev[mac] += s.n
			}
		}
	} else if s == nil {
		s = &addrSlots{next: 2}
		c.perIP[client] = s
	}
	defer c.mu.Unlock()
	n := s.n
	if s.mac != "" {
		n = c.perDev[s.mac]
	}
	switch {
	case c.max > 0 && c.total >= c.max:
		why = SlotRefusal{Scope: "global", Limit: c.max}
	case c.perClient > 0 && n >= c.perClient:
		why = SlotRefusal{Scope: "client", Limit: c.perClient}
	default:
		c.total++
		s.n++
		if s.mac != "" {
			c.perDev[s.mac]++
		}
		return true, s.text, SlotRefusal{}
	}
	why.Client, why.Total = n, c.total
	if s.mac != "" {
		why.MAC = net.HardwareAddr(s.mac)
	}
	if s.n == 0 {
		delete(c.perIP, client)
	}
	return false, s.text, why
}

// Release gives back a slot of client's.
func (c *ClientSlots) Release(client netip.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total--
	s := c.perIP[client]
	if s == nil {
		return
	}
	if s.mac != "" {
		if c.perDev[s.mac]--; c.perDev[s.mac] <= 0 {
			delete(c.perDev, s.mac)
		}
	}
	if s.n--; s.n <= 0 {
		delete(c.perIP, client)
	}
}

// Key returns what client's per-client limits count now: its device, if
// Acquire found one for a slot it holds, else the address.
func (c *ClientSlots) Key(client netip.Addr) ClientKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.perIP[client]; s != nil && s.mac != "" {
		return ClientKey{MAC: s.mac}
	}
	return ClientKey{Addr: client}
}

// Counts returns the slots taken in all, and how many addresses and
// devices hold them (tests, bounds).
func (c *ClientSlots) Counts() (total, addrs, devices int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total, len(c.perIP), len(c.perDev)
}
