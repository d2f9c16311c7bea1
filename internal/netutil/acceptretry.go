package netutil

import (
	"errors"
	"syscall"
)

// AcceptRetry reports whether an accept's error is worth retrying on the
// same listener, after a pause: out of file descriptors (EMFILE, ENFILE)
// and the others Go calls temporary, out of memory or socket buffers
// (ENOMEM, ENOBUFS), which it does not. Closing the listener instead
// would reset the connections in its queue; retrying at once spins, as
// the connection at the head of the queue fails each accept again.
func AcceptRetry(err error) bool {
	type temporary interface{ Temporary() bool }
	var t temporary
	return errors.As(err, &t) && t.Temporary() || errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ENOBUFS)
}
