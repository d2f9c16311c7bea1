package netutil

import (
	"net"
	"testing"
	"time"
)

// TestPeerGone: a TCP connection whose peer is there is not gone, one
// whose peer closed it is (its FIN read or not), and a connection that is
// not TCP never is.
func TestPeerGone(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if PeerGone(s) {
		t.Error("a connection whose peer is there: gone")
	}
	c.Write([]byte("G")) // data unread does not hide the FIN
	c.Close()
	for i := 0; !PeerGone(s); i++ {
		if i == 3000 {
			t.Fatal("a connection whose peer closed it: not gone 30 s on")
		}
		time.Sleep(10 * time.Millisecond)
	}
	a, b := net.Pipe()
	defer a.Close()
	b.Close()
	if PeerGone(a) {
		t.Error("a pipe: gone")
	}
}
