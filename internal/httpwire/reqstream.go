package httpwire

import (
	"bytes"
	"errors"
)

// Errors of the request-stream parser besides the head parser's.
var (
	// ErrNeedMore: the bytes given end inside a request head or a framing
	// line; call again with more.
	ErrNeedMore = errors.New("httpwire: http request stream needs more bytes")
	// ErrHeadTooLarge: a request head, a chunk line or a trailer section
	// is over its bound.
	ErrHeadTooLarge = errors.New("httpwire: http request head or framing line over the size cap")
)

// MaxChunkLine bounds a chunk-size line with its extensions (as Go's
// net/http does).
const MaxChunkLine = 4096

// maxBlankLines is how many empty lines (CRLF) a request may follow; RFC
// 9112 section 2.2 asks servers to ignore at least one, and some clients
// send one after a body.
const maxBlankLines = 2

type rsState uint8

const (
	rsHead        rsState = iota // a request head (or blank lines before it)
	rsBody                       // remain bytes of a Content-Length body
	rsChunkSize                  // a chunk-size line
	rsChunkData                  // remain bytes of chunk data
	rsChunkEnd                   // the CRLF after chunk data
	rsTrailer                    // trailer fields after the last chunk, up to an empty line
	rsMaybeTunnel                // after a request with Upgrade: HTTP again, or the upgraded protocol
	rsTunnel                     // opaque from here on (upgraded, or given up in audit mode)
)

// ReqStream follows the client-to-origin bytes of a plain HTTP/1.x
// connection so that every request head is found and decided, not only the
// first (THREATS.md C6): the transparent proxy forwards through it, and
// capture runs the bytes it reassembles through it, so that audit mode
// finds the requests enforce mode decides. It keeps no bytes itself: the
// caller holds what is not yet consumed and calls Next with it. Its state
// is bounded: a head of at most MaxHead bytes, a chunk line of at most
// MaxChunkLine, a trailer section of at most MaxHead, and a few counters.
// The zero value with MaxHead set is a stream at the start of a request
// head; after a first head parsed elsewhere, Start moves it into that
// request's body.
//
// It is strict where a lax reading would let the origin see a request the
// proxy did not (request smuggling): the head rules of ParseHead, chunk
// sizes in hex digits only, CRLF after every chunk, trailer fields shaped
// like header fields, bare CR or LF nowhere.
type ReqStream struct {
	MaxHead int // bound of a head and of a trailer section, in bytes
	// TLS: the stream is the cleartext inside TLS (an inspected
	// connection): heads are parsed with ParseHeadTLS.
	TLS     bool
	state   rsState
	remain  int64 // rsBody, rsChunkData: bytes left
	trailer int   // rsTrailer: bytes of trailer fields so far
	blank   int   // rsHead: empty lines before this head
	scan    int   // rsHead: bytes already searched for the end of the head
	upgrade bool  // the current request asked for an Upgrade
}

// Next examines data, the bytes the client sent that are not consumed
// yet, oldest first. It returns
//   - n > 0 and h == nil: data[:n] is body, framing or tunnel bytes,
//     to forward as they are;
//   - n > 0 and h != nil: data[:n] is a complete request head, to be
//     decided before a byte of it is forwarded; the stream is now in its
//     body;
//   - ErrNeedMore: data ends inside a head or a framing line; call again
//     with data and the bytes read next;
//   - another error: the stream cannot be followed (malformed head,
//     ambiguous framing, a bound exceeded); the connection must be denied
//     (or, in audit mode, given up with GiveUp).
func (s *ReqStream) Next(data []byte) (n int, h *Head, err error) {
	if len(data) == 0 {
		return 0, nil, ErrNeedMore
	}
	switch s.state {
	case rsTunnel:
		return len(data), nil, nil

	case rsMaybeTunnel:
		// After a request that asked to switch protocols the proxy does
		// not see the origin's answer (that direction is spliced). The
		// client's next bytes tell: a new request can only start with a
		// token character (or the blank line servers skip), which no
		// WebSocket frame (0x0_/0x8_), TLS record or other binary
		// protocol does; anything an HTTP server could read as a request
		// is parsed and decided as one.
		if c := data[0]; IsTChar(c) || c == '\r' || c == '\n' || c == ' ' || c == '\t' {
			s.state = rsHead
			return s.Next(data)
		}
		s.state = rsTunnel
		return len(data), nil, nil

	case rsBody:
		k := int64(len(data))
		if k > s.remain {
			k = s.remain
		}
		s.remain -= k
		if s.remain == 0 {
			s.endMessage()
		}
		return int(k), nil, nil

	case rsChunkData:
		k := int64(len(data))
		if k > s.remain {
			k = s.remain
		}
		s.remain -= k
		if s.remain == 0 {
			s.state = rsChunkEnd
		}
		return int(k), nil, nil

	case rsChunkEnd:
		if data[0] != '\r' || len(data) > 1 && data[1] != '\n' {
			return 0, nil, ErrHeadFraming
		}
		if len(data) < 2 {
			return 0, nil, ErrNeedMore
		}
		s.state = rsChunkSize
		return 2, nil, nil

	case rsChunkSize:
		line, err := crlfLine(data, MaxChunkLine)
		if err != nil {
			return 0, nil, err
		}
		size, ok := parseChunkSize(data[:line])
		if !ok {
			return 0, nil, ErrHeadFraming
		}
		if size == 0 {
			s.state, s.trailer = rsTrailer, 0
		} else {
			s.state, s.remain = rsChunkData, size
		}
		return line + 2, nil, nil

	case rsTrailer:
		line, err := crlfLine(data, s.MaxHead-s.trailer)
		if err != nil {
			return 0, nil, err
		}
		if line == 0 {
			s.endMessage()
			return 2, nil, nil
		}
		if !validFieldLine(data[:line]) {
			return 0, nil, ErrHeadFraming
		}
		s.trailer += line + 2
		return line + 2, nil, nil
	}

	// rsHead.
	if data[0] == '\r' || data[0] == '\n' {
		if data[0] == '\n' || len(data) > 1 && data[1] != '\n' || s.blank >= maxBlankLines {
			return 0, nil, ErrHeadMalformed
		}
		if len(data) < 2 {
			return 0, nil, ErrNeedMore
		}
		s.blank++
		return 2, nil, nil
	}
	if !IsTChar(data[0]) {
		return 0, nil, ErrHeadMalformed // no method starts so
	}
	from := max(0, s.scan-3)
	end := bytes.Index(data[from:], []byte("\r\n\r\n"))
	if end < 0 {
		// A bare LF ending a line: refuse now rather than at the cap.
		if bareLF(data, from) {
			return 0, nil, ErrHeadMalformed
		}
		if len(data) >= s.MaxHead {
			return 0, nil, ErrHeadTooLarge
		}
		s.scan = len(data)
		return 0, nil, ErrNeedMore
	}
	end += from + 4
	if bareLF(data[:end], from) {
		// Refused as malformed however the head came in segments:
		// ParseHead might first find another fault (a Content-Length
		// that is not a number: framing), which a head still arriving
		// is not refused for.
		return 0, nil, ErrHeadMalformed
	}
	if end > s.MaxHead {
		return 0, nil, ErrHeadTooLarge
	}
	parse := ParseHead
	if s.TLS {
		parse = ParseHeadTLS
	}
	hd, err := parse(data[:end])
	if err != nil {
		return 0, nil, err
	}
	s.Start(&hd)
	return hd.Len, &hd, nil
}

// bareLF reports whether data holds, from from on, a line ended by a LF
// without its CR.
func bareLF(data []byte, from int) bool {
	i := bytes.IndexByte(data[from:], '\n')
	if i < 0 {
		return false
	}
	for j := from + i; j < len(data); j++ {
		if data[j] == '\n' && (j == 0 || data[j-1] != '\r') {
			return true
		}
	}
	return false
}

// Start moves the stream past the head h (just parsed, here or by the
// transparent peek) into its body.
func (s *ReqStream) Start(h *Head) {
	s.scan, s.blank = 0, 0
	s.upgrade = h.Upgrade
	switch {
	case h.Chunked:
		s.state = rsChunkSize
	case h.BodyLen > 0:
		s.state, s.remain = rsBody, h.BodyLen
	default:
		s.endMessage()
	}
}

// endMessage moves past the end of a request.
func (s *ReqStream) endMessage() {
	s.state = rsHead
	if s.upgrade {
		s.state = rsMaybeTunnel
	}
	s.upgrade = false
}

// Skip consumes n bytes the caller does not have (a packet capture cut
// them off) and reports whether it could: only inside a Content-Length
// body or chunk data with at least n bytes left, or once the stream is
// opaque; elsewhere the bytes could hold a head or framing, and the
// stream is left as it was.
func (s *ReqStream) Skip(n int64) bool {
	switch {
	case n == 0 || s.state == rsTunnel:
		return true
	case (s.state == rsBody || s.state == rsChunkData) && n <= s.remain:
		s.remain -= n
		if s.remain == 0 {
			if s.state == rsBody {
				s.endMessage()
			} else {
				s.state = rsChunkEnd
			}
		}
		return true
	}
	return false
}

// GiveUp makes the rest of the stream opaque (audit mode after something
// the parser refuses: nothing is blocked, nothing more is decided).
func (s *ReqStream) GiveUp() { s.state = rsTunnel }

// Tunnel reports whether the stream is opaque from here on.
func (s *ReqStream) Tunnel() bool { return s.state == rsTunnel }

// InHead reports whether the stream is between requests or inside a head
// (where the head deadline applies to bytes held).
func (s *ReqStream) InHead() bool { return s.state == rsHead || s.state == rsMaybeTunnel }

// crlfLine returns the length of the line at the start of data, without
// its CRLF: ErrNeedMore when no line end is there yet (and data is under
// limit), ErrHeadFraming for a bare CR or LF, ErrHeadTooLarge over limit.
func crlfLine(data []byte, limit int) (int, error) {
	search := data
	if len(search) > limit+2 {
		search = search[:limit+2]
	}
	i := bytes.IndexByte(search, '\n')
	if i < 0 {
		if j := bytes.IndexByte(search, '\r'); j >= 0 && j+1 < len(search) {
			return 0, ErrHeadFraming // CR not followed by LF
		}
		if len(data) >= limit+2 {
			return 0, ErrHeadTooLarge
		}
		return 0, ErrNeedMore
	}
	if i == 0 || search[i-1] != '\r' {
		return 0, ErrHeadFraming
	}
	if bytes.IndexByte(search[:i-1], '\r') >= 0 {
		return 0, ErrHeadFraming
	}
	return i - 1, nil
}

// parseChunkSize parses a chunk-size line (without CRLF): 1 to 15 hex
// digits, then optionally chunk extensions (";" after optional blanks,
// then visible characters, blanks and tabs). No sign, no "0x", nothing
// before the digits.
func parseChunkSize(line []byte) (int64, bool) {
	var n int64
	i := 0
	for ; i < len(line); i++ {
		d, ok := hexVal(line[i])
		if !ok {
			goto ext
		}
		if i >= 15 {
			return 0, false
		}
		n = n<<4 | int64(d)
	}
ext:
	if i == 0 {
		return 0, false
	}
	rest := line[i:]
	if len(rest) == 0 {
		return n, true
	}
	rest = bytes.TrimLeft(rest, " \t")
	if len(rest) == 0 || rest[0] != ';' {
		return 0, false
	}
	for _, c := range rest {
		if (c < ' ' && c != '\t') || c == 0x7f {
			return 0, false
		}
	}
	return n, true
}

// validFieldLine reports whether a trailer line is a header field as the
// head parser accepts it: token ":" value without controls, no obs-fold.
func validFieldLine(l []byte) bool {
	if len(l) == 0 || l[0] == ' ' || l[0] == '\t' {
		return false
	}
	i := bytes.IndexByte(l, ':')
	if i <= 0 || !IsToken(string(l[:i])) {
		return false
	}
	for _, c := range l[i+1:] {
		if (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
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
