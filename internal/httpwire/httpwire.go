// Package httpwire holds the HTTP/1.x request syntax that two components
// share: the transparent proxy (proxy/), which enforces it on the first
// bytes of a connection and on every request head it reads, and capture
// (capture/), which must judge a plain-HTTP flow exactly as the proxy
// would, since audit mode reports what enforce mode would deny. It sits at
// the start of both flows: it says whether a connection's first bytes are
// an HTTP request (of any method), parses the request head (ParseHead:
// the host and path it names, its body framing, and the heads it refuses
// and why), follows the request stream of a keep-alive connection past
// each request's body to the next head (ReqStream: Content-Length,
// chunked bodies with trailers, Upgrade), and splits the authority a
// request names, before either component decides the request by its
// host. What each component then decides (reasons, rules) stays with it. The components never import
// each other, so the one copy lives here; it is a leaf and imports
// nothing of egressd's.
package httpwire

import (
	"net"
	"strconv"
	"strings"
)

// MaxMethodLen bounds the method of a request line that is not one of the
// methods a caller knows by name (the longest registered method,
// VERSION-CONTROL, has 15 characters).
const MaxMethodLen = 20

// RequestLineStart reports whether b starts like a request line with any
// method: a token, a space, then an origin-form ("/") or absolute http://
// target, or could still (more). Origins serve methods a list of known
// methods does not name (WebDAV's PROPFIND, a handler that takes any
// method): taken for another protocol, such a first request would be
// decided by address and the rest of the connection spliced, every later
// request undecided. It looks at a bounded prefix only, so that a head
// arriving a byte at a time costs no rescans of its whole length.
func RequestLineStart(b []byte) (yes, more bool) {
	i := 0
	for i < len(b) && IsTChar(b[i]) {
		if i++; i > MaxMethodLen {
			return false, false
		}
	}
	if i == len(b) {
		return false, true
	}
	if i == 0 || b[i] != ' ' {
		return false, false
	}
	t := b[i+1:]
	for _, form := range []string{"/", "http://"} {
		n := min(len(t), len(form))
		if strings.EqualFold(string(t[:n]), form[:n]) {
			if n == len(form) {
				return true, false
			}
			more = true
		}
	}
	return false, more
}

// IsTChar reports whether c is a token character (RFC 9110 section 5.6.2).
func IsTChar(c byte) bool { return tchar[c] }

// tchar is IsTChar's table: the visible ASCII characters but the
// delimiters. A look-up, not a search of the delimiters, since the head
// parser asks for every byte of every header name.
var tchar = func() (t [256]bool) {
	for c := '!'; c < 0x7f; c++ {
		t[c] = strings.IndexByte("()<>@,;:\\\"/[]?={}", byte(c)) < 0
	}
	return t
}()

// SplitAuthority splits "host[:port]" or "[v6]:port", strictly: no
// userinfo, no spaces, a decimal port of 1 to 65535.
func SplitAuthority(a string) (host, port string, ok bool) {
	if a == "" || strings.ContainsAny(a, "@/\\?#,") {
		return "", "", false
	}
	for i := 0; i < len(a); i++ {
		if a[i] < 0x21 || a[i] > 0x7e {
			return "", "", false // spaces, controls, non-ASCII
		}
	}
	if a[0] == '[' {
		i := strings.IndexByte(a, ']')
		if i < 0 {
			return "", "", false
		}
		host, rest := a[1:i], a[i+1:]
		if ip := net.ParseIP(host); ip == nil || !strings.Contains(host, ":") {
			return "", "", false
		}
		if rest == "" {
			return host, "", true
		}
		if rest[0] != ':' || !ValidPort(rest[1:]) {
			return "", "", false
		}
		return host, rest[1:], true
	}
	if strings.Count(a, ":") > 1 {
		return "", "", false // an IPv6 literal must be bracketed
	}
	host, port, found := strings.Cut(a, ":")
	if found && !ValidPort(port) {
		return "", "", false
	}
	if host == "" {
		return "", "", false
	}
	return host, port, true
}

// ValidPort reports whether p is a port as a request names it: 1 to
// 65535 in decimal, without a sign or a leading zero.
func ValidPort(p string) bool {
	if p == "" || len(p) > 5 || (len(p) > 1 && p[0] == '0') {
		return false
	}
	n, err := strconv.Atoi(p)
	return err == nil && n >= 1 && n <= 65535 && p[0] != '+' && p[0] != '-'
}
