package dnsfilter

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// queriesPerSocket is how many queries one upstream UDP socket carries
// before it is retired and a new one, with a new random source port, takes
// over. Opening a socket per query (what unbound does) costs several system
// calls; sharing one for a few queries keeps both the cost and the window
// an off-path attacker has to guess a port small (THREATS.md E6: every
// query still gets a fresh CSPRNG ID, and a port lives for a handful of
// queries, usually milliseconds).
const queriesPerSocket = 8

// udpMux sends queries to one upstream over a connected UDP socket and
// matches answers to them by ID and question. A reader goroutine per socket
// delivers answers; it exits when the socket is retired and idle, or on
// timeout of its last query.
type udpMux struct {
	up *upstream

	mu   sync.Mutex // guards following
	cur  *muxSocket
	dead bool
}

type muxSocket struct {
	conn *net.UDPConn
	m    *udpMux

	// guarded by m.mu
	pending map[uint16]*muxWait
	sent    int
	closed  bool
}

type muxWait struct {
	q  *dns.Msg
	ch chan *dns.Msg // buffered 1
}

var errMuxClosed = errors.New("upstream socket closed")

// socketLocked returns a socket with room for one more query, opening one
// if needed.
func (m *udpMux) socketLocked() (*muxSocket, error) {
	if m.dead {
		return nil, net.ErrClosed
	}
	if m.cur != nil && m.cur.sent < queriesPerSocket && !m.cur.closed {
		return m.cur, nil
	}
	if m.cur != nil {
		m.cur.retireLocked()
	}
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(m.up.addr))
	if err != nil {
		return nil, err
	}
	s := &muxSocket{conn: c, m: m, pending: make(map[uint16]*muxWait, queriesPerSocket)}
	m.cur = s
	go s.read()
	return s, nil
}

// retireLocked closes the socket once no query waits on it.
func (s *muxSocket) retireLocked() {
	s.sent = queriesPerSocket
	if len(s.pending) == 0 && !s.closed {
		s.closed = true
		_ = s.conn.Close()
	}
}

// readBufs holds the readers' buffers: a socket lives for a handful of
// queries, and a fresh 64 KiB buffer each time (allocated, cleared, and
// soon handed back to the OS) cost a tenth of the miss path's CPU.
var readBufs = sync.Pool{New: func() any { return new([65535]byte) }}

func (s *muxSocket) read() {
	bp := readBufs.Get().(*[65535]byte)
	defer readBufs.Put(bp)
	buf := bp[:]
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			s.m.mu.Lock()
			s.closed = true
			for id, w := range s.pending {
				delete(s.pending, id)
				close(w.ch)
			}
			if s.m.cur == s {
				s.m.cur = nil
			}
			s.m.mu.Unlock()
			_ = s.conn.Close()
			return
		}
		if n < 12 {
			continue
		}
		id := uint16(buf[0])<<8 | uint16(buf[1])
		s.m.mu.Lock()
		w := s.pending[id]
		s.m.mu.Unlock()
		if w == nil {
			continue // unknown ID: late, spoofed or junk
		}
		r := new(dns.Msg)
		if r.Unpack(buf[:n]) != nil || !isAnswerTo(r, w.q) {
			continue // keep waiting for the real answer
		}
		s.m.mu.Lock()
		if s.pending[id] == w {
			delete(s.pending, id)
			w.ch <- r
		}
		if s.sent >= queriesPerSocket && len(s.pending) == 0 && !s.closed {
			s.closed = true
			_ = s.conn.Close()
		}
		s.m.mu.Unlock()
	}
}

// exchange sends q (its ID is replaced) and waits for the answer until
// deadline or ctx is done.
func (m *udpMux) exchange(ctx context.Context, deadline time.Time, q *dns.Msg) (*dns.Msg, error) {
	m.mu.Lock()
	s, err := m.socketLocked()
	if err != nil {
		m.mu.Unlock()
		return nil, err
	}
	id := randomID()
	for s.pending[id] != nil {
		id = randomID()
	}
	q.Id = id
	w := &muxWait{q: q, ch: make(chan *dns.Msg, 1)}
	s.pending[id] = w
	s.sent++
	m.mu.Unlock()

	done := func() {
		m.mu.Lock()
		if s.pending[id] == w {
			delete(s.pending, id)
		}
		if s.sent >= queriesPerSocket && len(s.pending) == 0 && !s.closed {
			s.closed = true
			_ = s.conn.Close()
		}
		m.mu.Unlock()
	}
	wire, err := q.Pack()
	if err != nil {
		done()
		return nil, err
	}
	if _, err := s.conn.Write(wire); err != nil {
		done()
		// A refused port (ICMP) or a closed socket: this socket is no
		// good, the next query opens another.
		m.mu.Lock()
		if m.cur == s {
			s.retireLocked()
			m.cur = nil
		}
		m.mu.Unlock()
		return nil, err
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case r, ok := <-w.ch:
		if !ok {
			return nil, errMuxClosed
		}
		return r, nil
	case <-t.C:
		done()
		return nil, context.DeadlineExceeded
	case <-ctx.Done():
		done()
		return nil, ctx.Err()
	}
}

// close closes every socket; later exchanges fail.
func (m *udpMux) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dead = true
	if m.cur != nil && !m.cur.closed {
		m.cur.closed = true
		_ = m.cur.conn.Close()
	}
}
