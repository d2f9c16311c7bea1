package main

import (
	"encoding/json"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"egressd/audit"
)

// daemonMetrics are the daemon-wide series: build information and the
// outcome of the last policy (re)load.
type daemonMetrics struct {
	reloadOK *prometheus.GaugeVec
	reloadTS prometheus.Gauge
	reloads  *prometheus.CounterVec
}

func newDaemonMetrics(reg prometheus.Registerer) *daemonMetrics {
	goVersion := ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "egress", Name: "build_info",
		Help: "Always 1; the labels say which build runs.", ConstLabels: prometheus.Labels{"version": version, "goversion": goVersion}})
	build.Set(1)
	m := &daemonMetrics{
		reloadOK: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "egress", Name: "config_last_reload_successful",
			Help: "1 if the last policy load succeeded, 0 if it failed and the previous policy kept running."}, nil),
		reloadTS: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "egress", Name: "config_last_reload_success_timestamp_seconds",
			Help: "Time of the last successful policy load."}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "egress", Name: "config_reloads_total",
			Help: "Policy reloads by outcome."}, []string{"outcome"}),
	}
	reg.MustRegister(build, m.reloadOK, m.reloadTS, m.reloads)
	return m
}

func (m *daemonMetrics) reloaded(ok bool) {
	if ok {
		m.reloadOK.WithLabelValues().Set(1)
		m.reloadTS.Set(float64(time.Now().UnixNano()) / 1e9)
		m.reloads.WithLabelValues("success").Inc()
		return
	}
	m.reloadOK.WithLabelValues().Set(0)
	m.reloads.WithLabelValues("failure").Inc()
}

// adminHandler serves the report, metrics and health on the admin address.
func (d *daemon) adminHandler() http.Handler {
	mux := http.NewServeMux()
	report := func(r *http.Request) (*audit.Report, error) {
		opt := audit.ReportOptions{}
		if s := r.URL.Query().Get("since"); s != "" {
			dur, err := time.ParseDuration(s)
			if err != nil {
				return nil, err
			}
			opt.Since = time.Now().Add(-dur)
		}
		return d.ledger.Report(opt), nil
	}
	mux.HandleFunc("GET /report.json", func(w http.ResponseWriter, r *http.Request) {
		rep, err := report(r)
		if err != nil {
			http.Error(w, "bad since: "+err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		rep.WriteJSON(w)
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		rep, err := report(r)
		if err != nil {
			http.Error(w, "bad since: "+err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		rep.WriteHTML(w)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		parts := d.degradedParts()
		w.Header().Set("Content-Type", "application/json")
		if len(parts) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(map[string]any{"ready": len(parts) == 0, "mode": d.store.Load().Mode(), "not_running": parts})
	})
	return mux
}
