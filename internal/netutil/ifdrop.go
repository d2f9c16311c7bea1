package netutil

import (
	"errors"
	"fmt"
	"net"
	"syscall"
)

// ErrSocketFilter is in the error of a socket filter that could not be
// attached or detached (errors.Is), with the kernel's errno beside it: a
// listener that fails with it failed at the filter, not at its bind.
var ErrSocketFilter = errors.New("netutil: socket filter")

// DropFromConn is DropFromInterface on an open socket (a listener or a
// UDP socket): one already closed takes no filter and is no error, as it
// gets nothing more anyway.
func DropFromConn(c any, ifindex int) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%w: %T has no descriptor", ErrSocketFilter, c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrSocketFilter, err)
	} else {
		err = DropFromInterface(rc, ifindex)
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
