package proxy

import (
	"context"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/elazarl/goproxy"
	"golang.org/x/sync/errgroup"

	"egressd/audit"
	"egressd/internal/logjson"
	"egressd/internal/netutil"
	"egressd/policy"
)

// Proxy is the transparent and explicit proxy. Build it with New, start it
// with Run (or Serve / ServeExplicit with listeners of your own), stop it
// with Close.
type Proxy struct {
	cfg     Config
	deps    Deps
	log     *slog.Logger
	met     *metrics
	peekMem *peekBudget // nil: unbounded (Config.PeekBudget < 0)
	deny    *template.Template
	engines engineCache

	gp *goproxy.ProxyHttpServer // explicit proxy and inspection; always non-nil
	// userDigests are the explicit proxy's users given by digest:
	// cfg.ProxyUserDigests, then what SetProxyUserDigests swapped in,
	// each with its cache of successful slow checks.
	userDigests atomic.Pointer[userSet]
	slow        *slowChecks            // bounds the bcrypt checks
	mitm        atomic.Pointer[mitmCA] // nil until inspection first needs it
	caOnce      sync.Mutex             // guards loading the CA
	caFailed    atomic.Bool            // the last try to load the CA failed
	certs       *certStore             // the inspected hosts' leaves
	ownOnce     sync.Once
	// own are the gateway's own addresses (cfg.OwnAddrs or the
	// interfaces', then what SetOwnAddrs gave), and those found later by
	// addOwn. The slice is never changed in place: SetOwnAddrs and addOwn
	// store a new one.
	own    atomic.Pointer[[]netip.Addr]
	ctOnce sync.Once
	ct     Conntrack          // deps.Conntrack or ctOwn; nil if it could not be opened
	ctOwn  *netutil.Conntrack // opened by the proxy, closed by Close

	kaListener net.Listener // opened by listenTransparent: accepted connections inherit keepalive
	// deferAccept: kaListener has TCP_DEFER_ACCEPT (deferAcceptControl).
	deferAccept bool

	// dropMu guards dropFrom, the interface indexes the listeners'
	// socket filters drop (transparent, explicit: DropTransparentFrom,
	// DropExplicitFrom, SetDropFrom), and opened, the listeners Run opened
	// (the transparent one, then the explicit ones), with the index of
	// dropFrom each takes.
	dropMu   sync.Mutex
	dropFrom [2]int
	opened   []openedListener

	// explicitMu guards explicitLns, the explicit listeners open on an
	// address (Run's, then SetExplicitAddrs'), by the address they were
	// opened for; retired, those SetExplicitAddrs closed, until their
	// Serve returns (or, when it returned first, their keepExplicit
	// finds them retired); explicitFailed, the addresses that did not open
	// (logged once); explicitDown, the addresses whose listener failed
	// to accept, closed and due to be opened again (keepExplicit); and
	// retryLns, the RetryListener ServeExplicit serves each listener
	// through while it does, which SetExplicitAddrs closes in its
	// listener's place so that a pause waiting out EMFILE ends at once.
	explicitMu     sync.Mutex
	explicitLns    map[string]net.Listener
	retired        map[net.Listener]bool
	retryLns       map[net.Listener]*netutil.RetryListener
	explicitFailed map[string]bool
	explicitDown   map[string]*downListener
	// explicitChanges wakes ExplicitChanges' reader when a listener goes
	// down or is opened again.
	explicitChanges chan struct{}
	// reopenBase and reopenMax bound keepExplicit's wait before it opens
	// a failed listener again (reopenFirst, reopenLongest; a test's
	// shorter); relisten, when set, opens it in listenExplicit's place
	// (a test's failing one).
	reopenBase, reopenMax time.Duration
	relisten              func(addr string) (net.Listener, error)
	// afterServe, when set, is called by keepExplicit each time its
	// listener's Serve returns (a test's, to retire it just then).
	afterServe func()

	// slots are the connections held, in all and per client (a LAN
	// device, or an address without one: Deps.Devices).
	slots    *netutil.ClientSlots
	limMu    sync.Mutex           // guards lastWarn
	lastWarn map[string]time.Time // per limit scope, to keep the log line rate-limited

	// explicitSlots are the explicit listener's connections that hold a
	// connection slot (net.Conn → client netip.Addr): explicitConnState.
	explicitSlots sync.Map

	mu        sync.Mutex // guards following
	closed    bool
	listeners map[net.Listener]struct{}
	servers   map[*http.Server]struct{}

	// Every client and destination conn, closed by Close. Two entries a
	// connection, added and removed by many goroutines at once: a
	// sync.Map, not a map under mu (whose lock was the proxy's most
	// contended under a high connection rate).
	conns       sync.Map    // net.Conn → struct{}, or *dialedConn (trackDialed)
	sweepOnce   sync.Once   // starts keepAliveSweeper
	connsClosed atomic.Bool // set by Close before it closes conns

	closeOnce sync.Once
	done      chan struct{}

	// ready is closed once Run has opened every configured listener;
	// bound holds the transparent one's address (nil when off) and
	// boundExplicit the explicit ones' (ExplicitAddr, then ExplicitMore;
	// those that opened).
	ready         chan struct{}
	bound         net.Addr
	boundExplicit []net.Addr
	// explicitErr is why explicit listeners did not open while another
	// listener did (set before ready is closed).
	explicitErr error

	work workers // runs handleTransparent and the tunnels' ends
	// fastScanned counts the stream bytes the fast path's queue goroutine
	// has looked at for a complete ClientHello (fastQueue.kick): a test
	// bounds it by the bytes the client sent.
	fastScanned atomic.Int64

	// live are the forwarded connections a reload decides again and
	// the live report lists open (*liveConn → struct{}), each until its
	// event is emitted; current is the engine the last Redecide
	// published (reload.go).
	live    sync.Map
	current atomic.Pointer[policy.Engine]
	gen     atomic.Uint64 // Redecide calls so far
}

// workerIdle is how long a kept goroutine waits for its next connection.
const workerIdle = 10 * time.Second

// New checks the configuration and builds a proxy. It has no side effects:
// no listener is opened and no file is touched (the CA is loaded or
// generated when inspection first needs it).
func New(cfg Config, deps Deps) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if deps.Policy == nil || deps.Policy.Load() == nil {
		return nil, errors.New("proxy: no policy")
	}
	cfg = cfg.withDefaults()
	if deps.Sink == nil {
		deps.Sink = audit.Discard
	}
	if deps.Logger == nil {
		deps.Logger = slog.Default()
	}
	tpl, err := template.New("deny").Parse(cfg.DenyPage)
	if err != nil {
		return nil, fmt.Errorf("proxy: deny page template: %w", err)
	}
	met, err := newMetrics(deps.Registerer)
	if err != nil {
		return nil, fmt.Errorf("proxy: metrics: %w", err)
	}
	p := &Proxy{
		cfg:       cfg,
		deps:      deps,
		log:       deps.Logger.With(audit.LogComponent, "proxy"),
		met:       met,
		deny:      tpl,
		peekMem:   newPeekBudget(cfg.PeekBudget),
		lastWarn:  map[string]time.Time{},
		listeners: map[net.Listener]struct{}{},
		servers:   map[*http.Server]struct{}{},
		done:      make(chan struct{}),
		ready:     make(chan struct{}),
		work:      workers{tasks: make(chan func()), idle: workerIdle},
		slow:      newSlowChecks(),
		dropFrom:  [2]int{cfg.DropTransparentFrom, cfg.DropExplicitFrom},

		explicitLns:    map[string]net.Listener{},
		retired:        map[net.Listener]bool{},
		retryLns:       map[net.Listener]*netutil.RetryListener{},
		explicitFailed: map[string]bool{},
		explicitDown:   map[string]*downListener{},

		explicitChanges: make(chan struct{}, 1),
		reopenBase:      reopenFirst,
		reopenMax:       reopenLongest,
	}
	if deps.Registerer != nil {
		if err := deps.Registerer.Register(caExpiryGauge(p.caExpiry)); err != nil {
			return nil, fmt.Errorf("proxy: metrics: %w", err)
		}
	}
	var deviceOf func(netip.Addr) net.HardwareAddr
	if deps.Devices != nil {
		deviceOf = deps.Devices.ClientDevice
	}
	p.slots = netutil.NewClientSlots(cfg.MaxConns, cfg.MaxConnsPerClient, deviceOf)
	if len(cfg.ProxyUserDigests) > 0 {
		p.userDigests.Store(newUserSet(maps.Clone(cfg.ProxyUserDigests)))
	}
	if deps.Dial == nil {
		// No keepalive at the dial: trackDialed sets it later. No
		// Timeout either: dial's context has the deadline (a second one
		// would cost every connection another timer).
		d := &net.Dialer{KeepAlive: -1}
		p.deps.Dial = d.DialContext
	}
	p.current.Store(deps.Policy.Load())
	p.certs = &certStore{}
	p.gp = p.newGoproxy()
	return p, nil
}

// Ready is closed once Run has opened the configured listeners (the
// explicit one may have failed: ExplicitErr). It is never closed when the
// transparent one, or the only one, fails to open (Run returns the error).
func (p *Proxy) Ready() <-chan struct{} { return p.ready }

// Addrs returns the bound addresses of the transparent and the (first)
// explicit listener (nil for one that is off or did not open), once
// Ready is closed.
func (p *Proxy) Addrs() (transparent, explicit net.Addr) {
	if len(p.boundExplicit) > 0 {
		explicit = p.boundExplicit[0]
	}
	return p.bound, explicit
}

// ExplicitAddrs returns the bound addresses of every explicit listener
// that opened (ExplicitAddr, then ExplicitMore), once Ready is closed.
func (p *Proxy) ExplicitAddrs() []net.Addr { return p.boundExplicit }

// ExplicitErr returns, once Ready is closed, why explicit listeners did
// not open while another listener serves; nil when every one opened or
// they are off.
func (p *Proxy) ExplicitErr() error { return p.explicitErr }

// Run opens the configured listeners and serves them until ctx is done or
// a listener fails; then it closes the proxy. An explicit listener that
// cannot open (its port taken by another proxy on the box, say) does not
// take the transparent one down with it: enforce mode's redirect sends
// every LAN connection there. Run goes on with the transparent listener
// and reports the failure through ExplicitErr. Nor does an explicit
// listener whose accept fails later: it is opened again (keepExplicit).
func (p *Proxy) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	if a := p.cfg.TransparentAddr; a != "" {
		ln, err := p.listenTransparent(ctx, a)
		if err != nil {
			p.Close()
			return fmt.Errorf("proxy: transparent listener: %w", err)
		}
		p.bound = ln.Addr()
		g.Go(func() error { return p.Serve(ln) })
	}
	if a := p.cfg.ExplicitAddr; a != "" {
		var errs []error
		for _, a := range append([]string{a}, p.cfg.ExplicitMore...) {
			ln, err := p.listenExplicit(ctx, a)
			if err != nil {
				errs = append(errs, fmt.Errorf("proxy: explicit listener %s: %w", a, err))
				continue
			}
			p.boundExplicit = append(p.boundExplicit, ln.Addr())
			p.explicitMu.Lock()
			p.explicitLns[a] = ln
			p.explicitMu.Unlock()
			// A listener that fails to accept is opened again; the
			// proxy goes on meanwhile.
			g.Go(func() error { p.keepExplicit(a, ln); return nil })
		}
		switch {
		case len(errs) > 0 && p.bound == nil && len(p.boundExplicit) == 0:
			p.Close()
			return errors.Join(errs...)
		case len(errs) > 0:
			p.explicitErr = errors.Join(errs...)
			p.log.Error("proxy: explicit listeners did not open; the other listeners go on", audit.LogError, p.explicitErr.Error())
		}
	}
	if p.cfg.Inspect {
		g.Go(func() error { p.watchCA(ctx); return nil })
	}
	close(p.ready) // after bound: the close orders the writes before Addrs
	g.Go(func() error {
		select {
		case <-ctx.Done():
		case <-p.done:
		}
		p.Close()
		return nil
	})
	err := g.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// Close stops the listeners and closes every open connection. It is
// idempotent and safe after a partial start.
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		var queued []*net.TCPConn
		for ln := range p.listeners {
			// Closing a listener resets the connections in its accept
			// queue, which the proxy would never see: each is taken first,
			// to be refused with a line and an event of its own.
			queued = append(queued, acceptQueued(ln)...)
			ln.Close()
		}
		for s := range p.servers {
			s.Close()
		}
		p.connsClosed.Store(true)
		p.mu.Unlock()
		// A trackConn that stored its conn before the flag was set is in
		// the map now; one after it sees the flag and closes its own.
		p.conns.Range(func(c, _ any) bool {
			c.(net.Conn).Close()
			return true
		})
		close(p.done)
		for _, c := range queued {
			f, _ := transparentRecord(c, time.Now())
			p.origDst(c, f)
			p.refuseAtShutdown(c, f)
		}
		// After the lookups of connections still being set up, if any:
		// Conntrack.Close waits for one in flight, and later ones fail (and
		// keep the socket's address).
		p.ctOnce.Do(func() {})
		if p.ctOwn != nil {
			p.ctOwn.Close()
		}
	})
	return nil
}

// acceptQueued accepts, without waiting, every connection in ln's accept
// queue (Close). A connection the kernel queues after it returns is reset
// when ln closes, unrecorded: the window is the few instructions between.
func acceptQueued(ln net.Listener) []*net.TCPConn {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return nil
	}
	var fds []int
	rc.Control(func(fd uintptr) {
		for {
			// The listening socket is non-blocking (the net package's):
			// EAGAIN once the queue is empty.
			nfd, _, err := syscall.Accept4(int(fd), syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
			if err == syscall.EINTR || err == syscall.ECONNABORTED {
				continue
			}
			if err != nil {
				return
			}
			fds = append(fds, nfd)
		}
	})
	var conns []*net.TCPConn
	for _, fd := range fds {
		f := os.NewFile(uintptr(fd), "queued")
		c, err := net.FileConn(f) // a dup: f is closed either way
		f.Close()
		if tc, ok := c.(*net.TCPConn); ok && err == nil {
			conns = append(conns, tc)
		} else if c != nil {
			c.Close()
		}
	}
	return conns
}

// track registers a listener or connection so Close can close it; it
// reports false (and closes it) when the proxy is already closed.
func (p *Proxy) trackConn(c net.Conn) bool {
	return p.trackConnValue(c, struct{}{})
}

// trackConnValue is trackConn with v as the set's value for c.
func (p *Proxy) trackConnValue(c net.Conn, v any) bool {
	if p.connsClosed.Load() {
		c.Close()
		return false
	}
	p.conns.Store(c, v)
	if p.connsClosed.Load() { // Close may have listed the map before the Store
		p.conns.Delete(c)
		c.Close()
		return false
	}
	return true
}

func (p *Proxy) untrackConn(c net.Conn) {
	p.conns.Delete(c)
}

func (p *Proxy) trackListener(ln net.Listener) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		ln.Close()
		return false
	}
	p.listeners[ln] = struct{}{}
	return true
}

// closing reports whether Close has begun: it sets closed before it
// closes the listeners, and closes done after them.
func (p *Proxy) closing() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// Serve accepts redirected connections on ln (the transparent listener)
// until ln fails or the proxy is closed. A test can create ln inside a
// network namespace.
func (p *Proxy) Serve(ln net.Listener) error {
	if !p.trackListener(ln) {
		return net.ErrClosed
	}
	p.ownAddrs()
	ours := ln == p.kaListener
	var pause netutil.AcceptBackoff
	for {
		c, err := ln.Accept()
		if err != nil {
			select {
			case <-p.done:
				return nil
			default:
			}
			if errors.Is(err, net.ErrClosed) && p.closing() {
				// Close closes the listeners before p.done: an accept
				// (or a pause's end) in between is the proxy closing.
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || netutil.AcceptRetry(err) {
				// EMFILE and friends: back off instead of spinning.
				p.acceptFailing("transparent", ln, err)
				// Close ends the pause, or Run would wait it out
				// (TestServeOutOfFDsStops).
				if !pause.Wait(p.done, nil) {
					return nil
				}
				continue
			}
			return fmt.Errorf("proxy: accept: %w", err)
		}
		pause.Reset()
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			continue
		}
		p.work.run(func() { p.handleTransparent(tc, ours) })
	}
}

// ownAddrs returns the gateway's own addresses: read once (or the last
// SetOwnAddrs gave), plus those addOwn found since.
func (p *Proxy) ownAddrs() []netip.Addr {
	p.ownOnce.Do(func() {
		own := p.cfg.OwnAddrs
		if own == nil {
			var err error
			if own, err = netutil.HostAddrs(); err != nil {
				p.log.Warn("cannot list the gateway's own addresses", audit.LogError, err)
			}
		}
		own = slices.Clone(own)
		p.own.Store(&own)
	})
	return *p.own.Load()
}

// SetOwnAddrs replaces the gateway's own addresses (Config.OwnAddrs, or
// those the proxy read from the interfaces) with addrs: egressd run calls
// it when the interfaces' addresses change (a WAN address gained on a
// reconnect, a new delegated IPv6 prefix, an address taken off), so the
// guard refuses the new ones and no longer the old ones. Connections
// already decided keep their decision. The list is swapped whole: the
// readers (every connection's decision) take no lock.
func (p *Proxy) SetOwnAddrs(addrs []netip.Addr) {
	p.ownAddrs() // the first read, if not done yet, must not overwrite addrs later
	own := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if a = a.Unmap(); !slices.Contains(own, a) {
			own = append(own, a)
		}
	}
	p.own.Store(&own)
}

// addOwn records a, seen to be the gateway's own address, if it is not
// known yet: an address the gateway gained after the list was read.
func (p *Proxy) addOwn(a netip.Addr) {
	for {
		cur := p.own.Load()
		if slices.Contains(*cur, a) {
			return
		}
		next := append(slices.Clone(*cur), a)
		if p.own.CompareAndSwap(cur, &next) {
			return
		}
	}
}

// keyOf returns what client's per-client limits count now: its device,
// if acquire found one (netutil.ClientSlots).
func (p *Proxy) keyOf(client netip.Addr) netutil.ClientKey { return p.slots.Key(client) }

// acquire takes a connection slot for client; false when a limit is hit
// (and then it logs, at most once a second per scope). The cap per
// client is per LAN device where Deps.Devices names one for the address
// (netutil.ClientSlots).
func (p *Proxy) acquire(client netip.Addr) bool {
	_, ok := p.acquireDevice(client)
	return ok
}

// acquireDevice is acquire, and returns the MAC of client's device as
// text when the slots found one (netutil.ClientSlots.AcquireDevice: no
// lookup of its own), for the connection's event; "" when none.
func (p *Proxy) acquireDevice(client netip.Addr) (dev string, ok bool) {
	ok, dev, why := p.slots.AcquireDevice(client)
	if ok {
		p.met.active.Inc()
		return dev, true
	}
	p.met.limitHit(why.Scope)
	p.limMu.Lock()
	now := time.Now()
	warn := now.Sub(p.lastWarn[why.Scope]) >= time.Second
	if warn {
		p.lastWarn[why.Scope] = now
	}
	p.limMu.Unlock()
	if warn {
		attrs := []any{"scope", why.Scope, "limit", why.Limit, audit.LogClient, client}
		if why.MAC != nil {
			attrs = append(attrs, audit.LogClientMAC, why.MAC.String())
		}
		p.log.Warn("connection limit reached: refusing new connections", append(attrs, "client_conns", why.Client, "total_conns", why.Total)...)
	}
	return dev, false
}

// acceptFailing logs that accepting on ln, a listener of kind
// ("transparent", "explicit"), fails for a reason waited out (out of file
// descriptors, say), naming the listener, at most once every 10 s for
// each: the connections meanwhile wait in its queue, unanswered. One
// line for the proxy as a whole named whichever listener failed first,
// and left the others' failures unsaid (TestAcceptFailingNamesListener).
func (p *Proxy) acceptFailing(kind string, ln net.Listener, err error) {
	addr := ln.Addr().String()
	scope := acceptScope(kind, addr)
	p.limMu.Lock()
	now := time.Now()
	warn := now.Sub(p.lastWarn[scope]) >= 10*time.Second
	if warn {
		p.lastWarn[scope] = now
	}
	p.limMu.Unlock()
	if warn {
		p.log.Warn("proxy: accept failing: retrying", "kind", kind, "listen", addr, audit.LogError, audit.ErrorText(err))
	}
}

// acceptScope is the key of acceptFailing's lines for the listener of
// kind on addr in lastWarn.
func acceptScope(kind, addr string) string { return "accept " + kind + " " + addr }

// forgetAcceptFailing forgets when accepting on ln, a listener of kind,
// was last said to fail (acceptFailing), once ln is served no more:
// lastWarn kept an entry for every explicit address that ever ran out of
// descriptors, retired or not (TestExplicitRetiredOutOfFDs). A listener
// opened on the address again says so again at its first failure.
func (p *Proxy) forgetAcceptFailing(kind string, ln net.Listener) {
	p.limMu.Lock()
	delete(p.lastWarn, acceptScope(kind, ln.Addr().String()))
	p.limMu.Unlock()
}

func (p *Proxy) release(client netip.Addr) {
	p.slots.Release(client)
	p.met.active.Dec()
}

// flowRecord is the state of one connection that ends up in the canonical
// line and the audit event.
type flowRecord struct {
	listener string
	ev       audit.Event
	err      error
	portDone bool // transparent: ev.ClientPort is the client's own (clientPort)
	lined    bool // transparent: the connection's line is written already (Deps.Accepted)
	// lc is the connection's registration (addLive), listed open until
	// its event is emitted (finish).
	lc *liveConn
}

// finish emits the canonical slog line (unless written already: lined)
// and the audit event.
func (p *Proxy) finish(f *flowRecord) {
	ev := &f.ev
	ev.Duration = time.Since(ev.Time).Seconds()
	p.deps.Sink.Emit(*ev)
	p.unlist(f) // after the event: listed open until then (OpenFlows)
	p.met.connDone(f.listener, ev.Verdict, ev.Mode, ev.BytesOut, ev.BytesIn)
	level := slog.LevelInfo
	switch {
	case f.err != nil && ev.Verdict != policy.Deny:
		level = slog.LevelError
	case ev.Verdict == policy.Deny:
		level = slog.LevelWarn
	}
	if f.lined || !p.log.Enabled(context.Background(), level) || audit.QuietLine(p.deps.Sink, ev) {
		return
	}
	var buf [audit.FlowAttrsMax + 2]slog.Attr
	attrs := append(ev.AppendFlowAttrs(buf[:0]), slog.String("listener", f.listener))
	if f.err != nil {
		attrs = append(attrs, slog.String(audit.LogError, audit.ErrorText(f.err)))
	}
	logjson.Log(context.Background(), p.log, level, audit.CanonicalMessage, attrs...)
}

// addrPortOf converts a net.Addr of a TCP connection.
func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
