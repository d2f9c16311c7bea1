package capture

import (
	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// metrics are capture's Prometheus metrics (namespace egress, subsystem
// capture). Labels are bounded: verdict and mode only.
type metrics struct {
	flows *prometheus.CounterVec
}

func newMetrics() *metrics {
	return &metrics{
		flows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "capture", Name: "flows_total",
			Help: "Flows capture classified and reported (once each), by verdict and mode.",
		}, []string{"verdict", "mode"}),
	}
}

func (m *metrics) flow(d policy.Decision) {
	m.flows.WithLabelValues(string(d.Verdict), string(d.Mode)).Inc()
}

// register registers the metrics; counters kept by the pipeline are read
// at scrape time.
func (m *metrics) register(r prometheus.Registerer, c *Capture) error {
	counter := func(name, help string, f func(Stats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "capture", Name: name, Help: help,
		}, func() float64 { return float64(f(c.Stats())) })
	}
	cs := []prometheus.Collector{
		m.flows,
		counter("packets_total", "Packets capture read.", func(s Stats) uint64 { return s.Packets }),
		counter("bytes_total", "Bytes of packets capture read.", func(s Stats) uint64 { return s.Bytes }),
		counter("malformed_packets_total", "Packets that failed to decode and were skipped.", func(s Stats) uint64 { return s.Malformed }),
		counter("decode_panics_total", "Packets whose decoding panicked, recovered and counted as malformed too: each a decoder's defect to fix.", func(s Stats) uint64 { return s.Panics }),
		counter("own_flows_total", "Flows to or from the gateway's own addresses (the explicit proxy, the admin page, ssh): not egress, not recorded.", func(s Stats) uint64 { return s.Own }),
		counter("inbound_flows_total", "Flows started from outside the LAN toward a LAN host (the gateway sent their first packet out of a LAN interface): recorded denied as inbound in audit mode, not recorded in enforce mode.", func(s Stats) uint64 { return s.Inbound }),
		counter("evicted_flows_total", "Flows ended early because the flow table was full.", func(s Stats) uint64 { return s.Evicted }),
		counter("stream_limited_flows_total", "Flows that gave up their name search because the name-search buffers of all flows were full (MaxStreamBytes).", func(s Stats) uint64 { return s.StreamLimited }),
		counter("http_requests_total", "Later requests of plain-HTTP flows capture followed and recorded (audit mode), and request streams it refused.", func(s Stats) uint64 { return s.Requests }),
		counter("http_unfollowed_flows_total", "Plain-HTTP flows whose later requests capture stopped following (a missing segment, bytes cut off, MaxStreamBytes).", func(s Stats) uint64 { return s.Unfollowed }),
		counter("unforwarded_frames_total", "Frames from a LAN client that the gateway would have routed (to its MAC address, toward an address not its own, not redirected to its proxy or DNS forwarder) and drops instead (a wrong IPv4 header checksum; a TTL or hop limit of 1 or 0): no server reads them, and capture skips them.", func(s Stats) uint64 { return s.Unforwarded }),
		counter("other_vlan_frames_total", "Frames a LAN interface's socket read tagged for a VLAN (ID not 0): that VLAN device's, or dropped by the kernel where the interface has none; skipped.", func(s Stats) uint64 { return s.OtherVLAN }),
		counter("kernel_drops_total", "Packets the kernel dropped on the capture socket.", func(s Stats) uint64 { return s.KernelDrops }),
		counter("socket_errors_total", "Capture sockets that failed to read, closed and opened again (capture goes on on the other LAN interfaces meanwhile).", func(s Stats) uint64 { return s.SocketErrors }),
		counter("client_hellos_total", "TLS ClientHellos parsed, over TCP and QUIC.", func(s Stats) uint64 { return s.Hellos }),
		counter("quic_initials_opened_total", "QUIC Initial packets decrypted.", func(s Stats) uint64 { return s.QUICOpened }),
		counter("fragments_total", "IP fragments seen.", func(s Stats) uint64 { return s.Fragments }),
		counter("guarded_packets_total", "LAN packets enforce mode's gateway hardening drops (forged sources, loopback destinations, router advertisements, redirects), recorded denied in both modes.", func(s Stats) uint64 { return s.Guarded }),
		counter("rpf_unchecked_packets_total", "LAN packets whose source capture could not check against the routing table (over its lookup budget, or no answer from the kernel): recorded as other flows.", func(s Stats) uint64 { return s.RPFUnchecked }),
		interfaceUp{c: c, desc: prometheus.NewDesc("egress_capture_interface_up",
			"1 while capture reads a LAN interface that is up with a carrier; 0 while it is down, has no carrier, does not exist or its socket failed and waits to open again.",
			[]string{"interface"}, nil)},
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "egress", Subsystem: "capture", Name: "active_flows",
			Help: "Flows in the flow table.",
		}, func() float64 { return float64(c.proc.stats.active.Load()) }),
	}
	for _, col := range cs {
		if err := r.Register(col); err != nil {
			return err
		}
	}
	return nil
}

// interfaceUp is egress_capture_interface_up, one series per
// Config.Interfaces entry, read at scrape time (Capture.InterfacesUp):
// /readyz says why a LAN is not read, the metric lets an alert see it.
type interfaceUp struct {
	c    *Capture
	desc *prometheus.Desc
}

func (u interfaceUp) Describe(ch chan<- *prometheus.Desc) { ch <- u.desc }

func (u interfaceUp) Collect(ch chan<- prometheus.Metric) {
	seen := make(map[string]bool, len(u.c.cfg.Interfaces))
	for i, up := range u.c.InterfacesUp() {
		name := u.c.cfg.Interfaces[i]
		if seen[name] {
			continue // a name given twice (egressd run refuses it) is one series
		}
		seen[name] = true
		v := 0.0
		if up {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(u.desc, prometheus.GaugeValue, v, name)
	}
}
