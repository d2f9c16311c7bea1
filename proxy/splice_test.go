package proxy

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); ch <- c }()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-ch
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

// TestSpliceCopy: bytes arrive intact both ways through a tunnel made of
// spliceCopy, across an idle pause (the pipe is released and taken again),
// and a half close reaches the other side.
func TestSpliceCopy(t *testing.T) {
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	var p Proxy
	p.done = make(chan struct{})
	ended := make(chan [2]int64, 1)
	p.startTunnel(proxyIn, proxyOut, func(out, in int64, reason string) {
		if reason != closeClient && reason != closeServer {
			t.Errorf("close reason %q", reason)
		}
		ended <- [2]int64{out, in}
	})
	up := make([]byte, 8<<20)
	down := make([]byte, 3<<20+17)
	rand.Read(up)
	rand.Read(down)
	got := make(chan []byte, 2)
	go func() { b, _ := io.ReadAll(server); got <- b }()
	go func() { b, _ := io.ReadAll(client); got <- b }()
	client.Write(up[:1000])
	time.Sleep(200 * time.Millisecond) // idle: no pipe held
	client.Write(up[1000:])
	client.CloseWrite()
	server.Write(down)
	server.CloseWrite()
	a, b := <-got, <-got
	if !(bytes.Equal(a, up) && bytes.Equal(b, down) || bytes.Equal(a, down) && bytes.Equal(b, up)) {
		t.Fatalf("bytes differ: %d and %d", len(a), len(b))
	}
	select {
	case n := <-ended:
		if n[0] != int64(len(up)) || n[1] != int64(len(down)) {
			t.Errorf("counted %v", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("tunnel did not end")
	}
}

// TestSpliceIdleHoldsNoPipe: a tunnel waiting for data holds no pipe: after
// a chunk each way, every pipe the process has open is in the free list
// while the tunnel idles (and is taken again for the next chunk).
func TestSpliceIdleHoldsNoPipe(t *testing.T) {
	// Start from an empty free list (pipes of earlier tests are closed).
	for len(freePipes) > 0 {
		(<-freePipes).release()
	}
	base := openPipeFDs(t) // the test binary's own (stdout, stderr, ...)
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	var p Proxy
	p.done = make(chan struct{})
	ended := make(chan struct{})
	p.startTunnel(proxyIn, proxyOut, func(int64, int64, string) { close(ended) })
	buf := make([]byte, 64)
	for round := range 3 {
		client.Write([]byte("ping"))
		server.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := io.ReadFull(server, buf[:4]); err != nil || string(buf[:n]) != "ping" {
			t.Fatalf("round %d: server read %q, %v", round, buf[:n], err)
		}
		server.Write([]byte("pong"))
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := io.ReadFull(client, buf[:4]); err != nil || string(buf[:n]) != "pong" {
			t.Fatalf("round %d: client read %q, %v", round, buf[:n], err)
		}
		// Both directions go back to waiting and give their pipes back.
		deadline := time.Now().Add(5 * time.Second)
		for openPipeFDs(t)-base != 2*len(freePipes) && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if open, free := openPipeFDs(t)-base, len(freePipes); open != 2*free || free == 0 {
			t.Fatalf("round %d: %d pipe descriptors open, %d pipes in the free list while the tunnel idles: a direction holds a pipe", round, open, free)
		}
	}
	// A tunnel that ends at EOF both ways leaves its pipes to the next
	// one: kept in the free list, not closed.
	client.CloseWrite()
	server.CloseWrite()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("tunnel did not end")
	}
	if open, free := openPipeFDs(t)-base, len(freePipes); free == 0 || open != 2*free {
		t.Fatalf("after the tunnel ended: %d pipe descriptors open, %d pipes free; want every pipe free and kept", open, free)
	}
	client.Close()
	server.Close()
}

// openPipeFDs counts the process's open pipe descriptors.
func openPipeFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal("no /proc/self/fd (the proxy's splice needs Linux):", err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "pipe:") {
			n++
		}
	}
	return n
}

// TestSpliceReset: a reset on one side ends the tunnel, and the pipes go
// back to the free list.
func TestSpliceReset(t *testing.T) {
	for len(freePipes) > 0 {
		(<-freePipes).release()
	}
	base := openPipeFDs(t)
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	var p Proxy
	p.done = make(chan struct{})
	ended := make(chan string, 1)
	p.startTunnel(proxyIn, proxyOut, func(_, _ int64, reason string) { ended <- reason })
	client.Write([]byte("x"))
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	// Both directions idle, every pipe free.
	deadline := time.Now().Add(5 * time.Second)
	for (len(freePipes) == 0 || openPipeFDs(t)-base != 2*len(freePipes)) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	before := len(freePipes)
	server.SetLinger(0)
	server.Close()
	select {
	case r := <-ended:
		if r != closeReset && r != closeServer {
			t.Errorf("reason %q", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("tunnel did not end after a reset")
	}
	// The read that met the reset moved nothing into its pipe: the pipe
	// is kept for the next tunnel, not closed.
	if open, free := openPipeFDs(t)-base, len(freePipes); before == 0 || free < before || open != 2*free {
		t.Fatalf("after the reset: %d pipe descriptors open, %d pipes free (%d before); want every pipe free and kept", open, free, before)
	}
}

// TestHalfCloseTimeout: once the client has closed its half, an origin that
// keeps sending keeps the tunnel open, and one that falls silent (and never
// closes) ends it after HalfCloseTimeout.
func TestHalfCloseTimeout(t *testing.T) {
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	var p Proxy
	p.done = make(chan struct{})
	// Chunks 150 ms apart against a 1 s timeout: a busy box would have to
	// stretch a 150 ms sleep past 1 s to end the tunnel early (at 300 ms
	// it did once, under load).
	p.cfg.HalfCloseTimeout = time.Second
	ended := make(chan string, 1)
	p.startTunnel(proxyIn, proxyOut, func(_, _ int64, reason string) { ended <- reason })
	go io.Copy(io.Discard, server)
	go io.Copy(io.Discard, client)
	client.Write([]byte("request"))
	client.CloseWrite()
	// The origin answers slowly but steadily for longer than the timeout:
	// every chunk comes within it, so the tunnel stays.
	for i := 0; i < 9; i++ {
		time.Sleep(150 * time.Millisecond)
		if _, err := server.Write([]byte("chunk")); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		select {
		case r := <-ended:
			t.Fatalf("tunnel ended (%s) while the origin was still sending", r)
		default:
		}
	}
	// Then silence, without a close.
	select {
	case r := <-ended:
		if r != closeHalfIdle {
			t.Errorf("reason %q, want %q", r, closeHalfIdle)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("half-closed tunnel to a silent origin did not end")
	}
}

// TestTunnelCloseReasonFirstEnd: a tunnel whose client closes first is
// client-closed even when the server's close, which the client's caused,
// is seen before the client's direction has finished passing its close
// on. The direction that ended first was marked only after closing the
// other side's write half, so a server that closes on EOF (an echo, a
// witness) was often marked first under load: server-closed. The server
// side here holds its CloseWrite until the server's close has been read,
// as a goroutine preempted there does.
func TestTunnelCloseReasonFirstEnd(t *testing.T) {
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	var p Proxy
	p.done = make(chan struct{})
	ended := make(chan string, 1)
	late := &lateCloseWrite{Conn: proxyOut, eof: make(chan struct{})}
	p.startTunnel(proxyIn, late, func(_, _ int64, reason string) { ended <- reason })
	go func() { io.Copy(server, server); server.CloseWrite() }() // echo, closes on EOF
	client.Write([]byte("ping"))
	client.CloseWrite()
	if b, err := io.ReadAll(client); string(b) != "ping" || err != nil {
		t.Fatalf("echo %q, %v", b, err)
	}
	select {
	case r := <-ended:
		if r != closeClient {
			t.Errorf("close reason %q, want %q (the client closed first)", r, closeClient)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tunnel not ended 10 s after both sides closed")
	}
}

// lateCloseWrite is a net.Conn (no WriteTo, ReadFrom: the tunnel copies
// through Read and Write) whose CloseWrite returns only after Read has
// returned EOF, and a moment more.
type lateCloseWrite struct {
	net.Conn
	eof     chan struct{}
	eofOnce sync.Once
}

func (c *lateCloseWrite) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err == io.EOF {
		c.eofOnce.Do(func() { close(c.eof) })
	}
	return n, err
}

func (c *lateCloseWrite) CloseWrite() error {
	err := c.Conn.(*net.TCPConn).CloseWrite()
	select {
	case <-c.eof:
		time.Sleep(100 * time.Millisecond) // the other direction ends meanwhile
	case <-time.After(5 * time.Second):
	}
	return err
}
