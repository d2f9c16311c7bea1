package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

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
	cancel, ran := runReady(t, p)
	first := p.ExplicitAddrs()[0].String()

	// A free port on another loopback address.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatalf("no 127.0.0.2 (Linux's lo holds 127.0.0.0/8): %v", err)
	}
	later := ln.Addr().String()
	ln.Close()

	answers := explicitAnswers
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
	endRun(t, cancel, ran)
	if err := p.SetExplicitAddrs([]string{later}); err != net.ErrClosed {
		t.Errorf("after Close: %v, want net.ErrClosed", err)
	}
}

// endRun checks that runReady's Run still runs, then ends it and checks
// that it returns nil.
func endRun(t *testing.T, cancel context.CancelFunc, ran chan error) {
	t.Helper()
	select {
	case err := <-ran:
		t.Fatalf("Run returned while the listeners changed: %v", err)
	default:
	}
	cancel()
	if err := <-ran; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// explicitAnswers reports whether an explicit proxy on addr answers a
// request the policy denies (403).
func explicitAnswers(addr string) bool {
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

// TestSetExplicitAddrsFailLoggedAgain: an address that does not open is
// logged once while it is given; one no longer given, then given again
// and still not opening (an IPv6 address whose duplicate address
// detection failed, taken off and put back), is logged again. Before, the
// address stayed on the list of those logged once it was no longer
// given: the second failure was silent, and the list grew by every
// address that never opened.
func TestSetExplicitAddrsFailLoggedAgain(t *testing.T) {
	p, logs := loggedExplicitProxy(t)
	cancel, ran := runReady(t, p)
	defer func() { cancel(); <-ran }()
	const bad = "198.51.100.1:3128" // not the host's: does not open
	for _, addrs := range [][]string{{"127.0.0.1:0", bad}, {"127.0.0.1:0", bad}, {"127.0.0.1:0"}, {"127.0.0.1:0", bad}} {
		err := p.SetExplicitAddrs(addrs)
		if (err != nil) != slices.Contains(addrs, bad) {
			t.Fatalf("SetExplicitAddrs(%v): %v", addrs, err)
		}
	}
	n := strings.Count(logs(), "cannot listen on "+bad)
	if n != 2 {
		t.Errorf("%q logged %d times, want 2 (once, and again after it was not given for a while)", bad, n)
	}
	p.explicitMu.Lock()
	failed := len(p.explicitFailed)
	p.explicitMu.Unlock()
	if failed != 1 {
		t.Errorf("%d addresses on the failed list, want 1", failed)
	}
}

// loggedExplicitProxy returns a proxy with an explicit listener on
// 127.0.0.1:0 under a policy that allows nothing, and what it has logged
// so far.
func loggedExplicitProxy(t *testing.T) (*Proxy, func() string) {
	t.Helper()
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	var mu sync.Mutex
	p, err := New(Config{ExplicitAddr: "127.0.0.1:0"}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return p, func() string {
		mu.Lock()
		defer mu.Unlock()
		return logs.String()
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// TestSetExplicitAddrsNoLeak: listeners SetExplicitAddrs opened and
// closed, one of them with a request under way on a connection it
// accepted, and calls racing the proxy's Close from two goroutines,
// leave no goroutine behind once the proxy is closed, and no listener
// open: the count of goroutines comes back to what it was.
func TestSetExplicitAddrsNoLeak(t *testing.T) {
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	before := runtime.NumGoroutine()
	for round := range 3 {
		p, err := New(Config{ExplicitAddr: "127.0.0.1:0"}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		cancel, ran := runReady(t, p)
		extra := []string{"127.0.0.2:0", "127.0.0.3:0", "127.0.0.4:0"}
		if err := p.SetExplicitAddrs(append([]string{"127.0.0.1:0"}, extra...)); err != nil {
			t.Fatalf("no 127.0.0.2-4 (Linux's lo holds 127.0.0.0/8): %v", err)
		}
		// A request head begun on one of them, then its listener closed:
		// the connection is the retired server's until the proxy closes.
		p.explicitMu.Lock()
		held := p.explicitLns[extra[0]].Addr().String()
		p.explicitMu.Unlock()
		c, err := net.DialTimeout("tcp", held, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET http://denied.test/ HTTP/1.1\r\n") // unfinished head
		if err := p.SetExplicitAddrs([]string{"127.0.0.1:0"}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for i := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range 20 {
					_ = p.SetExplicitAddrs([]string{"127.0.0.1:0", extra[(i+j)%len(extra)]})
				}
			}()
		}
		if round > 0 {
			cancel() // Close while the calls go on
		}
		wg.Wait()
		cancel()
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			buf := make([]byte, 1<<20)
			t.Fatalf("Run did not return in 10s after its context was done:\n%s", buf[:runtime.Stack(buf, true)])
		}
		c.Close()
		if ln, err := net.Listen("tcp", held); err == nil {
			ln.Close()
		} else {
			t.Errorf("%s still taken after Close: %v", held, err)
		}
	}
	var after int
	for deadline := time.Now().Add(10 * time.Second); ; {
		after = runtime.NumGoroutine()
		if after <= before || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if after > before {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines before, %d after the proxies closed:\n%s", before, after, buf[:runtime.Stack(buf, true)])
	}
}

// runReady runs p until its listeners are open; the caller cancels and
// reads ran (Run's error) when done.
func runReady(t *testing.T, p *Proxy) (context.CancelFunc, chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-ran:
		cancel()
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("not ready in 10s")
	}
	return cancel, ran
}

// TestExplicitListenersShareClientLimit: the per-client connection limit
// holds across the explicit listeners (egressd run opens one on each LAN
// address): a client at its limit on one listener has a connection on
// another closed at once, and is served on it once it is under the limit
// again.
func TestExplicitListenersShareClientLimit(t *testing.T) {
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{ExplicitAddr: "127.0.0.1:0", MaxConns: 100, MaxConnsPerClient: 2, HelloTimeout: 20 * time.Second},
		Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	cancel, ran := runReady(t, p)
	defer func() { cancel(); <-ran }()
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0", "127.0.0.2:0"}); err != nil {
		t.Fatalf("no 127.0.0.2 (Linux's lo holds 127.0.0.0/8): %v", err)
	}
	p.explicitMu.Lock()
	first, second := p.explicitLns["127.0.0.1:0"].Addr().String(), p.explicitLns["127.0.0.2:0"].Addr().String()
	p.explicitMu.Unlock()
	dial := func(addr string) net.Conn {
		d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "GET http://denied.test/ HTTP/1.1\r\n") // unfinished head: the slot is held
		return c
	}
	// closed reports whether the proxy closed c (no answer: the head is
	// unfinished, so an open connection's read times out).
	closed := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err := c.Read(make([]byte, 1))
		var ne net.Error
		return err != nil && !(errors.As(err, &ne) && ne.Timeout())
	}
	var held []net.Conn
	for range 2 {
		held = append(held, dial(first))
	}
	// Both accepted and holding their slots before the third comes.
	for i := 0; i < 500; i++ {
		if total, _, _ := p.slots.Counts(); total == 2 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if total, _, _ := p.slots.Counts(); total != 2 {
		t.Fatalf("%d slots held, want 2", total)
	}
	over := dial(second)
	if !closed(over) {
		t.Errorf("a third connection of the client, on the second listener, was not closed: the limit of 2 does not hold across listeners")
	}
	over.Close()
	held[0].Close()
	// The slot comes back once the server sees the close: bounded retries.
	served := false
	for i := 0; i < 50 && !served; i++ {
		c := dial(second)
		io.WriteString(c, "Host: denied.test\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		served = strings.HasPrefix(line, "HTTP/1.1 403")
		c.Close()
		if !served {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if !served {
		t.Error("the client, under its limit again, is not served on the second listener")
	}
	held[1].Close()
}

// TestExplicitReopensAfterAcceptFails: an explicit listener whose accept
// fails for good (here its socket is shut down: accept says EINVAL) is
// closed and opened again on the same address, with a wait between
// tries, both one Run opened and one SetExplicitAddrs opened; while it
// is closed, ExplicitDown names it (with the last failure to open it
// again) and ExplicitChanges wakes; the proxy goes on throughout, and
// SetExplicitAddrs leaves the reopening to it. Before, a listener
// SetExplicitAddrs opened stayed closed, and one Run opened ended Run.
// Loopback only, no root.
func TestExplicitReopensAfterAcceptFails(t *testing.T) {
	p, logs := loggedExplicitProxy(t)
	p.reopenBase, p.reopenMax = time.Millisecond, 8*time.Millisecond
	var failing atomic.Bool
	var tries atomic.Int32
	p.relisten = func(a string) (net.Listener, error) {
		tries.Add(1)
		if failing.Load() {
			return nil, errors.New("test: not now")
		}
		return p.listenExplicit(context.Background(), a)
	}
	cancel, ran := runReady(t, p)
	defer func() { cancel(); <-ran }()
	addrs := []string{"127.0.0.1:0", "127.0.0.2:0"}
	if err := p.SetExplicitAddrs(addrs); err != nil {
		t.Fatalf("no 127.0.0.2 (Linux's lo holds 127.0.0.0/8): %v", err)
	}
	lnOf := func(a string) net.Listener {
		p.explicitMu.Lock()
		defer p.explicitMu.Unlock()
		return p.explicitLns[a]
	}
	answers := explicitAnswers
	for _, a := range addrs { // Run's, then SetExplicitAddrs'
		failing.Store(true)
		n := tries.Load()
		for len(p.ExplicitChanges()) > 0 {
			<-p.ExplicitChanges()
		}
		ln := lnOf(a)
		old := ln.Addr().String()
		rc, err := ln.(syscall.Conn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		rc.Control(func(fd uintptr) { syscall.Shutdown(int(fd), syscall.SHUT_RD) })
		for i := 0; i < 1000 && tries.Load() < n+3; i++ {
			time.Sleep(5 * time.Millisecond)
		}
		if got := tries.Load() - n; got < 3 {
			t.Fatalf("%s: %d tries to open it again, want 3 or more", a, got)
		}
		down := p.ExplicitDown()
		if len(down) != 1 || !strings.Contains(down[0].Error(), a+": ") || !strings.Contains(down[0].Error(), "test: not now") {
			t.Errorf("%s down: ExplicitDown %v, want it alone, with the last failure", a, down)
		}
		if len(p.ExplicitChanges()) == 0 {
			t.Errorf("%s down: ExplicitChanges did not wake", a)
		}
		if err := p.SetExplicitAddrs(addrs); err != nil || lnOf(a) != nil {
			t.Errorf("%s down: SetExplicitAddrs %v opened it (%v): the reopening is keepExplicit's", a, err, lnOf(a))
		}
		if answers(old) {
			t.Errorf("%s down: %s still answers", a, old)
		}
		failing.Store(false)
		for i := 0; i < 1000 && len(p.ExplicitDown()) > 0; i++ {
			time.Sleep(5 * time.Millisecond)
		}
		if down := p.ExplicitDown(); len(down) != 0 || lnOf(a) == nil || !answers(lnOf(a).Addr().String()) {
			t.Errorf("%s opened again: ExplicitDown %v, listener %v; want none down, it answering", a, down, lnOf(a))
		}
		select {
		case err := <-ran:
			t.Fatalf("Run returned after an accept failed: %v", err)
		default:
		}
	}
	var m dto.Metric
	p.met.reopens.Write(&m)
	if got := m.GetCounter().GetValue(); got != float64(len(addrs)) {
		t.Errorf("egress_proxy_listener_reopens_total %v, want %d (one per listener opened again)", got, len(addrs))
	}
	p.dropMu.Lock()
	opened := len(p.opened)
	p.dropMu.Unlock()
	if opened != 2 {
		t.Errorf("%d listeners filtered, want 2 (the closed ones off the list, the new ones on it)", opened)
	}
	out := logs()
	for _, a := range addrs {
		if n := strings.Count(out, "accept on "+a+" failed"); n != 1 {
			t.Errorf("%q logged %d times, want 1", "accept on "+a+" failed", n)
		}
		if !strings.Contains(out, "cannot open "+a+" again") {
			t.Errorf("no line on the failures to open %s again:\n%s", a, out)
		}
	}
}
