// Package fakemac is a LAN neighbour table for the tests of the packages
// that ask one (the forwarder, the proxies, capture, the firewall and
// netutil's connection slots): fixed answers from an address to a MAC,
// counting the questions. Its methods are those the packages' own
// interfaces name: ClientMAC (a client's MAC, where a policy names MAC
// addresses) and ClientDevice (a client's device, where limits count
// devices). No production code imports it.
package fakemac

import (
	"net"
	"net/netip"
	"sync"
)

// Table answers from a fixed map, counting the questions. Its methods
// may be called from several goroutines.
type Table struct {
	mu    sync.Mutex
	macs  map[netip.Addr]net.HardwareAddr
	asked int
}

// New returns a table holding macs (nil: none yet).
func New(macs map[netip.Addr]net.HardwareAddr) *Table {
	if macs == nil {
		macs = map[netip.Addr]net.HardwareAddr{}
	}
	return &Table{macs: macs}
}

// Set gives a the MAC m (nil: none).
func (t *Table) Set(a netip.Addr, m net.HardwareAddr) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.macs[a] = m
}

// ClientMAC returns a's MAC, or nil, and counts the question.
func (t *Table) ClientMAC(a netip.Addr) net.HardwareAddr {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.asked++
	return t.macs[a]
}

// ClientDevice is ClientMAC under the name the per-device limits ask by.
func (t *Table) ClientDevice(a netip.Addr) net.HardwareAddr { return t.ClientMAC(a) }

// Asked returns how many questions the table was asked.
func (t *Table) Asked() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.asked
}
