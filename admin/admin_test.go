package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/html"

	"egressd/audit"
	"egressd/policy"
)

var t0 = time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)

func testLedger(t *testing.T, reg prometheus.Registerer) (*audit.Ledger, *policy.Engine) {
	t.Helper()
	src, err := os.ReadFile("../audit/testdata/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile("policy.yaml", src)
	if err != nil {
		t.Fatal(err)
	}
	l := audit.NewLedger(eng, audit.LedgerOptions{})
	if reg != nil {
		if err := l.RegisterMetrics(reg); err != nil {
			t.Fatal(err)
		}
	}
	emit := func(i int, client, dest string, port uint16, proto, name string, out, in uint64) {
		ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: t0.Add(time.Duration(i) * time.Minute),
			Client: netip.MustParseAddr(client), ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr(dest),
			DestPort: port, Proto: proto, Name: name, BytesOut: out, BytesIn: in}
		pr, _ := policy.ParseProto(proto)
		ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: port, Proto: pr, Name: name, Now: ev.Time}))
		l.Emit(ev)
	}
	for i := range 7 {
		emit(i, "192.168.10.5", "198.51.100.10", 443, "tcp", "api.nirovision.com", 100, 1000)
	}
	emit(10, "192.168.10.6", "17.1.2.3", 5223, "tcp", "", 10, 20)
	emit(11, "192.168.10.6", "17.1.2.4", 443, "tcp", "", 10, 20)
	emit(12, "192.168.10.7", "203.0.113.123", 123, "udp", "", 48, 48)
	emit(13, "192.168.10.8", "203.0.113.9", 443, "tcp", "tracker.example", 517, 0)
	emit(14, "192.168.10.9", "203.0.113.9", 443, "tcp", "tracker.example", 517, 0)
	emit(15, "192.168.10.9", "198.51.100.77", 8443, "tcp", "<b>evil</b>", 1, 0) // escaped in HTML
	return l, eng
}

func get(t *testing.T, url string) (int, http.Header, []byte) {
	t.Helper()
	return getFrom(t, http.DefaultClient, url)
}

// getFrom is get with client c.
func getFrom(t *testing.T, c *http.Client, url string) (int, http.Header, []byte) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, b
}

func TestEndpoints(t *testing.T) {
	reg := prometheus.NewRegistry()
	l, _ := testLedger(t, reg)
	var failing error
	s, err := New(Config{Version: "v1.2.3"}, Deps{Reporter: l, Registry: reg,
		Checks: []Check{{Name: "event log write failing", Fn: func() error { return failing }}}})
	if err != nil {
		t.Fatal(err)
	}
	s.ConfigLoaded(true, time.Unix(1700000000, 0))
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()

	if code, _, body := get(t, ts.URL+"/healthz"); code != 200 || string(body) != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, _, _ := get(t, ts.URL+"/readyz"); code != 200 {
		t.Errorf("/readyz = %d, want 200", code)
	}
	failing = errors.New("no space left on device")
	if code, _, body := get(t, ts.URL+"/readyz"); code != 503 || !strings.Contains(string(body), "event log write failing: no space") {
		t.Errorf("/readyz = %d %q, want 503 naming the state", code, body)
	}

	code, hdr, body := get(t, ts.URL+"/report.json")
	if code != 200 || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("/report.json = %d %s", code, hdr.Get("Content-Type"))
	}
	rep, err := audit.ReadReportJSON(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rules) != 3 || rep.Rules[0].Name != "vendor-cloud" || rep.Rules[0].Flows != 7 {
		t.Errorf("report rules = %+v", rep.Rules)
	}
	for _, bad := range []string{"bogus", "200000d"} {
		if code, _, _ := get(t, ts.URL+"/report.json?since="+bad); code != 400 {
			t.Errorf("since=%s: %d, want 400", bad, code)
		}
	}
	// This ledger has no event log, so the window cannot apply; it says so.
	if code, _, body := get(t, ts.URL+"/report.json?since=24h"); code != 200 || !bytes.Contains(body, []byte(`no event log`)) {
		t.Errorf("since=24h: %d %s", code, body)
	}

	_, _, metrics := get(t, ts.URL+"/metrics")
	for _, want := range []string{
		`egress_build_info{goversion="`,
		`version="v1.2.3"} 1`,
		"egress_config_last_reload_successful 1",
		"egress_config_last_reload_success_timestamp_seconds 1.7e+09",
		`egress_audit_flows_total{mode="audit",rule="vendor-cloud",verdict="allow"} 7`,
		`egress_audit_flows_total{mode="audit",rule="apple-apns",verdict="allow"} 2`,
		`egress_audit_flows_total{mode="audit",rule="(none)",verdict="deny"} 3`,
		"egress_audit_ledger_entries ",
	} {
		if !bytes.Contains(metrics, []byte(want)) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// Labels are bounded: never a client address or a host name.
	if bytes.Contains(metrics, []byte("192.168.")) || bytes.Contains(metrics, []byte("tracker.example")) {
		t.Errorf("/metrics carries a client or host name")
	}
	s.ConfigLoaded(false, time.Now())
	if _, _, metrics := get(t, ts.URL+"/metrics"); !bytes.Contains(metrics, []byte("egress_config_last_reload_successful 0")) ||
		!bytes.Contains(metrics, []byte("egress_config_last_reload_success_timestamp_seconds 1.7e+09")) {
		t.Errorf("a failed reload must set the gauge to 0 and keep the last success time")
	}

	code, hdr, page := get(t, ts.URL+"/")
	if code != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/html") || !strings.Contains(hdr.Get("Content-Security-Policy"), "default-src 'none'") {
		t.Errorf("/ = %d %v", code, hdr)
	}
	if bytes.Contains(page, []byte("<b>evil</b>")) {
		t.Errorf("a name from the wire reached the page unescaped")
	}
	if code, _, _ := get(t, ts.URL+"/nothing"); code != 404 {
		t.Errorf("/nothing = %d", code)
	}
}

// TestRun serves on a real loopback socket and stops on Close.
func TestRun(t *testing.T) {
	l, _ := testLedger(t, nil)
	s, err := New(Config{Addr: "127.0.0.1:0"}, Deps{Reporter: l})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	var addr string
	for i := 0; i < 500 && (addr == "" || addr == "127.0.0.1:0"); i++ {
		time.Sleep(10 * time.Millisecond)
		addr = s.Addr()
	}
	if code, _, _ := get(t, "http://"+addr+"/healthz"); code != 200 {
		t.Errorf("healthz %d", code)
	}
	s.Close()
	s.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestParseSince(t *testing.T) {
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"":                     {},
		"24h":                  now.Add(-24 * time.Hour),
		"90m":                  now.Add(-90 * time.Minute),
		"7d":                   now.Add(-7 * 24 * time.Hour),
		"2026-11-01T00:00:00Z": time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC),
	} {
		got, err := ParseSince(in, now)
		if err != nil || !got.Equal(want) {
			t.Errorf("ParseSince(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	// A window longer than a Duration holds is refused, in days as in
	// hours: "200000d" used to wrap into a time 22 years from now and an
	// empty report.
	for _, bad := range []string{"x", "-1h", "0d", "1.5d", "d", "106752d", "200000d", "2562048h"} {
		if _, err := ParseSince(bad, now); err == nil {
			t.Errorf("ParseSince(%q) succeeded", bad)
		}
	}
}

// TestHTMLInChromium opens the live report in a real headless Chromium:
// the page renders, the chart has one bar per used rule, and the numbers
// on the page are the JSON's.
func TestHTMLInChromium(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("chromium is required (Debian package chromium)")
		}
		t.Skip("chromium not installed (apt-get install chromium)")
	}
	l, _ := testLedger(t, nil)
	s, err := New(Config{}, Deps{Reporter: l})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	_, _, body := get(t, ts.URL+"/report.json")
	rep, err := audit.ReadReportJSON(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	shot := t.TempDir() + "/report.png"
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"}
	run := func(extra ...string) []byte {
		args := append(append(append([]string{}, base...), "--user-data-dir="+t.TempDir()), extra...)
		cmd := exec.CommandContext(ctx, chromium, append(args, ts.URL+"/")...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("chromium: %v\n%s", err, stderr.String())
		}
		return out
	}
	dom := run("--dump-dom")
	doc, err := html.Parse(bytes.NewReader(dom))
	if err != nil {
		t.Fatal(err)
	}

	bars := map[string]map[string]string{}
	var rows, unused int
	var mode, shed string
	walk(doc, func(n *html.Node) {
		a := attrs(n)
		switch {
		case n.Data == "g" && a["class"] == "bar":
			bars[a["data-rule"]] = a
		case n.Data == "tr" && parentID(n, "dropped") && !parentTag(n, "thead"):
			rows++
		case n.Data == "li" && parentID(n, "unused"):
			unused++
		case a["id"] == "mode":
			mode = text(n)
		case a["id"] == "shed":
			shed = text(n)
		}
		// Self-contained: nothing refers outside the page.
		for _, k := range []string{"src", "href"} {
			if v, ok := a[k]; ok {
				t.Errorf("<%s %s=%q>: the page must not load anything", n.Data, k, v)
			}
		}
		if n.Data == "script" || n.Data == "link" {
			t.Errorf("<%s> in a self-contained page", n.Data)
		}
	})
	if len(bars) != len(rep.Rules) || len(rep.Rules) != 3 {
		t.Errorf("%d bars, %d used rules in the JSON (want 3)", len(bars), len(rep.Rules))
	}
	for _, u := range rep.Rules {
		b, ok := bars[u.Name]
		if !ok {
			t.Errorf("no bar for rule %s", u.Name)
			continue
		}
		if b["data-flows"] != strconv.FormatUint(u.Flows, 10) || b["data-queries"] != strconv.FormatUint(u.Queries, 10) {
			t.Errorf("bar %s says %s flows, %s queries; JSON says %d, %d", u.Name, b["data-flows"], b["data-queries"], u.Flows, u.Queries)
		}
	}
	if rows != len(rep.Dropped) || unused != len(rep.UnusedRules) {
		t.Errorf("page: %d dropped rows, %d unused; JSON: %d, %d", rows, unused, len(rep.Dropped), len(rep.UnusedRules))
	}
	if mode != string(rep.Mode) || shed != fmt.Sprint(rep.ShedEvents) {
		t.Errorf("page mode %q shed %q; JSON %q %d", mode, shed, rep.Mode, rep.ShedEvents)
	}
	// Bars are drawn to scale: the widest bar belongs to the busiest rule.
	if !regexp.MustCompile(`<rect class="flows" x="200" y="0" width="520.0"`).Match(dom) {
		t.Errorf("the busiest rule's bar is not full width")
	}
	// And it paints: a screenshot is a non-empty PNG.
	run("--screenshot="+shot, "--window-size=1200,900")
	png, err := os.ReadFile(shot)
	if err != nil || len(png) < 1000 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Errorf("screenshot: %d bytes, %v", len(png), err)
	}
}

func walk(n *html.Node, fn func(*html.Node)) {
	if n.Type == html.ElementNode {
		fn(n)
	}
	for c := n.FirstChild; c != nil; c = c.NextSibling {
		walk(c, fn)
	}
}

func attrs(n *html.Node) map[string]string {
	m := map[string]string{}
	for _, a := range n.Attr {
		m[a.Key] = a.Val
	}
	return m
}

func parentID(n *html.Node, id string) bool {
	for p := n.Parent; p != nil; p = p.Parent {
		if attrs(p)["id"] == id {
			return true
		}
	}
	return false
}

func parentTag(n *html.Node, tag string) bool {
	for p := n.Parent; p != nil; p = p.Parent {
		if p.Type == html.ElementNode && p.Data == tag {
			return true
		}
	}
	return false
}

func text(n *html.Node) string {
	var b strings.Builder
	var f func(*html.Node)
	f = func(n *html.Node) {
		if n.Type == html.TextNode {
			b.WriteString(n.Data)
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			f(c)
		}
	}
	f(n)
	return strings.TrimSpace(b.String())
}

var _ = json.Marshal

// TestReportSaysReloadFailed: after a reload that failed the report, JSON
// and HTML (which `egressd report` reads), says so, with the reason and
// that the running policy was kept, until a reload succeeds. Before, only
// the log and egress_config_last_reload_successful said it: an operator
// who edited the policy, reloaded and read the report took the broken file
// for the running policy.
func TestReportSaysReloadFailed(t *testing.T) {
	l, _ := testLedger(t, nil)
	s, err := New(Config{}, Deps{Reporter: l})
	if err != nil {
		t.Fatal(err)
	}
	s.ConfigLoaded(true, t0)
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	notes := func() string {
		_, _, b := get(t, ts.URL+"/report.json")
		var r audit.Report
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatal(err)
		}
		return strings.Join(r.Notes, "\n")
	}
	if n := notes(); strings.Contains(n, "reload") {
		t.Fatalf("notes before any failure: %q", n)
	}
	s.ConfigFailed(t0.Add(time.Hour), `policy.yaml:3:10: ports: "7777/upd": protocol "upd" is not tcp or udp`)
	n := notes()
	for _, want := range []string{"reload at 2026-11-24 11:00:00Z failed", `"upd" is not tcp or udp`, "loaded at 2026-11-24 10:00:00Z"} {
		if !strings.Contains(n, want) {
			t.Errorf("notes after a failed reload lack %q:\n%s", want, n)
		}
	}
	if _, _, page := get(t, ts.URL+"/"); !bytes.Contains(page, []byte("failed")) {
		t.Errorf("the HTML report does not say the reload failed")
	}
	if _, _, m := get(t, ts.URL+"/metrics"); !bytes.Contains(m, []byte("egress_config_last_reload_successful 0")) {
		t.Errorf("ConfigFailed must set the gauge to 0")
	}
	s.ConfigLoaded(true, t0.Add(2*time.Hour))
	if n := notes(); strings.Contains(n, "reload") {
		t.Errorf("notes after a successful reload: %q", n)
	}
	// A reload whose policy got in but whose users file was refused: the
	// note says so, not that the policy before still runs; a later failed
	// reload names the policy it loaded.
	s.ConfigPartlyLoaded(t0.Add(3*time.Hour), "proxy users: users:2: expected NAME:bcrypt:HASH")
	n = notes()
	if !strings.Contains(n, "reload at 2026-11-24 13:00:00Z failed in part (proxy users:") || strings.Contains(n, "still") {
		t.Errorf("notes after a reload refused in part:\n%s", n)
	}
	if _, _, m := get(t, ts.URL+"/metrics"); !bytes.Contains(m, []byte("egress_config_last_reload_successful 0")) {
		t.Errorf("ConfigPartlyLoaded must set the gauge to 0")
	}
	s.ConfigFailed(t0.Add(4*time.Hour), "")
	if n := notes(); !strings.Contains(n, "loaded at 2026-11-24 13:00:00Z") {
		t.Errorf("a failed reload after one refused in part names another load:\n%s", n)
	}
}
