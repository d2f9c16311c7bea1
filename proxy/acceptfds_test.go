package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestServeOutOfFDsStops: the transparent listener's accept out of file
// descriptors waits with a pause growing to a second (Serve); Close
// meanwhile has Serve return without waiting the pause out. The time it
// takes is logged; the test fails only past 5 s (a hang), not on speed.
func TestServeOutOfFDsStops(t *testing.T) {
	serveOutOfFDs(t, (*Proxy).Serve)
}

// TestServeExplicitOutOfFDsStops: the explicit listener's accept out of
// file descriptors is waited out by the listener (netutil.RetryListener),
// not by http.Server, which logged every retry through its ErrorLog
// ("http: Accept error: ...; retrying in 5ms", one a second at the
// longest pause) and slept up to a second deaf to Close: the log has the
// proxy's one rate-limited line and none of http.Server's, and Close
// ends ServeExplicit with the listener closed (serveOutOfFDs: with the
// listener's Close ignored, the proxy's done channel alone ended the
// pause and the test passed).
func TestServeExplicitOutOfFDsStops(t *testing.T) {
	logs := serveOutOfFDs(t, (*Proxy).ServeExplicit)
	if all := strings.Join(logs, "\n"); strings.Contains(all, "Accept error") {
		t.Errorf("http.Server saw the accept's errors (its own retry lines in the log):\n%s", all)
	}
}

// serveOutOfFDs runs serve on a loopback listener, runs the test process
// out of descriptors with a connection waiting in the listener's queue,
// waits for the proxy's "accept failing" line and for the pause to grow
// to a second, closes the proxy and checks that serve returns nil, the
// listener closed, with the line logged once. It returns the log's lines (debug level).
func serveOutOfFDs(t *testing.T, serve func(*Proxy, net.Listener) error) []string {
	t.Helper()
	eng, err := policy.Compile("p", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	var logs lockedBuf
	p, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serve(p, ln) }()

	connect := testnet.DialQueued(t, ln.Addr().String()) // the socket made while descriptors are free
	release := testnet.OutOfFDs(t)
	defer connect()() // waits in the queue: accept has no descriptor
	const warn = "proxy: accept failing: retrying"
	count := func() int { return strings.Count(strings.Join(logs.lines(), "\n"), warn) }
	deadline := time.Now().Add(10 * time.Second)
	for count() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if count() == 0 {
		release()
		t.Fatalf("the log does not say %q out of descriptors: %q", warn, logs.lines())
	}
	// 5 ms doubling: past 1.3 s each pause is a second long.
	time.Sleep(1500 * time.Millisecond)

	start := time.Now()
	p.Close()
	select {
	case err := <-done:
		t.Logf("serve returned %v after Close, out of descriptors", time.Since(start))
		if err != nil {
			t.Errorf("serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		release()
		t.Fatalf("serve has not returned 5 s after Close while accept waited out EMFILE")
	}
	release()
	// Close closed the listener itself, not only ended the wait: with
	// its Close ignored, p.done alone ended the pause and serve returned
	// all the same, the socket left open behind it (taking connections
	// into a queue no one accepts). The descriptor's state says so, not
	// a dial that could meet another socket on the port.
	if err := ln.(*net.TCPListener).SetDeadline(time.Time{}); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the listener after Close: %v, want it closed (net.ErrClosed)", err)
	}
	if n := count(); n != 1 {
		t.Errorf("the log says %q %d times in under 10 s, want once: %q", warn, n, logs.lines())
	}
	return logs.lines()
}

// TestExplicitRetiredOutOfFDs: an explicit listener whose accept waits
// out EMFILE (netutil.RetryListener's pause, a second long by then) is
// closed by SetExplicitAddrs (through the wrapper, which ends the pause:
// TestExplicitRetiredPauseEnds); its address, given again at once once
// the descriptors are back, is listened on and answered; the old one
// ends as a retired listener (no "accept failed" reopening of its own,
// no server kept, and its "accept failing" line's time forgotten: the map
// kept one for every address that ever ran out of descriptors), and Run
// ends clean. Loopback only.
func TestExplicitRetiredOutOfFDs(t *testing.T) {
	p, logs := loggedExplicitProxy(t)
	cancel, ran := runReady(t, p)
	defer cancel()
	addr := freeAddr3(t)
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0", addr}); err != nil {
		t.Fatal(err)
	}
	answers := explicitAnswers
	if !answers(addr) {
		t.Fatalf("%s does not answer once given", addr)
	}
	servers := func() int { return serverCount(p) }

	connect := testnet.DialQueued(t, addr)
	release := testnet.OutOfFDs(t)
	closeQueued := connect()
	if !waitAcceptFailing(logs) {
		release()
		closeQueued()
		t.Fatalf("the log does not say %q out of descriptors:\n%s", acceptFailingLine, logs())
	}
	time.Sleep(1500 * time.Millisecond) // the pauses are a second long now
	err := p.SetExplicitAddrs([]string{"127.0.0.1:0"})
	release()
	closeQueued()
	if err != nil {
		t.Fatalf("retire %s: %v", addr, err)
	}
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0", addr}); err != nil {
		t.Fatalf("%s given again: %v", addr, err)
	}
	if !answers(addr) {
		t.Errorf("%s given again after its listener was retired out of descriptors: no answer", addr)
	}
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0"}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); servers() != 1; {
		if time.Now().After(deadline) {
			t.Errorf("%d servers kept, want 1 (Run's)", servers())
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s := logs(); strings.Contains(s, "accept on "+addr+" failed") {
		t.Errorf("a retired listener was taken for a failed one:\n%s", s)
	}
	p.limMu.Lock()
	_, kept := p.lastWarn[acceptScope("explicit", addr)]
	p.limMu.Unlock()
	if kept {
		t.Errorf("the retired listener on %s is still in the accept-failing warnings' map: one entry kept for every address that ever ran out of descriptors", addr)
	}
	endRun(t, cancel, ran)
}

// TestExplicitRetiredPauseEnds: an explicit listener retired by
// SetExplicitAddrs while its accept waits out EMFILE ends that wait at
// its close: no accept is tried on it after the close. Before,
// SetExplicitAddrs closed the listener under the RetryListener, whose
// pause (a second long by then) only the proxy's Close ended: the loop
// slept it out, accepted once more on the closed listener (net.ErrClosed)
// and only then went, up to a second later. Observed by the order of
// events on the listener (an accept begun after its Close began), not by
// time: the listener holds its third failing accept's EMFILE until the
// retire is done, so the close comes before the pause that error starts
// has a timer, never as it fires (retired from the test's goroutine
// meanwhile, a loaded box's late wake of the accept loop saw the timer
// and the close at once about one run in six, and accepted once more).
// Loopback only.
func TestExplicitRetiredPauseEnds(t *testing.T) {
	p, logs := loggedExplicitProxy(t)
	cancel, ran := runReady(t, p)
	defer cancel()
	inner, err := net.Listen("tcp", "127.0.0.3:0")
	if err != nil {
		t.Fatalf("no 127.0.0.3 (Linux's lo holds 127.0.0.0/8): %v", err)
	}
	addr := inner.Addr().String()
	ln := &orderListener{Listener: inner, holdAt: 3, held: make(chan struct{}), resume: make(chan struct{})}
	p.explicitMu.Lock()
	p.explicitLns[addr] = ln
	p.explicitMu.Unlock()
	kept := make(chan struct{})
	go func() { p.keepExplicit(addr, ln); close(kept) }()

	connect := testnet.DialQueued(t, addr)
	release := testnet.OutOfFDs(t)
	defer release()
	defer connect()()
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			close(ln.resume)
		}
	}
	defer resume()
	select {
	case <-ln.held:
	case <-time.After(10 * time.Second):
		release()
		t.Fatalf("no third failing accept on %s out of descriptors:\n%s", addr, logs())
	}
	if !strings.Contains(logs(), acceptFailingLine) {
		t.Errorf("the log does not say %q at the third failing accept:\n%s", acceptFailingLine, logs())
	}
	if err := p.SetExplicitAddrs([]string{"127.0.0.1:0"}); err != nil {
		resume()
		t.Fatalf("retire %s: %v", addr, err)
	}
	resume()
	select {
	case <-kept:
	case <-time.After(5 * time.Second):
		release()
		t.Fatalf("keepExplicit of %s has not returned 5 s after the listener was retired", addr)
	}
	release()
	if n := ln.afterClose.Load(); n != 0 {
		t.Errorf("%d accepts on %s begun after its Close: the pause went on past the retiring close", n, addr)
	}
	endRun(t, cancel, ran)
}

// orderListener counts the accepts begun after its Close began. Its
// holdAt-th failing accept (if holdAt is not 0) closes held and returns
// its error only once resume is closed.
type orderListener struct {
	net.Listener
	closed     atomic.Bool
	afterClose atomic.Int64

	holdAt       int64
	failed       atomic.Int64
	held, resume chan struct{}
}

func (l *orderListener) Accept() (net.Conn, error) {
	if l.closed.Load() {
		l.afterClose.Add(1)
	}
	c, err := l.Listener.Accept()
	if err != nil && l.holdAt != 0 && l.failed.Add(1) == l.holdAt {
		close(l.held)
		<-l.resume
	}
	return c, err
}

func (l *orderListener) Close() error {
	l.closed.Store(true)
	return l.Listener.Close()
}

// TestAcceptFailingNamesListener: the transparent and an explicit
// listener out of descriptors at once each have their "accept failing"
// line, naming its address and kind. Before, one line (rate-limited for
// the proxy as a whole) named whichever listener failed first, and the
// other's failure went unsaid. Loopback only.
func TestAcceptFailingNamesListener(t *testing.T) {
	eng, err := policy.Compile("p", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	var logs lockedBuf
	p, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	lns := map[string]net.Listener{}
	for _, kind := range []string{"transparent", "explicit"} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[kind] = ln
	}
	go p.Serve(lns["transparent"])
	go p.ServeExplicit(lns["explicit"])
	var connects []func() func()
	for _, ln := range lns {
		connects = append(connects, testnet.DialQueued(t, ln.Addr().String()))
	}
	release := testnet.OutOfFDs(t)
	defer release()
	for _, c := range connects {
		defer c()()
	}
	want := func(kind string) string { return fmt.Sprintf("kind=%s listen=%s", kind, lns[kind].Addr()) }
	logged := func(kind string) bool {
		return slices.ContainsFunc(logs.lines(), func(l string) bool {
			return strings.Contains(l, `msg="proxy: accept failing: retrying"`) && strings.Contains(l, want(kind))
		})
	}
	has := func() bool { return logged("transparent") && logged("explicit") }
	for deadline := time.Now().Add(10 * time.Second); !has() && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	release()
	if !has() {
		t.Errorf("the log does not have %q and %q:\n%s", want("transparent"), want("explicit"), strings.Join(logs.lines(), "\n"))
	}
}

// acceptFailingLine is the proxy's line for an accept waiting out EMFILE.
const acceptFailingLine = "proxy: accept failing: retrying"

// waitAcceptFailing waits, at most 10 s, for logs to have
// acceptFailingLine; false if it does not.
func waitAcceptFailing(logs func() string) bool {
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs(), acceptFailingLine); {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// TestExplicitReservedOutOfFDsWarnsOnce: an explicit address whose
// listener runs out of descriptors, is retired and given again, out of
// descriptors again each time, says "accept failing" once for each
// listener, at its first failure (its time forgotten once the last one
// was served no more), and not at each of the failures that follow
// (the wrapper's pauses, 5 ms doubling): no line a failure however often
// the address is served again. Two limits keep it so, the wrapper's
// (netutil.RetryListener, one line a listener every 10 s) and the proxy's
// (acceptFailing, one an address every 10 s, forgotten at the retire):
// with both dropped, each failure was a line. That the time is forgotten
// is TestExplicitRetiredOutOfFDs's check (here the wait for each line,
// up to 10 s, would outlast a line held back). Loopback only.
func TestExplicitReservedOutOfFDsWarnsOnce(t *testing.T) {
	p, logs := loggedExplicitProxy(t)
	cancel, ran := runReady(t, p)
	defer cancel()
	addr := freeAddr3(t)
	count := func() int {
		n := 0
		for _, l := range strings.Split(logs(), "\n") {
			if strings.Contains(l, acceptFailingLine) && strings.Contains(l, "listen="+addr) {
				n++
			}
		}
		return n
	}
	servers := func() int { return serverCount(p) }
	const listeners = 3
	for i := range listeners {
		if err := p.SetExplicitAddrs([]string{"127.0.0.1:0", addr}); err != nil {
			t.Fatalf("listener %d: %v", i, err)
		}
		connect := testnet.DialQueued(t, addr)
		release := testnet.OutOfFDs(t)
		closeQueued := connect()
		for deadline := time.Now().Add(10 * time.Second); count() < i+1 && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		// The pauses 5, 10, 20, 40, 80 and 160 ms: six failures more.
		time.Sleep(400 * time.Millisecond)
		err := p.SetExplicitAddrs([]string{"127.0.0.1:0"})
		release()
		closeQueued()
		if err != nil {
			t.Fatalf("retire listener %d: %v", i, err)
		}
		if n := count(); n != i+1 {
			t.Errorf("after listener %d's failures the log says %q %d times for %s, want %d (once a listener)", i, acceptFailingLine, n, addr, i+1)
		}
		for deadline := time.Now().Add(10 * time.Second); servers() != 1; {
			if time.Now().After(deadline) {
				t.Fatalf("listener %d: %d servers kept, want 1 (Run's)", i, servers())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	endRun(t, cancel, ran)
}

// freeAddr3 is a free loopback address on 127.0.0.3 (a port listened on
// and closed).
func freeAddr3(t *testing.T) string {
	t.Helper()
	free, err := net.Listen("tcp", "127.0.0.3:0")
	if err != nil {
		t.Fatalf("no 127.0.0.3 (Linux's lo holds 127.0.0.0/8): %v", err)
	}
	defer free.Close()
	return free.Addr().String()
}

// serverCount is how many explicit servers p keeps (Run's and each
// listener's not yet retired).
func serverCount(p *Proxy) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.servers)
}
