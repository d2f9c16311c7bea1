package audit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./audit -run %s -update)", err, t.Name())
	}
	if d := cmp.Diff(string(want), string(got)); d != "" {
		t.Errorf("%s differs (-want +got); rerun with -update if intended:\n%s", name, d)
	}
}

func fixtureReport(t *testing.T) *Report {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	for _, ev := range fixtureEvents(t, eng) {
		l.Emit(ev)
	}
	return l.Report(ReportOptions{Now: reportNow})
}

func TestGoldenReports(t *testing.T) {
	r := fixtureReport(t)
	var txt, js bytes.Buffer
	if err := r.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	golden(t, "report.txt", txt.Bytes())
	golden(t, "report.json", js.Bytes())
}

// TestReportFacts checks the counting rules on the fixture independently
// of the golden files, so that an -update cannot bless a wrong count.
func TestReportFacts(t *testing.T) {
	r := fixtureReport(t)
	rules := map[string]RuleReport{}
	for _, u := range r.Rules {
		rules[u.Name] = u
	}
	vc := rules["vendor-cloud"]
	// 40001 (capture + proxy: once), 40002, 40004.
	if vc.Flows != 3 || vc.BytesOut != 5120+1000+100 || vc.BytesIn != 90210+2000+200 {
		t.Errorf("vendor-cloud = %d flows, %d out, %d in; want 3, 6220, 92410", vc.Flows, vc.BytesOut, vc.BytesIn)
	}
	if d := cmp.Diff([]string{"api.nirovision.com", "registry-1.docker.io"}, vc.Destinations); d != "" {
		t.Errorf("vendor-cloud destinations (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]string{"192.168.10.5", "192.168.10.6"}, vc.Clients); d != "" {
		t.Errorf("vendor-cloud clients (-want +got):\n%s", d)
	}
	if n := rules["ntp"].Flows; n != 2 {
		t.Errorf("ntp flows = %d, want 2 (two packets 30 s apart are one exchange)", n)
	}
	if u := rules["dns-only"]; u.Flows != 0 || u.Queries != 1 {
		t.Errorf("dns-only = %d flows, %d queries; want 0, 1", u.Flows, u.Queries)
	}
	if d := cmp.Diff([]string{"vendor-docs"}, r.UnusedRules); d != "" {
		t.Errorf("unused (-want +got):\n%s", d)
	}
	if len(r.ExpiredRules) != 1 || r.ExpiredRules[0].Name != "old-exception" || r.ExpiredRules[0].Flows != 1 {
		t.Errorf("expired = %+v, want old-exception with 1 flow", r.ExpiredRules)
	}
	var tracker, trackerDNS *DroppedReport
	for i, d := range r.Dropped {
		switch {
		case d.Dest == "tracker.example" && d.Proto == "tcp":
			tracker = &r.Dropped[i]
		case d.Dest == "tracker.example" && d.Proto == "dns":
			trackerDNS = &r.Dropped[i]
		}
	}
	if tracker == nil || tracker.Flows != 2 || tracker.ClientCount != 2 || tracker.IP != "203.0.113.9" || tracker.Enforced {
		t.Errorf("tracker.example:443/tcp = %+v, want 2 flows from 2 clients, not enforced", tracker)
	}
	if trackerDNS == nil || trackerDNS.Queries != 1 || trackerDNS.Flows != 0 || trackerDNS.Port != 53 {
		t.Errorf("tracker.example dns = %+v, want 1 query", trackerDNS)
	}
	// capture+proxy of 40001, the NTP packet 30 s later, the DNS query seen
	// by capture, capture+proxy of 40010.
	if r.Totals.Duplicates != 4 {
		t.Errorf("duplicates = %d, want 4", r.Totals.Duplicates)
	}
	// Every distinct flow is either credited to a rule or dropped.
	var sum uint64
	for _, u := range r.Rules {
		sum += u.Flows
	}
	for _, d := range r.Dropped {
		sum += d.Flows
	}
	if sum != r.Totals.Flows {
		t.Errorf("rules+dropped = %d flows, totals say %d", sum, r.Totals.Flows)
	}
}

// TestReportJSONContract checks the keys DESIGN.md promises.
func TestReportJSONContract(t *testing.T) {
	var buf bytes.Buffer
	if err := fixtureReport(t).WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	if m["mode"] != "audit" {
		t.Errorf("mode = %v", m["mode"])
	}
	rule := m["rules"].([]any)[0].(map[string]any)
	for _, k := range []string{"name", "flows", "bytes_out", "bytes_in", "clients", "destinations", "first_seen", "last_seen"} {
		if _, ok := rule[k]; !ok {
			t.Errorf("rules[0] lacks %q", k)
		}
	}
	if _, ok := m["unused_rules"].([]any); !ok {
		t.Errorf("unused_rules is not a list")
	}
	drop := m["dropped"].([]any)[0].(map[string]any)
	for _, k := range []string{"dest", "ip", "port", "proto", "flows", "clients", "enforced", "first_seen", "last_seen"} {
		if _, ok := drop[k]; !ok {
			t.Errorf("dropped[0] lacks %q", k)
		}
	}
	back, err := ReadReportJSON(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(fixtureReport(t), back); d != "" {
		t.Errorf("JSON round trip (-want +got):\n%s", d)
	}
}

func TestEmptyReport(t *testing.T) {
	l := NewLedger(nil, LedgerOptions{})
	r := l.Report(ReportOptions{Since: time.Now().Add(-time.Hour)})
	var buf bytes.Buffer
	if err := r.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(buf.Bytes(), []byte(`"rules": []`)) || !bytes.Contains(buf.Bytes(), []byte(`"dropped": []`)) {
		t.Errorf("empty lists must be [] not null:\n%s", buf.String())
	}
	if len(r.Notes) == 0 {
		t.Errorf("a windowed report without an event log must say it ignored Since")
	}
	for _, f := range []func(*bytes.Buffer) error{func(b *bytes.Buffer) error { return r.WriteText(b) }, func(b *bytes.Buffer) error { return r.WriteHTML(b) }} {
		buf.Reset()
		if err := f(&buf); err != nil {
			t.Fatal(err)
		}
	}
}

func TestDedupAndBounds(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{MaxClients: 3, MaxDropped: 2, MaxFlows: 4})
	base := Event{Kind: KindFlow, Source: SourceProxy, Time: t0, Dest: mustAddr("203.0.113.5"), DestPort: 443, Proto: "tcp", Name: "x.example", Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: policy.ReasonNoRule}
	for i := range 10 {
		ev := base
		ev.Client = mustAddr("192.168.10." + itoa(i+1))
		ev.ClientPort = uint16(1000 + i)
		l.Emit(ev)
		l.Emit(ev) // the same flow twice: once
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if len(r.Dropped) != 1 || r.Dropped[0].Flows != 10 || r.Dropped[0].ClientCount != 3 || !r.Dropped[0].ClientsTruncated {
		t.Fatalf("dropped = %+v, want one entry of 10 flows, 3 clients kept, truncated", r.Dropped)
	}
	// Beyond MaxDropped, flows go to the overflow entry.
	for i := range 3 {
		ev := base
		ev.Name = "y" + itoa(i) + ".example"
		ev.Client, ev.ClientPort = mustAddr("192.168.10.1"), uint16(2000+i)
		l.Emit(ev)
	}
	r = l.Report(ReportOptions{Now: reportNow})
	if len(r.Dropped) != 2 {
		t.Fatalf("dropped has %d entries, want 2 (bounded)", len(r.Dropped))
	}
	if got := r.Dropped[1]; got.Dest != overflowKey.dest || got.Flows != 3 {
		t.Errorf("overflow entry = %+v, want 3 flows", got)
	}
	if n := l.Len(); n > 2+2+4+1 {
		t.Errorf("ledger holds %d entries, bounds allow at most %d", n, 9)
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func itoa(i int) string { return strconv.Itoa(i) }

// TestLedgerRequests: later HTTP requests of a plain-HTTP connection share
// its 5-tuple but are not flows: an allowed one credits its rule (so the
// rule is used), a denied one is a dropped request; the connection stays
// one flow, and a second report of it (capture) is still a duplicate.
func TestLedgerRequests(t *testing.T) {
	eng, err := policy.Compile("r.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: web\n    to: [a.test]\n    ports: [80/tcp]\n  - name: other\n    to: [b.test]\n    ports: [80/tcp]\n  - name: unused\n    to: [c.test]\n    ports: [80/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	l := NewLedger(eng, LedgerOptions{})
	t0 := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	base := Event{Kind: KindFlow, Source: SourceProxy, Time: t0, Client: netip.MustParseAddr("192.0.2.7"), ClientPort: 40000,
		Dest: netip.MustParseAddr("203.0.113.5"), DestPort: 80, Proto: "tcp", Name: "a.test", NameSource: NameHost,
		Verdict: policy.Allow, Rule: "web", Mode: policy.ModeEnforce, BytesOut: 100, BytesIn: 1000, Duration: 2}
	l.Emit(base)
	capt := base
	capt.Source, capt.BytesOut = SourceCapture, 120
	l.Emit(capt)
	r1 := base
	r1.Kind, r1.Time, r1.Name, r1.Rule, r1.BytesOut, r1.BytesIn, r1.Duration = KindRequest, t0.Add(time.Second), "b.test", "other", 0, 0, 0
	l.Emit(r1)
	r2 := r1
	r2.Time, r2.Name, r2.Rule, r2.Verdict, r2.Reason, r2.Enforced = t0.Add(1500*time.Millisecond), "evil.test", "", policy.Deny, policy.ReasonNoRule, true
	l.Emit(r2)
	l.Emit(r2) // two refused requests, both counted (requests are never merged)
	rep := l.Report(ReportOptions{Now: t0.Add(time.Hour)})
	if tt := rep.Totals; tt.Flows != 1 || tt.Allowed != 1 || tt.Dropped != 0 || tt.Duplicates != 1 || tt.Requests != 3 || tt.DroppedRequests != 2 {
		t.Errorf("totals %+v", tt)
	}
	rules := map[string]RuleReport{}
	for _, r := range rep.Rules {
		rules[r.Name] = r
	}
	if w := rules["web"]; w.Flows != 1 || w.Requests != 0 || w.BytesOut != 120 {
		t.Errorf("web %+v", w)
	}
	if o := rules["other"]; o.Flows != 0 || o.Requests != 1 || len(o.Destinations) != 1 || o.Destinations[0] != "b.test" {
		t.Errorf("other %+v", o)
	}
	if len(rep.UnusedRules) != 1 || rep.UnusedRules[0] != "unused" {
		t.Errorf("unused %v", rep.UnusedRules)
	}
	if len(rep.Dropped) != 1 {
		t.Fatalf("dropped %+v", rep.Dropped)
	}
	if d := rep.Dropped[0]; d.Dest != "evil.test" || d.Port != 80 || d.Proto != "tcp" || d.Flows != 0 || d.Requests != 2 || !d.Enforced || d.IP != "203.0.113.5" {
		t.Errorf("dropped %+v", d)
	}

	// The text and HTML reports show the requests too: rule other and
	// evil.test have no flow, and without a REQUESTS column they read as
	// used or dropped with nothing counted.
	var txt, page bytes.Buffer
	if err := rep.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	for _, re := range []string{
		`(?m)^  RULE +FLOWS +QUERIES +REQUESTS +OUT `,
		`(?m)^  other +0 +0 +1 +0 B `,
		`(?m)^  web +1 +0 +0 +120 B `,
		`(?m)^  DEST +IP +PORT +FLOWS +QUERIES +REQUESTS +CLIENTS `,
		`(?m)^  evil\.test +203\.0\.113\.5 +80/tcp +0 +0 +2 +1 +yes `,
	} {
		if !regexp.MustCompile(re).Match(txt.Bytes()) {
			t.Errorf("text report does not match %s:\n%s", re, txt.String())
		}
	}
	if err := rep.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`<th>Queries</th><th>Requests</th><th>Out</th>`,
		`<tr data-rule="other"><td>other</td><td class="n flows">0</td><td class="n">0</td><td class="n requests">1</td>`,
		`<th>Queries</th><th>Requests</th><th>Clients</th>`,
		`<td>evil.test</td><td>203.0.113.5</td><td>80/tcp</td><td class="n flows">0</td><td class="n">0</td><td class="n requests">2</td>`,
	} {
		if !strings.Contains(page.String(), want) {
			t.Errorf("HTML report does not contain %s", want)
		}
	}
}

// TestReplayRequests: a candidate policy that drops what a later request
// of a plain-HTTP connection reached says so, counted as a request.
func TestReplayRequests(t *testing.T) {
	cand, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: web\n    to: [a.test]\n    ports: [80/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	r := NewReplayer(cand, t0)
	ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0, Client: netip.MustParseAddr("192.0.2.7"), ClientPort: 40000,
		Dest: netip.MustParseAddr("203.0.113.5"), DestPort: 80, Proto: "tcp", Name: "a.test", NameSource: NameHost,
		Verdict: policy.Allow, Rule: "web", Mode: policy.ModeEnforce}
	r.Emit(ev)
	ev.Kind, ev.Name, ev.Rule, ev.Time = KindRequest, "b.test", "other", t0.Add(time.Second)
	r.Emit(ev)
	res := r.Result()
	if res.Flows != 1 || res.Requests != 1 || res.Unchanged != 1 || len(res.NewlyDropped) != 1 {
		t.Fatalf("%+v", res)
	}
	if d := res.NewlyDropped[0]; d.Dest != "b.test" || d.Requests != 1 || d.Flows != 0 || d.OldRule != "other" {
		t.Errorf("%+v", d)
	}
}

// TestReplaySamePolicyChangesNothing: denials a component made besides the
// rules (an SNI for an address nobody resolved, a malformed hello, a
// client over its DNS rate) are not "newly allowed" by a candidate whose
// rules allow the name: replayed against the very policy that recorded
// them, nothing changes. A rule's denial is still re-decided.
func TestReplaySamePolicyChangesNothing(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	cli := netip.MustParseAddr("192.168.10.5")
	flow := func(port uint16, name, reason string) Event {
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(port) * time.Second), Client: cli, ClientPort: port,
			Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: name, NameSource: NameSNI}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, Reason: reason, Mode: policy.ModeEnforce})
		return ev
	}
	events := []Event{
		flow(40001, "api.nirovision.com", "sni-mismatch"),
		flow(40002, "api.nirovision.com", "hello-malformed"),
		flow(40003, "", "special-range"),
		flow(40004, "tracker.example", policy.ReasonNoRule),
	}
	q := Event{Kind: KindDNS, Source: SourceDNS, Time: t0, Client: cli, ClientPort: 5353,
		Dest: netip.MustParseAddr("192.168.10.1"), DestPort: 53, Proto: "udp", Name: "api.nirovision.com", QType: "A"}
	q.Stamp(policy.Decision{Verdict: policy.Deny, Reason: "rate-limited", Mode: policy.ModeEnforce})
	events = append(events, q)

	r := NewReplayer(eng, reportNow)
	for _, ev := range events {
		r.Emit(ev)
	}
	res := r.Result()
	if len(res.NewlyAllowed) != 0 || len(res.NewlyDropped) != 0 || len(res.RuleChanged) != 0 || res.Unchanged != uint64(len(events)) {
		t.Errorf("replayed against the policy that recorded them: %d unchanged of %d, newly allowed %+v", res.Unchanged, len(events), res.NewlyAllowed)
	}

	// A candidate that allows tracker.example lifts that rule's denial.
	cand, err := policy.Compile("c.yaml", []byte("version: 1\nrules:\n  - name: tracker\n    to: [tracker.example]\n    ports: [443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	r = NewReplayer(cand, reportNow)
	for _, ev := range events {
		r.Emit(ev)
	}
	if res := r.Result(); len(res.NewlyAllowed) != 1 || res.NewlyAllowed[0].Dest != "tracker.example" {
		t.Errorf("candidate allowing tracker.example: newly allowed %+v", res.NewlyAllowed)
	}
}

// TestFlowTableChains fills the ledger's table of recent flows with
// records whose hashes collide (set by hand: maphash never collides in a
// test), past its size, and checks after each step that exactly the
// newest MaxFlows records are found, whatever their place among the
// slots of their hash: five hashes, two of them in the table's last
// slots, whose records run over its end to its first ones.
func TestFlowTableChains(t *testing.T) {
	const size = 5
	l := NewLedger(nil, LedgerOptions{MaxFlows: size})
	rng := rand.New(rand.NewPCG(1, 2))
	var ids []flowID
	hashes := []uint64{0, 1, 2, ^uint64(0), ^uint64(1)}
	for i := range 200 {
		id := flowID{kind: KindDNS, name: fmt.Sprintf("q%d.example", i)}
		ids = append(ids, id)
		r := l.recLocked()
		if *r != (flowRec{}) {
			t.Fatalf("step %d: record from recLocked not zeroed: %+v", i, r)
		}
		r.id, r.h, r.start, r.end = id, hashes[rng.IntN(len(hashes))], t0, t0
		l.rememberLocked(r)
		n := 0
		for _, s := range l.flows {
			if s.r != nil {
				n++
			}
		}
		if want := min(i+1, size); n != want || len(l.ring) != want {
			t.Fatalf("step %d: %d records in the table, %d in the ring, want %d", i, n, len(l.ring), want)
		}
		for j, old := range ids {
			found := false
			for _, h := range hashes {
				found = found || l.findLocked(old, h, t0) != nil
			}
			if kept := j > i-size; found != kept {
				t.Fatalf("step %d: record %d found %v, want %v", i, j, found, kept)
			}
		}
	}
}

// Names in a report come off the wire (an SNI, a Host header capture read)
// and may hold anything. The HTML page escapes them, and the terminal
// report must not pass control sequences to the operator's terminal nor
// let a newline forge a row.
func TestReportHostileNames(t *testing.T) {
	hostile := []string{
		"<script>alert(1)</script>.example",
		`x"><img src=x onerror=alert(1)>`,
		"evil\x1b]0;owned\x07\x1b[2J.example\n  FAKE  1.2.3.4  443/tcp",
		"bidi\u202egpj.exe",
	}
	l := NewLedger(nil, LedgerOptions{})
	for i, n := range hostile {
		base := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(i) * time.Minute),
			Client: netip.MustParseAddr("192.0.2.10"), ClientPort: uint16(40000 + i),
			Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: n, NameSource: NameSNI}
		allowed := base
		allowed.Stamp(policy.Decision{Verdict: policy.Allow, Rule: "web", Mode: policy.ModeAudit})
		l.Emit(allowed)
		denied := base
		denied.ClientPort += 1000
		denied.Stamp(policy.Decision{Verdict: policy.Deny, Reason: "invalid-name", Mode: policy.ModeAudit})
		l.Emit(denied)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	var html, txt bytes.Buffer
	if err := r.WriteHTML(&html); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"<script>alert", "<img"} {
		if bytes.Contains(html.Bytes(), []byte(bad)) {
			t.Errorf("HTML report holds %q unescaped", bad)
		}
	}
	if err := r.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"\x1b", "\x07", "\u202e"} {
		if bytes.Contains(txt.Bytes(), []byte(bad)) {
			t.Errorf("terminal report holds %q raw:\n%s", bad, txt.String())
		}
	}
	if bytes.Contains(bytes.ToLower(txt.Bytes()), []byte("\n  fake")) {
		t.Errorf("a newline in a name forged a row of the terminal report:\n%s", txt.String())
	}
}

// TestReportEnforcedPartly: a destination dropped by an audit run and then
// blocked by an enforce run says so alike in the text and HTML reports
// ("1/2" flows blocked). The HTML page said "no" (the latest flow) where
// the text said 1/2.
func TestReportEnforcedPartly(t *testing.T) {
	l := NewLedger(nil, LedgerOptions{})
	t0 := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0, Client: netip.MustParseAddr("192.0.2.7"), ClientPort: 40000,
		Dest: netip.MustParseAddr("203.0.113.5"), DestPort: 443, Proto: "tcp", Name: "evil.test", NameSource: NameSNI,
		Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce, Enforced: true}
	l.Emit(ev)
	ev.ClientPort, ev.Time, ev.Mode, ev.Enforced = 40001, t0.Add(time.Minute), policy.ModeAudit, false
	l.Emit(ev)
	rep := l.Report(ReportOptions{Now: t0.Add(time.Hour)})
	if len(rep.Dropped) != 1 || rep.Dropped[0].EnforcedFlows != 1 || rep.Dropped[0].Flows != 2 {
		t.Fatalf("dropped %+v", rep.Dropped)
	}
	var txt, page bytes.Buffer
	if err := rep.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	if err := rep.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^  evil\.test +203\.0\.113\.5 +443/tcp +2 +0 +1 +1/2 +no-rule `).Match(txt.Bytes()) {
		t.Errorf("text report:\n%s", txt.String())
	}
	if !strings.Contains(page.String(), `<td class="enforced">1/2</td>`) {
		t.Errorf("HTML report has no enforced cell 1/2:\n%s", page.String())
	}
}

// TestReplayPathUnseen: a flow that showed no HTTP/1 path (cleartext h2c,
// another protocol) is re-decided with that fact: denied as path-unseen
// where only a host/path rule named the host, it is newly allowed by a
// candidate with a host rule, and stays denied under one with only another
// host/path rule; allowed by a host rule and recorded as showing no path,
// it is newly dropped (path-unseen) by a candidate that narrows the host to
// a path. An event from before the field existed is known to have shown
// no path from its reason alone.
func TestReplayPathUnseen(t *testing.T) {
	compile := func(to string) *policy.Engine {
		t.Helper()
		e, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: r\n    to: ["+to+"]\n    ports: [80/tcp]\n"))
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	t0 := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	flow := func(port uint16, d policy.Decision, noPath bool) Event {
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(port) * time.Second), Client: netip.MustParseAddr("192.0.2.7"), ClientPort: port,
			Dest: netip.MustParseAddr("203.0.113.5"), DestPort: 80, Proto: "tcp", Name: "a.test", NameSource: NameDNSLearned, NoPath: noPath}
		ev.Stamp(d)
		return ev
	}
	unseen := policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonPathUnseen, Mode: policy.ModeEnforce}
	allowed := policy.Decision{Verdict: policy.Allow, Rule: "r", Reason: policy.ReasonAllowed, Mode: policy.ModeEnforce}
	replay := func(cand *policy.Engine, evs ...Event) *ReplayResult {
		r := NewReplayer(cand, t0)
		for _, ev := range evs {
			r.Emit(ev)
		}
		return r.Result()
	}

	// Denied path-unseen (with the field, and from before it).
	for _, ev := range []Event{flow(40001, unseen, true), flow(40002, unseen, false)} {
		if res := replay(compile("a.test"), ev); len(res.NewlyAllowed) != 1 || res.NewlyAllowed[0].NewRule != "r" {
			t.Errorf("no-path flow %v under a host rule: %+v", ev.NoPath, res)
		}
		if res := replay(compile(`"a.test/other/*"`), ev); res.Unchanged != 1 || len(res.NewlyAllowed) != 0 {
			t.Errorf("no-path flow %v under another host/path rule: %+v", ev.NoPath, res)
		}
	}
	// Allowed by a host rule, no path shown: a host/path candidate drops it.
	res := replay(compile(`"a.test/api/*"`), flow(40003, allowed, true))
	if len(res.NewlyDropped) != 1 || res.NewlyDropped[0].NewReason != policy.ReasonPathUnseen {
		t.Errorf("allowed no-path flow under a host/path candidate: %+v", res)
	}
	// TLS (path unknown) stays allowed at host level.
	res = replay(compile(`"a.test/api/*"`), flow(40004, allowed, false))
	if len(res.NewlyDropped) != 0 {
		t.Errorf("allowed flow with an unknown path under a host/path candidate: %+v", res)
	}
}

// TestReportECH (THREATS.md B1): the report counts DNS answers whose ech
// SvcParam egressd's forwarder stripped (dns events, in every mode) and
// DNS exchanges with other resolvers whose answers kept one (capture
// flows, audit mode: enforce mode sends every LAN query to the forwarder,
// which would strip it), with their clients and the names the forwarder
// stripped, each flow once however often it was reported; the text and
// HTML reports say so. Before, only the forwarder's log lines did.
func TestReportECH(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 8, 0, 0, 0, time.UTC)
	c1, c2, c3 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3")
	res := netip.MustParseAddr("198.51.100.53")
	dnsEv := func(c netip.Addr, port uint16, name, filtered string) Event {
		return Event{Kind: KindDNS, Source: SourceDNS, Time: t0, Client: c, ClientPort: port, Proto: "udp", Name: name, QType: "HTTPS",
			Verdict: policy.Allow, Rule: "r", Mode: policy.ModeAudit, Filtered: filtered}
	}
	flowEv := func(c netip.Addr, port uint16, filtered string) Event {
		return Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: c, ClientPort: port, Dest: res, DestPort: 53, Proto: "udp",
			Verdict: policy.Allow, Rule: "dns", Mode: policy.ModeAudit, Filtered: filtered}
	}
	l := NewLedger(nil, LedgerOptions{Now: func() time.Time { return t0 }})
	for _, ev := range []Event{
		dnsEv(c1, 1000, "a.test", "ech"),
		dnsEv(c1, 1001, "a.test", "rebinding+ech"),
		dnsEv(c2, 1002, "b.test", "ech"),
		dnsEv(c2, 1003, "c.test", "rebinding"),
		dnsEv(c2, 1004, "d.test", ""),
		flowEv(c3, 2000, "ech"),
		flowEv(c3, 2000, "ech"), // the same flow again
		flowEv(c3, 2001, ""),
	} {
		l.Emit(ev)
	}
	r := l.Report(ReportOptions{})
	want := &ECHReport{Stripped: 3, WouldStrip: 1, Clients: []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"}, ClientCount: 3,
		Names: []DestCount{{"a.test", 2}, {"b.test", 1}}}
	if d := cmp.Diff(want, r.ECH); d != "" {
		t.Errorf("ech (-want +got):\n%s", d)
	}
	var buf bytes.Buffer
	if err := r.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"ECH CONFIGS IN DNS ANSWERS", "3 answers of egressd's DNS forwarder", "1 DNS exchange with other resolvers", "a.test (2)"} {
		if !strings.Contains(buf.String(), s) {
			t.Errorf("text report lacks %q:\n%s", s, buf.String())
		}
	}
	buf.Reset()
	if err := r.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "ECH") {
		t.Errorf("HTML report says nothing of ECH")
	}
	// Without any, the report has no such part.
	l = NewLedger(nil, LedgerOptions{})
	l.Emit(dnsEv(c1, 1000, "a.test", "rebinding"))
	r = l.Report(ReportOptions{})
	buf.Reset()
	r.WriteText(&buf)
	if r.ECH != nil || strings.Contains(buf.String(), "ECH") {
		t.Errorf("no ech answers: report has %+v", r.ECH)
	}
}

// TestReplayNoMAC: a candidate that names clients by MAC decides each
// event with the MAC it carries, and counts those that carry none (the
// proxy and the forwarder record one only under a policy that names
// MACs): its MAC rules matched none of them. A candidate without MACs
// counts nothing.
func TestReplayNoMAC(t *testing.T) {
	cand, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\ngroups:\n  kiosks: [\"02:00:00:00:00:0a\"]\nrules:\n  - name: k\n    from: [kiosks]\n    to: [a.test]\n    ports: [443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	flow := func(port uint16, mac string) Event {
		return Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(port) * time.Millisecond), Client: netip.MustParseAddr("192.0.2.7"), ClientPort: port,
			ClientMAC: mac, Dest: netip.MustParseAddr("203.0.113.5"), DestPort: 443, Proto: "tcp", Name: "a.test", NameSource: NameSNI,
			Verdict: policy.Allow, Rule: "k", Mode: policy.ModeEnforce}
	}
	r := NewReplayer(cand, t0)
	r.Emit(flow(40000, "02:00:00:00:00:0a"))
	r.Emit(flow(40001, ""))
	r.Emit(flow(40002, ""))
	res := r.Result()
	if res.Flows != 3 || res.Unchanged != 1 || res.NoMAC != 2 || len(res.NewlyDropped) != 1 || res.NewlyDropped[0].Flows != 2 {
		t.Errorf("%+v", res)
	}
	plain, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: k\n    to: [a.test]\n    ports: [443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	r = NewReplayer(plain, t0)
	r.Emit(flow(40001, ""))
	if res := r.Result(); res.NoMAC != 0 {
		t.Errorf("a candidate without MACs: no_mac %d", res.NoMAC)
	}
}

// TestReportAlarms (THREATS.md E2): the DNS forwarder's dns-tunnel alarms
// are listed in the report, one entry per client and zone with its alarm
// count and the most distinct names a window had, in the text, JSON and
// HTML reports, and never count as queries. Before, the ledger ignored
// events of an unknown kind.
func TestReportAlarms(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 8, 0, 0, 0, time.UTC)
	c := netip.MustParseAddr("192.0.2.7")
	alarm := func(at time.Duration, n uint64) Event {
		return Event{Kind: KindAlarm, Source: SourceDNS, Time: t0.Add(at), Client: c, ClientMAC: "02:00:00:00:00:07", Proto: "udp",
			Name: "t.tenant.cloud", Count: n, Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel"}
	}
	l := NewLedger(nil, LedgerOptions{Now: func() time.Time { return t0 }})
	l.Emit(alarm(0, 503))
	l.Emit(alarm(time.Minute, 511))
	r := l.Report(ReportOptions{})
	want := []AlarmReport{{Reason: "dns-tunnel", Client: "192.0.2.7", ClientMAC: "02:00:00:00:00:07", Zone: "t.tenant.cloud", Rule: "tenant",
		Alarms: 2, DistinctNames: 511, FirstSeen: t0, LastSeen: t0.Add(time.Minute)}}
	if d := cmp.Diff(want, r.Alarms); d != "" {
		t.Errorf("alarms (-want +got):\n%s", d)
	}
	if r.Totals.Queries != 0 || r.Totals.Flows != 0 {
		t.Errorf("alarms counted as queries or flows: %+v", r.Totals)
	}
	var buf bytes.Buffer
	if err := r.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"ALARMS (1)", "dns-tunnel  192.0.2.7 (02:00:00:00:00:07)  zone t.tenant.cloud: 511 distinct names"} {
		if !strings.Contains(buf.String(), s) {
			t.Errorf("text report lacks %q:\n%s", s, buf.String())
		}
	}
	buf.Reset()
	if err := r.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(buf.Bytes(), &back); err != nil || len(back.Alarms) != 1 || back.Alarms[0].DistinctNames != 511 {
		t.Errorf("JSON report alarms %+v (%v):\n%s", back.Alarms, err, buf.String())
	}
	buf.Reset()
	if err := r.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `id="alarms"`) || !strings.Contains(buf.String(), "t.tenant.cloud") {
		t.Errorf("HTML report has no alarm:\n%s", buf.String())
	}
	// The event survives the event log's encoding.
	ev := alarm(0, 503)
	b, err := ev.appendJSON(nil)
	if err != nil {
		t.Fatal(err)
	}
	var dec Event
	if !decodeEvent(bytes.TrimSpace(b), &dec) || dec.Kind != KindAlarm || dec.Count != 503 || dec.Name != "t.tenant.cloud" {
		t.Errorf("decoded %+v from %s", dec, b)
	}
}

// TestReportZoneAlarm: a zone-wide dns-tunnel-zone alarm names no client
// (the zero address): the report keeps its client empty in JSON and says
// "all clients" in the text and HTML reports, not "invalid IP".
func TestReportZoneAlarm(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 8, 0, 0, 0, time.UTC)
	l := NewLedger(nil, LedgerOptions{Now: func() time.Time { return t0 }})
	l.Emit(Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Proto: "udp", Name: "t.tenant.cloud", Count: 1003,
		Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel-zone"})
	r := l.Report(ReportOptions{})
	if len(r.Alarms) != 1 || r.Alarms[0].Client != "" || r.Alarms[0].Reason != "dns-tunnel-zone" {
		t.Fatalf("alarms %+v, want one dns-tunnel-zone alarm with no client", r.Alarms)
	}
	var buf bytes.Buffer
	if err := r.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	if s := "dns-tunnel-zone  all clients  zone t.tenant.cloud: 1003 distinct names"; !strings.Contains(buf.String(), s) {
		t.Errorf("text report lacks %q:\n%s", s, buf.String())
	}
	buf.Reset()
	if err := r.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	if s := "dns-tunnel-zone: all clients, zone t.tenant.cloud"; !strings.Contains(buf.String(), s) || strings.Contains(buf.String(), "invalid IP") {
		t.Errorf("HTML report lacks %q:\n%s", s, buf.String())
	}
}
