//go:build !linux

package dnsfilter

import "net"

// msgTrunc: ReadBatch reads one datagram per call here and reports no
// flags; an answer cut to the buffer fails to unpack and times out.
const msgTrunc = 0

// batchConnFor is nil off Linux: readUDP reads one datagram per call.
func batchConnFor(*net.UDPConn) batchConn { return nil }
