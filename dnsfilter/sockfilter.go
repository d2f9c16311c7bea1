package dnsfilter

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"egressd/internal/netutil"
)

// SetDropFrom changes the interfaces whose packets the listening sockets
// drop (Config.DropUDPFrom, DropTCPFrom) on every socket the server has
// open and those it opens later: egressd run calls it when the WAN
// interface comes back with another index (a PPP link re-made). Zero
// takes a filter off. Connections already accepted keep the filter they
// had.
func (s *Server) SetDropFrom(udp, tcp int) error {
	if udp < 0 || tcp < 0 {
		return fmt.Errorf("dnsfilter: interface index %d, %d: negative", udp, tcp)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropUDP, s.dropTCP = udp, tcp
	return setDropFrom(s.udp, s.tcp, udp, tcp)
}

// dropSetter is a listener socket that is not a *net.UDPConn (rawUDP).
type dropSetter interface {
	setDropFrom(ifindex int) error
}

// setDropFrom attaches the filters to the sockets: every one is tried,
// and the errors are returned together.
func setDropFrom(udp []udpConn, tcp []net.Listener, udpIdx, tcpIdx int) error {
	var errs []error
	for _, c := range udp {
		switch c := c.(type) {
		case syscall.Conn:
			errs = append(errs, dropFromConn(c, udpIdx))
		case dropSetter:
			errs = append(errs, c.setDropFrom(udpIdx))
		default:
			errs = append(errs, fmt.Errorf("dnsfilter: socket filter: %T has no descriptor", c))
		}
	}
	for _, l := range tcp {
		c, ok := l.(syscall.Conn)
		if !ok {
			errs = append(errs, fmt.Errorf("dnsfilter: socket filter: %T has no descriptor", l))
			continue
		}
		errs = append(errs, dropFromConn(c, tcpIdx))
	}
	return errors.Join(errs...)
}

func dropFromConn(c syscall.Conn, ifindex int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("dnsfilter: socket filter: %w", err)
	}
	if err := netutil.DropFromInterface(rc, ifindex); err != nil {
		if errors.Is(err, net.ErrClosed) {
			return nil // closing: it gets nothing more anyway
		}
		return fmt.Errorf("dnsfilter: %w", err)
	}
	return nil
}
