package policy

import (
	"net/url"
	"strings"
	"testing"
)

// TestDecidePathForms: a request path is matched against a host/path glob
// after both are normalised as RFC 3986 §6.2.2 says (NormalPath):
// percent-encoded unreserved characters decoded once, the hex digits of
// the other escapes upper-cased. So a path an origin decodes to the one a
// rule names is allowed however its unreserved characters are spelled,
// and one it decodes to another path is not: no reserved escape (%2F,
// %3F, %25) is decoded, nor anything twice, and case is kept (nginx on
// Linux serves /Public and /public from two directories). Dot segments
// and encoded dots are the callers' path-form check (PlainPath),
// not the match's.
func TestDecidePathForms(t *testing.T) {
	e := mustCompile(t, `version: 1
mode: enforce
rules:
  - name: files
    to: ["paths.test/public/*", "paths.test/caf%c3%a9/*", "paths.test/%7Euser/*", "paths.test/My%20Page", "paths.test/a%2Fb"]
    ports: [80/tcp]
`)
	for path, want := range map[string]bool{
		"/public/x": true,
		// Unreserved characters escaped, in either hex case.
		"/%70ublic/x": true, "/publi%63/%78": true, "/%70%75%62%6C%69%63/x": true, "/%70%75%62%6c%69%63/x": true,
		"/public/%7e%2D%5F%2e": true,
		// Decoded, another path: case is kept.
		"/%70UBLIC/x": false, "/%50ublic/x": false, "/Public/x": false, "/PUBLIC/x": false,
		// Reserved escapes are not decoded, nor anything twice.
		"/public%2Fx": false, "/public%2fx": false, "/%2570ublic/x": false, "/public%3F/x": false,
		// Slashes, parameters and dots as spelled.
		"/public//x": true, "//public/x": false, "/public;/x": false, "/public/x;v=1": true, "/public/./x": true,
		// The rule's own escapes are normalised as well.
		"/caf%C3%A9/x": true, "/caf%c3%a9/x": true, "/caf%c3%A9/x": true, "/caf%C3%A9": false,
		// Raw UTF-8 is matched as its escapes, as origins serve it.
		"/caf\xc3\xa9/x": true, "/caf\xc3\xa9": false, "/caf\xc3\xa8/x": false,
		"/~user/x": true, "/%7euser/x": true, "/%7Euser/x": true,
		"/My%20Page": true, "/%4Dy%20Page": true, "/My%20page": false, "/My Page": false,
		"/a%2fb": true, "/a%2Fb": true, "/a/b": false,
		// Not escapes: kept as they are.
		"/public/%zz": true, "/public/%": true, "/%7": false, "/%": false,
		"/private/x": false,
	} {
		d := e.Decide(Input{Name: "paths.test", Port: 80, Proto: TCP, Path: path})
		if d.Allowed() != want || !want && d.Reason != ReasonPath {
			t.Errorf("%q: %+v, want allowed %v", path, d, want)
		}
	}
}

// TestNormalPath: unreserved escapes decoded once, the others' hex upper
// case, anything else as it is.
func TestNormalPath(t *testing.T) {
	for in, want := range map[string]string{
		"": "", "/": "/", "/a/b": "/a/b", "/%41%61%30%2d%2E%5f%7E": "/Aa0-._~", "/%2f%2F%3f%25%c3%a9": "/%2F%2F%3F%25%C3%A9",
		"/%2541": "/%2541", "/%zz%4": "/%zz%4", "/caf\xc3\xa9": "/caf%C3%A9", "/%\xff": "/%%FF", "/%": "/%", "/x%": "/x%", "/%%41": "/%A",
	} {
		if got := NormalPath(in); got != want {
			t.Errorf("NormalPath(%q) = %q, want %q", in, got, want)
		}
	}
}

// FuzzNormalPath: a path and its normal form are one path to an origin
// that decodes escapes (nginx, Go's net/http): decoded once, they are the
// same bytes; the normal form is a fixed point where it has no '%' but
// its escapes'; and no reserved escape is decoded.
func FuzzNormalPath(f *testing.F) {
	for _, s := range []string{"/a/b", "/%70ublic/x", "/%2f%2F", "/%2541", "/%zz%4", "/%%41", "/caf%c3%a9"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		n := NormalPath(p)
		if raw := rawHigh(p); strings.Count(n, "%") > strings.Count(p, "%")+raw || len(n) > len(p)+2*raw || rawHigh(n) > 0 {
			t.Fatalf("NormalPath(%q) = %q", p, n)
		}
		d, err := url.PathUnescape(p)
		if err != nil {
			return
		}
		if dn, err := url.PathUnescape(n); err != nil || dn != d {
			t.Fatalf("NormalPath(%q) = %q: decodes to %q, not %q (%v)", p, n, dn, d, err)
		}
		if NormalPath(n) != n {
			t.Fatalf("NormalPath(%q) = %q, not a fixed point", p, n)
		}
		for _, r := range []string{"/", "?", "#", "\\", "%25"} {
			if strings.Count(strings.ToUpper(n), r) != strings.Count(strings.ToUpper(p), r) {
				t.Fatalf("NormalPath(%q) = %q: %q decoded", p, n, r)
			}
		}
	})
}

// TestGlobEscapesInClass: a rule's glob is normalised as a request path
// is, but an escaped '-' inside a character class stays a character, not
// a range: "[a%2Dz]" names 'a', '-' or 'z' (as "[a\-z]"), never 'm'.
// Before, NormalPath made it "[a-z]", a range the rule did not write.
// Escapes elsewhere in the glob, and a class's escaped letters, decode.
func TestGlobEscapesInClass(t *testing.T) {
	e := mustCompile(t, `version: 1
mode: enforce
rules:
  - name: files
    to: ["paths.test/v[1%2D3]/*", "paths.test/[%30-%39]x", "paths.test/a%2Db", "paths.test/c\\%2Dd", "paths.test/e[\\]%2D]f", "paths.test/g[!%2D]h", "paths.test/i[!a%2Dc]j", "paths.test/k[%2Dm]l"]
    ports: [80/tcp]
`)
	for path, want := range map[string]bool{
		"/v1/x": true, "/v3/x": true, "/v-/x": true, "/v%2D/x": true, "/v%2d/x": true, "/v2/x": false,
		"/5x": true, "/%35x": true, "/ax": false,
		"/a-b": true, "/a%2db": true, "/c-d": true, "/c%2Dd": true,
		"/e]f": true, "/e-f": true, "/e^f": false,
		"/gxh": true, "/g-h": false, "/idj": true, "/ibj": true, "/i-j": false, "/iaj": false,
		"/k-l": true, "/kml": true, "/kal": false,
	} {
		d := e.Decide(Input{Name: "paths.test", Port: 80, Proto: TCP, Path: path})
		if d.Allowed() != want {
			t.Errorf("%q: %+v, want allowed %v", path, d, want)
		}
	}
}

// TestDecidePathNoAlloc: deciding a path without an escape under
// host/path rules (the seed's notion.so/nirovision/*, a glob with a
// class) allocates nothing, cut or whole; BenchmarkDecide has no paths.
func TestDecidePathNoAlloc(t *testing.T) {
	e := mustCompile(t, `version: 1
mode: enforce
rules:
  - name: notion
    to: ["notion.so/nirovision/*", "paths.test/v[1%2D3]/*", "paths.test/caf%c3%a9/*"]
    ports: [443/tcp, 80/tcp]
`)
	for _, in := range []Input{
		{Name: "notion.so", Port: 443, Proto: TCP, Path: "/nirovision/page-123"},
		{Name: "notion.so", Port: 443, Proto: TCP, Path: "/other"},
		{Name: "paths.test", Port: 80, Proto: TCP, Path: "/v2/x"},
		{Name: "paths.test", Port: 80, Proto: TCP, Path: "/nirovision/page", PathCut: true},
	} {
		if n := testing.AllocsPerRun(200, func() { e.Decide(in) }); n != 0 {
			t.Errorf("%+v: %v allocations", in, n)
		}
	}
}
