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

// TestCheckName: CheckName takes a host name that a rule's "to" reads as
// that one name, and refuses the keyword "private", which a LAN client
// can ask for as a name.
func TestCheckName(t *testing.T) {
	for s, ok := range map[string]bool{
		"example.com": true, "a_b.example": true, "localhost": true, "any": true,
		"private": false, "198.51.100.7": false, "*.example.com": false, "0": false, "*": false,
	} {
		if err := CheckName(s); (err == nil) != ok {
			t.Errorf("CheckName(%q) = %v, want ok %v", s, err, ok)
		}
	}
	if err := CheckName("private"); err == nil || !strings.Contains(err.Error(), "10.0.0.0/8") {
		t.Errorf("CheckName(\"private\") = %v, want it to name what the keyword stands for", err)
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

// TestYAMLSyntaxErrorColumn: a YAML syntax error names its column too, as
// the errors on a node do (file:line:col). The library gives a line only:
// the column is that of what its message is about on the line (the tab,
// the unquoted "*", the ':' not allowed, the quote or bracket left open,
// the list or mapping whose next item is missing).
func TestYAMLSyntaxErrorColumn(t *testing.T) {
	for _, tc := range []struct{ src, want string }{
		{"version: 1\nrules:\n\t- name: a\n", "p.yaml:3:1: YAML syntax: found character that cannot start any token"},
		{"version: 1\nrules:\n  - name: a\n    why: x\n  \t to: [x]\n", "p.yaml:5:3: YAML syntax: found a tab character"},
		{"version: 1\nrules:\n  - name: a\n    to: @x\n", "p.yaml:4:9: YAML syntax: found character that cannot start any token"},
		{"version: 1\nrules:\n  - name: a\n    to: [*.example.com]\n", "p.yaml:4:10: YAML syntax: did not find expected alphabetic"},
		{"version: 1\nrules:\n  - name: a\n    to: [\"x.com]\n    ports: [443/tcp]\n", "p.yaml:4:10: YAML syntax: found unexpected end of stream"},
		{"version: 1\nrules:\n  - name: a\n    to: x: y\n", "p.yaml:4:10: YAML syntax: mapping values are not allowed"},
		{"version: 1\nmode: audit\n  rules: []\n", "p.yaml:3:8: YAML syntax: mapping values are not allowed"},
		{"version: 1\nrules:\n  - name: a\n   to: [x.com]\n", "p.yaml:3:3: YAML syntax: did not find expected '-' indicator"},
		{"version: 1\nrules:\n  - name: a\n    to: [a, b\n    ports: [443/tcp]\n", "p.yaml:4:9: YAML syntax: did not find expected ',' or ']'"},
		{"version: 1\nrules:\n  - name: a\n    to: {a: b\n", "p.yaml:4:9: YAML syntax: did not find expected ',' or '}'"},
		{"version: 1\nrules:\n  - name: \"a\"b\n", "p.yaml:3:5: YAML syntax: did not find expected key"},
		{"version: 1\nrules: []\n---\nrules: [x]\n", "p.yaml:3:1: a second YAML document"},
	} {
		_, err := Parse("p.yaml", []byte(tc.src))
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("%q: want %q, got:\n%v", tc.src, tc.want, err)
		}
	}
}
