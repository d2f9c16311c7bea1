package proxy

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestSetExplicitAddrs: the explicit listeners follow SetExplicitAddrs
// (egressd run calls it when the LAN interfaces' addresses change): an
// address given later is listened on and answered, one not given any
// more is closed (Run's too), and the proxy goes on; the listeners
// closed are off the list SetDropFrom filters. Loopback only, no root.
func TestSetExplicitAddrs(t *testing.T) {
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{ExplicitAddr: "127.0.0.1:0"}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0"}); err != errNotReady {
		t.Errorf("before Run: %v, want errNotReady", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-ran:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("not ready in 10s")
	}
	first := p.ExplicitAddrs()[0].String()

	// A free port on another loopback address.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("no 127.0.0.2: %v", err)
	}
	later := ln.Addr().String()
	ln.Close()

	answers := func(addr string) bool {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n")
		line, _ := bufio.NewReader(c).ReadString('\n')
		return strings.HasPrefix(line, "HTTP/1.1 403")
	}
	opened := func() int {
		p.dropMu.Lock()
		defer p.dropMu.Unlock()
		return len(p.opened)
	}

	if !answers(first) || answers(later) {
		t.Fatalf("at start: %s answers %v, %s %v; want only the first", first, answers(first), later, answers(later))
	}
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0", later}); err != nil {
		t.Fatal(err)
	}
	if !answers(first) || !answers(later) || opened() != 2 {
		t.Errorf("after %s was given: %s answers %v, %s %v, %d listeners filtered; want both, 2", later, first, answers(first), later, answers(later), opened())
	}
	if err := p.SetExplicitAddrs([]string{later}); err != nil {
		t.Fatal(err)
	}
	if answers(first) || !answers(later) || opened() != 1 {
		t.Errorf("after Run's address went: %s answers %v, %s %v, %d listeners filtered; want only the later, 1", first, answers(first), later, answers(later), opened())
	}
	if err := p.SetDropFrom(0, 0); err != nil {
		t.Errorf("SetDropFrom after a listener closed: %v", err)
	}
	if err := p.SetExplicitAddrs(nil); err != nil || answers(later) || opened() != 0 {
		t.Errorf("after every address went: %v, %s answers %v, %d listeners filtered", err, later, answers(later), opened())
	}
	// The closed listeners' servers are let go (no connection is left
	// on them).
	for deadline := time.Now().Add(10 * time.Second); ; {
		p.mu.Lock()
		n := len(p.servers)
		p.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%d servers still kept after their listeners closed", n)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := p.SetExplicitAddrs([]string{"198.51.100.1:3128"}); err == nil {
		t.Error("an address not the host's opened")
	}
	select {
	case err := <-ran:
		t.Fatalf("Run returned while the listeners changed: %v", err)
	default:
	}
	cancel()
	if err := <-ran; err != nil {
		t.Errorf("Run: %v", err)
	}
	if err := p.SetExplicitAddrs([]string{later}); err != net.ErrClosed {
		t.Errorf("after Close: %v, want net.ErrClosed", err)
	}
}
