package httpwire

import (
	"bytes"
	"errors"
	"strconv"
	"strings"
)

// Errors of the request head parser.
var (
	ErrHeadIncomplete = errors.New("httpwire: http request head incomplete")
	ErrHeadMalformed  = errors.New("httpwire: http request head malformed")
	ErrHostMismatch   = errors.New("httpwire: http host header and request target disagree")
	ErrHeadFraming    = errors.New("httpwire: http request framing ambiguous or invalid")
)

// Head is what a request head says about where it goes and how its body
// is framed.
type Head struct {
	Method string
	Target string
	Host   string // the authority that names the destination (absolute-form wins, and must agree with Host)
	Port   string // port from that authority, "" when absent
	Path   string // the path (origin-form or from an absolute URL), "*" for OPTIONS' asterisk form
	Len    int    // bytes of the head, including the final CRLF CRLF

	// Body framing (RFC 9112 section 6): BodyLen bytes follow the head
	// (Content-Length; 0 without one), or a chunked body when Chunked.
	BodyLen int64
	Chunked bool
	// Upgrade: the request carries an Upgrade header (WebSocket, h2c, ...),
	// so the connection may stop being HTTP after it.
	Upgrade bool
}

// ParseHead parses an HTTP/1.x request head at the start of b. It returns
// ErrHeadIncomplete when b holds no complete head yet, and
// ErrHeadMalformed, ErrHostMismatch or ErrHeadFraming for heads the proxy
// refuses. It is strict where laxness lets a request name two
// destinations, or lets two parsers disagree on where its body ends
// (request smuggling, THREATS.md C6): one Host header, no obs-fold, CRLF
// line ends, the absolute-form authority equal to Host; Content-Length all
// digits (repeated only with the same value), Transfer-Encoding exactly
// "chunked" (once, HTTP/1.1 only), never both.
func ParseHead(b []byte) (h Head, err error) {
	return parseHead(b, false)
}

// ParseHeadTLS parses a request head read inside TLS (an inspected
// connection) as ParseHead does, except that an absolute-form target may
// be https:// too.
func ParseHeadTLS(b []byte) (h Head, err error) {
	return parseHead(b, true)
}

func parseHead(b []byte, inTLS bool) (h Head, err error) {
	defer h.detach()
	end := bytes.Index(b, []byte("\r\n\r\n"))
	if end < 0 {
		if bytes.Contains(b, []byte("\n\n")) || bytes.Contains(b, []byte("\r\n\n")) {
			return h, ErrHeadMalformed // bare LF line ends
		}
		return h, ErrHeadIncomplete
	}
	h.Len = end + 4
	head := string(b[:end])
	lines := strings.Split(head, "\r\n")
	// Request line: METHOD SP target SP HTTP/1.x
	parts := strings.Split(lines[0], " ")
	if len(parts) != 3 || !IsToken(parts[0]) || parts[1] == "" {
		return h, ErrHeadMalformed
	}
	if parts[2] != "HTTP/1.1" && parts[2] != "HTTP/1.0" {
		return h, ErrHeadMalformed
	}
	h.Method, h.Target = parts[0], parts[1]
	if !TargetBytes(h.Target) {
		return h, ErrHeadMalformed
	}
	var host string
	hosts, cl, te := 0, 0, 0
	var clVal string
	teChunked := false
	for _, l := range lines[1:] {
		if l == "" || l[0] == ' ' || l[0] == '\t' {
			return h, ErrHeadMalformed // obs-fold or empty line inside the head
		}
		name, val, ok := strings.Cut(l, ":")
		if !ok || !IsToken(name) {
			return h, ErrHeadMalformed
		}
		for i := 0; i < len(val); i++ {
			if c := val[i]; (c < ' ' && c != '\t') || c == 0x7f {
				return h, ErrHeadMalformed
			}
		}
		raw := val
		val = strings.Trim(val, " \t")
		switch {
		case strings.EqualFold(name, "Host"):
			hosts++
			host = val
		case strings.EqualFold(name, "Content-Length"):
			// 1*DIGIT and nothing else: no sign, no list ("5, 5"), no
			// tab; at most 18 digits so that it fits an int64.
			if strings.Trim(raw, " ") != val || !allDigits(val) || len(val) > 18 {
				return h, ErrHeadFraming
			}
			if cl > 0 && val != clVal {
				return h, ErrHeadFraming
			}
			cl++
			clVal = val
		case strings.EqualFold(name, "Transfer-Encoding"):
			// Only "chunked", alone: any other coding, a list, a tab
			// ("\tchunked") or a second header is a body length another
			// parser may see differently.
			te++
			teChunked = strings.EqualFold(strings.Trim(raw, " "), "chunked")
		case strings.EqualFold(name, "Upgrade"):
			h.Upgrade = true
		}
	}
	if hosts > 1 {
		return h, ErrHeadMalformed
	}
	if te > 0 && (cl > 0 || te > 1 || !teChunked || parts[2] != "HTTP/1.1") {
		return h, ErrHeadFraming
	}
	h.Chunked = te == 1
	if cl > 0 {
		h.BodyLen, _ = strconv.ParseInt(clVal, 10, 64)
	}
	if hosts == 1 {
		if _, _, ok := SplitAuthority(host); !ok {
			return h, ErrHeadMalformed
		}
	}
	switch {
	case h.Target == "*":
		if h.Method != "OPTIONS" {
			return h, ErrHeadMalformed
		}
		// A path no host/path glob names: "" would read as unknown, and
		// host/path rules would allow it at host level.
		h.Host, h.Path = host, "*"
	case h.Target[0] == '/':
		h.Path = h.Target
		h.Host = host
	default:
		// Absolute form: http://authority[/path] (or https:// inside
		// TLS). Any other form (CONNECT's authority-form, another
		// scheme) has no business on a transparent connection.
		rest, ok := cutPrefixFold(h.Target, "http://")
		if !ok && inTLS {
			rest, ok = cutPrefixFold(h.Target, "https://")
		}
		if !ok || h.Method == "CONNECT" {
			return h, ErrHeadMalformed
		}
		auth, path := rest, "/"
		if i := strings.IndexAny(rest, "/?#"); i >= 0 {
			auth, path = rest[:i], rest[i:]
			if path[0] != '/' {
				path = "/" + path
			}
		}
		ah, ap, ok := SplitAuthority(auth)
		if !ok || ah == "" {
			return h, ErrHeadMalformed
		}
		if hosts == 1 {
			hh, hp, _ := SplitAuthority(host)
			if !strings.EqualFold(strings.TrimSuffix(hh, "."), strings.TrimSuffix(ah, ".")) || (hp != ap && hp != "" && ap != "") {
				return h, ErrHostMismatch
			}
		}
		h.Host, h.Path = auth, path
	}
	if h.Host != "" {
		hh, hp, _ := SplitAuthority(h.Host)
		h.Host, h.Port = hh, hp
	}
	// A '#' stays in the path: a request target has no fragment (RFC
	// 9112 section 3.2), and an origin that reads past it (Go's
	// http.FileServer cleans "/a/#/../b" to "/b") would serve another
	// path than the one before it; policy.PlainPath refuses it.
	return h, nil
}

// detach copies the strings of h out of the head they were cut from, all
// in one allocation, so that keeping h or one of its strings does not keep
// the whole head: its header lines, up to the 64 KiB cap, for as long as a
// connection's record or a capture flow lives. A plain-HTTP keep-alive
// connection whose first head carried 60 KB of headers held all of them
// in the proxy (its path and host in the connection's record), about
// 100 KiB a connection with its buffer (TestHeadKeepsNoHeaders,
// proxy/TestIdleHTTPConnMemory).
func (h *Head) detach() {
	n := len(h.Method) + len(h.Target) + len(h.Host) + len(h.Port) + len(h.Path)
	if n == 0 {
		return
	}
	var b strings.Builder
	b.Grow(n)
	for _, f := range []string{h.Method, h.Target, h.Host, h.Port, h.Path} {
		b.WriteString(f)
	}
	all := b.String()
	for _, f := range []*string{&h.Method, &h.Target, &h.Host, &h.Port, &h.Path} {
		*f, all = all[:len(*f)], all[len(*f):]
	}
}

// IsToken reports whether s is a token (RFC 9110 section 5.6.2): one or
// more token characters.
func IsToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !IsTChar(s[i]) {
			return false
		}
	}
	return true
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// TargetBytes reports whether a request target is made of the bytes RFC
// 3986 allows in one: none is a control, a space, DEL or 0x80 or above
// (raw UTF-8, which origins would read as its escapes). The proxy refuses
// a request whose target is not (http-malformed), in every mode.
func TargetBytes(target string) bool {
	for i := 0; i < len(target); i++ {
		if c := target[i]; c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}
