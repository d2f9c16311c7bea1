// Package netns runs a function on a thread switched into another
// network namespace, for the sockets it opens there: the conntrack
// socket of internal/netutil (egressd --netns) and the tests' namespaces
// (internal/testnet). A leaf: it imports nothing of egressd's.
package netns

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn on a goroutine of its own, locked to a thread switched
// into the network namespace at path (a path such as
// /var/run/netns/NAME), and waits for it; sockets fn opens stay in that
// namespace. The caller's goroutine and thread are left alone (on a
// reload that is the daemon's main loop). If the thread cannot be
// switched back, its goroutine ends still locked to it, and Go discards
// the thread rather than run anything else in the wrong namespace. A
// panic in fn is raised again in the caller.
func Do(path string, fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var r result
		back := true // the thread is in its own namespace
		defer func() {
			r.panic = recover()
			if back {
				runtime.UnlockOSThread()
			}
			done <- r
		}()
		r.err = do(path, fn, &back)
	}()
	r := <-done
	if r.panic != nil {
		panic(r.panic)
	}
	return r.err
}

// do does Do's work on the locked thread; back is false while the thread
// is not in its own namespace.
func do(path string, fn func() error, back *bool) (err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return fmt.Errorf("netns: network namespace: %w", err)
	}
	defer orig.Close()
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("netns: network namespace: %w", err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("netns: setns %s: %w", path, err)
	}
	*back = false
	defer func() {
		// Deferred, so that a panic in fn switches back too.
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
			err = errors.Join(err, fmt.Errorf("netns: setns back: %w", serr))
			return
		}
		*back = true
	}()
	return fn()
}
