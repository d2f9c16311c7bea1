//go:build !linux

package netutil

import (
	"errors"
	"syscall"
)

// DropFromInterface needs Linux's socket filters: elsewhere a non-zero
// index is an error.
func DropFromInterface(_ syscall.RawConn, ifindex int) error {
	if ifindex == 0 {
		return nil
	}
	return errors.New("netutil: socket filters need Linux")
}
