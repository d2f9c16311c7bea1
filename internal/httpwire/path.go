package httpwire

import "strings"

// PlainPath reports whether an origin-form path means what it spells: no
// "." or ".." segment (also as "..;" for servlet containers), no
// backslash, no '#' (a target has no fragment; an origin may read past
// it), no percent-encoded dot, slash, backslash or percent, no overlong
// UTF-8 (a two-byte lead byte C0 or C1, E0 80–9F, F0 80–8F, and the
// bytes F5–FF, which begin RFC 2279's five- and six-byte forms), and no IIS
// %uXXXX escape (IIS reads %u002e as a dot). A path that is not plain may
// be read by an origin as another one ("/allowed/../other"): the proxy
// refuses it where only a host/path rule would allow it (path-form), and
// capture judges it so. nginx and Go's http.FileServer answer the
// overlong and %u forms with 404 or 400; they are refused for origins that
// decode them.
func PlainPath(path string) bool {
	if strings.ContainsAny(path, "\\#") {
		return false
	}
	for i := 0; i+2 < len(path); i++ {
		if path[i] != '%' {
			continue
		}
		if (path[i+1] == 'u' || path[i+1] == 'U') && i+5 < len(path) && isHex(path[i+2:i+6]) {
			return false
		}
		switch strings.ToLower(path[i+1 : i+3]) {
		case "2e", "2f", "5c", "25", "c0", "c1":
			return false
		}
		// An overlong three- or four-byte sequence: its lead byte, then
		// a continuation byte below the least one a shortest form uses.
		lead, ok := pctByte(path[i:])
		if ok && lead >= 0xf5 {
			// No UTF-8 begins so (RFC 3629); RFC 2279's five- and
			// six-byte forms did, and old decoders read
			// %f8%80%80%80%ae as a dot.
			return false
		}
		if !ok || (lead != 0xe0 && lead != 0xf0) {
			continue
		}
		if next, ok := pctByte(path[i+3:]); ok && (lead == 0xe0 && next >= 0x80 && next <= 0x9f || lead == 0xf0 && next >= 0x80 && next <= 0x8f) {
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

// pctByte returns the byte a "%XX" at the start of s encodes.
func pctByte(s string) (byte, bool) {
	if len(s) < 3 || s[0] != '%' {
		return 0, false
	}
	hi, ok1 := hexVal(s[1])
	lo, ok2 := hexVal(s[2])
	return hi<<4 | lo, ok1 && ok2
}

// isHex reports whether s is one or more hex digits.
func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if _, ok := hexVal(s[i]); !ok {
			return false
		}
	}
	return s != ""
}

// hexVal is the value of the hex digit c.
func hexVal(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
