package policy

import "strings"

// NormalPath is a request path (or a host/path rule's glob) normalised as
// RFC 3986 §6.2.2 says, the form a host/path rule is matched in: a
// percent-encoded unreserved character (ALPHA, DIGIT, '-', '.', '_', '~')
// is decoded, once ("/%70ublic" is "/public"; "%2570" stays), and the hex
// digits of every other escape are upper-cased ("%c3%a9" is "%C3%A9"),
// and a raw byte 0x80 or above, which RFC 3986 has no place for, is
// written as its escape ("/caf\xc3\xa9" is "/caf%C3%A9": Go's net/http
// re-encodes it so, and nginx and http.FileServer serve it as the file the
// escapes name). nginx and Go's net/http serve the same file for every
// spelling of one normal path, so a path an origin reads as the one a
// rule names is allowed however its unreserved characters are spelled,
// the same in every mode; a reserved escape ("%2F", "%3F", "%25") is not
// decoded, and nothing else changes (case, "//", ";", dot segments: those
// are the callers' path-form check, PathForm, on the path as sent). A '%'
// without two hex digits after it stays as it is. It allocates only when
// path has an escape or a byte 0x80 or above.
func NormalPath(path string) string {
	return normalPath(path, false)
}

// normalGlob is NormalPath of a host/path rule's glob, but an escaped
// '-' that the glob would read as a range's is written "\\-": a character
// as the rule wrote it ("[a%2Dz]" names 'a', '-' or 'z', as "[a\\-z]", not
// the range "[a-z]"). gobwas/glob reads a class "[x-y]" (or "[!x-y]") as a
// range, any other as characters; no other unreserved character means
// anything to it. A raw byte 0x80 or above inside a class stays as it is
// (a class of "%C3%A9" would name '%', 'C', '3', 'A' and '9'): the class
// then matches no path, whose such bytes are escaped.
func normalGlob(glob string) string {
	return normalPath(glob, true)
}

func normalPath(path string, glob bool) string {
	i := escapeStart(path)
	if i < 0 {
		return path
	}
	var b strings.Builder
	b.Grow(len(path) + strings.Count(path, "%") + 2*rawHigh(path)) // "\\-" for "%2D", "%XX" for a raw byte
	b.WriteString(path[:i])
	// In a glob, where path[:i] leaves the class syntax (in a path it
	// stays the zero globState).
	var g globState
	if glob {
		for j := 0; j < i; j++ {
			g.step(path[j])
		}
	}
	for ; i < len(path); i++ {
		c := path[i]
		if c >= 0x80 && !(glob && g.inClass) {
			b.WriteByte('%')
			b.WriteByte(hexDigits[c>>4])
			b.WriteByte(hexDigits[c&0xf])
			if glob {
				g.step('%')
				g.step(hexDigits[c>>4])
				g.step(hexDigits[c&0xf])
			}
			continue
		}
		hi, ok1 := byte(0), false
		lo, ok2 := byte(0), false
		if c == '%' && i+2 < len(path) {
			hi, ok1 = unhex(path[i+1])
			lo, ok2 = unhex(path[i+2])
		}
		if !ok1 || !ok2 {
			b.WriteByte(c)
			if glob {
				g.step(c)
			}
			continue
		}
		if v := hi<<4 | lo; unreserved(v) {
			if glob && v == '-' && g.inClass && g.n > 0 && !g.escaped {
				b.WriteByte('\\')
				g.escaped = true
			}
			b.WriteByte(v)
			if glob {
				g.step(v)
			}
		} else {
			b.WriteByte('%')
			b.WriteByte(hexDigits[hi])
			b.WriteByte(hexDigits[lo])
			if glob {
				g.step('%')
				g.step(hexDigits[hi])
				g.step(hexDigits[lo])
			}
		}
		i += 2
	}
	return b.String()
}

const hexDigits = "0123456789ABCDEF"

// escapeStart is the index of path's first '%' or byte 0x80 or above, or
// -1: where NormalPath may change it.
func escapeStart(path string) int {
	for i := 0; i < len(path); i++ {
		if path[i] == '%' || path[i] >= 0x80 {
			return i
		}
	}
	return -1
}

// rawHigh is how many bytes 0x80 or above path has.
func rawHigh(path string) int {
	n := 0
	for i := 0; i < len(path); i++ {
		if path[i] >= 0x80 {
			n++
		}
	}
	return n
}

// globState is where a glob's text is in its class syntax: inside a
// character class (from '[' to ']'), with n characters of it read (not
// counting a leading '!'), after an escaping '\\'.
type globState struct {
	inClass, not, escaped bool
	n                     int
}

// step reads the glob's next byte c.
func (g *globState) step(c byte) {
	switch {
	case g.escaped:
		g.escaped = false
		if g.inClass {
			g.n++
		}
	case c == '\\':
		g.escaped = true
	case !g.inClass:
		if c == '[' {
			g.inClass, g.not, g.n = true, false, 0
		}
	case c == ']':
		g.inClass = false
	case c == '!' && g.n == 0 && !g.not:
		g.not = true
	default:
		g.n++
	}
}

// cutPathStart is the start of a path cut at a size cap (Input.PathCut)
// without a trailing '%' or '%' and one hex digit: the escape it began
// is not known, and NormalPath of the rest is a prefix of the whole
// path's only from an escape's boundary.
func cutPathStart(start string) string {
	switch n := len(start); {
	case n >= 1 && start[n-1] == '%':
		return start[:n-1]
	case n >= 2 && start[n-2] == '%':
		if _, ok := unhex(start[n-1]); ok {
			return start[:n-2]
		}
	}
	return start
}

// unreserved reports whether c is an unreserved character of RFC 3986.
func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}

// unhex is the value of the hex digit c.
func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
