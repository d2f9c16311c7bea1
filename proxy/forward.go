package proxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"time"
)

// dial connects to the destination with the dial timeout and sets TCP
// keepalive on the connection.
func (p *Proxy) dial(ctx context.Context, dest netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.DialTimeout)
	defer cancel()
	c, err := p.deps.Dial(ctx, "tcp", dest.String())
	if err != nil {
		return nil, err
	}
	p.setKeepAlive(c)
	return c, nil
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
	tc.SetKeepAlive(true)
	tc.SetKeepAlivePeriod(p.cfg.KeepAlive)
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
)

type copyResult struct {
	n   int64
	err error
}

// upstreamCopier copies client → server in its own goroutine; a named type
// so stacks of long-lived tunnels read well.
type upstreamCopier struct {
	client, server net.Conn
	done           chan<- copyResult
}

func (u upstreamCopier) run() {
	n, err := io.Copy(u.server, u.client)
	if err == nil {
		closeWrite(u.server)
	} else {
		// A reset: end the other direction too.
		u.client.Close()
		u.server.Close()
	}
	u.done <- copyResult{n, err}
}

// pipe copies both ways until both directions ended, propagating half
// closes. Between two *net.TCPConn io.Copy uses splice(2), so the bytes
// stay in the kernel. It returns the bytes each way and the close reason.
// Established tunnels have no idle timeout.
func (p *Proxy) pipe(client, server net.Conn) (out, in int64, reason string) {
	done := make(chan copyResult, 1)
	go upstreamCopier{client: client, server: server, done: done}.run()

	nIn, errIn := io.Copy(client, server)
	var up copyResult
	got := false
	select {
	case up = <-done:
		got = true
	default:
	}
	switch {
	case errIn != nil:
		client.Close()
		server.Close()
		reason = closeReset
	case got && up.err == nil:
		closeWrite(client)
		reason = closeClient
	default:
		closeWrite(client)
		reason = closeServer
	}
	if !got {
		up = <-done
	}
	if up.err != nil {
		reason = closeReset
	}
	select {
	case <-p.done:
		reason = closeShutdown
	default:
	}
	client.Close()
	server.Close()
	return up.n, nIn, reason
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
