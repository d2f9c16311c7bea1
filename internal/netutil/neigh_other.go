//go:build !linux

package netutil

import (
	"errors"
	"net/netip"
)

// netlinkNeigh needs Linux's netlink: elsewhere every address is its own
// device.
type netlinkNeigh struct{ iface string }

var errNeighLinux = errors.New("netutil: the neighbour table needs Linux")

func (*netlinkNeigh) dump(int, func(Neighbour)) (bool, error) { return false, errNeighLinux }
func (*netlinkNeigh) get(netip.Addr) (Neighbour, error)       { return Neighbour{}, errNeighLinux }
func (*netlinkNeigh) prefixes() ([]netip.Prefix, error)       { return nil, errNeighLinux }
func (*netlinkNeigh) resolve(netip.Addr) error                { return errNeighLinux }
