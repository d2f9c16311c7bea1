package proxy

import (
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"sync/atomic"

	"egressd/internal/httpwire"
)

// errNoHead: an inspected request whose head the request follower did not
// find (it read the bytes as a body: the two parsers disagree on framing),
// or a follower that stopped at maxFollowedHeads.
var errNoHead = errors.New("proxy: inspected request head not followed")

// maxFollowedHeads bounds the heads found and not yet taken: goproxy reads
// at most a buffer ahead of the request it handles, a few hundred heads at
// most; more are bytes no request is read from (after a WebSocket
// upgrade), and the follower stops.
const maxFollowedHeads = 1024

// clearStream follows the cleartext an inspected connection's client sends
// (after TLS, when it speaks TLS) with an httpwire.ReqStream, as the
// transparent proxy follows plain HTTP without inspection, and keeps, for
// each request head it finds, in order, what the head parser said of it.
// goproxy reads requests with net/http, which keeps an absolute-form
// target's authority and drops the Host line that disagrees with it
// (THREATS.md A1): the parser sees the Host line and refuses the head
// (httpwire.ErrHostMismatch), as without inspection.
type clearStream struct {
	mu    sync.Mutex
	s     httpwire.ReqStream
	pend  []byte  // bytes read that the parser has not consumed yet
	heads []error // per head found and not yet taken: nil, or why it is refused
	done  bool    // it follows no more
	// rest is what next says when no head is left: errNoHead, or nil
	// after the parser refused a head (the stream is not followed past
	// it; in enforce mode its 403 closes the connection, in audit mode
	// the rest is decided on what net/http reads, as the transparent
	// proxy gives up following in audit mode).
	rest error
	tls  atomic.Bool
}

func newClearStream(maxHead int) *clearStream {
	return &clearStream{s: httpwire.ReqStream{MaxHead: maxHead}, rest: errNoHead}
}

// feed runs b, the next cleartext bytes read from the client, through the
// parser. A refusal is kept for the head it was found in; the bytes after
// it are not followed.
func (cs *clearStream) feed(b []byte) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.done || len(b) == 0 {
		return
	}
	data := b
	if len(cs.pend) > 0 {
		data = append(cs.pend, b...)
	}
	for len(data) > 0 && !cs.s.Tunnel() {
		n, h, err := cs.s.Next(data)
		if errors.Is(err, httpwire.ErrNeedMore) {
			break
		}
		if err != nil {
			cs.heads, cs.done, cs.pend, cs.rest = append(cs.heads, err), true, nil, nil
			return
		}
		if h != nil {
			if len(cs.heads) >= maxFollowedHeads {
				cs.done, cs.pend = true, nil
				return
			}
			cs.heads = append(cs.heads, nil)
		}
		data = data[n:]
	}
	if cs.s.Tunnel() {
		data = nil
	}
	cs.pend = append(cs.pend[:0:0], data...)
}

// next takes what the parser said of the next request head: nil when it
// found the head and does not refuse it, errNoHead when it did not find
// it.
func (cs *clearStream) next() error {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if len(cs.heads) > 0 {
		err := cs.heads[0]
		cs.heads = cs.heads[1:]
		return err
	}
	return cs.rest
}

// inspectConn is an inspected client connection as goproxy reads it: on
// the first read it terminates TLS itself when the client speaks TLS (the
// bytes written before, goproxy's answer to the CONNECT, go out as they
// are), so that the cleartext passes through the request follower (cs)
// before goproxy's parser. goproxy then sees cleartext and does not
// terminate TLS again; inspectedRequest restores the https scheme.
type inspectConn struct {
	net.Conn                              // the client connection
	tlsConfig func() (*tls.Config, error) // the leaf for the inspected host
	cs        *clearStream
	once      sync.Once
	rd        net.Conn // what reads come from once started
	tc        atomic.Pointer[tls.Conn]
	err       error
}

func (c *inspectConn) start() {
	var b [1]byte
	n, err := c.Conn.Read(b[:])
	if n == 0 {
		c.err = err
		return
	}
	pc := &pipelinedConn{Conn: c.Conn, pre: []byte{b[0]}}
	c.rd = pc
	if b[0] != 0x16 { // not a TLS handshake record: cleartext
		return
	}
	cfg, err := c.tlsConfig()
	if err != nil {
		c.err = err
		return
	}
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"http/1.1"}
	tc := tls.Server(pc, cfg)
	if err := tc.Handshake(); err != nil {
		c.err = err
		return
	}
	c.cs.mu.Lock()
	c.cs.s.TLS = true
	c.cs.mu.Unlock()
	c.cs.tls.Store(true)
	c.tc.Store(tc)
	c.rd = tc
}

func (c *inspectConn) Read(b []byte) (int, error) {
	c.once.Do(c.start)
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.rd.Read(b)
	c.cs.feed(b[:n])
	return n, err
}

func (c *inspectConn) Write(b []byte) (int, error) {
	if tc := c.tc.Load(); tc != nil {
		return tc.Write(b)
	}
	return c.Conn.Write(b)
}

func (c *inspectConn) Close() error {
	if tc := c.tc.Load(); tc != nil {
		return tc.Close()
	}
	return c.Conn.Close()
}
