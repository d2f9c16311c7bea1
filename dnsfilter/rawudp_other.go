//go:build !linux

package dnsfilter

import "net"

// toRaw: listeners stay on the netpoller off Linux.
func (s *Server) toRaw(conns []*net.UDPConn) []udpConn {
	out := make([]udpConn, len(conns))
	for i, c := range conns {
		out[i] = c
	}
	return out
}

func (s *Server) readRawConn(udpConn) (bool, error) { return false, nil }

func isRawUDP(udpConn) bool { return false }

const rawSupported = false
