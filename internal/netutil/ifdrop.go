package netutil

import (
	"errors"
	"fmt"
	"net"
	"syscall"
)

// DropFromConn is DropFromInterface on an open socket (a listener or a
// UDP socket): one already closed takes no filter and is no error, as it
// gets nothing more anyway.
func DropFromConn(c any, ifindex int) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("netutil: socket filter: %T has no descriptor", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		err = fmt.Errorf("netutil: socket filter: %w", err)
	} else {
		err = DropFromInterface(rc, ifindex)
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
