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
	ch chan *dns.Msg // buffered 1; nil for an asynchronous wait

	// An asynchronous wait (exchangeAsync): fn is called exactly once, by
	// whoever takes the wait out of pending (the reader with the answer
	// or the socket's error, the timer with the deadline).
	fn    func(*dns.Msg, error)
	timer *time.Timer
}

// deliver hands r (or err) to the waiter; the caller has taken w out of
// pending and holds no lock.
func (w *muxWait) deliver(r *dns.Msg, err error) {
	if w.fn == nil {
		if r != nil {
			w.ch <- r
		} else {
			close(w.ch)
		}
		return
	}
	if w.timer != nil {
		w.timer.Stop()
	}
	w.fn(r, err)
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
			ws := make([]*muxWait, 0, len(s.pending))
			for id, w := range s.pending {
				delete(s.pending, id)
				ws = append(ws, w)
			}
			if s.m.cur == s {
				s.m.cur = nil
			}
			s.m.mu.Unlock()
			_ = s.conn.Close()
			for _, w := range ws {
				w.deliver(nil, errMuxClosed)
			}
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
		mine := s.pending[id] == w
		if mine {
			delete(s.pending, id)
		}
		if s.sent >= queriesPerSocket && len(s.pending) == 0 && !s.closed {
			s.closed = true
			_ = s.conn.Close()
		}
		s.m.mu.Unlock()
		if mine {
			w.deliver(r, nil)
		}
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

	done := func() { s.take(id, w) }
	if err := s.send(q); err != nil {
		done()
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

// take removes w from pending if it is still there, and reports whether
// it was: the caller then owns the wait's delivery.
func (s *muxSocket) take(id uint16, w *muxWait) bool {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	mine := s.pending[id] == w
	if mine {
		delete(s.pending, id)
	}
	if s.sent >= queriesPerSocket && len(s.pending) == 0 && !s.closed {
		s.closed = true
		_ = s.conn.Close()
	}
	return mine
}

// send packs and writes q on the socket. A write that fails (a refused
// port, reported by ICMP, or a closed socket) retires the socket: the next
// query opens another.
func (s *muxSocket) send(q *dns.Msg) error {
	wire, err := q.Pack()
	if err != nil {
		return err
	}
	if _, err := s.conn.Write(wire); err != nil {
		m := s.m
		m.mu.Lock()
		if m.cur == s {
			s.retireLocked()
			m.cur = nil
		}
		m.mu.Unlock()
		return err
	}
	return nil
}

// exchangeAsync sends q (its ID is replaced) and returns at once; fn gets
// the answer, or an error at deadline or when the socket fails, exactly
// once, on the socket's reader or a timer goroutine. When exchangeAsync
// itself returns an error, fn is never called.
func (m *udpMux) exchangeAsync(deadline time.Time, q *dns.Msg, fn func(*dns.Msg, error)) error {
	m.mu.Lock()
	s, err := m.socketLocked()
	if err != nil {
		m.mu.Unlock()
		return err
	}
	id := randomID()
	for s.pending[id] != nil {
		id = randomID()
	}
	q.Id = id
	w := &muxWait{q: q, fn: fn}
	s.pending[id] = w
	s.sent++
	// Armed under the lock: the timer's take waits for it, so w.timer is
	// set before anyone can deliver.
	w.timer = time.AfterFunc(time.Until(deadline), func() {
		if s.take(id, w) {
			w.fn(nil, context.DeadlineExceeded)
		}
	})
	m.mu.Unlock()
	if err := s.send(q); err != nil {
		if s.take(id, w) {
			w.timer.Stop()
			return err
		}
		return nil // the reader or the timer took it: fn is called
	}
	return nil
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
