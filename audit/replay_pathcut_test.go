package audit

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayClippedPath: a request whose path was longer than the event
// keeps (MaxPathBytes) is replayed on the start kept, as capture judges
// it again at a reload (policy.Input.PathCut, capture's rejudge): a
// host/path rule the start decides ("/api/*", or one whose lead the start
// does not begin with) matches as on the whole path; where one the start
// cannot decide ranks first, a recorded allow stays and a recorded deny
// is lifted only by a rule that allows the host whatever the path, else
// the event is counted unchanged and as path_cut (not known). Each event
// is decided live on its whole path (as the proxy does) with the policy
// that records it; replayed against that same policy nothing changes, and
// against a candidate the replay gives the verdict the candidate gives
// the whole path wherever it says one. Before, the start was judged as
// the whole path: a request allowed by "/m/*.js" was newly dropped
// (path-not-allowed) by the very policy that allowed it.
func TestReplayClippedPath(t *testing.T) {
	compile, rule := func(rules string) *policy.Engine { return compileRules(t, rules) }, rule80
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	long := strings.Repeat("a", MaxPathBytes+100)
	none := rule("other", "other.test")
	cases := []struct {
		what       string
		old, cand  string
		host, path string
		// want: "unchanged", "cut" (unchanged, not known), or the change
		// list and the candidate's rule or reason.
		want, wantRule string
	}{
		{"glob past the cut, same policy", rule("js", "web.test/m/*.js"), rule("js", "web.test/m/*.js"), "web.test", "/m/" + long + ".js", "cut", ""},
		{"prefix glob, same policy", rule("api", "web.test/api/*"), rule("api", "web.test/api/*"), "web.test", "/api/" + long, "unchanged", ""},
		{"glob past the cut, another rule first", rule("js", "web.test/m/*.js"), rule("js2", "web.test/m/*.js") + rule("host", "web.test"), "web.test", "/m/" + long + ".js", "cut", ""},
		{"glob past the cut, nothing else", none, rule("js", "web.test/m/*.js"), "web.test", "/m/" + long + ".js", "cut", ""},
		{"undecided rule before a host rule lifts a deny", none, rule("mid", "web.test/m/*/x") + rule("host", "web.test"), "web.test", "/m/" + long, "allowed", "host"},
		{"prefix glob lifts a deny", none, rule("api", "web.test/api/*") + rule("host", "web.test"), "web.test", "/api/" + long, "allowed", "api"},
		{"lead the start leaves drops it", rule("api3", "web3.test/api/*"), rule("v1", "web3.test/v1/*"), "web3.test", "/api/" + long, "dropped", policy.ReasonPath},
	}
	for i, c := range cases {
		old, cand := compile(c.old), compile(c.cand)
		port := uint16(41000 + i)
		whole := policy.Input{Client: netip.MustParseAddr("192.0.2.7"), Dest: netip.MustParseAddr("203.0.113.5"), Port: 80, Proto: policy.TCP, Name: c.host, Path: c.path, Now: t0}
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(i) * time.Second), Client: whole.Client, ClientPort: port,
			Dest: whole.Dest, DestPort: 80, Proto: "tcp", Name: c.host, NameSource: NameHost, Path: c.path}
		ev.Stamp(old.Decide(whole)) // live, on the whole path
		ev.Bound()
		if ev.PathLen != len(c.path) {
			t.Fatalf("%s: path_len %d, want %d", c.what, ev.PathLen, len(c.path))
		}
		for _, against := range []struct {
			eng  *policy.Engine
			same bool
		}{{old, true}, {cand, false}} {
			got, gotRule, res := replayOne(against.eng, t0, ev)
			if against.same {
				if res.Unchanged != 1 || len(res.NewlyAllowed)+len(res.NewlyDropped)+len(res.RuleChanged) != 0 {
					t.Errorf("%s: replayed against the policy that recorded it: %+v, want unchanged", c.what, res)
				}
				continue
			}
			live := cand.Decide(whole)
			if got == "cut" {
				var b strings.Builder
				if err := res.WriteText(&b); err != nil || !strings.Contains(b.String(), "of which 1 with a path cut") {
					t.Errorf("%s: text %q (%v), want the path-cut line", c.what, b.String(), err)
				}
			}
			if got != c.want || gotRule != c.wantRule {
				t.Errorf("%s: replay %q %q, want %q %q (%+v)", c.what, got, gotRule, c.want, c.wantRule, res)
			}
			if got == "allowed" && (!live.Allowed() || live.Rule != gotRule) || got == "dropped" && live.Allowed() {
				t.Errorf("%s: replay %q %q, but the candidate decides the whole path %+v", c.what, got, gotRule, live)
			}
		}
	}
}

// replayOne replays ev against eng at t0 and says what changed:
// "allowed", "dropped", "rule" (with the candidate's rule, or for
// "dropped" its reason), "cut" (unchanged, and in path_cut: not known) or
// "unchanged"; and the result.
func replayOne(eng *policy.Engine, t0 time.Time, ev Event) (string, string, *ReplayResult) {
	r := NewReplayer(eng, t0)
	r.Emit(ev)
	res := r.Result()
	switch {
	case len(res.NewlyAllowed) == 1:
		return "allowed", res.NewlyAllowed[0].NewRule, res
	case len(res.NewlyDropped) == 1:
		return "dropped", res.NewlyDropped[0].NewReason, res
	case len(res.RuleChanged) == 1:
		return "rule", res.RuleChanged[0].NewRule, res
	case res.Unchanged == 1 && res.PathCut == 1:
		return "cut", "", res
	case res.Unchanged == 1:
		return "unchanged", "", res
	}
	return "", "", res
}

// compileRules compiles an enforce policy of rules (YAML list items).
func compileRules(t *testing.T, rules string) *policy.Engine {
	t.Helper()
	e, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\nrules:\n"+rules))
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// rule80 is a rule, as a YAML list item, allowing to on 80/tcp.
func rule80(name, to string) string {
	return "  - name: " + name + "\n    to: [\"" + to + "\"]\n    ports: [80/tcp]\n"
}
