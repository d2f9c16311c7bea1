package policy

import "strings"

// ReasonPathForm: a request path an origin may read as another one (not
// PlainPath: dot segments, encoded dots, slashes or backslashes, double
// encoding) where only a host/path rule would allow the request
// (Engine.PathForm).
const ReasonPathForm = "path-form"

// PathForm is d, or a path-form denial (ReasonPathForm) where d allows a
// request whose path, as sent without its query, is not PlainPath and only
// a host/path rule allows it: in without its path (in.Name the name the
// request was decided under) is not allowed at host level. A glob must
// not be passed by "/allowed/../other"; a rule that allows the host
// allows every path. The proxy (transparent, explicit, inspected), the
// capture, the audit replay and `egressd policy explain` decide so.
func (e *Engine) PathForm(in Input, path string, d Decision) Decision {
	if !d.Allowed() || path == "" || PlainPath(path) {
		return d
	}
	in.Path, in.PathCut = "", false
	if e.HostLevel().Decide(in).Allowed() {
		return d
	}
	return Decision{Verdict: Deny, RuleIndex: -1, Reason: ReasonPathForm, Mode: e.Mode()}
}

// PlainPath reports whether an origin-form path means what it spells: no
// "." or ".." segment (also as "..;" for servlet containers), no
// backslash, no '#' (a target has no fragment; an origin may read past
// it), no percent-encoded dot, slash, backslash or percent, no overlong
// UTF-8 (a two-byte lead byte C0 or C1, E0 80–9F, F0 80–8F, and the
// bytes F5–FF, which begin RFC 2279's five- and six-byte forms), escaped
// or raw (a raw byte 0x80 or above is read as its escape, as NormalPath
// writes it), and no IIS %uXXXX escape (IIS reads %u002e as a dot). A
// path that is not plain may be read by an origin as another one
// ("/allowed/../other"): PathForm refuses it where only a host/path rule
// would allow it. nginx and Go's http.FileServer answer the overlong and
// %u forms with 404 or 400; they are refused for origins that decode them.
func PlainPath(path string) bool {
	if strings.ContainsAny(path, "\\#") {
		return false
	}
	if rawHigh(path) > 0 {
		path = escapeHigh(path)
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

// escapeHigh is path with each byte 0x80 or above written as its escape,
// "%XX", and nothing else changed.
func escapeHigh(path string) string {
	var b strings.Builder
	b.Grow(len(path) + 2*rawHigh(path))
	for i := 0; i < len(path); i++ {
		if c := path[i]; c >= 0x80 {
			b.WriteByte('%')
			b.WriteByte(hexDigits[c>>4])
			b.WriteByte(hexDigits[c&0xf])
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// pctByte returns the byte a "%XX" at the start of s encodes.
func pctByte(s string) (byte, bool) {
	if len(s) < 3 || s[0] != '%' {
		return 0, false
	}
	hi, ok1 := unhex(s[1])
	lo, ok2 := unhex(s[2])
	return hi<<4 | lo, ok1 && ok2
}

// isHex reports whether s is one or more hex digits.
func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if _, ok := unhex(s[i]); !ok {
			return false
		}
	}
	return s != ""
}
