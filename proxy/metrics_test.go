package proxy

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// seriesOf gathers reg and returns name's series as their label values
// joined by "," (in the labels' name order), with their values.
func seriesOf(t *testing.T, reg *prometheus.Registry, name string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var vals []string
			for _, l := range m.GetLabel() {
				vals = append(vals, l.GetValue())
			}
			out[strings.Join(vals, ",")] = m.GetCounter().GetValue()
		}
	}
	return out
}

// TestLazyCounters: the series counted per packet or per connection,
// resolved once (lazyCounter), are the label values the README lists,
// and, as with a look-up at each count, none exists before its first
// count (the README's †).
func TestLazyCounters(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	row := func(name string) string {
		for _, l := range strings.Split(string(readme), "\n") {
			if strings.HasPrefix(l, "| `"+name+"`") {
				return l
			}
		}
		t.Fatalf("README.md has no row for %s", name)
		return ""
	}
	for _, c := range []struct {
		name   string
		labels []string
		inc    func(i int)
	}{
		{"egress_proxy_fast_verdicts_total", fastVerdictLabels[:], func(i int) { m.fastVerdictOf[i].Inc() }},
		{"egress_proxy_fast_syns_total", synResultLabels[synResFast:], func(i int) { m.fastSYNOf[synResFast+synResult(i)].Inc() }},
		{"egress_proxy_fast_errors_total", fastErrLabels[:], func(i int) { m.fastErrOf[i].Inc() }},
		{"egress_proxy_limit_rejections_total", limitScopeLabels[:], func(i int) { m.limitHit(limitScopeLabels[i]) }},
	} {
		if got := seriesOf(t, reg, c.name); len(got) != 0 {
			t.Errorf("%s has series %v before any count", c.name, got)
		}
		r := row(c.name)
		for i, l := range c.labels {
			if !strings.Contains(r, "`"+l+"`") {
				t.Errorf("%s{%s}: README.md's row does not list it: %s", c.name, l, r)
			}
			c.inc(i)
			c.inc(i)
		}
		got := seriesOf(t, reg, c.name)
		for _, l := range c.labels {
			if got[l] != 2 {
				t.Errorf("%s{%s} = %v, want 2 (series %v)", c.name, l, got[l], got)
			}
		}
		if len(got) != len(c.labels) {
			t.Errorf("%s has series %v, want %v", c.name, got, c.labels)
		}
	}
	if got := seriesOf(t, reg, "egress_proxy_connections_total"); len(got) != 0 {
		t.Errorf("connections_total has series %v before any connection", got)
	}
	m.connDone("transparent", policy.Allow, policy.ModeEnforce, 10, 20)
	m.connDone("explicit", policy.Deny, policy.ModeAudit, 1, 2)
	m.connDone("explicit", "", policy.ModeAudit, 0, 0) // no decision: looked up
	m.requestDone(policy.Deny, policy.ModeEnforce)
	conns := seriesOf(t, reg, "egress_proxy_connections_total")
	want := map[string]float64{"transparent,enforce,allow": 1, "explicit,audit,deny": 1, "explicit,audit,": 1} // listener, mode, verdict
	if len(conns) != len(want) {
		t.Errorf("connections_total series %v, want %v", conns, want)
	}
	for k, v := range want {
		if conns[k] != v {
			t.Errorf("connections_total{%s} = %v, want %v", k, conns[k], v)
		}
	}
	bytes := seriesOf(t, reg, "egress_proxy_bytes_total")
	if bytes["out"] != 11 || bytes["in"] != 22 || len(bytes) != 2 {
		t.Errorf("bytes_total %v, want out 11, in 22", bytes)
	}
	if got := seriesOf(t, reg, "egress_proxy_http_requests_total"); len(got) != 1 || got["enforce,deny"] != 1 {
		t.Errorf("http_requests_total %v, want enforce,deny 1", got)
	}
	m.revokedIn(policy.ModeAudit).Inc()
	m.ctRemapped.Inc()
	if got := seriesOf(t, reg, "egress_proxy_reload_revoked_total"); got["audit"] != 1 || got["enforce"] != 0 || len(got) != 2 {
		t.Errorf("reload_revoked_total %v, want audit 1, enforce 0", got)
	}
	ct := seriesOf(t, reg, "egress_proxy_conntrack_lookups_total")
	keys := make([]string, 0, len(ct))
	for k := range ct {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, []string{"error", "not-found", "remapped", "same", "timeout"}) || ct["remapped"] != 1 {
		t.Errorf("conntrack_lookups_total %v", ct)
	}
}
