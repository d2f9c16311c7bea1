//go:build !linux

package netutil

import (
	"errors"
	"net/netip"
)

// RouteAsker needs Linux's netlink: elsewhere it does not open.
type RouteAsker struct{}

// OpenRouteAsker fails: route lookups need Linux.
func OpenRouteAsker() (*RouteAsker, error) {
	return nil, errors.New("netutil: route lookups need Linux")
}

// Close does nothing.
func (*RouteAsker) Close() error { return nil }

// RoutesBack knows nothing.
func (*RouteAsker) RoutesBack(int, netip.Addr) (bool, error) {
	return false, errors.New("netutil: route lookups need Linux")
}
