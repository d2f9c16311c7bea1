// Package netutil holds small Linux socket helpers shared by egressd's
// components: reading the original destination of a connection that
// nftables redirected (REDIRECT/DNAT) to a local listener
// (SO_ORIGINAL_DST), and its original source when NAT remapped the
// client's port (Conntrack, over ctnetlink). The transparent proxy uses
// both on every accepted connection, before it decides. HostAddrs lists
// the gateway's own addresses, which the proxy refuses as destinations and
// capture leaves out of the egress record. DropFromInterface attaches to a
// listening socket a socket filter that drops what arrives on one
// interface (the WAN one: THREATS.md, no open resolver on the WAN side).
// Devices reads the kernel's neighbour table (RTM_GETNEIGH) to tell which
// LAN addresses are one device's, for the proxy's and capture's questions
// about what egressd's DNS gave a client, and which MAC a LAN client has,
// for policies that name clients by MAC (the forwarder, the proxies,
// capture and the firewall's re-decisions ask it alike), and which device
// an address is where a device's addresses share one client's limits
// (Devices.Device: the forwarder's rate limit, ClientSlots' connection
// caps).
package netutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Socket options of netfilter's conntrack: SO_ORIGINAL_DST at SOL_IP and
// IP6T_SO_ORIGINAL_DST at SOL_IPV6 share the number 80.
const (
	soOriginalDst     = 80
	ip6tSoOriginalDst = 80
)

// ErrNoOriginalDst means the kernel knows no original destination for the
// socket (conntrack has no entry, or the address family does not match).
var ErrNoOriginalDst = errors.New("netutil: no original destination")

// OriginalDst returns the destination the client addressed before
// nftables redirected the connection to us. For a connection that was not
// redirected it returns the local address. IPv4 connections (including
// IPv4-mapped ones on a dual-stack socket) are asked with SO_ORIGINAL_DST,
// IPv6 ones with IP6T_SO_ORIGINAL_DST.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	la, _ := c.LocalAddr().(*net.TCPAddr)
	v4 := la != nil && la.IP.To4() != nil
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("netutil: original destination: %w", err)
	}
	var ap netip.AddrPort
	var serr error
	cerr := rc.Control(func(fd uintptr) { ap, serr = OriginalDstFD(int(fd), v4) })
	if cerr != nil {
		return netip.AddrPort{}, fmt.Errorf("netutil: original destination: %w", cerr)
	}
	if serr != nil {
		return netip.AddrPort{}, serr
	}
	return ap, nil
}

// OriginalDstFD is OriginalDst for a socket's descriptor; v4 says whether
// its local address is IPv4 (then SO_ORIGINAL_DST is asked first, else
// IP6T_SO_ORIGINAL_DST).
func OriginalDstFD(fd int, v4 bool) (netip.AddrPort, error) {
	if v4 {
		if ap, err := getOrigDst(fd, unix.SOL_IP, soOriginalDst); err == nil {
			return ap, nil
		}
		return getOrigDst(fd, unix.SOL_IPV6, ip6tSoOriginalDst)
	}
	if ap, err := getOrigDst(fd, unix.SOL_IPV6, ip6tSoOriginalDst); err == nil {
		return ap, nil
	}
	return getOrigDst(fd, unix.SOL_IP, soOriginalDst)
}

// getOrigDst calls getsockopt and decodes the sockaddr_in or sockaddr_in6
// the kernel writes.
func getOrigDst(fd, level, opt int) (netip.AddrPort, error) {
	var buf [unix.SizeofSockaddrInet6]byte
	l := uint32(len(buf))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		if e == syscall.ENOENT || e == syscall.ENOPROTOOPT {
			return netip.AddrPort{}, ErrNoOriginalDst
		}
		return netip.AddrPort{}, fmt.Errorf("netutil: getsockopt original destination: %w", e)
	}
	return decodeSockaddr(buf[:l])
}

// decodeSockaddr decodes a raw sockaddr_in or sockaddr_in6 (family in host
// byte order, port and address in network byte order).
func decodeSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, ErrNoOriginalDst
	}
	family := *(*uint16)(unsafe.Pointer(&b[0]))
	switch family {
	case unix.AF_INET:
		if len(b) < 8 {
			return netip.AddrPort{}, ErrNoOriginalDst
		}
		port := binary.BigEndian.Uint16(b[2:4])
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port), nil
	case unix.AF_INET6:
		if len(b) < 24 {
			return netip.AddrPort{}, ErrNoOriginalDst
		}
		port := binary.BigEndian.Uint16(b[2:4])
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), port), nil
	}
	return netip.AddrPort{}, ErrNoOriginalDst
}
