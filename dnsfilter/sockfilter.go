package dnsfilter

import (
	"errors"
	"fmt"
	"net"

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
		if d, ok := c.(dropSetter); ok {
			errs = append(errs, d.setDropFrom(udpIdx))
		} else {
			errs = append(errs, netutil.DropFromConn(c, udpIdx))
		}
	}
	for _, l := range tcp {
		errs = append(errs, netutil.DropFromConn(l, tcpIdx))
	}
	return errors.Join(errs...)
}
