package httpwire

import "testing"

// TestPlainPath: a path with dot segments, encoded dots, slashes,
// backslashes or percents, an overlong UTF-8 lead byte, or a '#' is not
// plain.
func TestPlainPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/": true, "/a/b.c/d": true, "/a/..b/c": true, "/a/My%20Page": true, "/a/b;v=1": true,
		"/a/../b": false, "/a/./b": false, "/a/..": false, "/..;/b": false, "/a/%2e%2E/b": false,
		"/a%2fb": false, "/a%5Cb": false, "/a\\b": false, "/a/%252e": false, "/a/%c0%ae": false,
		"/a/#/../b": false, "/a#frag": false,
	} {
		if got := PlainPath(p); got != want {
			t.Errorf("PlainPath(%q) = %v", p, got)
		}
	}
}
