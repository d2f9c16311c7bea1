// Package netns runs a function on a thread switched into another
// network namespace, for the sockets it opens there: the conntrack
// socket of internal/netutil (egressd --netns) and the tests' namespaces
// (internal/testnet). A leaf: it imports nothing of egressd's.
package netns

import (
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
// the thread rather than run anything else in the wrong namespace.
func Do(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ok, err := doLocked(path, fn)
		if ok {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// doLocked does Do's work on the locked thread; ok reports that
// the thread is back in its namespace.
func doLocked(path string, fn func() error) (ok bool, err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return true, fmt.Errorf("netns: network namespace: %w", err)
	}
	defer orig.Close()
	target, err := os.Open(path)
	if err != nil {
		return true, fmt.Errorf("netns: network namespace: %w", err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return true, fmt.Errorf("netns: setns %s: %w", path, err)
	}
	ferr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return false, fmt.Errorf("netns: setns back: %w", err)
	}
	return true, ferr
}
