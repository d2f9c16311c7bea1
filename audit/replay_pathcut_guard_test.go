package audit

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayClippedPathKnownDeny: where the start of a cut path cannot
// decide a host/path rule of the candidate (policy.ReasonPathCut), the
// replay still knows the verdict when nothing past the cut can change
// it, and says it rather than "not known" (path_cut):
//   - the destination is a guarded range (169.254.169.254) that only a
//     CIDR rule of the recording policy named: the candidate refuses any
//     allow there (special-range) whatever the path, so a recorded allow
//     is newly dropped, and a recorded special-range deny stays, known;
//   - a recorded deny the component gave besides the rules (path-form: a
//     path an origin may read as another) stays whatever the candidate's
//     rules say, known.
//
// Before, each was counted unchanged and in path_cut: the allow to the
// metadata address the candidate refuses was not shown as newly dropped.
func TestReplayClippedPathKnownDeny(t *testing.T) {
	compile, rule := func(rules string) *policy.Engine { return compileRules(t, rules) }, rule80
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	path := "/m/" + strings.Repeat("a", MaxPathBytes) + ".js"
	meta := netip.MustParseAddr("169.254.169.254")
	web := netip.MustParseAddr("203.0.113.5")
	cand := compile(rule("js", "meta.test/m/*.js") + rule("webjs", "web.test/m/*.js"))
	for i, c := range []struct {
		what               string
		dest               netip.Addr
		host               string
		verdict, rule, why string
		want               string // "dropped", "unchanged" (known) or "cut"
		wantReason         string
	}{
		{"allowed to metadata by a CIDR rule the candidate drops", meta, "meta.test", "allow", "js", "allowed", "dropped", reasonSpecialRange},
		{"special-range deny to metadata", meta, "meta.test", "deny", "", reasonSpecialRange, "unchanged", ""},
		{"path-form deny", web, "web.test", "deny", "", "path-form", "unchanged", ""},
		// Not known: the whole path decides (a path-not-allowed deny
		// the candidate's *.js may lift, an allow it may drop).
		{"path-not-allowed deny", web, "web.test", "deny", "", policy.ReasonPath, "cut", ""},
		{"allowed elsewhere", web, "web.test", "allow", "old", "allowed", "cut", ""},
	} {
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(i) * time.Second), Client: netip.MustParseAddr("192.0.2.7"),
			ClientPort: uint16(44000 + i), Dest: c.dest, DestPort: 80, Proto: "tcp", Name: c.host, NameSource: NameHost, Path: path,
			Verdict: policy.Verdict(c.verdict), Rule: c.rule, Reason: c.why, Mode: policy.ModeEnforce}
		ev.Bound()
		if ev.PathLen == 0 {
			t.Fatal("path not cut")
		}
		r := NewReplayer(cand, t0)
		r.Emit(ev)
		res := r.Result()
		var got, reason string
		switch {
		case len(res.NewlyDropped) == 1:
			got, reason = "dropped", res.NewlyDropped[0].NewReason
		case len(res.NewlyAllowed)+len(res.RuleChanged) > 0:
			got = "allowed"
		case res.Unchanged == 1 && res.PathCut == 1:
			got = "cut"
		case res.Unchanged == 1:
			got = "unchanged"
		}
		if got != c.want || reason != c.wantReason {
			t.Errorf("%s: replay %q %q, want %q %q (%+v)", c.what, got, reason, c.want, c.wantReason, res)
		}
	}
}
