//go:build !linux

package netutil

import (
	"net"
	"net/netip"
)

// ifaceAddrs lists the addresses of the interface with index ifindex, or
// of every interface for 0 (no address flags outside Linux).
func ifaceAddrs(ifindex int) ([]netip.Addr, error) {
	var addrs []net.Addr
	var err error
	if ifindex == 0 {
		addrs, err = net.InterfaceAddrs()
	} else {
		var i *net.Interface
		if i, err = net.InterfaceByIndex(ifindex); err == nil {
			addrs, err = i.Addrs()
		}
	}
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
