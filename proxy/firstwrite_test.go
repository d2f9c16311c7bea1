package proxy

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// TestFirstWriteConn: dialAtFirstWrite's connection is safe to use
// before its first write: deadlines are kept for the dial, LocalAddr,
// RemoteAddr and Read dial (once) instead of reaching a nil socket
// (they panicked), and a Close before any of them dials nothing, the
// calls after it failing with net.ErrClosed. Loopback only.
func TestFirstWriteConn(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dials := 0
	newConn := func() *firstWriteConn {
		return &firstWriteConn{dial: func() (*net.TCPConn, error) {
			dials++
			c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
			if err != nil {
				return nil, err
			}
			return c.(*net.TCPConn), nil
		}}
	}

	c := newConn()
	if err := c.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatalf("SetReadDeadline before the dial: %v", err)
	}
	if err := c.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatalf("SetWriteDeadline before the dial: %v", err)
	}
	if dials != 0 {
		t.Fatalf("deadlines dialed")
	}
	local := c.LocalAddr()
	if local == nil || c.RemoteAddr() == nil || c.RemoteAddr().String() != ln.Addr().String() {
		t.Fatalf("addresses before the first write: %v → %v, want a dialed socket to %v", local, c.RemoteAddr(), ln.Addr())
	}
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if srv.RemoteAddr().String() != local.String() {
		t.Errorf("accepted %v, the conn says %v", srv.RemoteAddr(), local)
	}
	// The read deadline set before the dial holds: Read times out.
	var ne net.Error
	if _, err := c.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("Read with the early deadline past: %v, want a timeout", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "hi"); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Errorf("CloseWrite: %v", err)
	}
	srv.SetDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(srv); string(b) != "hi" || err != nil {
		t.Errorf("the server read %q, %v; want \"hi\"", b, err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if dials != 1 {
		t.Errorf("%d dials, want 1", dials)
	}

	// Closed before anything: no dial, and nothing after dials.
	c = newConn()
	if err := c.Close(); err != nil {
		t.Errorf("close before the dial: %v", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("write after Close: %v, want net.ErrClosed", err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after Close: %v, want net.ErrClosed", err)
	}
	if c.LocalAddr() != nil {
		t.Errorf("LocalAddr after Close: %v, want nil", c.LocalAddr())
	}
	if dials != 1 {
		t.Errorf("Close then calls dialed (%d dials, want 1)", dials)
	}
}
