package audit

import (
	"net/netip"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"egressd/policy"
)

// TestReplayPathNotUTF8: a path with bytes that are not UTF-8 (raw bytes
// 0x80 and above: a raw overlong dot "\xc0\xae") is changed by Bound,
// each such byte written as U+FFFD, as the event log's JSON writes it:
// the event says so (path_len, the length of the path as sent), and a
// replay decides the path as one cut where the first byte was replaced,
// on the start kept (TestReplayClippedPath), and where only a host/path
// rule would allow it, not known: the bytes replaced may be what made
// the path one an origin reads as another (path-form). Before, path_len stayed 0
// and the replay decided the U+FFFD spelling as the path sent: a plain
// path, so a request the recording policy refused (path-form) was newly
// allowed by that very policy.
func TestReplayPathNotUTF8(t *testing.T) {
	t0 := time.Date(2026, 12, 6, 9, 0, 0, 0, time.UTC)
	public, host := rule80("public", "docs.paths.test/public/*"), rule80("host", "docs.paths.test")
	cases := []struct {
		what, old, cand, path string
		// want: "unchanged", "cut" (unchanged, not known), or the change
		// list and the candidate's rule or reason.
		want, wantRule string
	}{
		{"raw overlong dots, same policy", public, public, "/public/\xc0\xae\xc0\xae/private/x", "unchanged", ""},
		{"raw overlong dots, candidate adds nothing", public, public + rule80("other", "other.test"), "/public/\xc0\xae\xc0\xae/private/x", "unchanged", ""},
		{"raw byte, a host rule allows every path", host, rule80("host2", "docs.paths.test"), "/public/\xc0\xae\xc0\xae/private/x", "rule", "host2"},
		{"raw byte, a prefix glob the start decides", public, rule80("public2", "docs.paths.test/public/*"), "/public/\xe9/x", "cut", ""},
		{"raw overlong dots, a prefix glob after no rule", rule80("other", "other.test"), public, "/public/\xc0\xae\xc0\xae/private/x", "cut", ""},
		{"raw byte, a glob the start decides", host, public, "/other/\xff/x", "dropped", policy.ReasonPath},
		{"raw byte, a glob past the start", host, rule80("x", "docs.paths.test/public/*/x"), "/public/\xff/x", "cut", ""},
	}
	for i, c := range cases {
		old, cand := compileRules(t, c.old), compileRules(t, c.cand)
		whole := policy.Input{Client: netip.MustParseAddr("192.0.2.7"), Dest: netip.MustParseAddr("203.0.113.5"), Port: 80, Proto: policy.TCP, Name: "docs.paths.test", Path: c.path, Now: t0}
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(i) * time.Second), Client: whole.Client, ClientPort: uint16(42000 + i),
			Dest: whole.Dest, DestPort: 80, Proto: "tcp", Name: "docs.paths.test", NameSource: NameHost, Path: c.path}
		ev.Stamp(old.PathForm(whole, c.path, old.Decide(whole))) // as recorded before raw bytes were http-malformed
		ev.Bound()
		if !utf8.ValidString(ev.Path) || !strings.Contains(ev.Path, "\uFFFD") || ev.PathLen != len(c.path) {
			t.Fatalf("%s: bound to %q, path_len %d, want U+FFFD and path_len %d", c.what, ev.Path, ev.PathLen, len(c.path))
		}
		for _, against := range []struct {
			eng  *policy.Engine
			same bool
		}{{old, true}, {cand, false}} {
			got, gotRule, res := replayOne(against.eng, t0, ev)
			if against.same {
				if got != "unchanged" && got != "cut" {
					t.Errorf("%s: replayed against the policy that recorded it: %q %q (%+v), want unchanged", c.what, got, gotRule, res)
				}
				continue
			}
			if got != c.want || gotRule != c.wantRule {
				t.Errorf("%s: replay %q %q, want %q %q (%+v)", c.what, got, gotRule, c.want, c.wantRule, res)
			}
		}
	}
}

// FuzzBoundPath: Bound leaves a path valid UTF-8 within MaxPathBytes,
// sets path_len exactly where it changed the path (cut it, or wrote a
// byte that is not UTF-8 as U+FFFD) to the length as sent, keeps the
// start before the first change, and changes nothing when run again.
func FuzzBoundPath(f *testing.F) {
	f.Add("/public/\xc0\xae\xc0\xae/private/x", 0)
	f.Add("/caf\xc3\xa9/x", 0)
	f.Add("/"+strings.Repeat("\xff", MaxPathBytes), 0)
	f.Add("/x\uFFFD", 7)
	f.Fuzz(func(t *testing.T, path string, n int) {
		n = max(0, min(n, 1<<20))
		ev := Event{Path: path, PathLen: n}
		ev.Bound()
		if !utf8.ValidString(ev.Path) || len(ev.Path) > MaxPathBytes {
			t.Fatalf("bound %q to %q: not UTF-8 or over %d bytes", path, ev.Path, MaxPathBytes)
		}
		changed := ev.Path != path
		if changed && ev.PathLen < len(path) || !changed && ev.PathLen != n {
			t.Fatalf("bound %q (path_len %d) to %q, path_len %d", path, n, ev.Path, ev.PathLen)
		}
		start := strings.TrimSuffix(ev.Path, TruncMark)
		if i := strings.IndexRune(start, utf8.RuneError); i >= 0 {
			start = start[:i]
		}
		if changed && !strings.HasPrefix(path, start) {
			t.Fatalf("bound %q to %q: the start %q is not the path's", path, ev.Path, start)
		}
		again := ev
		again.Bound()
		if again.Path != ev.Path || again.PathLen != ev.PathLen {
			t.Fatalf("bounding %q again changed it: %+v", path, again)
		}
	})
}
