package dnsfilter

import (
	"sync/atomic"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// metrics are the forwarder's Prometheus series: namespace egress,
// subsystem dnsfilter. Labels are bounded: verdict, mode, rcode, and the
// configured upstream addresses; never a client or a name.
type metrics struct {
	queries          *prometheus.CounterVec // verdict, mode, rcode
	queryDuration    *prometheus.HistogramVec
	cacheHits        prometheus.Counter
	cacheMisses      prometheus.Counter
	shared           prometheus.Counter // misses answered by another query's upstream exchange
	rateLimited      prometheus.Counter
	tunnelAlarms     prometheus.Counter
	dropped          *prometheus.CounterVec // reason: overload, malformed, panic
	tcpRefused       *prometheus.CounterVec // scope: global, client
	filtered         *prometheus.CounterVec // kind: rebinding, ech
	upstreamRequests *prometheus.CounterVec // upstream, proto
	upstreamFailures *prometheus.CounterVec // upstream
	upstreamUp       *prometheus.GaugeVec   // upstream
	upstreamDuration *prometheus.HistogramVec
	learnTotal       *prometheus.CounterVec // result: ok, timeout, error
	learnOK          prometheus.Counter
	learnTimeout     prometheus.Counter
	learnError       prometheus.Counter
	learnDuration    prometheus.Histogram
	setFull          *prometheus.CounterVec // action: trimmed, servfail
	setFullTrimmed   prometheus.Counter
	setFullServfail  prometheus.Counter

	// queryCounters caches the queries children for the hot path:
	// [verdict allow/deny][mode audit/enforce][rcode 0..23].
	queryCounters [2][2][24]atomic.Pointer[prometheus.Counter]
}

func newMetrics() *metrics {
	const ns, sub = "egress", "dnsfilter"
	m := &metrics{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "queries_total",
			Help: "DNS queries answered, by verdict, policy mode and response code."}, []string{"verdict", "mode", "rcode"}),
		queryDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "query_duration_seconds",
			Help:    "Time from a query's arrival to its answer, by how it was answered (cache, upstream, local).",
			Buckets: []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}}, []string{"path"}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "cache_hits_total",
			Help: "Queries answered from the cache."}),
		cacheMisses: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "cache_misses_total",
			Help: "Queries that were not in the cache and went upstream (or joined an identical query in flight)."}),
		shared: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "upstream_shared_total",
			Help: "Cache misses answered by an identical query already in flight (sent upstream once)."}),
		rateLimited: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "rate_limited_total",
			Help: "Queries dropped or refused because their client exceeded its rate."}),
		tunnelAlarms: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "tunnel_alarms_total",
			Help: "Alarms raised because a client sent more distinct names of a wildcard rule's zone upstream in a window than the tunnel threshold, all clients more than twice it, or a client more than ten times it in sixty windows (THREATS.md E2)."}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "dropped_total",
			Help: "Packets not answered, by reason (overload, malformed, panic)."}, []string{"reason"}),
		tcpRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "tcp_refused_total",
			Help: "Client TCP connections closed as soon as accepted because a connection limit was hit, by scope (global, client)."}, []string{"scope"}),
		filtered: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "answers_filtered_total",
			Help: "Upstream answers changed by the answer filter, by kind (rebinding, ech)."}, []string{"kind"}),
		upstreamRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "upstream_requests_total",
			Help: "Queries sent to upstreams, by upstream and transport."}, []string{"upstream", "proto"}),
		upstreamFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "upstream_failures_total",
			Help: "Upstream attempts that timed out or failed, by upstream."}, []string{"upstream"}),
		upstreamUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "upstream_up",
			Help: "1 when the upstream is considered healthy, 0 when it is skipped as down."}, []string{"upstream"}),
		upstreamDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "upstream_duration_seconds",
			Help:    "Duration of one upstream attempt, by upstream.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}}, []string{"upstream"}),
		learnTotal: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "firewall_learn_total",
			Help: "Allowed answers whose addresses were handed to the firewall before the answer was sent, by result (ok; timeout or error: the answer went out anyway)."}, []string{"result"}),
		learnDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "firewall_learn_duration_seconds",
			Help:    "Time an allowed answer waited for the firewall to take its addresses.",
			Buckets: []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5}}),
		setFull: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "set_full_answers_total",
			Help: "Enforce-mode answers changed because a full learned set refused addresses the client could not reach otherwise, by action (trimmed: those addresses left out; servfail: none was left, or the answer could not be trimmed)."}, []string{"action"}),
	}
	// Every series of a bounded label exists from the start, at 0, so
	// that /metrics lists what the READMEs name before the first event
	// and a rate() over it sees the first increment.
	for _, scope := range []string{"global", "client"} {
		m.tcpRefused.WithLabelValues(scope)
	}
	for _, reason := range []string{"overload", "malformed", "panic"} {
		m.dropped.WithLabelValues(reason)
	}
	for _, kind := range []string{"rebinding", "ech"} {
		m.filtered.WithLabelValues(kind)
	}
	m.learnOK = m.learnTotal.WithLabelValues("ok")
	m.learnTimeout = m.learnTotal.WithLabelValues("timeout")
	m.learnError = m.learnTotal.WithLabelValues("error")
	m.setFullTrimmed = m.setFull.WithLabelValues("trimmed")
	m.setFullServfail = m.setFull.WithLabelValues("servfail")
	return m
}

func (m *metrics) register(r prometheus.Registerer, s *Server) error {
	cs := []prometheus.Collector{m.queries, m.queryDuration, m.cacheHits, m.cacheMisses, m.shared, m.rateLimited, m.tunnelAlarms,
		m.dropped, m.tcpRefused, m.filtered, m.upstreamRequests, m.upstreamFailures, m.upstreamUp, m.upstreamDuration, m.learnTotal, m.learnDuration, m.setFull,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "egress", Subsystem: "dnsfilter", Name: "cache_entries",
			Help: "Answers in the cache."}, func() float64 {
			if s.cache == nil {
				return 0
			}
			return float64(s.cache.len())
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "egress", Subsystem: "dnsfilter", Name: "cache_evictions_total",
			Help: "Unexpired answers evicted because the cache was full."}, func() float64 {
			if s.cache == nil {
				return 0
			}
			return float64(s.cache.evict.Load())
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "egress", Subsystem: "dnsfilter", Name: "learned_entries",
			Help: "Entries in the learned-address table."}, func() float64 { return float64(s.table.Len()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "egress", Subsystem: "dnsfilter", Name: "learned_feed_dropped_total",
			Help: "Learned-address changes lost by subscribers that did not keep up."}, func() float64 { return float64(s.table.Dropped()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "egress", Subsystem: "dnsfilter", Name: "learned_evictions_total",
			Help: "Unexpired learned addresses evicted, or not kept (audit-mode answers no rule allowed), because the table was full."}, func() float64 { return float64(s.table.Evicted()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "egress", Subsystem: "dnsfilter", Name: "learned_refused_total",
			Help: "Addresses of answers not learned: past the 64 one answer may add (dropped from the answer too), or of a client holding its share of a full table with none of its own to give up."}, func() float64 { return float64(s.table.Refused()) }),
	}
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// countQuery counts one answered query without a label lookup on the hot
// path.
func (m *metrics) countQuery(v policy.Verdict, mode policy.Mode, rcode int) {
	vi, mi := 0, 0
	if v != policy.Allow {
		vi = 1
	}
	if mode == policy.ModeEnforce {
		mi = 1
	}
	if rcode < 0 || rcode >= 24 {
		m.queries.WithLabelValues(string(v), string(mode), rcodeName(rcode)).Inc()
		return
	}
	p := &m.queryCounters[vi][mi][rcode]
	c := p.Load()
	if c == nil {
		cnt := m.queries.WithLabelValues(string(v), string(mode), rcodeString(rcode))
		c = &cnt
		p.Store(c)
	}
	(*c).Inc()
}

func rcodeString(rc int) string {
	if s, ok := dns.RcodeToString[rc]; ok {
		return s
	}
	return "OTHER"
}
