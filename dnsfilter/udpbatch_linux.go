package dnsfilter

import (
	"net"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// msgTrunc is recvmmsg's flag for a datagram cut to the buffer.
const msgTrunc = unix.MSG_TRUNC

// batchConnFor returns x/net's PacketConn for c when readUDPBatch can
// serve c with recvmmsg and sendmmsg, else nil: an AF_INET socket, or an
// AF_INET6 one that no IPv4 client can reach (IPV6_V6ONLY, or bound to
// one IPv6 address). A dual-stack socket's IPv4 clients arrive as
// v4-mapped addresses, which x/net would send to as AF_INET, and such a
// socket refuses that.
func batchConnFor(c *net.UDPConn) batchConn {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	domain, v6only, serr := 0, 0, error(nil)
	if err := rc.Control(func(fd uintptr) {
		domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		if serr == nil && domain == unix.AF_INET6 {
			v6only, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
		}
	}); err != nil || serr != nil {
		return nil
	}
	switch domain {
	case unix.AF_INET:
		return ipv4.NewPacketConn(c)
	case unix.AF_INET6:
		la, _ := c.LocalAddr().(*net.UDPAddr)
		if v6only == 1 || la != nil && !la.IP.IsUnspecified() && la.IP.To4() == nil {
			return ipv6.NewPacketConn(c)
		}
	}
	return nil
}
