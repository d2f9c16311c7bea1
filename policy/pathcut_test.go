package policy

import (
	"strings"
	"testing"

	"github.com/gobwas/glob"
)

// TestDecidePathCut: a request path cut at a size cap (Input.PathCut) is
// decided as the whole path would be where its start tells every host/path
// rule ranked before the credited one (a literal lead it does or does not
// start with, a literal path it is longer than), and otherwise denied
// ReasonPathCut: not allowed by a later rule, nor denied by one, that the
// whole path's match of an earlier rule might have changed.
func TestDecidePathCut(t *testing.T) {
	e := mustCompile(t, `version: 1
mode: audit
rules:
  - name: api
    to: ["cut.test/api/*"]
    ports: [80/tcp]
  - name: exact
    to: ["cut.test/login"]
    ports: [80/tcp]
  - name: mid
    to: ["cut.test/m/*/x"]
    ports: [80/tcp]
  - name: host
    to: [cut.test]
    ports: [80/tcp]
  - name: other
    to: ["other.test/v1/*"]
    ports: [80/tcp]
`)
	long := strings.Repeat("a", 64)
	for _, tc := range []struct {
		name, host, start string
		rule, reason      string
	}{
		{"lead and star", "cut.test", "/api/" + long, "api", ""},
		{"lead of the glob not taken in", "cut.test", "/ap", "", ReasonPathCut},
		{"other lead", "cut.test", "/zzz/" + long, "host", ""},
		{"literal path, longer", "cut.test", "/login", "host", ""},
		{"glob past its lead", "cut.test", "/m/" + long, "", ReasonPathCut},
		{"glob past its lead, other start", "cut.test", "/n/" + long, "host", ""},
		{"only host/path rules, matched", "other.test", "/v1/" + long, "other", ""},
		{"only host/path rules, missed", "other.test", "/v2/" + long, "", ReasonPath},
	} {
		in := Input{Name: tc.host, Port: 80, Proto: TCP, Path: tc.start, PathCut: true}
		d := e.Decide(in)
		if d.Rule != tc.rule || tc.reason != "" && d.Reason != tc.reason || (tc.rule != "") != d.Allowed() {
			t.Errorf("%s: %s%s (cut): %+v, want rule %q reason %q", tc.name, tc.host, tc.start, d, tc.rule, tc.reason)
		}
	}
	// Not cut: the start is the whole path.
	if d := e.Decide(Input{Name: "cut.test", Port: 80, Proto: TCP, Path: "/login"}); d.Rule != "exact" {
		t.Errorf("cut.test/login (whole): %+v, want rule exact", d)
	}
}

// FuzzPathStartMatch: where pathStartMatch is sure of a glob's match on
// every longer path beginning with start, the glob's match on start and
// some rest agrees, both in normal form as Decide matches them (the start
// without a trailing escape it cut, cutPathStart).
func FuzzPathStartMatch(f *testing.F) {
	for _, s := range [][3]string{
		{"/api/*", "/api/aa", "b"}, {"/login", "/log", "in"}, {"/m/*/x", "/m/a", "/x"},
		{"/a?c", "/a", "bc"}, {"/[ab]*", "/a", "x"}, {"/{x,y}z", "/", "xz"}, {`/a\*`, "/a", "*"},
		{"/aA*", "/a%4", "1b"}, {"/a%C3*", "/a%", "c3"}, {"/%4*", "/%4%", "41"}, {"/a*", "/%%", "41"}, {"/[a%2Dz]*", "/", "m"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, g, start, rest string) {
		if rest == "" {
			return // the whole path is longer than its start
		}
		if !strings.HasPrefix(g, "/") || !strings.HasPrefix(start, "/") {
			// A rule's glob is compiled as "/" + its path (parseTarget) and
			// a cut path is an origin-form one: cutPathStart never empties
			// it ("%7" alone would be, and "%70" is "p").
			return
		}
		p, err := glob.Compile(normalGlob(g))
		if err != nil {
			return
		}
		cut := cutPathStart(start)
		if cut == "" {
			cut = start
		}
		match, sure := pathStartMatch(p.String(), NormalPath(cut))
		if whole := NormalPath(start + rest); sure && p.Match(whole) != match {
			t.Fatalf("glob %q, start %q: sure of %v, but %q (%q) matches %v", g, start, match, start+rest, whole, !match)
		}
	})
}
