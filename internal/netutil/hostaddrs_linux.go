package netutil

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// addrNotHeld are the flags of an address the host does not hold: in
// duplicate address detection, or failed it.
const addrNotHeld = unix.IFA_F_TENTATIVE | unix.IFA_F_DADFAILED

// ifaceAddrs lists the addresses (RTM_GETADDR dump, NETLINK_ROUTE) of the
// interface with index ifindex, or of every interface for 0, but those
// with a flag of addrNotHeld.
func ifaceAddrs(ifindex int) ([]netip.Addr, error) {
	b, err := syscall.NetlinkRIB(syscall.RTM_GETADDR, syscall.AF_UNSPEC)
	if err != nil {
		return nil, fmt.Errorf("netutil: addresses: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return nil, fmt.Errorf("netutil: addresses: %w", err)
	}
	var out []netip.Addr
	for _, m := range msgs {
		if m.Header.Type == syscall.NLMSG_DONE {
			break
		}
		if m.Header.Type != syscall.RTM_NEWADDR || len(m.Data) < unix.SizeofIfAddrmsg {
			continue
		}
		// struct ifaddrmsg: family, prefixlen, flags, scope (a byte
		// each), index (u32).
		flags := uint32(m.Data[2])
		if ifindex != 0 && binary.NativeEndian.Uint32(m.Data[4:8]) != uint32(ifindex) {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, fmt.Errorf("netutil: addresses: %w", err)
		}
		var addr, local []byte
		for _, a := range attrs {
			switch a.Attr.Type {
			case unix.IFA_ADDRESS:
				addr = a.Value
			case unix.IFA_LOCAL:
				local = a.Value
			case unix.IFA_FLAGS: // all the flags; the header has the low 8
				if len(a.Value) >= 4 {
					flags = binary.NativeEndian.Uint32(a.Value)
				}
			}
		}
		if local != nil {
			addr = local // IFA_ADDRESS is the peer's on a point-to-point link
		}
		a, ok := netip.AddrFromSlice(addr)
		if !ok || flags&addrNotHeld != 0 {
			continue
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}
