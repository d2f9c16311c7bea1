package main

import (
	"context"
	"io"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// registeredMetric is a metric of the daemon's registry: its labels
// (variable and constant, sorted), help text and, where a series exists
// already, its type (counter, gauge, histogram; "" before its first).
type registeredMetric struct {
	labels []string
	help   string
	typ    string
}

var descRE = regexp.MustCompile(`^Desc\{fqName: "([^"]*)", help: ("(?:[^"\\]|\\.)*"), unit: "[^"]*", constLabels: \{([^}]*)\}, variableLabels: \{([^}]*)\}\}$`)

// daemonMetrics runs `egressd run` in this process (its network
// namespace: the test runs in one of its own) on lo, with capture, the
// DNS forwarder, both proxies, the event log and the admin server, until
// the admin server is up (the parts register their metrics before it),
// and returns every egress_* metric its registry describes. Describe
// lists a Vec with no series yet, which /metrics and Gather leave out.
func daemonMetrics(t *testing.T) map[string]registeredMetric {
	t.Helper()
	var cfg runConfig
	fs := newFlags("run", io.Discard)
	cfg.flags(fs)
	if _, err := parseArgs(fs, []string{"--no-firewall", "--lan", "lo", "--wan", "lo", "--dns-listen", "127.0.0.1:0",
		"--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
		"--upstream-dns", "127.0.0.1:9", "--state-dir", t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	var out, errb lockedBuffer
	d, err := newDaemon(cfg, &out, &errb)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	done := make(chan error, 1)
	go func() { done <- d.run(ctx) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("egressd run did not stop within 20s of its context's end")
		}
	}()
	for !strings.Contains(out.String(), "admin: http://") {
		select {
		case err := <-done:
			t.Fatalf("egressd run ended before its admin server was up: %v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
		case <-time.After(20 * time.Millisecond):
		}
		if ctx.Err() != nil {
			t.Fatalf("the admin server was not up within 30s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
	}
	if strings.Contains(out.String(), "NOT RUNNING") {
		t.Fatalf("a part is not running (its metrics may be missing):\n%s", out.String())
	}

	ch := make(chan *prometheus.Desc)
	go func() { d.reg.Describe(ch); close(ch) }()
	ms := map[string]registeredMetric{}
	for desc := range ch {
		m := descRE.FindStringSubmatch(desc.String())
		if m == nil {
			t.Fatalf("cannot read the descriptor %s", desc)
		}
		if !strings.HasPrefix(m[1], "egress_") {
			continue // go_*, process_*
		}
		var labels []string
		for _, l := range strings.Split(m[3], ",") {
			if name, _, ok := strings.Cut(l, "="); ok {
				labels = append(labels, name)
			}
		}
		for _, l := range strings.Split(m[4], ",") {
			if l != "" {
				labels = append(labels, strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")"))
			}
		}
		slices.Sort(labels)
		ms[m[1]] = registeredMetric{labels: labels, help: m[2]}
	}
	mfs, err := d.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if m, ok := ms[mf.GetName()]; ok {
			m.typ = strings.ToLower(mf.GetType().String())
			ms[mf.GetName()] = m
		}
	}
	if len(ms) < 20 {
		t.Fatalf("the registry describes %d egress_* metrics: %v", len(ms), ms)
	}
	return ms
}

// readmeMetricRow is a row of README.md's Metrics table.
type readmeMetricRow struct {
	typ       string
	labels    []string
	laterOnly bool // † in its type: no series until its first event
}

// readmeMetricsTable returns the rows of the table under README.md's
// "### Metrics" heading, by metric name.
func readmeMetricsTable(t *testing.T) map[string]readmeMetricRow {
	t.Helper()
	s := readmeText(t)
	i := strings.Index(s, "\n### Metrics\n")
	if i < 0 {
		t.Fatal(`README.md has no "### Metrics" section`)
	}
	s = s[i+len("\n### Metrics\n"):]
	if j := strings.Index(s, "\n#"); j >= 0 {
		s = s[:j]
	}
	rowRE := regexp.MustCompile("^\\| `(egress_[a-z0-9_]+)` \\| ([a-z]+)( †)? \\| ([^|]*) \\| [^|]+ \\|$")
	rows := map[string]readmeMetricRow{}
	for _, line := range strings.Split(s, "\n") {
		if !strings.HasPrefix(line, "| `egress_") {
			continue
		}
		m := rowRE.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("README.md's Metrics table: a row not of the form | `name` | type[ †] | labels | meaning |:\n%s", line)
			continue
		}
		if _, dup := rows[m[1]]; dup {
			t.Errorf("README.md's Metrics table lists %s twice", m[1])
		}
		var labels []string
		for _, l := range regexp.MustCompile("`([a-z_]+)`").FindAllStringSubmatch(m[4], -1) {
			labels = append(labels, l[1])
		}
		slices.Sort(labels)
		rows[m[1]] = readmeMetricRow{typ: m[2], labels: labels, laterOnly: m[3] != ""}
	}
	if len(rows) == 0 {
		t.Fatal("README.md's Metrics section has no table rows")
	}
	return rows
}

// TestMetricsMatchREADME: every egress_* metric the running daemon
// registers has a row in README.md's Metrics table, with its labels and
// (where it has a series) its type, and every row names a metric the
// daemon registers. Before, about two thirds of the metrics were in no
// README (egress_firewall_learned_set_full_total,
// egress_proxy_active_connections, egress_audit_write_failed_events_total
// among them) and nothing checked it.
func TestMetricsMatchREADME(t *testing.T) {
	have := daemonMetrics(t)
	doc := readmeMetricsTable(t)
	for _, name := range slices.Sorted(maps.Keys(have)) {
		m := have[name]
		row, ok := doc[name]
		if !ok {
			t.Errorf("egressd registers %s; README.md's Metrics table has no row for it (labels %v, help %s)", name, m.labels, m.help)
			continue
		}
		if !slices.Equal(row.labels, m.labels) {
			t.Errorf("README.md's Metrics table gives %s the labels %v; it has %v", name, row.labels, m.labels)
		}
		if m.typ != "" && row.typ != m.typ {
			t.Errorf("README.md's Metrics table gives %s the type %s; it is a %s", name, row.typ, m.typ)
		}
		if m.typ != "" && row.laterOnly {
			t.Errorf("README.md's Metrics table marks %s † (no series until its first event); it has one from the start", name)
		}
		if m.typ == "" && !row.laterOnly {
			t.Errorf("%s has no series at the start; README.md's Metrics table does not mark it †", name)
		}
	}
	for name := range doc {
		if _, ok := have[name]; !ok {
			t.Errorf("README.md's Metrics table lists %s; egressd registers no such metric", name)
		}
	}
}
