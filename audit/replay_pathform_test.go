package audit

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayPathForm: a recorded request whose path an origin may read as
// another ("/public/%2e%2e/private/x": policy.NormalPath makes it
// "/public/../private/x", which the glob /public/* matches) is replayed as
// the proxy and capture judge it live: path-form where only a host/path
// rule allows it. Before, replay decided the path alone: a candidate that
// narrowed a whole-host rule to docs.paths.test/public/* was shown still
// allowing such a request (rule changed), one that added /public/* to a
// denial was shown lifting it, while egressd refuses both with path-form.
// A path with only an escaped unreserved letter is still re-decided.
func TestReplayPathForm(t *testing.T) {
	t0 := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	cand, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: files\n    to: [docs.paths.test/public/*]\n    ports: [80/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	ev := func(port uint16, path string, d policy.Decision) Event {
		e := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(port) * time.Millisecond), Client: netip.MustParseAddr("192.0.2.7"), ClientPort: port,
			Dest: netip.MustParseAddr("203.0.113.5"), DestPort: 80, Proto: "tcp", Name: "docs.paths.test", NameSource: NameHost, Path: path}
		e.Stamp(d)
		return e
	}
	allowedHost := policy.Decision{Verdict: policy.Allow, Rule: "host", Mode: policy.ModeEnforce}
	deniedPath := policy.Decision{Verdict: policy.Deny, Rule: "other", Reason: policy.ReasonPath, Mode: policy.ModeEnforce}
	for _, c := range []struct {
		ev                   Event
		dropped, lifted, chg int
	}{
		{ev(40001, "/public/%2e%2e/private/x", allowedHost), 1, 0, 0},
		{ev(40002, "/public/%2E./private/x", allowedHost), 1, 0, 0},
		{ev(40003, "/public/.%2e/private/x", allowedHost), 1, 0, 0},
		{ev(40004, "/public/%252e%252e/private/x", allowedHost), 1, 0, 0},
		{ev(40005, "/public/%2e%2e/private/x", deniedPath), 0, 0, 0},
		{ev(40006, "/public/../private/x", deniedPath), 0, 0, 0},
		// Plain: re-decided on its normal form.
		{ev(40007, "/%70ublic/x", allowedHost), 0, 0, 1},
		{ev(40008, "/%70ublic/x", deniedPath), 0, 1, 0},
	} {
		r := NewReplayer(cand, t0.Add(time.Hour))
		r.Emit(c.ev)
		res := r.Result()
		if len(res.NewlyDropped) != c.dropped || len(res.NewlyAllowed) != c.lifted || len(res.RuleChanged) != c.chg {
			t.Errorf("%s (recorded %s %s): newly dropped %+v, newly allowed %+v, rule changed %+v", c.ev.Path, c.ev.Verdict, c.ev.Reason, res.NewlyDropped, res.NewlyAllowed, res.RuleChanged)
			continue
		}
		if c.dropped == 1 && res.NewlyDropped[0].NewReason != "path-form" {
			t.Errorf("%s: %+v, want path-form", c.ev.Path, res.NewlyDropped[0])
		}
	}
}

// FuzzPlainPathNormalForm: the glob matches policy.NormalPath of a path,
// so every path policy.PlainPath lets a host/path rule decide has no
// dot segment and no backslash in that form either: "%2e", "%2E.",
// ".%2e", "%252e", "%u002e" and overlong dots are refused before a glob
// sees "/public/../private".
func FuzzPlainPathNormalForm(f *testing.F) {
	for _, s := range []string{"/public/%2e%2e/private/x", "/public/%2E./x", "/public/.%2e/x", "/public/%252e%252e/x", "/public/%u002e%u002e/x",
		"/public/%c0%ae%c0%ae/x", "/public/%e0%80%ae/x", "/public/%2e/x", "/public/%2e;/x", "/%2e%2e", "/public/%5c../x", "/%70ublic/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if !policy.PlainPath(p) {
			return
		}
		n := policy.NormalPath(p)
		if strings.Contains(n, "\\") {
			t.Fatalf("PlainPath(%q), but its normal form %q has a backslash", p, n)
		}
		for _, seg := range strings.Split(n, "/") {
			if seg, _, _ = strings.Cut(seg, ";"); seg == "." || seg == ".." {
				t.Fatalf("PlainPath(%q), but its normal form %q has a dot segment", p, n)
			}
		}
	})
}
