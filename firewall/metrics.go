package firewall

import "github.com/prometheus/client_golang/prometheus"

// metrics are the firewall's Prometheus metrics (namespace egress,
// subsystem firewall). Labels are bounded: op, result, mode, rule.
type metrics struct {
	applies   *prometheus.CounterVec // op: install|remove|learn; result: ok|error
	installed *prometheus.GaugeVec   // mode: 1 for the installed mode, else 0
	learned   *prometheus.CounterVec // rule: addresses written to its sets
	setFull   prometheus.Counter
	// learnRefused counts the addresses decided under another policy than
	// the installed one that the installed rule does not cover
	// (ErrNotCovered): not written.
	learnRefused prometheus.Counter
	// flows counts the connections a look after a reload kept or cut
	// (result: kept|cut); flowErrors the looks that failed.
	flows      *prometheus.CounterVec
	flowErrors prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		applies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "apply_total",
			Help: "Netlink transactions on egressd's nftables table, by operation and result.",
		}, []string{"op", "result"}),
		installed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "installed",
			Help: "1 for the mode of the installed ruleset, 0 otherwise (all 0: nothing installed).",
		}, []string{"mode"}),
		learned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "learned_addresses_total",
			Help: "DNS-learned addresses written to a rule's nftables sets (new or refreshed).",
		}, []string{"rule"}),
		setFull: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "learned_set_full_total",
			Help: "Learned addresses refused because their set was full.",
		}),
		learnRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "learn_refused_total",
			Help: "DNS-learned addresses not written because they were decided under another policy than the installed one, whose rule of that name does not cover the name for the client.",
		}),
		flows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "reload_flows_total",
			Help: "Connections the enforce ruleset had let out, looked at after an install or reload: kept, or cut because the new policy does not allow them.",
		}, []string{"result"}),
		flowErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "reload_flow_errors_total",
			Help: "Looks at the connections already out, after an install or reload, that failed (conntrack netlink).",
		}),
	}
	// Served from the start, at 0.
	m.flows.WithLabelValues("kept")
	m.flows.WithLabelValues("cut")
	if reg != nil {
		m.applies = register(reg, m.applies)
		m.installed = register(reg, m.installed)
		m.learned = register(reg, m.learned)
		m.setFull = register(reg, m.setFull)
		m.learnRefused = register(reg, m.learnRefused)
		m.flows = register(reg, m.flows)
		m.flowErrors = register(reg, m.flowErrors)
	}
	return m
}

// RegisterMetrics registers the firewall's metrics on reg before any
// Firewall exists (egressd run in audit mode may never create one), so
// that they are served from the start; a Firewall New makes with the same
// Registerer later counts on them.
func RegisterMetrics(reg prometheus.Registerer) {
	newMetrics(reg)
}

// register registers c on reg, or returns the collector of that name
// already registered there. Any other error is a programming error.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		if are, ok := err.(prometheus.AlreadyRegisteredError); ok {
			if old, ok := are.ExistingCollector.(C); ok {
				return old
			}
		}
		panic(err)
	}
	return c
}
