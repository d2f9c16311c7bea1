//go:build !linux

package dnsfilter

import "net"

// canBatch is false off Linux: readUDP reads one datagram per call.
func canBatch(*net.UDPConn) bool { return false }
