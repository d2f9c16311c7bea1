package dnsfilter

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"egressd/audit"
)

// tcpWriteTimeout bounds one write of an answer to a TCP client.
const tcpWriteTimeout = 2 * time.Second

// tcpLimits caps the client TCP connections of every listen address
// together, overall and per client address. miekg/dns reads a message's
// whole announced length (up to 64 KiB) before the bytes arrive and keeps
// a goroutine per connection, with no limit of its own: without one, a
// client opening a thousand connections that each announce 65,535 bytes
// held 63 MB of heap until the read timeout. unbound and dnsmasq cap
// their incoming TCP connections too. A connection over a limit is closed
// as soon as it is accepted.
type tcpLimits struct {
	max, perClient int // 0: no limit

	mu       sync.Mutex // guards following
	total    int
	perIP    map[netip.Addr]int
	lastWarn map[string]time.Time // per scope, to keep the log line rate-limited
}

// tcpLimited wraps a TCP listener of the server with its limits and the
// write deadline.
func (s *Server) tcpLimited(l net.Listener) net.Listener {
	return tcpListener{Listener: l, s: s}
}

// tcpListener accepts client TCP connections under the server's limits
// and gives each write a deadline: miekg/dns v1 documents
// Server.WriteTimeout but never applies it, so a client that pipelines
// queries and never reads its answers would block the connection's
// goroutine in Write for as long as it stays connected, keeping its
// descriptor, and with it ShutdownContext (which waits for every
// connection) and so Run.
type tcpListener struct {
	net.Listener
	s *Server
}

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
	t := &s.tcpLim
	t.mu.Lock()
	scope := ""
	switch {
	case t.max > 0 && t.total >= t.max:
		scope = "global"
	case t.perClient > 0 && t.perIP[client] >= t.perClient:
		scope = "client"
	default:
		t.total++
		t.perIP[client]++
		t.mu.Unlock()
		return true
	}
	now := time.Now()
	warn := now.Sub(t.lastWarn[scope]) >= time.Second
	if warn {
		t.lastWarn[scope] = now
	}
	n, total := t.perIP[client], t.total
	t.mu.Unlock()
	s.m.tcpRefused.WithLabelValues(scope).Inc()
	if warn {
		limit := t.max
		if scope == "client" {
			limit = t.perClient
		}
		s.log.Warn("dnsfilter: tcp connection limit reached: closing new connections",
			"scope", scope, "limit", limit, audit.LogClient, client.String(), "client_conns", n, "total_conns", total)
	}
	return false
}

func (s *Server) releaseTCP(client netip.Addr) {
	t := &s.tcpLim
	t.mu.Lock()
	t.total--
	if t.perIP[client]--; t.perIP[client] <= 0 {
		delete(t.perIP, client)
	}
	t.mu.Unlock()
}

// tcpConn is an accepted client connection: it releases its slot on the
// first Close (miekg/dns and serveTCP may both close it) and gives each
// write a deadline.
type tcpConn struct {
	net.Conn
	s      *Server
	client netip.Addr
	closed atomic.Bool
}

func (c *tcpConn) Write(b []byte) (int, error) {
	_ = c.SetWriteDeadline(time.Now().Add(tcpWriteTimeout))
	return c.Conn.Write(b)
}

func (c *tcpConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.s.releaseTCP(c.client)
	}
	return c.Conn.Close()
}
