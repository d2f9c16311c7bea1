package dnsfilter

import (
	"net"

	"golang.org/x/sys/unix"
)

// msgTrunc is recvmmsg's flag for a datagram cut to the buffer.
const msgTrunc = unix.MSG_TRUNC

// canBatch reports whether c is an AF_INET socket, which readUDPBatch
// serves with recvmmsg and sendmmsg.
func canBatch(c *net.UDPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	domain, serr := 0, error(nil)
	if err := rc.Control(func(fd uintptr) {
		domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
	}); err != nil || serr != nil {
		return false
	}
	return domain == unix.AF_INET
}
