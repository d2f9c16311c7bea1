package httpwire

import "strings"

// PlainPath reports whether an origin-form path means what it spells: no
// "." or ".." segment (also as "..;" for servlet containers), no
// backslash, no '#' (a target has no fragment; an origin may read past
// it), no percent-encoded dot, slash, backslash, percent or
// overlong UTF-8 lead byte. A path that is not plain may be read by an
// origin as another one ("/allowed/../other"): the proxy refuses it where
// only a host/path rule would allow the request (path-form), and capture
// judges it so.
func PlainPath(path string) bool {
	if strings.ContainsAny(path, "\\#") {
		return false
	}
	for i := 0; i+2 < len(path); i++ {
		if path[i] != '%' {
			continue
		}
		switch strings.ToLower(path[i+1 : i+3]) {
		case "2e", "2f", "5c", "25", "c0", "c1":
			return false
		}
	}
	for _, seg := range strings.Split(path, "/") {
		seg, _, _ = strings.Cut(seg, ";")
		if seg == "." || seg == ".." {
			return false
		}
	}
	return true
}
