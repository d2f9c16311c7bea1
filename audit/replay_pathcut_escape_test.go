package audit

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayClippedPathMidEscape: a path cut at MaxPathBytes whose kept
// start ends inside a percent escape ("%", "%4") or between the escapes
// of one UTF-8 character ("%C3" of "%C3%A9"), or whose cut falls inside
// a raw UTF-8 character (Clip keeps whole characters), read back from an
// events file as `audit --replay` reads it: replayed against the policy
// that recorded it nothing changes (a rule whose literal lead runs past
// the cut is not decided on the half escape: policy.cutPathStart), and
// against a candidate the replay never contradicts what the candidate
// makes of the whole path. Each path is decided live, whole, with a rule
// naming its normal form past the cut ("%41" is "A").
func TestReplayClippedPathMidEscape(t *testing.T) {
	compile, rule := func(rules string) *policy.Engine { return compileRules(t, rules) }, rule80
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	// pad returns "/p/" and a's up to n bytes, so that what follows
	// starts at byte n: the cut keeps MaxPathBytes-len(TruncMark) bytes.
	keep := MaxPathBytes - len(TruncMark)
	pad := func(n int) string { return "/p/" + strings.Repeat("a", n-3) }
	type tc struct {
		what      string
		path      string // the whole path, as sent
		ruleGlob  string // the recording policy's path glob (normal form)
		wantStart string // the recorded start ends so (before TruncMark)
	}
	cases := []tc{
		{"cut after %", pad(keep-1) + "%41/x/" + strings.Repeat("b", 100), pad(keep-1) + "A/x/*", "a%"},
		{"cut after %4", pad(keep-2) + "%41/x/" + strings.Repeat("b", 100), pad(keep-2) + "A/x/*", "a%4"},
		{"cut after %41", pad(keep-3) + "%41/x/" + strings.Repeat("b", 100), pad(keep-3) + "A/x/*", "a%41"},
		{"cut after %4 of lower-case hex", pad(keep-2) + "%4a/x/" + strings.Repeat("b", 100), pad(keep-2) + "J/x/*", "a%4"},
		{"cut between the escapes of é", pad(keep-3) + "%c3%a9/x/" + strings.Repeat("b", 100), pad(keep-3) + "%C3%A9/x/*", "a%c3"},
		{"cut after the % of %a9 of é", pad(keep-4) + "%c3%a9/x/" + strings.Repeat("b", 100), pad(keep-4) + "%C3%A9/x/*", "a%c3%"},
		{"cut after %a of %a9 of é", pad(keep-5) + "%c3%a9/x/" + strings.Repeat("b", 100), pad(keep-5) + "%C3%A9/x/*", "a%c3%a"},
		{"cut in a raw é", pad(keep-1) + "é/x/" + strings.Repeat("b", 100), pad(keep-1) + "é/x/*", "a"},
		{"cut in a raw €", pad(keep-2) + "€/x/" + strings.Repeat("b", 100), pad(keep-2) + "€/x/*", "a"},
	}
	dir := t.TempDir()
	for i, c := range cases {
		host := "web.test"
		old := compile(rule("deep", host+c.ruleGlob) + rule("other", "other.test"))
		// Candidates: the same rule and a host rule after it; a rule
		// whose lead the start leaves (decided: no match); nothing for
		// the host.
		cands := map[string]*policy.Engine{
			"same":       old,
			"then host":  compile(rule("deep", host+c.ruleGlob) + rule("host", host)),
			"other lead": compile(rule("v1", host+"/v1/*")),
			"host only":  compile(rule("host", host)),
		}
		whole := policy.Input{Client: netip.MustParseAddr("192.0.2.7"), Dest: netip.MustParseAddr("203.0.113.5"), Port: 80,
			Proto: policy.TCP, Name: host, Path: c.path, Now: t0}
		live := old.Decide(whole)
		if !live.Allowed() || live.Rule != "deep" {
			t.Fatalf("%s: live decision on the whole path %+v, want allowed by deep", c.what, live)
		}
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(i) * time.Second), Client: whole.Client,
			ClientPort: uint16(42000 + i), Dest: whole.Dest, DestPort: 80, Proto: "tcp", Name: host, NameSource: NameHost, Path: c.path}
		ev.Stamp(live)
		ev.Bound()
		if !strings.HasSuffix(strings.TrimSuffix(ev.Path, TruncMark), c.wantStart) || ev.PathLen != len(c.path) {
			t.Fatalf("%s: recorded path ends %q (path_len %d), want the start to end %q", c.what,
				ev.Path[len(ev.Path)-12:], ev.PathLen, c.wantStart)
		}
		b, err := ev.appendJSON(nil)
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(dir, "events-"+string(rune('a'+i))+".ndjson")
		if err := os.WriteFile(file, append(b, '\n'), 0o600); err != nil {
			t.Fatal(err)
		}
		for name, cand := range cands {
			r := NewReplayer(cand, t0)
			if _, err := ReplayPath(file, r); err != nil {
				t.Fatal(err)
			}
			res := r.Result()
			if res.Flows != 1 {
				t.Fatalf("%s vs %s: %+v, want one flow replayed", c.what, name, res)
			}
			got := cand.Decide(whole)
			switch {
			case name == "same":
				if res.Unchanged != 1 {
					t.Errorf("%s: against the policy that recorded it: %+v, want unchanged", c.what, res)
				}
			case len(res.NewlyDropped) == 1:
				if got.Allowed() {
					t.Errorf("%s vs %s: newly dropped (%s), but the candidate allows the whole path by %s", c.what, name, res.NewlyDropped[0].NewReason, got.Rule)
				}
			case len(res.RuleChanged) == 1:
				if !got.Allowed() || got.Rule != res.RuleChanged[0].NewRule {
					t.Errorf("%s vs %s: credited to %s, the candidate decides the whole path %+v", c.what, name, res.RuleChanged[0].NewRule, got)
				}
			case res.Unchanged == 1 && res.PathCut == 0:
				if !got.Allowed() || got.Rule != "deep" {
					t.Errorf("%s vs %s: unchanged, not path_cut, but the candidate decides the whole path %+v", c.what, name, got)
				}
			}
		}
	}
}

// TestReplayOldEventLongPath: an event written before events were bounded
// (46e4287: the whole path, up to the 64 KiB head, and no path_len) is
// bounded as it is read, so that path_len marks it cut and the replay
// judges it on the start, as one written since: the policy that recorded
// it (allowed by "/m/*.js", which the start cannot decide) leaves it
// unchanged and counted in path_cut, not newly dropped. A short path of
// such a line has no path_len and is replayed whole.
func TestReplayOldEventLongPath(t *testing.T) {
	eng, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: js\n    to: [\"web.test/m/*.js\"]\n    ports: [80/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	long := "/m/" + strings.Repeat("a", 5000) + ".js"
	var lines []byte
	for i, p := range []string{long, "/m/x.js", "/m/" + strings.Repeat("a", 5000) + ".css"} {
		// The old writer's line: encoding/json of the event, no path_len.
		in := policy.Input{Client: netip.MustParseAddr("192.0.2.7"), Dest: netip.MustParseAddr("203.0.113.5"), Port: 80, Proto: policy.TCP, Name: "web.test", Path: p, Now: t0}
		d := eng.Decide(in)
		line, err := json.Marshal(map[string]any{"time": t0.Add(time.Duration(i) * time.Second), "kind": "flow", "source": "proxy",
			"client": "192.0.2.7", "client_port": 43000 + i, "dest_ip": "203.0.113.5", "dest_port": 80, "proto": "tcp",
			"name": "web.test", "name_source": "host", "path": p, "verdict": d.Verdict, "rule": d.Rule, "mode": "enforce", "reason": d.Reason})
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(line), "path_len") {
			t.Fatal("the old line has a path_len")
		}
		lines = append(append(lines, line...), '\n')
	}
	file := filepath.Join(t.TempDir(), "events.ndjson")
	if err := os.WriteFile(file, lines, 0o600); err != nil {
		t.Fatal(err)
	}
	var evs []Event
	if _, _, err := readPath(file, func(ev Event) { evs = append(evs, ev) }); err != nil || len(evs) != 3 {
		t.Fatalf("read %d events: %v", len(evs), err)
	}
	r := NewReplayer(eng, t0)
	if _, err := ReplayPath(file, r); err != nil {
		t.Fatal(err)
	}
	res := r.Result()
	// The .js one allowed, cut: unchanged, path_cut. The short one:
	// unchanged. The .css one denied live (path-not-allowed), cut: the
	// start cannot tell, no rule allows the host whatever the path: the
	// record stays, path_cut too.
	if res.Flows != 3 || res.Unchanged != 3 || res.PathCut != 2 || len(res.NewlyDropped)+len(res.NewlyAllowed)+len(res.RuleChanged) != 0 {
		t.Errorf("replay of old lines against the policy that recorded them: %+v, want 3 unchanged, 2 of them path_cut", res)
	}
	var b strings.Builder
	if err := res.WriteJSON(&b); err != nil || !strings.Contains(b.String(), `"path_cut": 2`) {
		t.Errorf("JSON %s (%v), want \"path_cut\": 2", b.String(), err)
	}
}
