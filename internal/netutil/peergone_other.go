//go:build !linux

package netutil

import "net"

// PeerGone reports false: the state of a connection is read on Linux only.
func PeerGone(c net.Conn) bool { return false }
