package netutil

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// PeerGone reports whether c's peer has ended c, a TCP connection: its
// socket is no longer established (a reset closed it, a FIN put it in
// CLOSE-WAIT), whatever of its data is still to read. A connection that
// is not TCP, or whose state cannot be read, reports false.
func PeerGone(c net.Conn) bool {
	ti := TCPInfo(c)
	return ti != nil && ti.State != unix.BPF_TCP_ESTABLISHED
}

// TCPInfo returns the TCP_INFO of c, a TCP connection; nil when c is not
// one or on an error.
func TCPInfo(c net.Conn) *unix.TCPInfo {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var ti *unix.TCPInfo
	var terr error
	if err := rc.Control(func(fd uintptr) { ti, terr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || terr != nil {
		return nil
	}
	return ti
}
