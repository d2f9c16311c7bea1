package testnet

import (
	"net/netip"
	"os"
	"syscall"
	"testing"
)

// OutOfFDs runs the test process out of file descriptors: RLIMIT_NOFILE
// is lowered to a few above the highest in use and every free one below
// it is taken with /dev/null, so the next open, socket or accept fails
// with EMFILE (a socket the test needs meanwhile: DialQueued). release
// gives them all back and restores the limit, and runs at the test's end
// if the test did not call it.
func OutOfFDs(t testing.TB) (release func()) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatalf("testnet: getrlimit: %v", err)
	}
	probe, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatalf("testnet: %v", err)
	}
	lim := old
	lim.Cur = uint64(probe.Fd()) + 8
	probe.Close()
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("testnet: setrlimit: %v", err)
	}
	var held []*os.File
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			break
		}
		held = append(held, f)
	}
	done := false
	release = func() {
		if done {
			return
		}
		done = true
		for _, f := range held {
			f.Close()
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
			t.Errorf("testnet: setrlimit back: %v", err)
		}
	}
	t.Cleanup(release)
	if len(held) == 0 {
		release()
		t.Fatalf("testnet: no descriptor to take under a limit of %d", lim.Cur)
	}
	return release
}

// DialQueued connects a TCP socket to addr (an IPv4 address and port)
// that was made before OutOfFDs ran out the descriptors: connect needs
// none, so the connection waits in the listener's accept queue whatever
// else in the test process took a freed descriptor meanwhile (one freed
// for the test's socket could be taken by another goroutine first). Call the returned func
// first, before OutOfFDs; it connects and returns the socket's closer.
func DialQueued(t testing.TB, addr string) (connect func() (closeSocket func())) {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		t.Fatalf("testnet: DialQueued %q: an IPv4 address and port", addr)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("testnet: socket: %v", err)
	}
	closed := false
	closeFn := func() {
		if !closed {
			closed = true
			syscall.Close(fd)
		}
	}
	t.Cleanup(closeFn)
	return func() func() {
		if err := syscall.Connect(fd, &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
			t.Fatalf("testnet: connect %s: %v", addr, err)
		}
		return closeFn
	}
}
