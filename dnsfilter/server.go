package dnsfilter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/netutil"
	"egressd/policy"
)

// Deps are the forwarder's collaborators.
type Deps struct {
	// Policy answers "may this client resolve this name"; required. Its
	// engine's mode decides audit (forward, record would-deny) versus
	// enforce (answer locally).
	Policy *policy.Store
	// Sink receives one audit.Event per query. Nil means audit.Discard.
	Sink audit.Sink
	// Logger gets one canonical line per query. Nil discards.
	Logger *slog.Logger
	// Registerer gets the egress_dnsfilter_* metrics. Nil means a private
	// registry (metrics are kept but not exported).
	Registerer prometheus.Registerer
	// Table is the learned-address table to fill. Nil means a new table of
	// Config.TableSize entries.
	Table *Table
	// Firewall, when set, is handed the addresses of every allowed answer
	// whose rule it Wants, and the answer is written to the client only
	// once it has them (or Config.LearnTimeout passed), so that the
	// client's first packet to them is not dropped. Nil means answers go
	// out at once (the Table's Subscribe feed still tells who listens).
	Firewall Firewall
	// MACs tells a client's MAC address, for a policy whose rules name
	// clients by MAC (policy.Engine.HasMACs). Nil means no client has one:
	// such rules match none of the forwarder's clients.
	MACs ClientMACs
	// Devices tells which device of the LAN a client address is, so that
	// a device's addresses share one client's rate limit. Nil means each
	// address is a client of its own.
	Devices ClientDevices
	// Now is the clock. Nil means time.Now.
	Now func() time.Time
}

// Server is the filtering forwarder. Create it with New, start it with Run.
type Server struct {
	cfg   Config
	pol   *policy.Store
	sink  audit.Sink
	log   *slog.Logger
	m     *metrics
	table *Table       // always non-nil
	fw    Firewall     // nil: answers do not wait
	macs  ClientMACs   // nil: no client has a MAC
	cache *cache       // nil when disabled
	rl    *rateLimiter // nil when disabled
	tun   *tunnels     // nil when disabled
	ups   *upstreams
	sf    singleflight.Group

	flMu    sync.Mutex         // guards flights
	flights map[string]*flight // the asynchronous miss path's, by cache key
	pcs     sync.Map           // udpConn → batchWriter, for the listeners readUDPBatch and readRaw serve
	now     func() time.Time

	durCache, durUpstream, durLocal prometheus.Observer

	tcpLim tcpLimits // client TCP connections

	slowSem  chan struct{} // bounds UDP queries on the general path
	inflight chan struct{} // bounds upstream exchanges
	slow     sync.WaitGroup

	baseCtx    context.Context // cancelled by Close; bounds upstream work
	baseCancel context.CancelFunc
	// lingerCtx is cancelled as shutdown begins: a closing client
	// connection stops reading the client's leftover bytes
	// (tcpConn.linger) and closes at once.
	lingerCtx    context.Context
	lingerCancel context.CancelFunc

	// rawLeft is how many more listener readers may wait in recvmmsg
	// outside the netpoller (toRaw): set by listen to one less than
	// GOMAXPROCS.
	rawLeft int

	mu      sync.Mutex // guards following
	running bool
	udp     []udpConn
	tcp     []net.Listener
	tcpSrv  []*dns.Server
	addrs   []netip.AddrPort
	// dropUDP and dropTCP are the interface indexes the listening
	// sockets' filters drop (DropUDPFrom, DropTCPFrom; SetDropFrom).
	dropUDP, dropTCP int

	// withheldWire, set by tests before Run, replaces the rendered
	// answer withholdAnswer reads (one that does not unpack); nil: none.
	withheldWire func([]byte) []byte
	// truncatedWire, set by tests before Run, replaces the rendered
	// answer truncateAnswer cuts to the client's UDP size (one that does
	// not unpack); nil: none.
	truncatedWire func([]byte) []byte
	// fullRecheck is how long an entry remembers a full set's refusal,
	// and how often a set's refusals are a warning (gate): fullRecheck,
	// or shorter or longer in tests, set before Run.
	fullRecheck time.Duration
	fullMu      sync.Mutex
	fullWarned  map[string]int64 // "rule/set": when its refusal was last a warning (unix ns)
	fullEng     *policy.Engine   // the running policy fullWarned is of (warnFull)
	// tcpWrap, set by tests before Run, wraps each TCP listener as it
	// is opened (the server serves and closes what it returns); nil:
	// none.
	tcpWrap func(net.Listener) net.Listener

	closing   atomic.Bool
	ready     chan struct{} // closed once listeners are bound
	done      chan struct{} // closed by Close, or by shutdown when Run's ctx is done
	closeOnce sync.Once
}

// New checks cfg and builds a server. It opens no socket.
func New(cfg Config, deps Deps) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if deps.Policy == nil || deps.Policy.Load() == nil {
		return nil, errors.New("dnsfilter: no policy")
	}
	cfg = cfg.withDefaults()
	ups, from := cfg.Upstreams, ""
	if len(ups) == 0 {
		var err error
		if ups, err = readResolvConf(cfg.ResolvConf); err != nil {
			return nil, err
		}
		from = ", from " + cfg.ResolvConf + ","
	}
	s := &Server{
		cfg:   cfg,
		pol:   deps.Policy,
		sink:  deps.Sink,
		log:   deps.Logger,
		table: deps.Table,
		fw:    deps.Firewall,
		macs:  deps.MACs,
		now:   deps.Now,
		m:     newMetrics(),
		ready: make(chan struct{}),
		done:  make(chan struct{}),

		flights: map[string]*flight{},
		dropUDP: cfg.DropUDPFrom,
		dropTCP: cfg.DropTCPFrom,
	}
	if s.sink == nil {
		s.sink = audit.Discard
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With(audit.LogComponent, "dnsfilter")
	if s.now == nil {
		s.now = time.Now
	}
	s.fullRecheck = fullRecheck
	if s.table == nil {
		s.table = NewTable(cfg.TableSize)
	}
	if cfg.CacheSize > 0 {
		s.cache = newCache(cfg.CacheSize)
	}
	if cfg.ClientRate > 0 {
		s.rl = newRateLimiter(cfg.ClientRate, cfg.ClientBurst)
		s.rl.devs = deps.Devices
		s.rl.links, _ = deps.Devices.(ClientLinks)
		s.rl.resolveErr = func(err error) {
			s.log.Warn("dnsfilter: cannot ask the kernel to resolve a LAN source whose query the rate limit dropped: a device's new address shares the unresolved sources' limit until an answer resolves it", audit.LogError, err.Error())
		}
	}
	if cfg.TunnelThreshold > 0 {
		s.tun = newTunnels(cfg.TunnelThreshold, cfg.TunnelWindow)
	}
	s.ups = &upstreams{timeout: cfg.UpstreamTimeout, downAfter: cfg.DownAfter, downFor: cfg.DownFor, udpSize: cfg.UDPSize, m: s.m, now: s.now}
	for _, u := range ups {
		ap, err := parseUpstream(u)
		if err != nil {
			return nil, err
		}
		if loopsBack(ap, cfg.Listen) {
			return nil, fmt.Errorf("dnsfilter: upstream %s%s is one of our own listen addresses (%w)", ap, from, ErrUpstreamLoop)
		}
		u := newUpstream(ap, s.m, cfg.UDPSize)
		u.mux.answers = s.sendAnswers
		s.ups.list = append(s.ups.list, u)
	}
	s.slowSem = make(chan struct{}, cfg.MaxInflight)
	var deviceOf func(netip.Addr) net.HardwareAddr
	if deps.Devices != nil {
		deviceOf = deps.Devices.ClientDevice
	}
	s.tcpLim = tcpLimits{slots: netutil.NewClientSlots(max(cfg.TCPMaxConns, 0), max(cfg.TCPMaxConnsPerClient, 0), deviceOf), lastWarn: map[string]time.Time{}}
	s.inflight = make(chan struct{}, cfg.MaxInflight)
	s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
	s.lingerCtx, s.lingerCancel = context.WithCancel(context.Background())
	s.durCache = s.m.queryDuration.WithLabelValues("cache")
	s.durUpstream = s.m.queryDuration.WithLabelValues("upstream")
	s.durLocal = s.m.queryDuration.WithLabelValues("local")
	reg := deps.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	if err := s.m.register(reg, s); err != nil {
		return nil, fmt.Errorf("dnsfilter: metrics: %w", err)
	}
	return s, nil
}

// Table returns the learned-address table.
func (s *Server) Table() *Table { return s.table }

// Ready is closed once Run has bound its listeners.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Addrs returns the bound listen addresses (UDP and TCP share each), once
// Ready is closed.
func (s *Server) Addrs() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.AddrPort(nil), s.addrs...)
}

// Run binds the listeners and serves until ctx is done or Close is called.
// It returns nil after a clean shutdown, or the error that stopped it.
func (s *Server) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errors.New("dnsfilter: already running")
	}
	s.running = true
	s.mu.Unlock()
	select {
	case <-s.done:
		s.shutdown()
		return net.ErrClosed
	default:
	}
	if err := s.listen(); err != nil {
		s.shutdown()
		return err
	}
	close(s.ready)

	g, gctx := errgroup.WithContext(ctx)
	s.mu.Lock()
	for _, c := range s.udp {
		g.Go(func() error { return s.readUDP(c) })
	}
	for _, srv := range s.tcpSrv {
		g.Go(func() error { return s.tcpServed(srv.ActivateAndServe()) })
	}
	s.mu.Unlock()
	g.Go(func() error {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-gctx.Done():
				return nil
			case <-s.done:
				return nil
			case <-t.C:
				now := s.now().UnixNano()
				s.table.Sweep()
				if s.cache != nil {
					s.cache.sweep(now)
				}
				if s.rl != nil {
					s.rl.sweep(now)
				}
			}
		}
	})
	g.Go(func() error {
		select {
		case <-gctx.Done():
		case <-s.done:
		}
		s.shutdown()
		return nil
	})
	err := g.Wait()
	s.slow.Wait()
	return err
}

// Close stops the server; it is idempotent and safe before or without Run.
func (s *Server) Close() error {
	s.closeOnce.Do(func() { close(s.done) })
	s.mu.Lock()
	running := s.running
	s.mu.Unlock()
	if !running {
		s.shutdown()
	}
	return nil
}

// tcpServed is what Run's TCP server ends with, its ActivateAndServe
// having returned err: nil once the server is stopping, else err. Close
// closes done before Run's shutdown sets closing: an accept's pause ends
// (net.ErrClosed) in between, and is a clean stop too
// (TestTCPServedAfterClose).
func (s *Server) tcpServed(err error) error {
	if s.closing.Load() || s.isDone() {
		return nil
	}
	return fmt.Errorf("dnsfilter: tcp: %w", err)
}

// isDone reports whether done is closed: Close or shutdown began.
func (s *Server) isDone() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

func (s *Server) shutdown() {
	s.closing.Store(true)
	// Run's ctx done stops the server too: a TCP accept waiting out
	// EMFILE (tcpListener.Accept) stops waiting, or ShutdownContext would
	// wait up to a second for it (TestTCPAcceptOutOfFDsStops).
	s.closeOnce.Do(func() { close(s.done) })
	s.lingerCancel()
	s.mu.Lock()
	udp, tcp, srvs := s.udp, s.tcp, s.tcpSrv
	s.mu.Unlock()
	// Stop reading first, then let in-flight TCP queries finish briefly;
	// upstream work is cancelled last so those queries can still answer.
	for _, c := range udp {
		_ = c.Close()
	}
	for _, l := range tcp {
		_ = l.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, srv := range srvs {
		_ = srv.ShutdownContext(ctx)
	}
	s.baseCancel()
	for _, u := range s.ups.list {
		u.mux.close()
	}
}

// listen binds UDP (UDPReaders sockets sharing the port through
// SO_REUSEPORT, so the kernel spreads queries over the readers) and TCP on
// every listen address. With port 0, UDP picks the port and TCP takes the
// same one, retrying if it is taken.
func (s *Server) listen() error {
	procs := runtime.GOMAXPROCS(0)
	readers := s.cfg.UDPReaders
	if readers == 0 {
		readers = defaultReaders(procs)
	}
	s.rawLeft = rawReaders(procs)
	for _, addr := range s.cfg.Listen {
		host, port, _ := net.SplitHostPort(addr)
		var err error
		for try := 0; try < 10; try++ {
			if err = s.listenOne(host, port, readers); err == nil || port != "0" {
				break
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// defaultReaders is one UDP reader per processor. Most of a reader's
// time goes to the kernel in recvmmsg and sendmmsg (about 70 % of it at
// saturation, mostly the loopback delivery of answers), so readers on
// two processors answer in parallel: on the 2-CPU benchmark box two
// readers gave 0.89-1.32x unbound's cached queries a second where one
// gave 0.83-0.91x, with a lower p99 (README, "Transparent proxy", "Half
// the CPUs for Go, undone"; the first machine of the same kind had shown
// no gain from a second reader). Not measured on more than two CPUs.
func defaultReaders(procs int) int {
	return max(1, procs)
}

// rawReaders is how many listener readers may wait in recvmmsg outside
// the netpoller (rawudp_linux.go) with procs processors: one fewer. A
// reader blocked in a system call keeps its processor until the runtime's
// sysmon takes it back, one or two of sysmon's ticks later (up to 10 ms
// each); with every processor held so, every other goroutine (the upstream
// answers' readers, the proxy, the timers) waits that long each time a
// reader goes back to wait. On a one-CPU machine, or with more listen
// addresses than processors, the readers beyond this stay on the
// netpoller.
func rawReaders(procs int) int {
	return max(0, procs-1)
}

func (s *Server) listenOne(host, port string, readers int) error {
	// A wildcard address gets an IPv4 socket and an IPv6-only one rather
	// than Go's dual-stack socket: IPv4 clients, the usual case on a LAN,
	// then reach an AF_INET socket, which readUDPBatch serves with
	// recvmmsg and sendmmsg (x/net cannot address v4-mapped clients from
	// an AF_INET6 socket). Without IPv6 on the host, IPv4 alone.
	var conns []*net.UDPConn
	closeAll := func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}
	var bound string
	var ap netip.AddrPort
	reuse := port != "0"
	// The filters go on before bind (Control), so that nothing from the
	// dropped interface is ever queued; SetDropFrom may change them
	// meanwhile, which the sockets then take below.
	s.mu.Lock()
	dropUDP, dropTCP := s.dropUDP, s.dropTCP
	s.mu.Unlock()
	ip, err := netip.ParseAddr(host)
	if host == "" || err == nil && ip.IsUnspecified() {
		cs, p, err := s.listenUDP("udp4", net.JoinHostPort("0.0.0.0", port), reuse, readers, false, true, dropUDP)
		if err != nil {
			return err
		}
		conns = cs
		ap = netip.AddrPortFrom(netip.IPv4Unspecified(), p)
		if host == "" || ip.Is6() {
			v6, _, err := s.listenUDP("udp6", net.JoinHostPort("::", strconv.Itoa(int(p))), reuse, readers, true, true, dropUDP)
			switch {
			case err == nil:
				conns = append(conns, v6...)
			case errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EADDRNOTAVAIL):
				// No IPv6 here: IPv4 only.
			default:
				closeAll()
				return err
			}
		}
		bound = net.JoinHostPort(host, strconv.Itoa(int(p)))
	} else {
		cs, p, err := s.listenUDP("udp", net.JoinHostPort(host, port), reuse, readers, false, false, dropUDP)
		if err != nil {
			return err
		}
		conns = cs
		ap = cs[0].LocalAddr().(*net.UDPAddr).AddrPort()
		bound = net.JoinHostPort(host, strconv.Itoa(int(p)))
	}
	for _, c := range conns {
		_ = c.SetReadBuffer(4 << 20)
		_ = c.SetWriteBuffer(4 << 20)
	}
	// No keepalive on accepted connections: TCPIdleTimeout ends idle
	// ones, and Go's default would set it on each with four system calls.
	// Plain TCP, not MPTCP (Go's default for listeners where the kernel
	// has it): an MPTCP socket refuses a socket filter, and SetDropFrom
	// may attach one later.
	tlc := &net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, rc syscall.RawConn) error {
		if dropTCP == 0 {
			return nil
		}
		return netutil.DropFromInterface(rc, dropTCP)
	}}
	tlc.SetMultipathTCP(false)
	l, err := tlc.Listen(context.Background(), "tcp", bound)
	if err != nil {
		closeAll()
		return fmt.Errorf("dnsfilter: %w", err) // net.OpError: "listen tcp ADDR: ..."
	}
	if s.tcpWrap != nil {
		l = s.tcpWrap(l)
	}
	ucs := s.toRaw(conns)
	srv := &dns.Server{
		Listener:      s.tcpLimited(l),
		Net:           "tcp",
		Handler:       dns.HandlerFunc(s.serveTCP),
		ReadTimeout:   2 * time.Second,
		WriteTimeout:  tcpWriteTimeout, // not applied by miekg: see tcpListener
		IdleTimeout:   func() time.Duration { return s.cfg.TCPIdleTimeout },
		MaxTCPQueries: s.cfg.TCPMaxQueries,
		MsgAcceptFunc: acceptQuery,
		MsgInvalidFunc: func([]byte, error) {
			s.m.dropped.WithLabelValues("malformed").Inc()
		},
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dropUDP != dropUDP || s.dropTCP != dropTCP {
		if err := setDropFrom(ucs, []net.Listener{l}, s.dropUDP, s.dropTCP); err != nil {
			for _, c := range ucs {
				_ = c.Close()
			}
			_ = l.Close()
			return err
		}
	}
	s.udp = append(s.udp, ucs...)
	s.tcp = append(s.tcp, l)
	s.tcpSrv = append(s.tcpSrv, srv)
	s.addrs = append(s.addrs, ap)
	return nil
}

// listenUDP opens the UDP sockets of one address: with reuse, one
// SO_REUSEPORT socket per reader, so the kernel spreads queries over them;
// without (port 0 asked for: tests), one plain socket read by every reader
// (the kernel may give a port-0 SO_REUSEPORT socket a port that another
// process's reuse group already holds). It returns the sockets, one per
// reader, and the port. dropFrom is the index of the interface whose
// datagrams the sockets drop (DropUDPFrom), zero for none. pktinfo (the
// wildcard address) has the kernel tell each datagram's destination
// address, for its answer to leave from (pktinfo_linux.go).
func (s *Server) listenUDP(network, addr string, reuse bool, readers int, v6only, pktinfo bool, dropFrom int) ([]*net.UDPConn, uint16, error) {
	ctx := context.Background()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		if dropFrom != 0 {
			if err := netutil.DropFromInterface(c, dropFrom); err != nil {
				return err
			}
		}
		var serr error
		err := c.Control(func(fd uintptr) {
			if reuse {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
			if serr == nil && v6only {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
			}
			if serr == nil && pktinfo {
				serr = setPktinfo(int(fd), network == "udp6")
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(ctx, network, addr)
	if err != nil {
		return nil, 0, fmt.Errorf("dnsfilter: %w", err) // net.OpError: "listen udp ADDR: ..."
	}
	first := pc.(*net.UDPConn)
	p := first.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	conns := []*net.UDPConn{first}
	host, _, _ := net.SplitHostPort(addr)
	bound := net.JoinHostPort(host, strconv.Itoa(int(p)))
	for i := 1; i < readers; i++ {
		if !reuse {
			conns = append(conns, first) // another reader of the same socket
			continue
		}
		pc, err := lc.ListenPacket(ctx, network, bound)
		if err != nil {
			for _, c := range conns {
				_ = c.Close()
			}
			return nil, 0, fmt.Errorf("dnsfilter: %w", err) // net.OpError: "listen udp ADDR: ..."
		}
		conns = append(conns, pc.(*net.UDPConn))
	}
	return conns, p, nil
}

// acceptQuery is miekg's default filter for TCP, but NOTIFY is not
// implemented here and a query carries no answer or authority records.
func acceptQuery(dh dns.Header) dns.MsgAcceptAction {
	switch {
	case dh.Bits&(1<<15) != 0: // a response: ignore, never answer it
		return dns.MsgIgnore
	case int(dh.Bits>>11)&0xF != dns.OpcodeQuery:
		return dns.MsgRejectNotImplemented
	case dh.Qdcount != 1, dh.Ancount != 0, dh.Nscount != 0, dh.Arcount > 2:
		return dns.MsgReject
	}
	return dns.MsgAccept
}

// udpConn is a listener's UDP socket: a *net.UDPConn, or on Linux an
// IPv4 rawUDP that Go's netpoller does not watch (rawudp_linux.go).
type udpConn interface {
	WriteToUDPAddrPort(b []byte, dst netip.AddrPort) (int, error)
	WriteMsgUDPAddrPort(b, oob []byte, dst netip.AddrPort) (n, oobn int, err error)
	LocalAddr() net.Addr
	Close() error
}

func (s *Server) readUDP(uc udpConn) error {
	if ok, err := s.readRawConn(uc); ok {
		return err
	}
	c := uc.(*net.UDPConn)
	if pc := batchConnFor(c); pc != nil && !s.cfg.noBatch {
		return s.readUDPBatch(c, pc)
	}
	buf := make([]byte, 65536)
	oob := make([]byte, oobCap)
	sc := newScratch()
	for {
		n, oobn, _, src, err := c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if s.closing.Load() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("dnsfilter: read udp: %w", err)
		}
		sc.from = parseAnswerFrom(oob[:oobn])
		if !s.fastSafe(sc, c, buf[:n], src) {
			s.slowUDP(c, buf[:n], src, sc.from)
		}
	}
}

// slowUDP serves a UDP query the fast path left alone on the general path,
// in a goroutine with a copy of b; the answer leaves from f.
func (s *Server) slowUDP(c udpConn, b []byte, src netip.AddrPort, f answerFrom) {
	select {
	case s.slowSem <- struct{}{}:
	default:
		s.m.dropped.WithLabelValues("overload").Inc()
		return
	}
	pkt := append([]byte(nil), b...)
	s.slow.Add(1)
	go func() {
		defer func() { <-s.slowSem; s.slow.Done() }()
		if out := s.serveWire(s.baseCtx, pkt, src, "udp"); out != nil {
			writeAnswer(c, out, src, f)
		}
	}()
}

func (s *Server) serveTCP(w dns.ResponseWriter, req *dns.Msg) {
	var src netip.AddrPort
	if ta, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		src = ta.AddrPort()
	}
	out := s.serveMsg(s.baseCtx, req, src, "tcp")
	if out == nil {
		_ = w.Close()
		return
	}
	if _, err := w.Write(out); err != nil {
		// A write that timed out may have sent part of the answer: the
		// stream is no longer framed, and the client is not reading.
		_ = w.Close()
	}
}

// LookupNetIP resolves name (A and AAAA) through the configured upstreams
// and the cache, with the answer filter applied (no special addresses for a
// public name). The policy is not consulted and nothing is learned: the
// proxy uses it to check that a name really resolves to a destination.
func (s *Server) LookupNetIP(ctx context.Context, name string) ([]netip.Addr, error) {
	n, ok := policy.NormalizeName(name)
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrInvalidName, name)
	}
	if n == canaryName {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, n)
	}
	type res struct {
		e   *entry
		err error
	}
	var rs [2]res
	var keys [2][]byte
	types := [2]uint16{dns.TypeA, dns.TypeAAAA}
	for i, t := range types {
		keys[i] = appendKey(nil, n, t, dns.ClassINET, 0)
		if s.cache != nil {
			now := s.now().UnixNano()
			rs[i].e = s.cache.get(keys[i], now)
			if rs[i].e == nil {
				// The answer a client that set the DNSSEC OK bit was
				// given (systemd-resolved sets it), validated as the
				// plain one is: asked again, a CDN that rotates its
				// answers gives another address than the client's.
				// Not one fetched with checking disabled.
				rs[i].e = s.cache.get(appendKey(nil, n, t, dns.ClassINET, keyDO), now)
			}
			if rs[i].e != nil {
				s.m.cacheHits.Inc()
			}
		}
	}
	// What the cache has is answered at once (the proxy asks for every
	// connection whose client did not ask our DNS, a browser with its
	// own resolver, say); the rest is resolved here, both types at once
	// when both are missing.
	resolve := func(i int) {
		rs[i].e, _, rs[i].err = s.resolve(ctx, keys[i], n, types[i], dns.ClassINET, 0, time.Time{}, nil)
	}
	switch {
	case rs[0].e == nil && rs[1].e == nil:
		var wg sync.WaitGroup
		wg.Go(func() { resolve(0) })
		resolve(1)
		wg.Wait()
	case rs[0].e == nil:
		resolve(0)
	case rs[1].e == nil:
		resolve(1)
	}
	var out []netip.Addr
	var errs []error
	notFound := false
	for _, r := range rs {
		if r.err != nil {
			errs = append(errs, r.err)
			continue
		}
		switch r.e.rcode {
		case dns.RcodeSuccess:
			// The addresses the table would learn from the answer: the
			// name's own (answerChain), not every address record a
			// hostile server put in it.
			for _, a := range r.e.addrs {
				out = append(out, a.addr)
			}
		case dns.RcodeNameError:
			notFound = true
		default:
			errs = append(errs, fmt.Errorf("%w: %s answered %s", ErrUpstream, r.e.upstream, rcodeString(r.e.rcode)))
		}
	}
	if len(out) > 0 {
		return out, nil
	}
	if notFound || len(errs) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, n)
	}
	return nil, errors.Join(errs...)
}

// loopsBack reports whether an upstream is one of the listen addresses
// (resolv.conf pointing at 127.0.0.1 while we listen on :53).
func loopsBack(up netip.AddrPort, listen []string) bool {
	for _, l := range listen {
		host, port, err := net.SplitHostPort(l)
		if err != nil || port != strconv.Itoa(int(up.Port())) {
			continue
		}
		if host == "" {
			if up.Addr().IsLoopback() || up.Addr().IsUnspecified() {
				return true
			}
			continue
		}
		if a, err := netip.ParseAddr(host); err == nil && (a.Unmap() == up.Addr().Unmap() || a.IsUnspecified() && up.Addr().IsLoopback()) {
			return true
		}
	}
	return false
}

// ErrUpstreamLoop is the error New returns (wrapped) when an upstream is
// one of the forwarder's own listen addresses.
var ErrUpstreamLoop = errors.New("a forwarding loop")
