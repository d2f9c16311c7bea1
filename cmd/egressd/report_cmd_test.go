package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/admin"
	"egressd/audit"
	"egressd/policy"
)

const auditPolicy = "../../audit/testdata/policy.yaml"

var rt0 = time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)

// recordEvents writes a small event stream into a state directory through
// the real journal, and returns the ledger that wrote it.
func recordEvents(t *testing.T, dir string) *audit.Ledger {
	t.Helper()
	eng, err := loadEngine(auditPolicy, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	l := audit.NewLedger(eng, audit.LedgerOptions{})
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	emit := func(i int, client, dest string, port uint16, proto, name string) {
		ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: rt0.Add(time.Duration(i) * time.Minute),
			Client: netip.MustParseAddr(client), ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr(dest),
			DestPort: port, Proto: proto, Name: name, BytesOut: 10, BytesIn: 100}
		pr, _ := policy.ParseProto(proto)
		ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: port, Proto: pr, Name: name, Now: ev.Time}))
		j.Emit(ev)
		if i%2 == 0 { // capture saw it too: still one flow
			ev.Source, ev.Time = audit.SourceCapture, ev.Time.Add(time.Millisecond)
			j.Emit(ev)
		}
	}
	for i := range 5 {
		emit(i, "192.168.10.5", "198.51.100.10", 443, "tcp", "api.nirovision.com")
	}
	emit(10, "192.168.10.6", "17.1.2.3", 5223, "tcp", "")
	emit(11, "192.168.10.6", "17.1.2.4", 5223, "tcp", "")
	emit(20, "192.168.10.8", "203.0.113.9", 443, "tcp", "tracker.example")
	emit(21, "192.168.10.9", "203.0.113.9", 443, "tcp", "tracker.example")
	emit(22, "192.168.10.9", "198.51.100.50", 443, "tcp", "a.cdn.example.co.uk")
	emit(23, "192.168.10.9", "198.51.100.51", 443, "tcp", "b.cdn.example.co.uk")
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	return l
}

func runCmd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestReportFromStateDir(t *testing.T) {
	dir := t.TempDir()
	recordEvents(t, dir)
	code, out, stderr := runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy, "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var rep audit.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Rules) != 2 || rep.Rules[0].Name != "vendor-cloud" || rep.Rules[0].Flows != 5 || rep.Rules[1].Flows != 2 {
		t.Errorf("rules = %+v", rep.Rules)
	}
	if len(rep.Dropped) != 3 || rep.Dropped[0].Dest != "tracker.example" || rep.Dropped[0].Flows != 2 {
		t.Errorf("dropped = %+v", rep.Dropped)
	}
	if !strings.Contains(stderr, "report from "+dir) {
		t.Errorf("stderr does not say where the report came from: %q", stderr)
	}

	// --since: the window leaves out the first events.
	since := time.Since(rt0.Add(15 * time.Minute)).Round(time.Second) // so that rt0+15m is the cut
	code, out, stderr = runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy, "--json", "--since", since.String())
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var win audit.Report
	json.Unmarshal([]byte(out), &win)
	if len(win.Rules) != 0 || len(win.Dropped) != 3 || win.Since == nil {
		t.Errorf("windowed: rules %+v dropped %d since %v", win.Rules, len(win.Dropped), win.Since)
	}

	// The terminal table, and the suggestions.
	code, out, _ = runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy)
	if code != 0 || !strings.Contains(out, "RULES BY USE (2)") || !strings.Contains(out, "UNUSED RULES") {
		t.Errorf("text report:\n%s", out)
	}
	code, out, _ = runCmd(t, "report", "--state-dir", dir, "--suggest")
	if code != 0 || !strings.Contains(out, `to: ["*.cdn.example.co.uk"]`) || !strings.Contains(out, `to: ["tracker.example"]`) {
		t.Errorf("suggestions:\n%s", out)
	}
	if strings.Contains(out, "*.co.uk") || strings.Contains(out, "*.example.co.uk\"") && !strings.Contains(out, "cdn") {
		t.Errorf("suggestion too wide:\n%s", out)
	}
	// --html writes a page.
	page := filepath.Join(t.TempDir(), "r.html")
	if code, _, stderr := runCmd(t, "report", "--state-dir", dir, "--html", page); code != 0 {
		t.Fatalf("html: %s", stderr)
	}
	if b, err := os.ReadFile(page); err != nil || !bytes.Contains(b, []byte(`class="bar"`)) {
		t.Errorf("html page: %v", err)
	}
	if code, _, _ := runCmd(t, "report", "--json", "--suggest"); code != exitUsage {
		t.Errorf("--json --suggest: exit %d", code)
	}
	if code, _, _ := runCmd(t, "report", "--since", "yesterday"); code != exitUsage {
		t.Errorf("--since yesterday: exit %d", code)
	}
}

func TestReportFromDaemon(t *testing.T) {
	l := recordEvents(t, t.TempDir())
	s, err := admin.New(admin.Config{}, admin.Deps{Reporter: l})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	addr := strings.TrimPrefix(ts.URL, "http://")
	code, out, stderr := runCmd(t, "report", "--admin", addr, "--json")
	if code != 0 || !strings.Contains(stderr, "from the daemon") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var got audit.Report
	json.Unmarshal([]byte(out), &got)
	want := l.Report(audit.ReportOptions{})
	if len(got.Rules) != len(want.Rules) || got.Rules[0].Flows != want.Rules[0].Flows || len(got.Dropped) != len(want.Dropped) {
		t.Errorf("daemon report %+v, ledger %+v", got.Rules, want.Rules)
	}
	// --policy does not apply to the daemon's report: say so rather
	// than ignore it.
	if code, _, stderr := runCmd(t, "report", "--admin", addr, "--json", "--policy", auditPolicy); code != 0 || !strings.Contains(stderr, "warning: --policy is not used") {
		t.Errorf("--policy with the daemon: exit %d, stderr %q; want a warning", code, stderr)
	}
	// An explicit --admin that does not answer is an error, not a
	// silent fallback.
	ts.Close()
	if code, _, stderr := runCmd(t, "report", "--admin", addr); code != exitFail || !strings.Contains(stderr, "no daemon") {
		t.Errorf("dead daemon: exit %d %s", code, stderr)
	}
}

// TestReplay records flows under the fixture policy and replays them
// against a candidate that drops apple-apns and allows tracker.example.
func TestReplay(t *testing.T) {
	dir := t.TempDir()
	recordEvents(t, dir)
	src, err := os.ReadFile(auditPolicy)
	if err != nil {
		t.Fatal(err)
	}
	cand := strings.Replace(string(src), "  - name: apple-apns\n    to: [17.0.0.0/8]\n    ports: [5223/tcp, 443/tcp]\n", "", 1)
	cand += "  - name: tracker\n    to: [tracker.example]\n    ports: [443/tcp]\n"
	if cand == string(src)+"  - name: tracker\n    to: [tracker.example]\n    ports: [443/tcp]\n" {
		t.Fatal("fixture policy changed: apple-apns not removed")
	}
	candFile := filepath.Join(t.TempDir(), "new.yaml")
	os.WriteFile(candFile, []byte(cand), 0o644)
	eng, err := loadEngine(candFile, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if code := runReplay(eng, dir, &out, &errb, true); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var res audit.ReplayResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatal(err)
	}
	if res.Flows != 11 || res.Unchanged != 7 {
		t.Errorf("flows %d unchanged %d, want 11 (each once) and 7", res.Flows, res.Unchanged)
	}
	if len(res.NewlyDropped) != 2 || len(res.NewlyAllowed) != 1 {
		t.Errorf("%d newly dropped groups (want 2: one per address), %d newly allowed (want 1)", len(res.NewlyDropped), len(res.NewlyAllowed))
	}
	var dropped, allowed uint64
	for _, c := range res.NewlyDropped {
		dropped += c.Flows
		if c.OldRule != "apple-apns" || c.NewReason != policy.ReasonNoRule {
			t.Errorf("newly dropped %+v", c)
		}
	}
	for _, c := range res.NewlyAllowed {
		allowed += c.Flows
		if c.Dest != "tracker.example" || c.NewRule != "tracker" {
			t.Errorf("newly allowed %+v", c)
		}
	}
	if dropped != 2 || allowed != 2 {
		t.Errorf("newly dropped %d flows, newly allowed %d; want 2 and 2", dropped, allowed)
	}

	// The same through the command line, on the events file, as text.
	code, text, stderr := runCmd(t, "audit", "--policy", candFile, "--replay", filepath.Join(dir, audit.CurrentLog))
	if code != 0 || !strings.Contains(text, "NEWLY DROPPED (2)") || !strings.Contains(text, "NEWLY ALLOWED (1)") || !strings.Contains(text, "allow (apple-apns)") {
		t.Errorf("egressd audit --replay: exit %d\n%s\n%s", code, text, stderr)
	}
}

// TestReportRotatedOut: `egressd report` reading a state directory whose
// oldest files rotation deleted still counts a rule used only there, says
// what it covers, and a window reaching back before the kept files does
// not call the rule unused; `audit --replay` says what it could not
// replay.
func TestReportRotatedOut(t *testing.T) {
	dir := t.TempDir()
	eng, err := loadEngine(auditPolicy, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, MaxFileBytes: 1500, MaxFiles: 1}, audit.NewLedger(eng, audit.LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	tcp, _ := policy.ParseProto("tcp")
	emit := func(i int, at time.Time, dest string, port uint16, name string) {
		ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: at,
			Client: netip.MustParseAddr("192.168.10.6"), ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr(dest),
			DestPort: port, Proto: "tcp", Name: name}
		ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: port, Proto: tcp, Name: name, Now: at}))
		j.Emit(ev)
	}
	for i := range 3 {
		emit(i, rt0.Add(time.Duration(i)*time.Second), "17.1.2.3", 5223, "")
	}
	for i := 0; j.Written() < 3 && i < 1000; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	for i := range 60 {
		emit(100+i, rt0.Add(24*time.Hour+time.Duration(i)*time.Second), "198.51.100.10", 443, "api.nirovision.com")
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	code, out, stderr := runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy)
	unused := out[strings.Index(out, "UNUSED RULES"):]
	if code != 0 || !strings.Contains(out, "rotated out") || strings.Contains(unused, "apple-apns") || !strings.Contains(stderr, "a summary of") {
		t.Errorf("exit %d\n%s\n%s", code, out, stderr)
	}
	since := time.Since(rt0.Add(-time.Hour)).Round(time.Hour)
	code, out, stderr = runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy, "--json", "--since", since.String())
	var win audit.Report
	if err := json.Unmarshal([]byte(out), &win); code != 0 || err != nil {
		t.Fatalf("exit %d, %v: %s", code, err, stderr)
	}
	if len(win.UsedBeforeDetail) != 1 || win.UsedBeforeDetail[0].Name != "apple-apns" || win.Coverage == nil || win.Coverage.RotatedOut == nil {
		t.Errorf("window: used before detail %+v, coverage %+v, unused %q", win.UsedBeforeDetail, win.Coverage, win.UnusedRules)
	}
	for _, n := range win.UnusedRules {
		if n == "apple-apns" {
			t.Errorf("window lists apple-apns unused: %q", win.UnusedRules)
		}
	}

	code, out, stderr = runCmd(t, "audit", "--policy", auditPolicy, "--replay", dir)
	if code != 0 || !strings.Contains(out, "not replayed:") || !strings.Contains(stderr, "cannot be replayed") {
		t.Errorf("replay: exit %d\n%s\n%s", code, out, stderr)
	}
}

// TestReportStateDirEnforceMode: a daemon run with --mode enforce keeps the
// policy file's copy (mode: audit) in its state directory. The report read
// from that directory says the mode the events were decided in, not the
// file's: before, it said "mode audit" and headed the refused connections
// "WOULD BE DROPPED (audit mode: not blocked)" beside ENFORCED yes.
func TestReportStateDirEnforceMode(t *testing.T) {
	dir := t.TempDir()
	src, err := os.ReadFile(auditPolicy)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(src, []byte("mode: audit")) {
		t.Fatal("the test policy is not an audit-mode one")
	}
	if err := os.WriteFile(filepath.Join(dir, runningPolicyFile), src, 0o644); err != nil {
		t.Fatal(err)
	}
	eng, err := loadEngine(auditPolicy, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	eng = eng.WithMode(policy.ModeEnforce) // as run --mode enforce
	l := audit.NewLedger(eng, audit.LedgerOptions{})
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	for i, d := range []struct {
		dest, name string
	}{{"198.51.100.10", "api.nirovision.com"}, {"203.0.113.9", "tracker.example"}} {
		ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: rt0.Add(time.Duration(i) * time.Minute),
			Client: netip.MustParseAddr("192.168.10.5"), ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr(d.dest),
			DestPort: 443, Proto: "tcp", Name: d.name}
		ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: 443, Proto: policy.TCP, Name: d.name, Now: ev.Time}))
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	code, out, stderr := runCmd(t, "report", "--state-dir", dir, "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var rep audit.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Mode != policy.ModeEnforce {
		t.Errorf("mode %q, want enforce (the events' mode)", rep.Mode)
	}
	if len(rep.Dropped) != 1 || !rep.Dropped[0].Enforced {
		t.Errorf("dropped %+v, want one enforced entry", rep.Dropped)
	}
	if len(rep.UnusedRules) == 0 {
		t.Error("no unused rules: the state directory's policy copy was not read")
	}
	code, out, stderr = runCmd(t, "report", "--state-dir", dir)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if strings.Contains(out, "audit mode") || !strings.Contains(out, "mode enforce") {
		t.Errorf("text report says audit mode for enforce-mode events:\n%s", out)
	}
}

// TestReportStateDirNotDir: --state-dir naming a file is one plain error,
// not first a warning that the summary of rotated-out files is unreadable
// (it said so, with kept_as="", before the error).
func TestReportStateDirNotDir(t *testing.T) {
	f := filepath.Join(t.TempDir(), "state")
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := runCmd(t, "report", "--state-dir", f)
	if code != exitFail || out != "" {
		t.Fatalf("exit %d, output %q", code, out)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if len(lines) != 1 || !strings.Contains(stderr, "not a directory") || strings.Contains(stderr, "summary") {
		t.Errorf("stderr: want one line saying %s is not a directory, got:\n%s", f, stderr)
	}
}

// TestReportStateDirMissing: an explicit --state-dir that does not exist
// is an error about that directory; no daemon was asked, so the message
// does not say there was none (it did: "no daemon at 127.0.0.1:9901 and
// no state directory").
func TestReportStateDirMissing(t *testing.T) {
	d := filepath.Join(t.TempDir(), "nothing")
	code, out, stderr := runCmd(t, "report", "--state-dir", d)
	if code != exitFail || out != "" {
		t.Fatalf("exit %d, output %q", code, out)
	}
	if strings.Contains(stderr, "daemon") || !strings.Contains(stderr, d) || !strings.Contains(stderr, "no such file") {
		t.Errorf("stderr: want one error naming %s, no daemon's, got:\n%s", d, stderr)
	}
}
