package dnsfilter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
	"github.com/miekg/dns"
	dto "github.com/prometheus/client_model/go"
)

// tcpClient opens a client TCP connection from the loopback address src
// and asks one allowed name on it; ok says whether an answer came.
func tcpClient(t *testing.T, src, addr string) (c *dns.Conn, ok bool) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 3 * time.Second}
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	c = &dns.Conn{Conn: nc}
	t.Cleanup(func() { _ = c.Close() })
	m := new(dns.Msg)
	m.SetQuestion("a.allowed.test.", dns.TypeA)
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if err := c.WriteMsg(m); err != nil {
		return c, false
	}
	r, err := c.ReadMsg()
	return c, err == nil && r.Id == m.Id && r.Rcode == dns.RcodeSuccess
}

func tcpRefusedCount(t *testing.T, s *Server, scope string) float64 {
	t.Helper()
	var m dto.Metric
	if err := s.m.tcpRefused.WithLabelValues(scope).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestTCPConnectionLimits: client TCP connections are capped per client
// address and overall; one over a cap is closed unanswered, counted by
// scope, and its slot comes back when a connection closes.
func TestTCPConnectionLimits(t *testing.T) {
	up := newFakeUpstream(t, "a.allowed.test. 300 IN A 192.0.2.1\n")
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, TCPMaxConns: 5, TCPMaxConnsPerClient: 3}, Deps{})

	var held []*dns.Conn
	for i := range 3 {
		c, ok := tcpClient(t, "127.0.0.2", ts.Addr)
		if !ok {
			t.Fatalf("connection %d of 127.0.0.2 (under both limits) got no answer", i+1)
		}
		held = append(held, c)
	}
	if _, ok := tcpClient(t, "127.0.0.2", ts.Addr); ok {
		t.Error("a fourth connection of 127.0.0.2 was answered: the per-client limit of 3 did not hold")
	}
	for i := range 2 {
		if _, ok := tcpClient(t, "127.0.0.3", ts.Addr); !ok {
			t.Fatalf("connection %d of 127.0.0.3 (under both limits) got no answer", i+1)
		}
	}
	if _, ok := tcpClient(t, "127.0.0.4", ts.Addr); ok {
		t.Error("a sixth connection overall was answered: the global limit of 5 did not hold")
	}
	if got := tcpRefusedCount(t, ts.Server, "client"); got != 1 {
		t.Errorf("tcp_refused_total{scope=client} = %v, want 1", got)
	}
	if got := tcpRefusedCount(t, ts.Server, "global"); got != 1 {
		t.Errorf("tcp_refused_total{scope=global} = %v, want 1", got)
	}

	// A closed connection gives its slot back (once the server has seen
	// the close).
	_ = held[0].Close()
	deadline := time.Now().Add(3 * time.Second)
	for {
		if _, ok := tcpClient(t, "127.0.0.2", ts.Addr); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("127.0.0.2 closed a connection, and a new one was still refused 3 s later")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestTCPConnectionLimitsDefault: the defaults are on, and a negative
// setting turns a limit off.
func TestTCPConnectionLimitsDefault(t *testing.T) {
	c := Config{}.withDefaults()
	if c.TCPMaxConns != defaultTCPMaxConns || c.TCPMaxConnsPerClient != defaultTCPMaxPerClient {
		t.Errorf("defaults %d / %d, want %d / %d", c.TCPMaxConns, c.TCPMaxConnsPerClient, defaultTCPMaxConns, defaultTCPMaxPerClient)
	}
	up := newFakeUpstream(t, "a.allowed.test. 300 IN A 192.0.2.1\n")
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, TCPMaxConns: -1, TCPMaxConnsPerClient: -1}, Deps{})
	for i := range defaultTCPMaxPerClient + 2 {
		if _, ok := tcpClient(t, "127.0.0.2", ts.Addr); !ok {
			t.Fatalf("connection %d got no answer with the limits disabled", i+1)
		}
	}
}

// TestTCPIdleClientsCut (THREATS.md G2): a client TCP connection that never
// sends a query, or goes quiet after one, is closed by the forwarder on its
// own: the read timeout for the first query, TCPIdleTimeout between
// queries. A client cannot hold connection slots by sitting on them.
func TestTCPIdleClientsCut(t *testing.T) {
	up := newFakeUpstream(t, "a.allowed.test. 300 IN A 192.0.2.1\n")
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, TCPIdleTimeout: 500 * time.Millisecond}, Deps{})
	closedWithin := func(c net.Conn, d time.Duration) error {
		c.SetReadDeadline(time.Now().Add(d))
		var b [1]byte
		_, err := c.Read(b[:])
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return fmt.Errorf("still open after %v", d)
		}
		return nil
	}
	silent, err := net.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c, ok := tcpClient(t, "127.0.0.2", ts.Addr)
	if !ok {
		t.Fatal("the query before going idle got no answer")
	}
	if err := closedWithin(c.Conn, 4*time.Second); err != nil {
		t.Errorf("idle after a query, with TCPIdleTimeout 500ms: %v", err)
	}
	if err := closedWithin(silent, 8*time.Second); err != nil {
		t.Errorf("connected, never sent a query: %v", err)
	}
}

// TestTCPAcceptOutOfFDsStops: a TCP accept out of file descriptors waits
// with a pause growing to a second (tcpLimited); the server stopped
// meanwhile, by its context as egressd stops it, returns without waiting
// the pause out, and no accept is tried again on the listener before
// shutdown closes it. Before, the accept gave miekg/dns the temporary
// EMFILE error back once done was closed, and miekg/dns retries a
// temporary error at once: the loop spun (an accept, EMFILE, back) until
// the listener's close. The listener here (tcpWrap) counts the accepts
// begun after done is closed, and its Close waits 50 ms before closing
// the socket, as a shutdown slow to reach it: a spinning loop made
// thousands of accepts meanwhile, one that stopped makes at most the one
// a pause's end began as done closed. The time it takes is logged; the
// test fails only past 5 s (a hang), not on speed.
func TestTCPAcceptOutOfFDsStops(t *testing.T) {
	var logs syncBuffer
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, UDPReaders: 1, ClientRate: -1},
		Deps{Policy: compile(t, gatePolicy), Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var cl *countingListener
	s.tcpWrap = func(l net.Listener) net.Listener {
		cl = &countingListener{Listener: l, done: s.done}
		return cl
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	select {
	case <-s.Ready():
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	addr := s.Addrs()[0].String()

	connect := testnet.DialQueued(t, addr) // the socket made while descriptors are free
	release := testnet.OutOfFDs(t)
	defer connect()() // waits in the queue: accept has no descriptor
	const warn = "dnsfilter: tcp accept failing: retrying"
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), warn) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), warn) {
		release()
		t.Fatalf("the log does not say %q out of descriptors: %s", warn, logs.String())
	}
	// 5 ms doubling: past 1.3 s each pause is a second long.
	time.Sleep(1500 * time.Millisecond)

	start := time.Now()
	cancel()
	select {
	case err := <-done:
		t.Logf("Run returned %v after the cancel, out of descriptors", time.Since(start))
		if err != nil {
			t.Errorf("run: %v", err)
		}
	case <-time.After(5 * time.Second):
		release()
		t.Fatalf("Run has not returned 5 s after the cancel while accept waited out EMFILE")
	}
	release()
	n, errs := cl.afterDone.Load(), cl.errsAfterDone.Load()
	t.Logf("%d accepts begun after done was closed, %d of them failing before the listener closed", n, errs)
	if n > 1 {
		t.Errorf("%d accepts begun after shutdown began (%d failing), want at most 1: the accept loop spun until the listener closed", n, errs)
	}
}

// countingListener counts the accepts begun once done is closed, and
// those of them that failed while the listener was still open; its
// Close waits closeDelay before closing the socket.
type countingListener struct {
	net.Listener
	done          <-chan struct{}
	afterDone     atomic.Int64
	errsAfterDone atomic.Int64
	closed        atomic.Bool
	closeOnce     sync.Once
}

const closeDelay = 50 * time.Millisecond

func (l *countingListener) Accept() (net.Conn, error) {
	select {
	case <-l.done:
		l.afterDone.Add(1)
		c, err := l.Listener.Accept()
		if err != nil && !l.closed.Load() {
			l.errsAfterDone.Add(1)
		}
		return c, err
	default:
		return l.Listener.Accept()
	}
}

func (l *countingListener) Close() error {
	l.closeOnce.Do(func() {
		time.Sleep(closeDelay)
		l.closed.Store(true)
	})
	return l.Listener.Close()
}

// TestTCPServedAfterClose: a TCP server's end between Close and Run's
// shutdown (done closed, closing not yet set: an accept's pause ended by
// done, net.ErrClosed) is a clean stop, not Run's error; an end while
// the server runs on is one. Run's own goroutines leave that gap to the
// scheduler, so the server here is marked running, as Run marks it, and
// is not run.
func TestTCPServedAfterClose(t *testing.T) {
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, ClientRate: -1}, Deps{Policy: compile(t, gatePolicy)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.shutdown()
	if err := s.tcpServed(net.ErrClosed); !errors.Is(err, net.ErrClosed) {
		t.Errorf("ended while running: %v, want net.ErrClosed", err)
	}
	s.mu.Lock()
	s.running = true // Close leaves the shutdown to Run
	s.mu.Unlock()
	s.Close()
	if s.closing.Load() {
		t.Fatal("closing set by Close of a running server: the gap is not there to test")
	}
	if err := s.tcpServed(net.ErrClosed); err != nil {
		t.Errorf("ended after Close, before shutdown: %v, want nil (a clean stop)", err)
	}
}
