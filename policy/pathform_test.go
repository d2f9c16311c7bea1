package policy

import (
	"net/url"
	"strings"
	"testing"
)

// TestPlainPath: a path with dot segments, encoded dots, slashes,
// backslashes or percents, an IIS %u escape, an overlong UTF-8 sequence,
// or a '#' is not plain.
func TestPlainPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/": true, "/a/b.c/d": true, "/a/..b/c": true, "/a/My%20Page": true, "/a/b;v=1": true,
		"/a/../b": false, "/a/./b": false, "/a/..": false, "/..;/b": false, "/a/%2e%2E/b": false,
		"/a%2fb": false, "/a%5Cb": false, "/a\\b": false, "/a/%252e": false, "/a/%c0%ae": false,
		"/a/#/../b": false, "/a#frag": false,
		// Raw bytes are read as their escapes.
		"/a/\xc0\xae/b": false, "/a/\xe0\x80\xae": false, "/a/\xff": false, "/caf\xc3\xa9/x": true,
		// IIS reads %uXXXX as the character U+XXXX: %u002e is a dot.
		"/a/%u002e%u002e/b": false, "/a/%U002E/b": false, "/a/%u2215b": false,
		// Overlong three- and four-byte forms of '.' and '/'.
		"/a/%e0%80%ae/b": false, "/a/%E0%80%AF": false, "/a/%f0%80%80%ae": false,
		// RFC 2279's five- and six-byte forms (old decoders read them):
		// bytes F5–FF begin no UTF-8 of RFC 3629.
		"/a/%f8%80%80%80%ae": false, "/a/%FC%80%80%80%80%AF": false, "/a/%f5%80%80%80": false, "/a/%ff": false,
		// Not IIS escapes, and longer UTF-8 that is not overlong.
		"/a/%f4%8f%bf%bf": true, "/a/%use": true, "/a/%u00": true, "/a/%e0%a4%85": true, "/a/%f0%9f%98%80": true, "/a/%e2%80%a6": true,
	} {
		if got := PlainPath(p); got != want {
			t.Errorf("PlainPath(%q) = %v", p, got)
		}
	}
}

// FuzzPlainPath: a path PlainPath calls plain has, decoded once (as nginx
// and Go's net/http decode it), no "." or ".." segment and no backslash,
// so that an origin cannot read it as another path. (A '#' decoded from
// %23 is a character of a name there, not a fragment.)
func FuzzPlainPath(f *testing.F) {
	for _, s := range []string{"/a/b", "/a/%2e%2e/b", "/a/%u002e", "/a/%e0%80%ae", "/a/..;/b", "/a/%252e", "/a/%c0%ae"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if !PlainPath(p) {
			return
		}
		d, err := url.PathUnescape(p)
		if err != nil {
			return
		}
		if strings.Contains(d, "\\") {
			t.Fatalf("PlainPath(%q): decoded %q", p, d)
		}
		for _, seg := range strings.Split(d, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("PlainPath(%q): decoded %q", p, d)
			}
		}
	})
}
