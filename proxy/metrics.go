package proxy

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// metrics are the proxy's Prometheus series: namespace egress, subsystem
// proxy, bounded labels only.
type metrics struct {
	conns     *prometheus.CounterVec // listener, verdict, mode
	active    prometheus.Gauge
	bytes     *prometheus.CounterVec // direction
	limitHits *prometheus.CounterVec // scope
	peek      prometheus.Histogram
	conntrack *prometheus.CounterVec // result
	requests  *prometheus.CounterVec // verdict, mode
	hellos    *prometheus.CounterVec // parser
	revoked   *prometheus.CounterVec // mode
	reopens   prometheus.Counter
	// The fast path's (ServeQueue).
	fastSYNs     *prometheus.CounterVec // result
	fastVerdicts *prometheus.CounterVec // verdict
	fastErrors   *prometheus.CounterVec // op
	fastFlows    prometheus.Gauge
	fastDecided  *prometheus.CounterVec // on
	// The series of fastDecided, resolved once.
	fastOnQueue, fastOnWorker prometheus.Counter
	// The hellos series of each parser, resolved once: the peek counts
	// every TLS connection.
	helloFast, helloTLS prometheus.Counter
	// The series counted per connection or per queued packet, each
	// resolved at its first count (lazyCounter).
	connsOf             [2][2][2]lazyCounter // listener, verdict, mode (connsIndex)
	requestsOf          [2][2]lazyCounter    // verdict, mode (connsIndex)
	bytesOut, bytesIn   lazyCounter
	fastVerdictOf       [fastVerdictKinds]lazyCounter
	fastSYNOf           [synResults]lazyCounter
	fastErrOf           [fastErrOps]lazyCounter
	limitOf             [limitScopes]lazyCounter // limit_rejections_total: counted per refused connection
	ctSame, ctRemapped  prometheus.Counter       // conntrack: served from the start
	ctNotFound, ctError prometheus.Counter
	ctTimeout           prometheus.Counter
	revokedEnforce      prometheus.Counter // served from the start
	revokedAudit        prometheus.Counter
}

// lazyCounter is one series of a CounterVec, looked up at its first count
// and kept: later counts cost no look-up of its labels (hashing them,
// the vec's lock), which the fast path paid per queued packet. As with a
// look-up at each count, the series exists from its first count on (the
// README's †), not before.
type lazyCounter struct {
	vec    *prometheus.CounterVec
	labels []string
	c      atomic.Pointer[prometheus.Counter]
}

func (l *lazyCounter) init(vec *prometheus.CounterVec, labels ...string) {
	l.vec, l.labels = vec, labels
}

// counter is the series, looked up at the first call: callers racing
// there get the same series (the vec's).
func (l *lazyCounter) counter() prometheus.Counter {
	if c := l.c.Load(); c != nil {
		return *c
	}
	c := l.vec.WithLabelValues(l.labels...)
	l.c.Store(&c)
	return c
}

func (l *lazyCounter) Inc()          { l.counter().Inc() }
func (l *lazyCounter) Add(v float64) { l.counter().Add(v) }

// The scopes of limit_rejections_total: the proxy's connection caps
// (netutil.SlotRefusal's), the peek memory budget (peekRefused).
type limitScope uint8

const (
	limitGlobal limitScope = iota
	limitClient
	limitPeek
	limitScopes
)

var limitScopeLabels = [limitScopes]string{"global", "client", "peek"}

// limitHit counts a connection refused for a limit of scope: a flood of
// them (the case the limits are for) looks no series up.
func (m *metrics) limitHit(scope string) {
	for i, l := range limitScopeLabels {
		if l == scope {
			m.limitOf[i].Inc()
			return
		}
	}
	m.limitHits.WithLabelValues(scope).Inc() // a scope the slots added since
}

// The fast path's verdicts (fast_verdicts_total{verdict}).
type fastVerdictKind uint8

const (
	fvAccept fastVerdictKind = iota
	fvAcceptPending
	fvRepeatAllowed
	fvRepeatDenied
	fvDrop
	fastVerdictKinds
)

var fastVerdictLabels = [fastVerdictKinds]string{"accept", "accept-pending", "repeat-allowed", "repeat-denied", "drop"}

// What the fast path says of a SYN (fast_syns_total{result}); synNone:
// nothing yet (declines: the SYN is fast).
type synResult uint8

const (
	synNone synResult = iota
	synResFast
	synPort
	synNotLearned
	synInspect
	synGuard
	synLimit
	synHeld
	synFastOpen
	synTableFull
	synAuditMode
	synMalformed
	synISNMismatch
	synResults
)

var synResultLabels = [synResults]string{"", "fast", "port", "not-learned", "inspect", "guard", "limit", "held", "fast-open", "table-full", "audit-mode", "malformed", "isn-mismatch"}

// The fast path's failures (fast_errors_total{op}).
type fastErrOp uint8

const (
	feVerdict fastErrOp = iota
	feParse
	feUnknownFlow
	feInject
	feServe
	feLateConflict
	feResetPayload
	fastErrOps
)

var fastErrLabels = [fastErrOps]string{"verdict", "parse", "unknown-flow", "inject", "serve", "late-conflict", "reset-payload"}

// connsIndex is where conns' series of (listener, verdict, mode) is in
// connsOf; ok false: a label value it has no place for (looked up).
func connsIndex(listener string, v policy.Verdict, m policy.Mode) (l, vi, mi int, ok bool) {
	switch listener {
	case "transparent":
	case "explicit":
		l = 1
	default:
		return 0, 0, 0, false
	}
	switch v {
	case policy.Allow:
	case policy.Deny:
		vi = 1
	default:
		return 0, 0, 0, false
	}
	switch m {
	case policy.ModeEnforce:
	case policy.ModeAudit:
		mi = 1
	default:
		return 0, 0, 0, false
	}
	return l, vi, mi, true
}

// connDone counts a connection decided (conns), and its bytes.
func (m *metrics) connDone(listener string, v policy.Verdict, mode policy.Mode, out, in uint64) {
	if l, vi, mi, ok := connsIndex(listener, v, mode); ok {
		m.connsOf[l][vi][mi].Inc()
	} else {
		m.conns.WithLabelValues(listener, string(v), string(mode)).Inc()
	}
	m.bytesOut.Add(float64(out))
	m.bytesIn.Add(float64(in))
}

// requestDone counts a later HTTP request decided (requests).
func (m *metrics) requestDone(v policy.Verdict, mode policy.Mode) {
	if _, vi, mi, ok := connsIndex("transparent", v, mode); ok {
		m.requestsOf[vi][mi].Inc()
		return
	}
	m.requests.WithLabelValues(string(v), string(mode)).Inc()
}

// revokedIn is reload_revoked_total's series of mode.
func (m *metrics) revokedIn(mode policy.Mode) prometheus.Counter {
	switch mode {
	case policy.ModeEnforce:
		return m.revokedEnforce
	case policy.ModeAudit:
		return m.revokedAudit
	}
	return m.revoked.WithLabelValues(string(mode))
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		conns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "connections_total",
			Help: "Connections (and explicit-proxy requests) decided, by listener, verdict and mode.",
		}, []string{"listener", "verdict", "mode"}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "active_connections",
			Help: "Client connections currently open.",
		}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "bytes_total",
			Help: "Bytes forwarded, by direction (out: client to destination).",
		}, []string{"direction"}),
		limitHits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "limit_rejections_total",
			Help: "Connections refused because a concurrency limit was reached, by scope.",
		}, []string{"scope"}),
		peek: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "peek_duration_seconds",
			Help:    "Time from accept to a decision on the transparent listener.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		conntrack: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "conntrack_lookups_total",
			Help: "Original-source lookups of transparent connections, by result: same (the socket's address was the client's), remapped (NAT had changed the source port; the client's was restored), not-found (no conntrack entry), timeout (no free socket or no answer within 200 ms) or error; all but remapped keep the socket's address.",
		}, []string{"result"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "http_requests_total",
			Help: "Later HTTP requests on plain-HTTP transparent connections (the first is the connection's) and requests in inspected connections, each decided on its own, by verdict and mode.",
		}, []string{"verdict", "mode"}),
		hellos: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "hello_parses_total",
			Help: "ClientHellos read on the transparent listener, by parser: fast (internal/tlshello alone: the hellos real clients send, and those it refuses) or crypto-tls (crypto/tls asked too: hellos of unusual shape, hellos that came in more pieces than the proxy reads for tlshello alone, and hellos cut short).",
		}, []string{"parser"}),
		revoked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "reload_revoked_total",
			Help: "Open connections a policy reload's new policy denies, by mode: enforce (the proxy closed them, close policy-revoked) or audit (kept, recorded as would-be-denied).",
		}, []string{"mode"}),
		reopens: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "listener_reopens_total",
			Help: "Explicit-proxy listeners opened again on their address after their accept failed for good (closed, then opened after a wait: keepExplicit).",
		}),
		fastSYNs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "fast_syns_total",
			Help: "SYNs the fast path answered, by result: fast (taken: decided from its queued packets), or why it went to the proxy: port (not one of the fast ports), not-learned (the address was not given out by our DNS to this client for a name an allowing rule covers), inspect (host/path rules decide the host), guard (special range, the gateway, loopback), limit (a connection limit), fast-open (the SYN carries data), table-full, audit-mode, malformed.",
		}, []string{"result"}),
		fastVerdicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "fast_verdicts_total",
			Help: "Verdicts the fast path gave queued packets: accept, accept-pending (a fast SYN), repeat-allowed (the packet that hands an allowed connection to the kernel), repeat-denied (the packet that marks a connection denied), drop.",
		}, []string{"verdict"}),
		fastErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "fast_errors_total",
			Help: "Fast-path failures, by op: verdict (the queue refused a verdict), parse (a queued packet that is not TCP the fast path reads), unknown-flow (a queued segment of no flow the table holds: denied), inject (a deny answer or reset not sent), serve (the queue's reader failed).",
		}, []string{"op"}),
		fastDecided: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "fast_decisions_total",
			Help: "Fast connections decided, by where: queue (on the queue's reader, by the segment that completed the ClientHello: no goroutine woken) or worker (a worker that waited for the client's bytes: a silent client, bytes that are not TLS, a stream that ended or was refused, a server name only a fresh lookup vouches for).",
		}, []string{"on"}),
		fastFlows: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "egress", Subsystem: "proxy", Name: "fast_flows",
			Help: "Connections in the fast path's flow table: being decided, or decided in the last 30 s.",
		}),
	}
	for _, mode := range []string{"enforce", "audit"} { // served from the start, at 0
		m.revoked.WithLabelValues(mode)
	}
	for _, r := range []string{"same", "remapped", "not-found", "timeout", "error"} { // served from the start, at 0
		m.conntrack.WithLabelValues(r)
	}
	m.helloFast = m.hellos.WithLabelValues("fast")
	m.helloTLS = m.hellos.WithLabelValues("crypto-tls")
	m.fastOnQueue = m.fastDecided.WithLabelValues("queue")
	m.fastOnWorker = m.fastDecided.WithLabelValues("worker")
	m.revokedEnforce = m.revoked.WithLabelValues(string(policy.ModeEnforce))
	m.revokedAudit = m.revoked.WithLabelValues(string(policy.ModeAudit))
	m.ctSame, m.ctRemapped = m.conntrack.WithLabelValues("same"), m.conntrack.WithLabelValues("remapped")
	m.ctNotFound, m.ctError = m.conntrack.WithLabelValues("not-found"), m.conntrack.WithLabelValues("error")
	m.ctTimeout = m.conntrack.WithLabelValues("timeout")
	for l, listener := range []string{"transparent", "explicit"} {
		for vi, v := range []policy.Verdict{policy.Allow, policy.Deny} {
			for mi, mode := range []policy.Mode{policy.ModeEnforce, policy.ModeAudit} {
				m.connsOf[l][vi][mi].init(m.conns, listener, string(v), string(mode))
				if l == 0 {
					m.requestsOf[vi][mi].init(m.requests, string(v), string(mode))
				}
			}
		}
	}
	m.bytesOut.init(m.bytes, "out")
	m.bytesIn.init(m.bytes, "in")
	for i := range m.fastVerdictOf {
		m.fastVerdictOf[i].init(m.fastVerdicts, fastVerdictLabels[i])
	}
	for i := synResFast; i < synResults; i++ {
		m.fastSYNOf[i].init(m.fastSYNs, synResultLabels[i])
	}
	for i := range m.fastErrOf {
		m.fastErrOf[i].init(m.fastErrors, fastErrLabels[i])
	}
	for i := range m.limitOf {
		m.limitOf[i].init(m.limitHits, limitScopeLabels[i])
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.conns, m.active, m.bytes, m.limitHits, m.peek, m.conntrack, m.requests, m.hellos, m.revoked, m.reopens, m.fastSYNs, m.fastVerdicts, m.fastErrors, m.fastFlows, m.fastDecided} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// caExpiryGauge is the inspection CA's end, end read at each scrape (see
// Proxy.caExpiry).
func caExpiryGauge(end func() float64) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "egress", Subsystem: "proxy", Name: "inspect_ca_expiry_timestamp_seconds",
		Help: "End of the inspection CA certificate's validity, in Unix seconds; 0 with inspection off (with it on, the CA is loaded when the proxy starts); 1 while inspection is on and the CA cannot be loaded.",
	}, end)
}
