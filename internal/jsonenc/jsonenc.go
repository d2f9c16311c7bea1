// Package jsonenc appends JSON strings and floats byte for byte as the
// standard library writes them, for egressd's hand-written encoders: the
// audit journal's events (as encoding/json writes them) and the log lines
// (as log/slog's JSON handler writes them, internal/logjson). It sits
// below both; each keeps a differential test and a fuzz target against the
// encoder it copies.
package jsonenc

import (
	"math"
	"strconv"
	"unicode/utf8"
)

// AppendString appends s quoted as log/slog's JSON handler quotes it: no
// HTML escaping, control bytes as \n, \r, \t or \u00XX, invalid UTF-8 as
// \ufffd, U+2028 and U+2029 escaped.
func AppendString(b []byte, s string) []byte { return appendString(b, s, &plain, false) }

// AppendStringHTML appends s quoted as encoding/json quotes strings with
// HTML escaping on (json.Marshal's default): as AppendString, and also
// <, > and & as \u00XX, backspace and form feed as \b and \f.
func AppendStringHTML(b []byte, s string) []byte { return appendString(b, s, &plainHTML, true) }

// AppendFloat appends a finite f as encoding/json writes a float64 (and
// so slog, which calls it): 'f' form, 'e' form outside [1e-6, 1e21) with a
// two-digit negative exponent shortened (e-09 as e-9). The caller keeps
// NaN and the infinities out; encoding/json refuses them.
func AppendFloat(b []byte, f float64) []byte {
	format := byte('f')
	if a := math.Abs(f); a != 0 && (a < 1e-6 || a >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

const hexDigits = "0123456789abcdef"

// plain and plainHTML hold the bytes each quoting copies as they are:
// ASCII from space on except the quote and the backslash, and for HTML
// also except <, > and &.
var plain, plainHTML = func() (t, h [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\'
		h[c] = t[c] && c != '<' && c != '>' && c != '&'
	}
	return t, h
}()

func appendString(b []byte, s string, keep *[256]bool, shortBF bool) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if keep[c] {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case shortBF && c == '\b':
				b = append(b, '\\', 'b')
			case shortBF && c == '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
