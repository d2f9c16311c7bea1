// Package admin is egressd's admin HTTP API, bound to localhost by
// default: the live HTML report at "/", the report JSON at "/report.json"
// (what `egressd report` reads from a running daemon), Prometheus metrics
// at "/metrics", and "/healthz" and "/readyz".
//
// It sits at the end of the flow: the components emit into audit/, and
// this package serves what the audit ledger makes of it. cmd/egressd wires
// it into `egressd run`.
package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"egressd/audit"
	"egressd/internal/netutil"
)

// DefaultAddr is the admin address when none is configured.
const DefaultAddr = "127.0.0.1:9901"

// Reporter makes reports; *audit.Ledger implements it. ReportContext
// gives up, with ctx's error, when ctx ends before the report is built
// (the request's client left while it waited for another's build).
type Reporter interface {
	ReportContext(context.Context, audit.ReportOptions) (*audit.Report, error)
}

// writeTimeout is the admin server's: the time to write an answer. A
// report's handler sets it again once its report is made (report), so a
// window's read longer than it still reaches its client.
const writeTimeout = 60 * time.Second

// reportLimit bounds a report's making, its wait for its turns and its
// window's (since=) read: past it the report is given up, 503, with a
// body that asks for a shorter window. A month's log reads in seconds;
// ten minutes is a slow disk's year, and a slot (and the one window read
// at a time) held no longer than that by a client still there.
const reportLimit = 10 * time.Minute

// MaxReportTime is the longest the admin server takes over a report,
// from its request to the end of its answer: reportLimit to make it (its
// wait for its turns and its window's read; its build, when begun, ends
// past it), then writeTimeout to write it. Nothing is sent meanwhile: a
// client such as `egressd report` waits for the answer that long.
const MaxReportTime = reportLimit + writeTimeout

// maxReports is how many reports ("/", "/report.json") the server has in
// progress at once: waiting for their turn, reading their window (since=)
// from the event log, built or written. One more is refused at once (503,
// Retry-After: busyRetryAfter) and counted. Without it each request held
// a goroutine for up to reportLimit, and each since= a window's ledger
// (the ledger reads one window at a time; the others wait), so a client
// looping on /report.json took goroutines and memory without bound. Four
// is a few operators and a poller; `egressd report` asks for one.
const maxReports = 4

// clientReports is how many of the maxReports slots one client address
// (an IPv6 client's /64, which it picks its addresses from) holds at
// once; its next report is refused as past maxReports. Half: a client
// looping on slow since= reports leaves the other half to the other
// operators, and a single operator's page and `egressd report` both run.
// A local client counts by its source address: 127.0.0.1 (or ::1) by
// default, so local clients share one, but any other 127.0.0.0/8 source
// is a client of its own (README).
const clientReports = 2

// busyRetryAfter is the Retry-After, in seconds, of a report refused past
// maxReports: about a build at the ledger's bounds.
const busyRetryAfter = "5"

// Check is a named readiness check: a non-nil error names a degraded
// state ("event log write failing") and makes /readyz answer 503.
type Check struct {
	Name string
	Fn   func() error
}

// Config configures the admin server.
type Config struct {
	// Addr is the listen address. Default DefaultAddr (localhost only).
	Addr string
	// Version is reported in egress_build_info. Default: the module
	// version from the build info, else "dev".
	Version string
	// Hosts are the names, besides IP literals and localhost, the server
	// answers to in a request's Host (case and a final dot aside): what
	// the operator types in the browser.
	Hosts []string
}

// Deps are what the admin server serves.
type Deps struct {
	// Reporter makes the reports of "/" and "/report.json". Required.
	Reporter Reporter
	// Registry registers the admin metrics (build info, config reload)
	// and gathers everything for /metrics. Nil means a new registry
	// with only the admin metrics.
	Registry *prometheus.Registry
	// Checks run on /readyz. Empty: ready as soon as it serves.
	Checks []Check
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Server is the admin HTTP server.
type Server struct {
	cfg  Config
	deps Deps
	log  *slog.Logger
	mux  *http.ServeMux

	reloadOK   prometheus.Gauge
	reloadTime prometheus.Gauge
	refusedRep *prometheus.CounterVec // reports refused past maxReports ("all") or clientReports ("client")

	reports chan struct{} // a token for each report in progress (maxReports)

	slotsMu     sync.Mutex     // guards clientSlots
	clientSlots map[string]int // the slots each client holds (clientKey), when any

	writeTimeout time.Duration // writeTimeout; shorter in tests
	reportLimit  time.Duration // reportLimit; shorter in tests

	mu     sync.Mutex // guards following
	loaded time.Time  // the last successful load or reload
	failed string     // a note on the last reload, when it failed
	srv    *http.Server
	ln     net.Listener
	closed bool

	hosts map[string]bool // Config.Hosts, normalHost'd

	now     func() time.Time // the clock of the refusal logs' pacing
	refused paced            // requests for another host (logRefused)
	busy    paced            // reports refused past maxReports (refuseBusy)
	greedy  paced            // reports refused past clientReports (refuseBusy)
}

// paced paces a log line: at most one an every, the next one counting
// the events between.
type paced struct {
	mu sync.Mutex // guards following
	at time.Time  // when a line was last logged
	n  int        // events since, not logged
}

// event records an event at now; it returns whether to log a line, and
// the events it counts (itself and those not logged since the last).
func (p *paced) event(now time.Time, every time.Duration) (int, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.at.IsZero() && now.Sub(p.at) < every {
		p.n++
		return 0, false
	}
	n := p.n + 1
	p.at, p.n = now, 0
	return n, true
}

// New builds the server and registers its metrics: egress_build_info,
// egress_config_last_reload_successful,
// egress_config_last_reload_success_timestamp_seconds and
// egress_admin_reports_refused_total. It does not listen.
func New(cfg Config, deps Deps) (*Server, error) {
	if deps.Reporter == nil {
		return nil, errors.New("admin: a reporter is required")
	}
	if cfg.Addr == "" {
		cfg.Addr = DefaultAddr
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			cfg.Version = bi.Main.Version
		}
	}
	if deps.Registry == nil {
		deps.Registry = prometheus.NewRegistry()
	}
	if deps.Logger == nil {
		deps.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, deps: deps, log: deps.Logger, now: time.Now, reports: make(chan struct{}, maxReports),
		writeTimeout: writeTimeout, reportLimit: reportLimit}
	for _, h := range cfg.Hosts {
		if err := CheckHost(h); err != nil {
			return nil, err
		}
		if s.hosts == nil {
			s.hosts = map[string]bool{}
		}
		s.hosts[normalHost(h)] = true
	}
	goVersion := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "egress", Name: "build_info",
		Help:        "Build information; the value is always 1.",
		ConstLabels: prometheus.Labels{"version": cfg.Version, "goversion": goVersion},
	})
	build.Set(1)
	s.reloadOK = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "egress", Subsystem: "config", Name: "last_reload_successful",
		Help: "Whether the last configuration (policy) load or reload succeeded.",
	})
	s.reloadTime = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "egress", Subsystem: "config", Name: "last_reload_success_timestamp_seconds",
		Help: "Unix time of the last successful configuration (policy) load or reload.",
	})
	s.refusedRep = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "egress", Subsystem: "admin", Name: "reports_refused_total",
		Help: "Report requests (/, /report.json) answered 503 at once because as many reports as the admin server makes at a time were in progress (limit all), or as many of the client's address as it makes for one (limit client).",
	}, []string{"limit"})
	for _, l := range []string{limitAll, limitClient} {
		s.refusedRep.WithLabelValues(l)
	}
	for _, c := range []prometheus.Collector{build, s.reloadOK, s.reloadTime, s.refusedRep} {
		if err := deps.Registry.Register(c); err != nil {
			return nil, fmt.Errorf("admin: register metrics: %w", err)
		}
	}
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("GET /{$}", s.capped(s.serveHTML))
	s.mux.HandleFunc("GET /report.json", s.capped(s.serveJSON))
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	s.mux.HandleFunc("GET /readyz", s.serveReady)
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(deps.Registry, promhttp.HandlerOpts{ErrorLog: slogPrinter{s.log}}))
	return s, nil
}

// ConfigLoaded records the outcome of a policy load or reload for the
// config gauges: on failure the old policy stays and the gauge says 0.
func (s *Server) ConfigLoaded(ok bool, at time.Time) {
	if !ok {
		s.ConfigFailed(at, "")
		return
	}
	s.reloadOK.Set(1)
	s.reloadTime.Set(float64(at.UnixNano()) / 1e9)
	s.mu.Lock()
	s.loaded, s.failed = at, ""
	s.mu.Unlock()
}

// ConfigFailed records a reload that failed (why: its error, "" when not
// known): the gauge says 0, and the reports served say so in a note until
// a reload succeeds, so that `egressd report` after an edit and a reload
// does not pass the refused file for the running policy.
func (s *Server) ConfigFailed(at time.Time, why string) {
	s.reloadOK.Set(0)
	const stamp = reloadStamp
	note := "the last policy reload at " + at.UTC().Format(stamp) + " failed"
	if why != "" {
		note += " (" + why + ")"
	}
	note += ": the running policy is still"
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.loaded.IsZero() {
		note += " the one loaded before"
	} else {
		note += " the one loaded at " + s.loaded.UTC().Format(stamp)
	}
	s.failed = note + "; fix the file and reload again"
}

// ConfigPartlyLoaded records a reload whose policy was taken but another
// part of which was refused (why: its error; the proxy users file): the
// gauge says 0, as for ConfigFailed, and the reports served say so in a
// note until a reload succeeds; the note does not say the policy before
// still runs, since the reload's does (and the report's rules are its).
func (s *Server) ConfigPartlyLoaded(at time.Time, why string) {
	s.reloadOK.Set(0)
	note := "the last reload at " + at.UTC().Format(reloadStamp) + " failed in part"
	if why != "" {
		note += " (" + why + ")"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loaded = at
	s.failed = note + ": its policy runs, what it refused runs as loaded before; fix the file and reload again"
}

// reloadStamp is how the reload notes write a time.
const reloadStamp = "2006-01-02 15:04:05Z"

// Handler returns the admin API's handler (for tests, or to mount
// elsewhere): the endpoints behind the Host check (hostOK) and the
// headers that keep other origins out.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// No response is for another origin: not to be framed (the
		// page's own CSP says so too), sniffed into a script or a
		// style, or loaded by a page of another site (no-cors). No
		// Access-Control-Allow-Origin is ever sent.
		h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Cross-Origin-Resource-Policy", "same-origin")
		if !s.hostOK(r.Host) {
			s.logRefused(r)
			h.Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(http.StatusMisdirectedRequest)
			fmt.Fprintln(w, "egressd admin: not a host this server answers to; use its address, localhost or a name of --admin-hosts")
			return
		}
		s.mux.ServeHTTP(w, r)
	})
}

// hostOK reports whether the server answers to host, a request's Host
// (for an absolute-form request, the URL's): an IP literal, localhost or
// a name of Config.Hosts, with or without a port. Anything else is a
// name the browser resolved on someone's word: DNS rebinding gives a
// page on attacker.example the gateway's address, and the page reads the
// admin API as its own origin. No Host at all (HTTP/1.0) is no browser's.
func (s *Server) hostOK(host string) bool {
	if host == "" {
		return true
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	for i := range len(host) {
		if host[i] >= 0x80 { // no Unicode case folding into a name: K (U+212A) is not k
			return false
		}
	}
	host = normalHost(host)
	return host == "localhost" || s.hosts[host]
}

// CheckHost checks a name of Config.Hosts: letters, digits, '-', '_'
// and dots, without a port.
func CheckHost(h string) error {
	n := normalHost(h)
	if n == "" {
		return fmt.Errorf("admin: host %q: expected a name", h)
	}
	for _, c := range n {
		if c >= 0x80 {
			// A browser sends an internationalized name in its
			// ASCII (xn--) form, the one hostOK compares.
			return fmt.Errorf("admin: host %q: expected a name in ASCII: an internationalized name in its xn-- form", h)
		}
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("admin: host %q: expected a name (letters, digits, '-', '_', '.'), without a port", h)
		}
	}
	return nil
}

// normalHost is a host name as hostOK compares it: lower case, without
// the final dot.
func normalHost(h string) string {
	return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(h)), ".")
}

// refusedEvery paces the refusal log: a page that fetches in a loop
// logs a line a minute, with the count of the refusals between.
const refusedEvery = time.Minute

// logRefused logs a request hostOK refused, at most once a refusedEvery.
func (s *Server) logRefused(r *http.Request) {
	n, ok := s.refused.event(s.now(), refusedEvery)
	if !ok {
		return
	}
	s.log.Warn("admin: refused a request for a host the admin server does not answer to (DNS rebinding?); --admin-hosts names more",
		"host", r.Host, "remote", r.RemoteAddr, "path", r.URL.Path, "refused", n)
}

// Addr returns the listening address once Run listens, else the
// configured one.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return s.ln.Addr().String()
	}
	return s.cfg.Addr
}

// Run listens and serves until ctx is done or Close is called.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("admin: listen %s: %w", s.cfg.Addr, err)
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: s.writeTimeout, IdleTimeout: 60 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) }}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.srv, s.ln = srv, ln
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	// Close (Shutdown closes the listener) and ctx end the wrapper's
	// pause (TestRunOutOfFDs). At ctx's end the wrapper may end it
	// before the Close above has begun Shutdown: Serve then returns the
	// wrapper's net.ErrClosed, not http.ErrServerClosed, and that is a
	// stop as asked too (TestRunOutOfFDsCancel).
	err = srv.Serve(RetryListener(ln, ctx.Done(), s.log))
	if err != nil && !errors.Is(err, http.ErrServerClosed) && !(ctx.Err() != nil && errors.Is(err, net.ErrClosed)) {
		return fmt.Errorf("admin: serve: %w", err)
	}
	return nil
}

// RetryListener wraps ln, an admin listener, for an http.Server: it waits
// out EMFILE and the like with a pause that stop and the listener's close
// end, and logs to log one line every 10 s at most (admin: accept
// failing: retrying). http.Server would sleep up to a second through a
// Shutdown and write each retry to stderr. Run serves with it, and so
// does egressd run's admin listener.
func RetryListener(ln net.Listener, stop <-chan struct{}, log *slog.Logger) net.Listener {
	return netutil.NewRetryListener(ln, stop, func(err error) {
		log.Warn("admin: accept failing: retrying", "listen", ln.Addr().String(), audit.LogError, audit.ErrorText(err))
	})
}

// Close stops the server, letting requests in flight finish for up to
// 5 s. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	srv := s.srv
	already := s.closed
	s.closed = true
	s.mu.Unlock()
	if already || srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return srv.Close()
	}
	return nil
}

// ParseSince parses a report window: a duration back from now ("24h",
// "90m", "7d") or an RFC 3339 time. Empty means everything.
func ParseSince(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if days, ok := strings.CutSuffix(s, "d"); ok {
		var n int
		// Beyond the longest Duration (about 292 years) the product
		// would wrap, into a window that starts in the future.
		if _, err := fmt.Sscanf(days, "%d", &n); err == nil && n > 0 && fmt.Sprint(n) == days && n <= int(math.MaxInt64/(24*time.Hour)) {
			return now.Add(-time.Duration(n) * 24 * time.Hour), nil
		}
	}
	if d, err := time.ParseDuration(s); err == nil && d > 0 {
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("admin: since %q: expected a duration such as 24h or 7d, or an RFC 3339 time", s)
}

// capped serves a report with h while fewer than maxReports are in
// progress, and fewer than clientReports of the request's client address,
// holding a slot until h returns; past them it answers at once, 503 with
// Retry-After, and counts and logs it (at most a line a refusedEvery). A
// request with a body is answered 400 at once: net/http ends a request's
// context when its client leaves only once the body was read to its end,
// so a report asked with a body never sent went on (its window read,
// built) for no one, holding its slot until reportLimit.
func (s *Server) capped(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength != 0 {
			// Closed after: net/http would wait to discard the body first.
			w.Header().Set("Connection", "close")
			http.Error(w, "admin: a report request has no body", http.StatusBadRequest)
			return
		}
		client := clientKey(r.RemoteAddr)
		if !s.takeClientSlot(client) {
			s.refuseBusy(w, r, limitClient)
			return
		}
		defer s.giveClientSlot(client)
		select {
		case s.reports <- struct{}{}:
			defer func() { <-s.reports }()
			h(w, r)
		default:
			s.refuseBusy(w, r, limitAll)
		}
	}
}

// clientKey is the client a report request's remote address counts
// under (clientReports): its IP address, an IPv6 one's /64.
func clientKey(remote string) string {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return remote
	}
	a := ap.Addr().Unmap()
	if a.Is6() {
		if p, err := a.WithZone("").Prefix(64); err == nil {
			return p.String()
		}
	}
	return a.String()
}

// takeClientSlot takes one of client's clientReports slots, if it has
// one left.
func (s *Server) takeClientSlot(client string) bool {
	s.slotsMu.Lock()
	defer s.slotsMu.Unlock()
	if s.clientSlots[client] >= clientReports {
		return false
	}
	if s.clientSlots == nil {
		s.clientSlots = map[string]int{}
	}
	s.clientSlots[client]++
	return true
}

// giveClientSlot gives back a slot takeClientSlot took.
func (s *Server) giveClientSlot(client string) {
	s.slotsMu.Lock()
	defer s.slotsMu.Unlock()
	if s.clientSlots[client]--; s.clientSlots[client] <= 0 {
		delete(s.clientSlots, client)
	}
}

// The limit label values of egress_admin_reports_refused_total.
const (
	limitAll    = "all"    // maxReports in progress
	limitClient = "client" // clientReports of the request's client in progress
)

// refuseBusy answers a report past maxReports (limitAll) or past its
// client's clientReports (limitClient).
func (s *Server) refuseBusy(w http.ResponseWriter, r *http.Request, limit string) {
	s.refusedRep.WithLabelValues(limit).Inc()
	pace, msg, body := &s.busy, "admin: too many reports in progress",
		fmt.Sprintf("admin: %d reports in progress, as many as are made at a time; retry in %s s", maxReports, busyRetryAfter)
	n := maxReports
	if limit == limitClient {
		pace, msg, body = &s.greedy, "admin: a client has as many reports in progress as one may",
			fmt.Sprintf("admin: %d reports of this client in progress, as many as are made at a time for one; retry in %s s", clientReports, busyRetryAfter)
		n = clientReports
	}
	if refused, log := pace.event(s.now(), refusedEvery); log {
		s.log.Warn(msg+"; answered 503, retry after "+busyRetryAfter+" s",
			"remote", r.RemoteAddr, "path", r.URL.Path, "in_progress", n, "refused", refused)
	}
	w.Header().Set("Retry-After", busyRetryAfter)
	http.Error(w, body, http.StatusServiceUnavailable)
}

func (s *Server) report(w http.ResponseWriter, r *http.Request) (*audit.Report, bool) {
	since, err := ParseSince(r.URL.Query().Get("since"), time.Now())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return nil, false
	}
	// The request's context ends when its client leaves; reportLimit
	// bounds the rest. Nothing is written meanwhile, so the write
	// deadline (writeTimeout from the request) may pass: it is set
	// again, to writeTimeout, for the answer once the report is made,
	// and a window's read longer than writeTimeout reaches its client,
	// rather than a cut connection every time. A deadline that passed
	// with no write in progress cuts nothing. (An error, a test's
	// recorder: net/http's deadline stays.)
	rc := http.NewResponseController(w)
	ctx, cancel := context.WithTimeout(r.Context(), s.reportLimit)
	defer cancel()
	defer watchClient(r, cancel)()
	rep, err := s.deps.Reporter.ReportContext(ctx, audit.ReportOptions{Since: since})
	rc.SetWriteDeadline(time.Now().Add(s.writeTimeout))
	if err != nil {
		s.log.Debug("admin: report given up", audit.LogError, err)
		msg := "admin: report: " + err.Error()
		if errors.Is(err, context.DeadlineExceeded) && r.Context().Err() == nil {
			msg = fmt.Sprintf("admin: report: not made within %v (its since= window read from the event log, or its wait for another's); ask for a shorter since=", s.reportLimit)
		}
		http.Error(w, msg, http.StatusServiceUnavailable)
		return nil, false
	}
	s.mu.Lock()
	if s.failed != "" {
		rep.Notes = append([]string{s.failed}, rep.Notes...)
	}
	s.mu.Unlock()
	return rep, true
}

// connKey keys a request's connection in its context (Run's ConnContext).
type connKey struct{}

// clientWatch is how often watchClient looks at a report's connection.
const clientWatch = 250 * time.Millisecond

// watchClient calls cancel when r's client has left, its connection no
// longer established, until the stop it returns is called. net/http ends
// a request's context when its client leaves only while it watches the
// connection, and it stops once it reads a byte of a next request
// (HTTP/1.1 pipelining): such a client that left would hold its report's
// slots, and the one window read at a time, for the whole reportLimit.
func watchClient(r *http.Request, cancel context.CancelFunc) (stop func()) {
	c, ok := r.Context().Value(connKey{}).(net.Conn)
	if !ok {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(clientWatch)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if netutil.PeerGone(c) {
					cancel()
					return
				}
			}
		}
	}()
	return func() { close(done) }
}

func (s *Server) serveJSON(w http.ResponseWriter, r *http.Request) {
	rep, ok := s.report(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if err := rep.WriteJSON(w); err != nil {
		s.log.Debug("admin: write report", audit.LogError, err)
	}
}

func (s *Server) serveHTML(w http.ResponseWriter, r *http.Request) {
	rep, ok := s.report(w, r)
	if !ok {
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	// The page is self-contained: forbid anything external, and scripts.
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'")
	if err := rep.WriteHTML(w); err != nil {
		s.log.Debug("admin: write report", audit.LogError, err)
	}
}

func (s *Server) serveReady(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	var failing []string
	for _, c := range s.deps.Checks {
		if err := c.Fn(); err != nil {
			failing = append(failing, fmt.Sprintf("%s: %v", c.Name, err))
		}
	}
	if len(failing) > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		for _, f := range failing {
			fmt.Fprintln(w, f)
		}
		return
	}
	fmt.Fprintln(w, "ready")
}

// slogPrinter adapts promhttp's error log to slog.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) { p.log.Warn("admin: metrics: " + fmt.Sprint(v...)) }
