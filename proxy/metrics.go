package proxy

import "github.com/prometheus/client_golang/prometheus"

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
