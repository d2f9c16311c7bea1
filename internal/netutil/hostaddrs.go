package netutil

import (
	"net"
	"net/netip"
)

// HostAddrs returns the addresses of the host's interfaces (in the
// caller's network namespace), IPv4-mapped ones unmapped: the gateway's
// own addresses, which the proxy refuses as destinations and capture
// leaves out of the egress record.
func HostAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range addrs {
		if pn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(pn.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}
