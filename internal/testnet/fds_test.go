package testnet

import (
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
)

// TestOutOfFDs: under OutOfFDs an open fails with EMFILE and a socket
// DialQueued made before connects all the same, queued at the listener;
// after release, opens work again and the limit is the old one.
func TestOutOfFDs(t *testing.T) {
	var before syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &before); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	connect := DialQueued(t, ln.Addr().String())
	release := OutOfFDs(t)
	f, openErr := os.Open(os.DevNull)
	if f != nil {
		f.Close()
	}
	closeSocket := connect()
	release()
	defer closeSocket()
	if !errors.Is(openErr, syscall.EMFILE) {
		t.Errorf("open out of descriptors: %v, want EMFILE", openErr)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("accept the queued connection after release: %v", err)
	}
	c.Close()
	var after syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &after); err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Errorf("limit after release %+v, want %+v", after, before)
	}
	release() // a second call does nothing
}
