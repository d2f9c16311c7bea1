package policy

import "strings"

// NormalPath is a request path (or a host/path rule's glob) normalised as
// RFC 3986 §6.2.2 says, the form a host/path rule is matched in: a
// percent-encoded unreserved character (ALPHA, DIGIT, '-', '.', '_', '~')
// is decoded, once ("/%70ublic" is "/public"; "%2570" stays), and the hex
// digits of every other escape are upper-cased ("%c3%a9" is "%C3%A9").
// nginx and Go's net/http serve the same file for every spelling of one
// normal path, so a path an origin reads as the one a rule names is
// allowed however its unreserved characters are spelled; a reserved
// escape ("%2F", "%3F", "%25") is not decoded, and nothing else changes
// (case, "//", ";", dot segments: those are the callers' path-form check,
// httpwire.PlainPath, on the path as sent). A '%' without two hex digits
// after it stays as it is. It allocates only when path has an escape.
func NormalPath(path string) string {
	return normalPath(path, false)
}

// normalGlob is NormalPath of a host/path rule's glob, but an escaped
// '-' that the glob would read as a range's is written "\\-": a character
// as the rule wrote it ("[a%2Dz]" names 'a', '-' or 'z', as "[a\\-z]", not
// the range "[a-z]"). gobwas/glob reads a class "[x-y]" (or "[!x-y]") as a
// range, any other as characters; no other unreserved character means
// anything to it.
func normalGlob(glob string) string {
	return normalPath(glob, true)
}

func normalPath(path string, glob bool) string {
	i := strings.IndexByte(path, '%')
	if i < 0 {
		return path
	}
	var b strings.Builder
	b.Grow(len(path) + strings.Count(path, "%")) // "\\-" for "%2D"
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
			const hexDigits = "0123456789ABCDEF"
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
