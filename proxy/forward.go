package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// dial connects to the destination with the dial timeout. The connection
// has no keepalive yet: trackDialed gives it one once it has lived
// keepAliveAfter (most connections end before, and never need it).
func (p *Proxy) dial(ctx context.Context, dest netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.DialTimeout)
	defer cancel()
	return p.deps.Dial(ctx, "tcp", dest.String())
}

// Lazy keepalive on dialed connections. Four setsockopt calls per
// connection were about 3 % of the proxy's CPU per new connection, for an
// option that only matters to a connection idle for the keepalive period
// (30 s by default). So a dialed connection is registered with its time
// (trackDialed), and a sweep every keepAliveSweep sets keepalive on those
// older than keepAliveAfter: a tunnel gets it between 5 and 10 s into its
// life, and its first probe comes at most that much later than if it had
// been set at the dial. Accepted connections inherit theirs from the
// listener at no cost (listenTransparent).
const (
	keepAliveAfter = 5 * time.Second
	keepAliveSweep = 5 * time.Second
)

// dialedConn is the connection set's value for a dialed connection that
// has no keepalive yet.
type dialedConn struct{ at time.Time }

// trackDialed is trackConn for a connection dial made: it also schedules
// its keepalive (none when Config.KeepAlive is negative).
func (p *Proxy) trackDialed(c net.Conn) bool {
	if p.cfg.KeepAlive < 0 {
		return p.trackConn(c)
	}
	p.sweepOnce.Do(func() { go p.keepAliveSweeper(keepAliveSweep) })
	return p.trackConnValue(c, &dialedConn{at: time.Now()})
}

// keepAliveSweeper sweeps every interval until the proxy is closed.
func (p *Proxy) keepAliveSweeper(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-p.done:
			return
		case now := <-t.C:
			p.sweepKeepAlive(now)
		}
	}
}

// sweepKeepAlive sets keepalive on the dialed connections registered
// before now minus keepAliveAfter, once each.
func (p *Proxy) sweepKeepAlive(now time.Time) {
	p.conns.Range(func(k, v any) bool {
		d, ok := v.(*dialedConn)
		if !ok || now.Sub(d.at) < keepAliveAfter {
			return true
		}
		// Only while still tracked: a connection untracked meanwhile
		// stays out of the set.
		if p.conns.CompareAndSwap(k, v, struct{}{}) {
			p.setKeepAlive(k.(net.Conn))
		}
		return true
	})
}

// keepAliveControl is a ListenConfig's Control: it sets the configured
// keepalive on the listening socket. A connection accepted from it
// inherits its keepalive settings (Linux copies them and starts the
// timer), so an accepted connection never pays these four system calls
// (on an established socket they also run the receive backlog under the
// socket lock, in the path of the ClientHello).
func (p *Proxy) keepAliveControl(_, _ string, rc syscall.RawConn) error {
	if p.cfg.KeepAlive < 0 {
		return nil // new sockets have no keepalive
	}
	var serr error
	err := rc.Control(func(fd uintptr) { serr = setKeepAliveFD(int(fd), p.cfg.KeepAlive) })
	if err != nil {
		return err
	}
	return serr
}

// setKeepAliveFD turns keepalive on with idle (rounded up to a second)
// and Go's default probes: every 15 s, 9 of them.
func setKeepAliveFD(fd int, idle time.Duration) error {
	secs := int((idle + time.Second - 1) / time.Second)
	for _, o := range []struct{ level, opt, v int }{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, secs},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return fmt.Errorf("proxy: keepalive: %w", err)
		}
	}
	return nil
}

// listenTransparent opens the transparent listener with the keepalive its
// connections inherit (handleTransparent then sets none) and, when the
// first-byte wait is a second or more, TCP_DEFER_ACCEPT (deferAcceptControl).
func (p *Proxy) listenTransparent(ctx context.Context, addr string) (net.Listener, error) {
	drop := p.dropFromNow(0)
	lc := net.ListenConfig{KeepAlive: -1, Control: func(network, address string, rc syscall.RawConn) error {
		if err := dropControl(rc, drop); err != nil {
			return err
		}
		if err := p.keepAliveControl(network, address, rc); err != nil {
			return err
		}
		p.deferAccept = p.cfg.FirstByteWait >= deferAcceptWait && deferAcceptControl(rc) == nil
		return nil
	}}
	lc.SetMultipathTCP(false) // see listenExplicit
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if err := p.opensListener(0, ln, drop); err != nil {
		return nil, err
	}
	p.kaListener = ln
	return ln, nil
}

// listenExplicit opens the explicit proxy's listener with the keepalive
// its connections inherit (as listenTransparent's: Go's default would set
// it again on every accepted connection, four system calls each) and
// TCP_DEFER_ACCEPT: its clients always speak first (a request head), so
// accept returns once the head is there.
func (p *Proxy) listenExplicit(ctx context.Context, addr string) (net.Listener, error) {
	drop := p.dropFromNow(1)
	lc := net.ListenConfig{KeepAlive: -1, Control: func(network, address string, rc syscall.RawConn) error {
		if err := dropControl(rc, drop); err != nil {
			return err
		}
		if err := p.keepAliveControl(network, address, rc); err != nil {
			return err
		}
		deferAcceptControl(rc) // without it, accept returns earlier: no harm
		return nil
	}}
	// Plain TCP, not MPTCP (Go's default for listeners where the kernel
	// has it): an MPTCP socket refuses a socket filter (EOPNOTSUPP), and
	// SetDropFrom may attach one later. Before the filters, a listener
	// with none was MPTCP there, and one with a filter plain TCP (Go
	// falls back when Control fails).
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if err := p.opensListener(1, ln, drop); err != nil {
		return nil, err
	}
	return ln, nil
}

// deferAcceptWait is how long the kernel holds a connection whose client
// has sent nothing before accept returns it anyway: TCP_DEFER_ACCEPT of one
// second is one retransmission of the SYN-ACK, after the initial RTO of 1 s
// (the next ACK from the client then completes the accept).
const deferAcceptWait = time.Second

// deferAcceptControl sets TCP_DEFER_ACCEPT on a listening socket: accept
// returns a connection once its first data (the ClientHello, the request
// head) has arrived, or after deferAcceptWait of silence. The proxy's first
// read then finds the bytes there instead of parking the connection's
// goroutine until they come: one wakeup and one failed read fewer per
// connection. A client that closes without sending still reaches accept at
// once (its FIN is not a bare ACK). The first-byte wait after accept does
// not count again what the kernel already waited (firstBytes).
func deferAcceptControl(rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, int(deferAcceptWait/time.Second))
	}); err != nil {
		return err
	}
	return serr
}

func (p *Proxy) setKeepAlive(c net.Conn) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	if p.cfg.KeepAlive < 0 {
		tc.SetKeepAlive(false)
		return
	}
	// Idle the configured period, then probes at Go's defaults (15 s, 9
	// of them), as the dialer and listener defaults this replaces set.
	tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: p.cfg.KeepAlive})
}

// Close reasons recorded in events.
const (
	closeClient   = "client-closed"
	closeServer   = "server-closed"
	closeReset    = "reset"
	closeDenied   = "denied"
	closeDial     = "dial-failed"
	closeShutdown = "shutdown"
	closeLimit    = "limit"
	closeEarly    = "client-closed-early"
	closeHalfIdle = "half-close-timeout"
	closeRevoked  = "policy-revoked" // a reload's policy denies it (enforce): both sides closed (Redecide)
)

// tunnel forwards both directions of an established connection, each on
// its own goroutine, and reports once both have ended. The goroutine that
// accepted and peeked (whose stack grew in crypto/tls) does not stay
// around for the tunnel's life: an idle tunnel is two small goroutines
// blocked in splice.
type tunnel struct {
	p              *Proxy
	client, server net.Conn
	pending        atomic.Int32 // directions still running
	first          atomic.Int32 // which direction ended first: 1 up (client closed), 2 down
	out, in        int64        // written by their direction before pending drops
	errOut, errIn  error
	done           func(out, in int64, reason string)
	// halfClosed is set when one direction has ended cleanly; from then on
	// the other direction's source gets an idle read deadline.
	halfClosed atomic.Bool
	halfIdle   time.Duration // Config.HalfCloseTimeout; <= 0: none

	// up, when set, replaces the spliced client-to-server copy (plain
	// HTTP: every request decided, httpstream.go).
	up func(t *tunnel) (int64, error)
	// denyMu guards a final answer for the client (a 403 for a request
	// refused mid-connection): it is written once the server's bytes have
	// all been forwarded, so that it follows the earlier responses.
	denyMu    sync.Mutex
	denyPage  []byte
	downEnded bool
}

// setDeny queues page for the client after the server's last byte; false
// when the server-to-client direction has already ended (the client's
// write half is closed).
func (t *tunnel) setDeny(page []byte) bool {
	t.denyMu.Lock()
	defer t.denyMu.Unlock()
	if t.downEnded {
		return false
	}
	t.denyPage = page
	return true
}

// sendDeny writes the queued answer, if any, when the server-to-client
// direction ends; it reports whether there was one.
func (t *tunnel) sendDeny() bool {
	t.denyMu.Lock()
	t.downEnded = true
	page := t.denyPage
	t.denyMu.Unlock()
	if page != nil {
		t.client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		t.client.Write(page)
	}
	return page != nil
}

// idle is the deadline refresher the copy loops call after moving bytes:
// once the tunnel is half-closed, each read must come within halfIdle.
func (t *tunnel) idle(src net.Conn) func() {
	if t.halfIdle <= 0 {
		return nil
	}
	return func() {
		if t.halfClosed.Load() {
			src.SetReadDeadline(time.Now().Add(t.halfIdle))
		}
	}
}

// halfClose marks the tunnel half-closed and starts the idle deadline of
// the direction still running, which reads from src.
func (t *tunnel) halfClose(src net.Conn) {
	if t.halfIdle <= 0 {
		return
	}
	t.halfClosed.Store(true)
	src.SetReadDeadline(time.Now().Add(t.halfIdle))
}

// startTunnel copies client ⇄ server. Between two *net.TCPConn it uses
// splice(2) (spliceCopy), so the bytes stay in the kernel. Half closes are propagated;
// a reset on either side tears both down. Established tunnels have no idle
// timeout. done is called once, after both directions ended and both
// connections are closed.
func (p *Proxy) startTunnel(client, server net.Conn, done func(out, in int64, reason string)) {
	p.startTunnelUp(client, server, nil, done)
}

// startTunnelUp is startTunnel with up, when not nil, as the
// client-to-server copy.
func (p *Proxy) startTunnelUp(client, server net.Conn, up func(*tunnel) (int64, error), done func(out, in int64, reason string)) {
	t := &tunnel{p: p, client: client, server: server, done: done, halfIdle: p.cfg.HalfCloseTimeout, up: up}
	t.pending.Store(2)
	go t.upstream()
	go t.downstream()
}

func (t *tunnel) upstream() {
	var n int64
	var err error
	if t.up != nil {
		n, err = t.up(t)
	} else {
		n, err = copyConn(t.server, t.client, t.idle(t.client))
	}
	t.out, t.errOut = n, err
	// Marked before the end is passed on: the other side's close that
	// it causes (an echo, a server that closes on EOF) must not be
	// marked first.
	t.first.CompareAndSwap(0, 1)
	if err == nil {
		closeWrite(t.server)
		t.halfClose(t.server)
	} else {
		t.client.Close()
		t.server.Close()
	}
	t.end()
}

func (t *tunnel) downstream() {
	n, err := copyConn(t.client, t.server, t.idle(t.server))
	t.in, t.errIn = n, err
	t.first.CompareAndSwap(0, 2) // before the end is passed on (upstream)
	denied := t.sendDeny()
	if err == nil {
		closeWrite(t.client)
		if !denied { // after a deny, the client's side drains on its own deadline
			t.halfClose(t.client)
		}
	} else {
		t.client.Close()
		t.server.Close()
	}
	t.end()
}

func (t *tunnel) end() {
	if t.pending.Add(-1) != 0 {
		return
	}
	t.client.Close()
	t.server.Close()
	reason := closeServer
	switch {
	case errors.Is(t.errOut, os.ErrDeadlineExceeded) || errors.Is(t.errIn, os.ErrDeadlineExceeded):
		reason = closeHalfIdle
	case t.errOut != nil || t.errIn != nil:
		reason = closeReset
	case t.first.Load() == 1:
		reason = closeClient
	}
	select {
	case <-t.p.done:
		reason = closeShutdown
	default:
	}
	// The record and its log line on a kept goroutine: this one's stack
	// is the small one a splice loop needs (workers).
	t.p.work.run(func() { t.done(t.out, t.in, reason) })
}

// pipe is startTunnel that waits for the end.
func (p *Proxy) pipe(client, server net.Conn) (out, in int64, reason string) {
	ch := make(chan struct{})
	p.startTunnel(client, server, func(o, i int64, r string) {
		out, in, reason = o, i, r
		close(ch)
	})
	<-ch
	return out, in, reason
}

func closeWrite(c net.Conn) {
	type cw interface{ CloseWrite() error }
	if w, ok := c.(cw); ok {
		w.CloseWrite()
		return
	}
	c.Close()
}

// lingerClose half-closes c after a final answer and drains what the
// client still sends for a moment, so that the answer is read before the
// kernel would answer unread data with a reset.
func lingerClose(c net.Conn) {
	closeWrite(c)
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.CopyN(io.Discard, c, 64<<10)
	c.Close()
}
