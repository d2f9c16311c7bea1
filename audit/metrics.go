package audit

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// ledgerMetrics count live events per rule and verdict. Labels are bounded:
// rule names come from the policy, verdict and mode are constants; never a
// client address or a hostname.
type ledgerMetrics struct {
	flows      *prometheus.CounterVec
	queries    *prometheus.CounterVec
	requests   *prometheus.CounterVec
	duplicates prometheus.Counter
}

// noRule is the rule label of a denial no rule is credited with.
const noRule = "(none)"

// RegisterMetrics registers the ledger's metrics on reg:
// egress_audit_flows_total, egress_audit_queries_total and
// egress_audit_requests_total {rule, verdict, mode}, egress_audit_duplicate_events_total and the gauge
// egress_audit_ledger_entries. Only live events (Emit, or a journal's
// Emit) count, not the ones replayed from the log at start.
func (l *Ledger) RegisterMetrics(reg prometheus.Registerer) error {
	m := &ledgerMetrics{
		flows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "flows_total",
			Help: "Distinct flows recorded, by credited rule, verdict and mode.",
		}, []string{"rule", "verdict", "mode"}),
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "queries_total",
			Help: "Distinct DNS queries recorded, by credited rule, verdict and mode.",
		}, []string{"rule", "verdict", "mode"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "requests_total",
			Help: "Later HTTP requests on plain-HTTP connections and requests in inspected connections (each decided on its own), by credited rule, verdict and mode.",
		}, []string{"rule", "verdict", "mode"}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "duplicate_events_total",
			Help: "Events merged into a flow or query another component already reported.",
		}),
	}
	size := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "egress", Subsystem: "audit", Name: "ledger_entries",
		Help: "Entries held by the ledger: rules, dropped destinations and remembered flows.",
	}, func() float64 { return float64(l.Len()) })
	for _, c := range []prometheus.Collector{m.flows, m.queries, m.requests, m.duplicates, size} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("audit: register metrics: %w", err)
		}
	}
	l.mu.Lock()
	l.metrics = m
	l.mu.Unlock()
	return nil
}

func (m *ledgerMetrics) observe(ev *Event, counted bool) {
	if !counted {
		if ev.Kind == KindFlow || ev.Kind == KindDNS {
			m.duplicates.Inc()
		}
		return
	}
	rule := ev.Rule
	if rule == "" {
		rule = noRule
	}
	verdict := string(ev.Verdict)
	if verdict != string(policy.Allow) {
		verdict = string(policy.Deny)
	}
	mode := string(ev.Mode)
	if mode != string(policy.ModeEnforce) {
		mode = string(policy.ModeAudit)
	}
	switch ev.Kind {
	case KindFlow:
		m.flows.WithLabelValues(rule, verdict, mode).Inc()
	case KindDNS:
		m.queries.WithLabelValues(rule, verdict, mode).Inc()
	case KindRequest:
		m.requests.WithLabelValues(rule, verdict, mode).Inc()
	}
}
