package dnsfilter

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"egressd/audit"
	"egressd/internal/netutil"
)

// tcpWriteTimeout bounds one write of an answer to a TCP client.
const tcpWriteTimeout = 2 * time.Second

// tcpLingerTime and tcpLingerBytes bound how long and how much of a
// client's leftover bytes a closing connection reads and discards after
// its last answer (tcpConn.linger).
const (
	tcpLingerTime  = 2 * time.Second
	tcpLingerBytes = 64 << 10
)

// tcpLimits caps the client TCP connections of every listen address
// together, overall and per client (a LAN device where Deps.Devices names
// one for the address, else the address: netutil.ClientSlots). miekg/dns
// reads a message's
// whole announced length (up to 64 KiB) before the bytes arrive and keeps
// a goroutine per connection, with no limit of its own: without one, a
// client opening a thousand connections that each announce 65,535 bytes
// held 63 MB of heap until the read timeout. unbound and dnsmasq cap
// their incoming TCP connections too. A connection over a limit is closed
// as soon as it is accepted.
type tcpLimits struct {
	slots *netutil.ClientSlots

	mu       sync.Mutex           // guards lastWarn
	lastWarn map[string]time.Time // per scope, to keep the log line rate-limited
}

// tcpLimited wraps a TCP listener of the server with its limits and the
// write deadline, over a netutil.RetryListener: that waits out an
// accept's error worth retrying on the same listener (out of file
// descriptors, EMFILE and ENFILE; out of memory or socket buffers, ENOMEM
// and ENOBUFS) with a growing pause, 5 ms to a second, and says so in the
// log at most every 10 s. miekg/dns retries a temporary error at once,
// and the connection waiting in the queue fails each accept again: without
// the pause the loop spun a core for as long as the descriptors were out
// (TestFDExhaustion). Shutdown (done closed) ends a pause with
// net.ErrClosed, which miekg/dns does not retry: giving it the temporary
// error back had it spin until shutdown closed the listener
// (TestTCPAcceptNoSpinAtShutdown).
func (s *Server) tcpLimited(l net.Listener) net.Listener {
	rl := netutil.NewRetryListener(l, s.done, func(err error) {
		s.log.Warn("dnsfilter: tcp accept failing: retrying", "listen", l.Addr().String(), audit.LogError, audit.ErrorText(err))
	})
	return tcpListener{Listener: rl, s: s}
}

// tcpListener accepts client TCP connections under the server's limits
// and gives each write a deadline: miekg/dns v1 documents
// Server.WriteTimeout but never applies it, so a client that pipelines
// queries and never reads its answers would block the connection's
// goroutine in Write for as long as it stays connected, keeping its
// descriptor, and with it ShutdownContext (which waits for every
// connection) and so Run.
type tcpListener struct {
	net.Listener // a netutil.RetryListener (tcpLimited)
	s            *Server
}

// Accept accepts the next connection under the limits; one over them is
// closed at once.
func (l tcpListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		client := netip.Addr{}
		if ap, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			client = ap.AddrPort().Addr().Unmap()
		}
		if l.s.acquireTCP(client) {
			return &tcpConn{Conn: c, s: l.s, client: client}, nil
		}
		_ = c.Close()
	}
}

// acquireTCP takes a connection slot for client; false when a limit is
// hit (and then it logs, at most once a second per scope).
func (s *Server) acquireTCP(client netip.Addr) bool {
	ok, why := s.tcpLim.slots.Acquire(client)
	if ok {
		return true
	}
	s.m.tcpRefused.WithLabelValues(why.Scope).Inc()
	s.warnOnce(why.Scope, time.Second, func() {
		attrs := []any{"scope", why.Scope, "limit", why.Limit, audit.LogClient, client.String()}
		if why.MAC != nil {
			attrs = append(attrs, audit.LogClientMAC, why.MAC.String())
		}
		s.log.Warn("dnsfilter: tcp connection limit reached: closing new connections", append(attrs, "client_conns", why.Client, "total_conns", why.Total)...)
	})
	return false
}

// warnOnce runs warn unless it ran for scope in the last period every:
// a log line rate-limited.
func (s *Server) warnOnce(scope string, every time.Duration, warn func()) {
	t := &s.tcpLim
	t.mu.Lock()
	now := time.Now()
	ok := now.Sub(t.lastWarn[scope]) >= every
	if ok {
		t.lastWarn[scope] = now
	}
	t.mu.Unlock()
	if ok {
		warn()
	}
}

func (s *Server) releaseTCP(client netip.Addr) {
	s.tcpLim.slots.Release(client)
}

// tcpConn is an accepted client connection: it gives each write a
// deadline, and on the first Close (miekg/dns and serveTCP may both close
// it) lingers (linger), then releases its slot.
type tcpConn struct {
	net.Conn
	s      *Server
	client netip.Addr
	closed atomic.Bool
	// broken: a write failed (timed out, perhaps part written): the
	// client is not reading, and the stream is no longer framed.
	broken atomic.Bool
}

func (c *tcpConn) Write(b []byte) (int, error) {
	_ = c.SetWriteDeadline(time.Now().Add(tcpWriteTimeout))
	n, err := c.Conn.Write(b)
	if err != nil {
		c.broken.Store(true)
	}
	return n, err
}

func (c *tcpConn) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return c.Conn.Close()
	}
	defer c.s.releaseTCP(c.client)
	if !c.broken.Load() {
		c.linger()
	}
	return c.Conn.Close()
}

// linger ends the connection's write side (a FIN after the answers
// written) and reads and discards what the client still sends until it
// closes its side, for at most tcpLingerTime and tcpLingerBytes. Closing
// a socket with unread bytes makes the kernel send a RST instead, and a
// client that pipelined more queries than the connection answers
// (Config.TCPMaxQueries) lost answers already written: those its kernel
// held unread, and those ours had not sent yet. Shutdown (lingerCtx)
// cuts it short.
func (c *tcpConn) linger() {
	tc, ok := c.Conn.(*net.TCPConn)
	if !ok || c.s.lingerCtx.Err() != nil || tc.CloseWrite() != nil {
		return
	}
	_ = tc.SetReadDeadline(time.Now().Add(tcpLingerTime))
	stop := context.AfterFunc(c.s.lingerCtx, func() { _ = tc.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	_, _ = io.CopyN(io.Discard, tc, tcpLingerBytes)
}
