package netutil

import (
	"net/netip"
)

// HostAddrs returns the addresses of the host's interfaces (in the
// caller's network namespace), IPv4-mapped ones unmapped: the gateway's
// own addresses, which the proxy refuses as destinations and capture
// leaves out of the egress record. An address the host does not hold
// (yet) is left out (InterfaceAddrs).
func HostAddrs() ([]netip.Addr, error) {
	return ifaceAddrs(0)
}

// InterfaceAddrs returns the addresses of the interface with index
// ifindex, in the kernel's order, IPv4-mapped ones unmapped. On Linux an
// IPv6 address still in duplicate address detection (tentative: nothing
// can be bound to it, and what is sent to it goes out on the link) or
// that failed it (dadfailed: another host on the link has it) is left
// out: it is not the host's. When the detection ends, the kernel's
// address notice says so.
func InterfaceAddrs(ifindex int) ([]netip.Addr, error) {
	return ifaceAddrs(ifindex)
}
