package dnsfilter

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// queriesPerSocket is how many queries one upstream UDP socket carries
// before it is retired and a new one, with a new random source port, takes
// over; socketMaxAge is the longest a socket takes new queries. Opening a
// socket per query (what unbound does, as a recursive resolver facing
// the internet's authorities) costs several system calls each, and no
// batching; forwarders to a configured upstream share sockets (CoreDNS's
// forward plugin keeps its sockets for up to 10 s, dnsdist one per backend
// by default). We keep the port changing every 64 queries or second
// (THREATS.md E6: an off-path attacker must also guess the query's fresh
// CSPRNG ID, and the question, within the query's round trip).
const (
	queriesPerSocket = 64
	socketMaxAge     = time.Second
)

// muxReadBatch is how many answers a socket's reader takes per recvmmsg,
// and readSlot the size of each buffer: at least our advertised EDNS size
// (Config.UDPSize). A datagram that does not fit (an upstream that ignored
// our size) is fetched again over TCP (errAnswerTooBig).
const (
	muxReadBatch = 16
	minReadSlot  = 4096
)

// udpMux sends queries to one upstream over a connected UDP socket and
// matches answers to them by ID and question. A reader goroutine per socket
// delivers answers, several per system call under load; it exits when the
// socket is retired and idle, or on timeout of its last query.
type udpMux struct {
	up      *upstream
	slot    int                // read buffer size
	answers func(*answerQueue) // sends what a batch of answers queued; nil: none do
	bufs    sync.Pool          // *muxBufs
	queues  sync.Pool          // *answerQueue
	mu      sync.Mutex         // guards following
	cur     *muxSocket
	dead    bool
}

type muxSocket struct {
	conn   *net.UDPConn
	pc     batchConn
	m      *udpMux
	opened time.Time

	// guarded by m.mu
	pending map[uint16]*muxWait
	sent    int
	closed  bool
	// One timer per socket for its asynchronous waits' deadlines (not one
	// per query), armed for the earliest; expire lands the waits whose
	// deadline has passed and re-arms it.
	timer *time.Timer
	armed time.Time // zero: not armed
}

// batchConn is x/net's ipv4 or ipv6 PacketConn: recvmmsg and sendmmsg
// where the system has them, one datagram per call elsewhere.
type batchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	batchWriter
}

// batchWriter sends datagrams with sendmmsg: a batchConn, or a rawUDP.
type batchWriter interface {
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

type muxBufs struct {
	ms []ipv4.Message
}

type muxResult struct {
	r   *dns.Msg
	err error
}

type muxWait struct {
	q  question       // what the answer must repeat
	ch chan muxResult // buffered 1; nil for an asynchronous wait

	// An asynchronous wait (exchangeAsync): to lands exactly once, by
	// whoever takes the wait out of pending (the reader with the answer
	// or the socket's error, the socket's timer at deadline).
	to       landing
	deadline time.Time
}

// landing gets an asynchronous exchange's outcome. aq, when not nil,
// collects the answers it sends, for the socket's reader to send together.
type landing interface {
	land(r *dns.Msg, err error, aq *answerQueue)
}

// question is a query's one question, as its answer must repeat it.
type question struct {
	name          string // with or without the final dot
	qtype, qclass uint16
}

func questionOf(q *dns.Msg) question {
	if len(q.Question) != 1 {
		return question{}
	}
	return question{q.Question[0].Name, q.Question[0].Qtype, q.Question[0].Qclass}
}

// answeredBy reports whether r is a response with q as its only question
// (in any case: RFC 4343). The caller has matched the ID.
func (q question) answeredBy(r *dns.Msg) bool {
	if !r.Response || len(r.Question) != 1 || !optWellFormed(r) {
		return false
	}
	a := r.Question[0]
	return a.Qtype == q.qtype && a.Qclass == q.qclass &&
		strings.EqualFold(strings.TrimSuffix(a.Name, "."), strings.TrimSuffix(q.name, "."))
}

// deliver hands r (or err) to the waiter; the caller has taken w out of
// pending and holds no lock.
func (w *muxWait) deliver(r *dns.Msg, err error, aq *answerQueue) {
	if w.to == nil {
		w.ch <- muxResult{r, err}
		return
	}
	w.to.land(r, err, aq)
}

var (
	errMuxClosed = errors.New("upstream socket closed")
	// errAnswerTooBig: the answer did not fit our read buffer; ask over TCP.
	errAnswerTooBig = errors.New("upstream answer larger than our EDNS buffer size")
)

func newUDPMux(u *upstream, udpSize uint16) *udpMux {
	m := &udpMux{up: u, slot: max(minReadSlot, int(udpSize))}
	m.bufs.New = func() any {
		b := &muxBufs{ms: make([]ipv4.Message, muxReadBatch)}
		for i := range b.ms {
			b.ms[i].Buffers = [][]byte{make([]byte, m.slot)}
		}
		return b
	}
	m.queues.New = func() any { return new(answerQueue) }
	return m
}

// socketLocked returns a socket with room for one more query, opening one
// if needed.
func (m *udpMux) socketLocked(now time.Time) (*muxSocket, error) {
	if m.dead {
		return nil, net.ErrClosed
	}
	if s := m.cur; s != nil && s.sent < queriesPerSocket && !s.closed && now.Sub(s.opened) < socketMaxAge {
		return s, nil
	}
	if m.cur != nil {
		m.cur.retireLocked()
	}
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(m.up.addr))
	if err != nil {
		return nil, err
	}
	s := &muxSocket{conn: c, m: m, opened: now, pending: make(map[uint16]*muxWait, queriesPerSocket)}
	if m.up.addr.Addr().Is4() {
		s.pc = ipv4.NewPacketConn(c)
	} else {
		s.pc = ipv6.NewPacketConn(c)
	}
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

func (s *muxSocket) read() {
	m := s.m
	bufs := m.bufs.Get().(*muxBufs)
	defer m.bufs.Put(bufs)
	aq := m.queues.Get().(*answerQueue)
	defer m.queues.Put(aq)
	if m.answers == nil {
		aq = nil
	}
	for {
		n, err := s.pc.ReadBatch(bufs.ms, 0)
		if err != nil {
			m.mu.Lock()
			s.closed = true
			ws := make([]*muxWait, 0, len(s.pending))
			for id, w := range s.pending {
				delete(s.pending, id)
				ws = append(ws, w)
			}
			if m.cur == s {
				m.cur = nil
			}
			if s.timer != nil {
				s.timer.Stop()
			}
			m.mu.Unlock()
			_ = s.conn.Close()
			for _, w := range ws {
				w.deliver(nil, errMuxClosed, nil)
			}
			return
		}
		for i := range bufs.ms[:n] {
			s.answer(&bufs.ms[i], aq)
		}
		if aq != nil && len(aq.items) > 0 {
			m.answers(aq)
		}
	}
}

// answer matches one datagram to its query and delivers it.
func (s *muxSocket) answer(msg *ipv4.Message, aq *answerQueue) {
	buf := msg.Buffers[0][:msg.N]
	if len(buf) < 12 {
		return
	}
	id := uint16(buf[0])<<8 | uint16(buf[1])
	s.m.mu.Lock()
	w := s.pending[id]
	s.m.mu.Unlock()
	if w == nil {
		return // unknown ID: late, spoofed or junk
	}
	var r *dns.Msg
	var err error
	if msg.Flags&msgTrunc != 0 {
		err = errAnswerTooBig
	} else {
		r = new(dns.Msg)
		if r.Unpack(buf) != nil || !w.q.answeredBy(r) {
			return // keep waiting for the real answer
		}
	}
	if s.take(id, w) {
		w.deliver(r, err, aq)
	}
}

// exchange sends q (its ID is replaced) and waits for the answer until
// deadline or ctx is done.
func (m *udpMux) exchange(ctx context.Context, deadline time.Time, q *dns.Msg) (*dns.Msg, error) {
	m.mu.Lock()
	s, err := m.socketLocked(time.Now())
	if err != nil {
		m.mu.Unlock()
		return nil, err
	}
	id := s.newIDLocked()
	q.Id = id
	w := &muxWait{q: questionOf(q), ch: make(chan muxResult, 1)}
	s.pending[id] = w
	s.sent++
	m.mu.Unlock()

	done := func() { s.take(id, w) }
	wire, err := q.Pack()
	if err == nil {
		err = s.send(wire)
	}
	if err != nil {
		done()
		return nil, err
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case res := <-w.ch:
		return res.r, res.err
	case <-t.C:
		done()
		return nil, context.DeadlineExceeded
	case <-ctx.Done():
		done()
		return nil, ctx.Err()
	}
}

// armLocked makes sure the socket's timer fires by deadline.
func (s *muxSocket) armLocked(deadline time.Time) {
	if !s.armed.IsZero() && !deadline.Before(s.armed) {
		return
	}
	s.armed = deadline
	if s.timer == nil {
		s.timer = time.AfterFunc(time.Until(deadline), s.expire)
		return
	}
	s.timer.Reset(time.Until(deadline))
}

// expire lands the asynchronous waits whose deadline has passed with
// context.DeadlineExceeded, and re-arms the timer for the earliest left.
func (s *muxSocket) expire() {
	m := s.m
	now := time.Now()
	var late []*muxWait
	var next time.Time
	m.mu.Lock()
	for id, w := range s.pending {
		if w.to == nil {
			continue // a synchronous wait keeps its own timer
		}
		if !w.deadline.After(now) {
			delete(s.pending, id)
			late = append(late, w)
		} else if next.IsZero() || w.deadline.Before(next) {
			next = w.deadline
		}
	}
	s.armed = time.Time{}
	if !next.IsZero() {
		s.armLocked(next)
	}
	if s.sent >= queriesPerSocket && len(s.pending) == 0 && !s.closed {
		s.closed = true
		_ = s.conn.Close()
	}
	m.mu.Unlock()
	for _, w := range late {
		w.to.land(nil, context.DeadlineExceeded, nil)
	}
}

func (s *muxSocket) newIDLocked() uint16 {
	id := randomID()
	for s.pending[id] != nil {
		id = randomID()
	}
	return id
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

// send writes a packed query on the socket. A write that fails (a refused
// port, reported by ICMP, or a closed socket) retires the socket: the next
// query opens another.
func (s *muxSocket) send(wire []byte) error {
	if _, err := s.conn.Write(wire); err != nil {
		s.failed()
		return err
	}
	return nil
}

func (s *muxSocket) failed() {
	m := s.m
	m.mu.Lock()
	if m.cur == s {
		s.retireLocked()
		m.cur = nil
	}
	m.mu.Unlock()
}

// exchangeAsync sends the packed query wire (its ID is written in) for
// w, whose q and to the caller has set, or queues it on sq when sq is not
// nil (sq.flush sends it), and returns at once; w.to lands with the
// answer, or an error at deadline or when the socket fails, exactly once,
// on the socket's reader or a timer goroutine. When exchangeAsync itself
// returns an error, w.to never lands.
func (m *udpMux) exchangeAsync(deadline time.Time, wire []byte, w *muxWait, sq *sendQueue) error {
	m.mu.Lock()
	s, err := m.socketLocked(time.Now())
	if err != nil {
		m.mu.Unlock()
		return err
	}
	id := s.newIDLocked()
	wire[0], wire[1] = byte(id>>8), byte(id)
	w.deadline = deadline
	s.pending[id] = w
	s.sent++
	s.armLocked(deadline)
	m.mu.Unlock()
	if sq != nil {
		sq.items = append(sq.items, queuedQuery{s: s, wire: wire, id: id, w: w})
		return nil
	}
	if err := s.send(wire); err != nil {
		if s.take(id, w) {
			return err
		}
		return nil // the reader or the timer took it: w.to lands
	}
	return nil
}

// sendQueue collects a reader's batch of upstream queries, to send with
// one sendmmsg per socket.
type sendQueue struct {
	items []queuedQuery
	out   batchMsgs
}

type queuedQuery struct {
	s    *muxSocket
	wire []byte
	id   uint16
	w    *muxWait
}

// flush sends the queued queries, socket by socket, and empties the
// queue. A query the kernel refuses fails as a failed send does: its wait
// gets the error.
func (sq *sendQueue) flush() {
	eachRun(sq.items, func(it *queuedQuery) *muxSocket { return it.s }, func(run []queuedQuery) {
		s := run[0].s
		for _, it := range run {
			sq.out.add(it.wire, netip.AddrPort{}, answerFrom{})
		}
		ms := sq.out.ms
		sent := 0
		for sent < len(ms) {
			k, err := s.pc.WriteBatch(ms[sent:], 0)
			if err != nil {
				s.failed()
				for _, it := range run[sent:] {
					if s.take(it.id, it.w) {
						it.w.deliver(nil, err, nil)
					}
				}
				break
			}
			sent += max(k, 1)
		}
		sq.out.reset()
	})
	clear(sq.items)
	sq.items = sq.items[:0]
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
