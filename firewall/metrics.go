package firewall

import "github.com/prometheus/client_golang/prometheus"

// metrics are the firewall's Prometheus metrics (namespace egress,
// subsystem firewall). Labels are bounded: op, result, mode, rule.
type metrics struct {
	applies   *prometheus.CounterVec // op: install|remove|learn; result: ok|error
	installed *prometheus.GaugeVec   // mode: 1 for the installed mode, else 0
	learned   *prometheus.CounterVec // rule: addresses written to its sets
	setFull   prometheus.Counter
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
		flows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "reload_flows_total",
			Help: "Connections the enforce ruleset had let out, looked at after an install or reload: kept, or cut because the new policy does not allow them.",
		}, []string{"result"}),
		flowErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "firewall", Name: "reload_flow_errors_total",
			Help: "Looks at the connections already out, after an install or reload, that failed (conntrack netlink).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.applies, m.installed, m.learned, m.setFull, m.flows, m.flowErrors)
	}
	return m
}
