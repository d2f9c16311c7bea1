package policy

import (
	"strings"
	"testing"
)

// TestCheckTarget: CheckTarget takes what a rule's "to" takes.
func TestCheckTarget(t *testing.T) {
	for s, ok := range map[string]bool{
		"example.com": true, "*.example.com": true, "198.51.100.7": true, "2001:db8::/32": true,
		"0": false, "1.2.3": false, "*.nip.io": false, "fe80::1%eth0": false, "a..b": false, "": false,
	} {
		if err := CheckTarget(s); (err == nil) != ok {
			t.Errorf("CheckTarget(%q) = %v, want ok %v", s, err, ok)
		}
	}
}

// TestUnquotedStarHint: the seed page writes its names as [*.nirovision.com],
// and an operator who copies that into "to:" unquoted gets YAML's alias
// error. The error says to quote the pattern (before: only "did not find
// expected alphabetic or numeric character").
func TestUnquotedStarHint(t *testing.T) {
	for _, src := range []string{
		"version: 1\nrules:\n  - name: a\n    to: [*.nirovision.com]\n    ports: [443/tcp]\n",
		"version: 1\nrules:\n  - name: a\n    to: [api.x.com, *.x.com]\n    ports: [443/tcp]\n",
		"version: 1\nrules:\n  - name: a\n    to:\n      - *.x.com\n    ports: [443/tcp]\n",
		"version: 1\nrules:\n  - name: a\n    to: [*]\n    ports: [443/tcp]\n",
	} {
		_, err := Parse("p.yaml", []byte(src))
		if err == nil {
			t.Fatalf("%q parsed", src)
		}
		if msg := err.Error(); !strings.Contains(msg, `quote`) || !strings.Contains(msg, "p.yaml:") {
			t.Errorf("%q: error gives no hint to quote the pattern:\n%s", src, msg)
		}
	}
	// Other syntax errors get no such hint.
	_, err := Parse("p.yaml", []byte("version: 1\nrules:\n  - name: a\n\tto: [x.com]\n"))
	if err == nil || strings.Contains(err.Error(), "quote") {
		t.Errorf("tab error: %v", err)
	}
}

// TestYAMLSyntaxErrorLine: the line a YAML syntax error names is the
// file's (from 1). The YAML library gives its parser's errors (a flow
// list or mapping not closed, a key missing) at a line counted from 0,
// its scanner's from 1: an unclosed list on line 5 was reported at line
// 4, an unclosed quote on line 4 at line 3.
func TestYAMLSyntaxErrorLine(t *testing.T) {
	for _, tc := range []struct {
		src  string
		line string
	}{
		{"version: 1\nmode: audit\nrules:\n  - name: a\n    to: [\"*.x.com\"\n    ports: [443/tcp]\n", "p.yaml:5:"},
		{"version: 1\nmode: audit\nrules:\n  - name: \"a\n    to: [\"a.com\"]\n", "p.yaml:4:"},
		{"version: 1\nmode: audit\nrules: {a: 1\n", "p.yaml:3:"},
		{"[version, 1\n", "p.yaml:2:"}, // the end of the file, where "]" was due
		// The scanner's lines were right already.
		{"version: 1\nmode: audit\nrules:\n  - name: a\n     to: [\"a.com\"]\n", "p.yaml:5:"},
		{"version: 1\nrules:\n  - name: a\n    to: [*.x.com]\n", "p.yaml:4:"},
	} {
		_, err := Parse("p.yaml", []byte(tc.src))
		if err == nil {
			t.Fatalf("%q parsed", tc.src)
		}
		if !strings.Contains(err.Error(), tc.line) {
			t.Errorf("%q: want the error at %s, got:\n%v", tc.src, tc.line, err)
		}
	}
}
