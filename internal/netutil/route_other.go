//go:build !linux

package netutil

import (
	"errors"
	"net/netip"
)

// RoutesBack needs Linux's netlink: elsewhere it knows nothing.
func RoutesBack(int, netip.Addr) (bool, error) {
	return false, errors.New("netutil: route lookups need Linux")
}
