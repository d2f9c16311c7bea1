package proxy

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"egressd/audit"
	"egressd/internal/netutil"
)

// The peek budget bounds the memory that connections not decided yet hold
// together: the ClientHellos and request heads being read, on the
// transparent listener (the recorder) and the explicit one (the bytes
// net/http reads for a request head). Each connection may hold peekFree
// bytes of its own, which every real hello (a post-quantum one is about
// 1.8 KB) and most request heads fit; bytes past that are taken from the
// budget, shared by all connections, and given back once the connection
// is decided; one client may take a tenth of it (as it may hold a tenth
// of the connections, MaxConnsPerClient): a LAN device, all its addresses
// together, where Deps.Devices names one (Proxy.keyOf: the device its
// connection slot found), else the address. A read that does not fit
// fails with errPeekBudget: the
// connection is refused with reason connection-limit, counted in
// egress_proxy_limit_rejections_total{scope="peek"} and logged (once a
// second at most).
//
// Without it each connection could hold a hello or head of up to
// HelloMaxBytes (64 KiB) for HelloTimeout, and crypto/tls's copies of a
// slow hello besides: about 80 KiB a connection, so the 5,000 connections
// of one client address held some 400 MB, and MaxConns (50,000) 4 GB
// (TestPeekBudget, TestExplicitPeekBudget). A client sending hellos that
// large is refused once it holds its tenth; it takes ten clients (ten
// devices, or addresses off the LAN's link) to make other clients' large
// hellos and heads wait for room (they are
// refused while none is free: TestPeekBudgetPerClient); hellos and heads
// within peekFree are never refused for it.

// errPeekBudget: the bytes read would pass the peek budget.
var errPeekBudget = errors.New("proxy: client hello or request head does not fit the memory left for them")

// peekFree is what a connection's peek holds outside the budget.
const peekFree = 4 << 10

// peekStep is the least taken from the budget at once, so that a hello
// read a segment at a time does not touch the shared counter per read.
const peekStep = 4 << 10

// peekBudget is the shared count. A nil *peekBudget bounds nothing.
type peekBudget struct {
	max       int64
	perClient int64 // what one client (a device, or an address without one: netutil.ClientKey) may take: a tenth of max
	used      atomic.Int64

	mu       sync.Mutex // guards byClient, and used's changes
	byClient map[netutil.ClientKey]int64
}

func newPeekBudget(max int) *peekBudget {
	if max <= 0 {
		return nil
	}
	return &peekBudget{max: int64(max), perClient: int64(max) / 10, byClient: map[netutil.ClientKey]int64{}}
}

// take takes n bytes for client, if they fit the budget and the client's
// tenth of it.
func (b *peekBudget) take(client netutil.ClientKey, n int) bool {
	if b == nil {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used.Load()+int64(n) > b.max || b.byClient[client]+int64(n) > b.perClient {
		return false
	}
	b.used.Add(int64(n))
	b.byClient[client] += int64(n)
	return true
}

// give gives back n bytes client took.
func (b *peekBudget) give(client netutil.ClientKey, n int) {
	if b == nil || n <= 0 {
		return
	}
	b.mu.Lock()
	b.used.Add(-int64(n))
	if b.byClient[client] -= int64(n); b.byClient[client] <= 0 {
		delete(b.byClient, client)
	}
	b.mu.Unlock()
}

// inUse is the bytes taken now (tests, the metric).
func (b *peekBudget) inUse() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}

// peekShare is one connection's part of the budget: what it has taken.
type peekShare struct {
	b      *peekBudget
	client netip.Addr // whose connection
	held   int        // bytes taken from b
	// key is whose share held counts against (its device's, once the
	// connection's slot found one: Proxy.keyOf), set at the first take;
	// keyOf nil: the address.
	key   netutil.ClientKey
	keyed bool
	keyOf func(netip.Addr) netutil.ClientKey
}

// whose returns the key the share's bytes count against.
func (s *peekShare) whose() netutil.ClientKey {
	if !s.keyed {
		s.key, s.keyed = netutil.ClientKey{Addr: s.client}, true
		if s.keyOf != nil {
			s.key = s.keyOf(s.client)
		}
	}
	return s.key
}

// fit returns how many of want more bytes the connection may hold, having
// held bytes already: all of them when they fit in peekFree and what it
// took before, else as many as the budget gives (at least peekStep at a
// time, when there is that much); 0 when none.
func (s *peekShare) fit(held, want int) int {
	free := peekFree + s.held - held
	if want <= free || s.b == nil {
		return want
	}
	need := want - free
	if step := max(need, peekStep, s.held); s.b.take(s.whose(), step) { // doubling, as a slice grows
		s.held += step
		return want
	}
	if s.b.take(s.whose(), need) {
		s.held += need
		return want
	}
	return max(free, 0)
}

// release gives back what the connection took.
func (s *peekShare) release() {
	if s.held == 0 {
		return
	}
	s.b.give(s.whose(), s.held)
	s.held = 0
}

// peekRefused counts a connection refused for the budget and logs it, at
// most once a second.
func (p *Proxy) peekRefused(client netip.Addr) {
	p.met.limitOf[limitPeek].Inc()
	p.limMu.Lock()
	now := time.Now()
	warn := now.Sub(p.lastWarn["peek"]) >= time.Second
	if warn {
		p.lastWarn["peek"] = now
	}
	p.limMu.Unlock()
	if warn {
		p.log.Warn("peek memory limit reached: refusing connections whose hello or request head does not fit",
			"scope", "peek", "limit", p.peekMem.max, audit.LogClient, client, "in_use", p.peekMem.inUse())
	}
}

// peekConn is a connection of the explicit listener: while a request head
// is being read (from accept, and again after each request), the bytes it
// reads past peekFree are taken from the budget; once the head is read
// (explicitHandler) they are given back. A read that does not fit fails,
// and net/http closes the connection.
type peekConn struct {
	net.Conn
	p      *Proxy
	client netip.Addr

	mu       sync.Mutex // guards following
	reading  bool       // a request head is being read
	hijacked bool       // by a CONNECT: no more heads
	read     int        // bytes read in it
	share    peekShare
}

func (c *peekConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	if c.reading {
		n := c.share.fit(c.read, len(b))
		if n == 0 {
			c.mu.Unlock()
			c.p.peekRefused(c.client)
			return 0, errPeekBudget
		}
		b = b[:n]
	}
	c.mu.Unlock()
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	if c.reading {
		c.read += n
	}
	c.mu.Unlock()
	return n, err
}

// headRead ends the head's count (explicitHandler, as a request begins).
func (c *peekConn) headRead() {
	c.mu.Lock()
	c.reading, c.read = false, 0
	c.share.release()
	c.mu.Unlock()
}

// nextHead starts counting the next request's head (a request ended),
// unless the connection was hijacked.
func (c *peekConn) nextHead() {
	c.mu.Lock()
	c.reading = !c.hijacked
	c.mu.Unlock()
}

// hijack ends the counts for good: the connection is a tunnel's now.
func (c *peekConn) hijack() {
	c.mu.Lock()
	c.hijacked = true
	c.mu.Unlock()
	c.headRead()
}

// Close gives back what the connection holds of the budget.
func (c *peekConn) Close() error {
	c.headRead()
	return c.Conn.Close()
}

// bareConn is c without the explicit listener's peekConn, once a hijack
// takes it over (the tunnel splices *net.TCPConn): it gives back what c
// held.
func bareConn(c net.Conn) net.Conn {
	if pc, ok := c.(*peekConn); ok {
		pc.hijack()
		return pc.Conn
	}
	return c
}

// peekListener gives the explicit listener's connections their peekConn.
// Its Listener is a netutil.RetryListener (ServeExplicit), which waits
// out an accept's errors worth retrying: http.Server never sees them.
type peekListener struct {
	net.Listener
	p *Proxy
}

func (l peekListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if l.p.peekMem == nil {
		return c, nil
	}
	client := addrPortOf(c.RemoteAddr()).Addr()
	return &peekConn{Conn: c, p: l.p, client: client, reading: true, share: peekShare{b: l.p.peekMem, client: client, keyOf: l.p.keyOf}}, nil
}
