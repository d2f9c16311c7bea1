package httpwire

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// streamResult is what driving a ReqStream over some input gave.
type streamResult struct {
	heads     []string // "METHOD host path" of every head found, in order
	forwarded []byte   // the bytes next released, in order
	held      int      // bytes left held at the end (an incomplete head or line)
	tunnel    bool
	err       error
}

// driveStream feeds in to a ReqStream in pieces of the sizes split gives
// (as reads would), holding back what next does not release, like
// the proxy's httpUpstream.run.
func driveStream(in []byte, maxHead int, split func(i int) int) streamResult {
	s := ReqStream{MaxHead: maxHead}
	var r streamResult
	var held []byte
	for pos, i := 0, 0; pos < len(in); i++ {
		k := max(1, min(split(i), len(in)-pos))
		held = append(held, in[pos:pos+k]...)
		pos += k
		for len(held) > 0 {
			n, h, err := s.Next(held)
			if errors.Is(err, ErrNeedMore) {
				break
			}
			if err != nil {
				r.err, r.held = err, len(held)
				return r
			}
			if n <= 0 || n > len(held) {
				r.err = fmt.Errorf("next released %d of %d bytes", n, len(held))
				return r
			}
			if h != nil {
				r.heads = append(r.heads, h.Method+" "+h.Host+" "+h.Path)
			}
			r.forwarded = append(r.forwarded, held[:n]...)
			held = held[n:]
		}
	}
	r.held, r.tunnel = len(held), s.Tunnel()
	return r
}

func whole(int) int      { return 1 << 30 }
func oneByte(int) int    { return 1 }
func threeBytes(int) int { return 3 }

// A keep-alive stream of every body framing: no body, Content-Length,
// chunked with extensions and trailers, a blank line between requests.
var pipelined = "GET /a HTTP/1.1\r\nHost: allowed.test\r\n\r\n" +
	"POST /b HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 11\r\n\r\nhello world" +
	"POST /c HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: chunked\r\n\r\n" +
	"5\r\nGET /\r\n" + "b;ext=1\r\n\r\nHost: x\r\n\r\n" + "0\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n" +
	"\r\n" +
	"GET http://denied.test/d HTTP/1.1\r\nHost: denied.test\r\n\r\n"

var pipelinedHeads = []string{"GET allowed.test /a", "POST allowed.test /b", "POST other.test /c", "GET denied.test /d"}

// TestReqStreamPipelined: every head of a pipelined stream is found, at
// every way of cutting it into reads; body bytes that look like a request
// (inside the chunked body) are not taken for one; all bytes are released
// in order.
func TestReqStreamPipelined(t *testing.T) {
	in := []byte(pipelined)
	for name, split := range map[string]func(int) int{"whole": whole, "one-byte": oneByte, "three-bytes": threeBytes} {
		t.Run(name, func(t *testing.T) {
			r := driveStream(in, 64<<10, split)
			if r.err != nil {
				t.Fatal(r.err)
			}
			if strings.Join(r.heads, "|") != strings.Join(pipelinedHeads, "|") {
				t.Errorf("heads %q", r.heads)
			}
			if !bytes.Equal(r.forwarded, in) || r.held != 0 {
				t.Errorf("forwarded %d of %d bytes, %d held", len(r.forwarded), len(in), r.held)
			}
		})
	}
	// Cut in two at every byte.
	for i := 1; i < len(in); i++ {
		r := driveStream(in, 64<<10, func(k int) int {
			if k == 0 {
				return i
			}
			return 1 << 30
		})
		if r.err != nil || strings.Join(r.heads, "|") != strings.Join(pipelinedHeads, "|") || !bytes.Equal(r.forwarded, in) {
			t.Fatalf("cut at %d: %v %q", i, r.err, r.heads)
		}
	}
}

// TestReqStreamChunkedEveryByte: a chunked body with an embedded request,
// a large chunk, extensions and trailers, delivered one byte per read and
// cut at every position, releases the same bytes and finds the same two
// heads; the head after the body is not released before it is complete.
func TestReqStreamChunkedEveryByte(t *testing.T) {
	body := strings.Repeat("x", 300)
	in := []byte("PUT /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: Chunked\r\n\r\n" +
		"12c;name=\"v\"\r\n" + body + "\r\n" +
		"1B\r\nGET / HTTP/1.1\r\nHost: e\r\n\r\n\r\n" +
		"0\r\nTrailer-A: b\r\n\r\n" +
		"GET /next HTTP/1.1\r\nHost: b.test\r\n\r\n")
	want := "PUT a.test /up|GET b.test /next"
	for i := 1; i < len(in); i++ {
		r := driveStream(in, 64<<10, func(k int) int {
			if k == 0 {
				return i
			}
			return 1
		})
		if r.err != nil || strings.Join(r.heads, "|") != want || !bytes.Equal(r.forwarded, in) {
			t.Fatalf("cut at %d: err %v heads %q forwarded %d/%d", i, r.err, r.heads, len(r.forwarded), len(in))
		}
	}
	// Until the last head is complete, nothing of it is released.
	last := bytes.LastIndex(in, []byte("GET /next"))
	for end := last + 1; end < len(in); end++ {
		r := driveStream(in[:end], 64<<10, oneByte)
		if r.err != nil || len(r.forwarded) != last || r.held != end-last {
			t.Fatalf("prefix %d: err %v, released %d (want %d), held %d", end, r.err, len(r.forwarded), last, r.held)
		}
	}
}

// TestReqStreamSmuggling: request shapes on which two HTTP parsers can
// disagree about where a request ends are refused, whatever comes first on
// the connection, and nothing after the refusal is released.
func TestReqStreamSmuggling(t *testing.T) {
	const ok = "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
	const next = "GET /x HTTP/1.1\r\nHost: denied.test\r\n\r\n"
	for _, c := range []struct {
		name, req string
		err       error
	}{
		{"cl-te", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"te-cl", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"two-cl-differ", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n", ErrHeadFraming},
		{"cl-list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", ErrHeadFraming},
		{"cl-plus", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", ErrHeadFraming},
		{"cl-negative", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", ErrHeadFraming},
		{"cl-tab", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\t5\r\n\r\nhello", ErrHeadFraming},
		{"cl-empty", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", ErrHeadFraming},
		{"cl-huge", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", ErrHeadFraming},
		{"te-tab", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"te-list", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"te-trailing-comma", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"te-gzip", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", ErrHeadFraming},
		{"te-twice", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"te-http10", "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"te-xchunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", ErrHeadFraming},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", ErrHeadMalformed},
		{"obs-fold-te", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n", ErrHeadMalformed},
		{"bare-lf-head", "GET / HTTP/1.1\nHost: a\r\n\r\n", ErrHeadMalformed},
		{"bare-lf-end", "GET / HTTP/1.1\r\nHost: a\n\n", ErrHeadMalformed},
		{"bare-lf-and-bad-cl", "POST / HTTP/1.1\r\nContent-Length: A\r\n\n\r\n\r\n", ErrHeadMalformed}, // one reason whole or in pieces (FuzzFollowAgreesWithProxy)
		{"bare-cr-value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", ErrHeadMalformed},
		{"space-before-colon", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", ErrHeadMalformed},
		{"chunk-bare-lf", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-bare-cr", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\rhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-data-no-crlf", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-data-lf-only", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-0x", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-sign", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-leading-space", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-empty-size", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-trailing-junk", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-overflow", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"chunk-ext-ctl", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\x00\r\nhello\r\n0\r\n\r\n", ErrHeadFraming},
		{"trailer-obs-fold", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: b\r\n c\r\n\r\n", ErrHeadFraming},
		{"trailer-bare-lf", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: b\n\r\n", ErrHeadFraming},
		{"trailer-not-field", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET / HTTP/1.1\r\n\r\n", ErrHeadFraming},
		{"three-blank-lines", "\r\n\r\n\r\n" + next, ErrHeadMalformed},
		{"lf-before-request", "\n" + next, ErrHeadMalformed},
		{"two-hosts", "GET / HTTP/1.1\r\nHost: a.test\r\nHost: denied.test\r\n\r\n", ErrHeadMalformed},
		{"absolute-vs-host", "GET http://denied.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", ErrHostMismatch},
		{"userinfo", "GET / HTTP/1.1\r\nHost: a.test@denied.test\r\n\r\n", ErrHeadMalformed},
		{"http09", "GET /\r\n\r\n", ErrHeadMalformed},
		{"h2-preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ErrHeadMalformed},
		{"connect", "CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n", ErrHeadMalformed},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, prefix := range []string{"", ok} {
				in := []byte(prefix + c.req + next)
				for sn, split := range map[string]func(int) int{"whole": whole, "one-byte": oneByte} {
					r := driveStream(in, 64<<10, split)
					if !errors.Is(r.err, c.err) {
						t.Fatalf("prefix %q %s: err %v, want %v (heads %q)", prefix, sn, r.err, c.err, r.heads)
					}
					for _, h := range r.heads {
						if strings.Contains(h, "denied.test") || strings.Contains(h, " /x") {
							t.Fatalf("%s: the request after the refused one was released: %q", sn, r.heads)
						}
					}
					if bytes.Contains(r.forwarded, []byte("denied.test")) {
						t.Fatalf("%s: released bytes naming denied.test: %q", sn, r.forwarded)
					}
				}
			}
		})
	}
}

// TestReqStreamBounds: a head, a chunk line and a trailer section over
// their caps are refused (the parser holds at most a head's worth).
func TestReqStreamBounds(t *testing.T) {
	const maxHead = 4096
	for _, c := range []struct{ name, in string }{
		{"head", "GET / HTTP/1.1\r\nHost: a\r\nX: " + strings.Repeat("a", maxHead) + "\r\n\r\n"},
		{"head-no-end", "GET / HTTP/1.1\r\nHost: a\r\nX: " + strings.Repeat("a", 2*maxHead)},
		{"chunk-ext", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;" + strings.Repeat("e", MaxChunkLine) + "\r\nhello\r\n0\r\n\r\n"},
		{"trailers", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + strings.Repeat("X-T: aaaaaaaaaaaaaa\r\n", maxHead/16) + "\r\n"},
	} {
		for sn, split := range map[string]func(int) int{"whole": whole, "one-byte": oneByte} {
			r := driveStream([]byte(c.in), maxHead, split)
			if !errors.Is(r.err, ErrHeadTooLarge) {
				t.Errorf("%s %s: err %v", c.name, sn, r.err)
			}
			if sn == "one-byte" && r.held > max(maxHead, MaxChunkLine+2)+1 {
				t.Errorf("%s %s: held %d bytes", c.name, sn, r.held)
			}
		}
	}
	// A body of any size is released as it comes, never held.
	big := "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + strings.Repeat("b", 100000)
	if r := driveStream([]byte(big), maxHead, func(int) int { return 1000 }); r.err != nil || r.held != 0 || len(r.forwarded) != len(big) {
		t.Errorf("large body: %v, held %d", r.err, r.held)
	}
}

// TestReqStreamUpgrade: after a request with Upgrade the client's next
// bytes decide: a WebSocket frame or a TLS record turns the stream opaque;
// a request (the origin refused to switch) is parsed and decided.
func TestReqStreamUpgrade(t *testing.T) {
	const up = "GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
	for _, c := range []struct {
		name, after string
		tunnel      bool
		heads       int
		err         error
	}{
		{"websocket-frame", "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n", true, 1, nil},
		{"tls", "\x16\x03\x01\x00\x05hello", true, 1, nil},
		{"next-request", "GET /x HTTP/1.1\r\nHost: denied.test\r\n\r\n", false, 2, nil},
		{"next-request-blank", "\r\nGET /x HTTP/1.1\r\nHost: denied.test\r\n\r\n", false, 2, nil},
		{"garbage-token", "get\x00 /x HTTP/1.1\r\nHost: denied.test\r\n\r\n", false, 1, ErrHeadMalformed},
		{"h2c-preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false, 1, ErrHeadMalformed},
	} {
		r := driveStream([]byte(up+c.after), 64<<10, oneByte)
		if !errors.Is(r.err, c.err) || r.tunnel != c.tunnel || len(r.heads) != c.heads {
			t.Errorf("%s: err %v tunnel %v heads %q", c.name, r.err, r.tunnel, r.heads)
		}
	}
	// Without Upgrade, binary bytes after a request are refused.
	r := driveStream([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n\x81\x85abcde"), 64<<10, whole)
	if r.err == nil || r.tunnel {
		t.Errorf("binary after a plain request: %v tunnel %v", r.err, r.tunnel)
	}
}

// FuzzReqStream: the request-stream parser never panics, releases only
// what it was given, in order, never holds more than its bounds, finds the
// same heads however the input is cut into reads, and every head it
// releases parses on its own as a head naming one clean host.
func FuzzReqStream(f *testing.F) {
	f.Add([]byte(pipelined), uint8(1))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n"), uint8(7))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), uint8(3))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n\x81\x80abcd"), uint8(2))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n"), uint8(5))
	const maxHead = 2048
	f.Fuzz(func(t *testing.T, in []byte, cut uint8) {
		a := driveStream(in, maxHead, whole)
		b := driveStream(in, maxHead, func(i int) int { return int(cut)%17 + 1 + i%3 })
		for _, r := range []streamResult{a, b} {
			if !bytes.HasPrefix(in, r.forwarded) {
				t.Fatalf("released bytes are not the input's prefix")
			}
			if r.err == nil && r.held > max(maxHead, MaxChunkLine+2) {
				t.Fatalf("held %d bytes without an error", r.held)
			}
		}
		// Where both got through the whole input, they agree on the heads;
		// where one stopped at an error, the other stopped at the same
		// kind or needed more (a cut can end the input inside a head).
		if a.err == nil && b.err == nil && strings.Join(a.heads, "|") != strings.Join(b.heads, "|") {
			t.Fatalf("heads differ by cut: %q vs %q", a.heads, b.heads)
		}
		if (a.err == nil) != (b.err == nil) {
			t.Fatalf("errors differ by cut: %v vs %v", a.err, b.err)
		}
		// Every released head parses alone.
		s := ReqStream{MaxHead: maxHead}
		rest := a.forwarded
		for len(rest) > 0 {
			n, h, err := s.Next(rest)
			if err != nil {
				t.Fatalf("released bytes do not parse again: %v", err)
			}
			if h != nil {
				for _, c := range []byte(h.Host) {
					if c == '@' || c == ' ' || c == '/' || c < 0x21 || c > 0x7e {
						t.Fatalf("released a head with host %q", h.Host)
					}
				}
			}
			rest = rest[n:]
		}
	})
}

// TestReqStreamSkip: bytes a capture cut off are skipped inside a body or
// chunk data that holds them, and refused where they could hold a head
// or framing; a skip that ends a body leaves the stream at the next head.
func TestReqStreamSkip(t *testing.T) {
	post := "POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
	s := ReqStream{MaxHead: 4096}
	if s.Skip(1) {
		t.Fatal("skipped bytes of a head")
	}
	n, h, err := s.Next([]byte(post + "abc"))
	if err != nil || h == nil || n != len(post) {
		t.Fatalf("head: %d %v %v", n, h, err)
	}
	if n, _, err := s.Next([]byte("abc")); n != 3 || err != nil {
		t.Fatalf("body: %d %v", n, err)
	}
	if s.Skip(8) {
		t.Fatal("skipped past the body's end")
	}
	if !s.Skip(7) {
		t.Fatal("did not skip the rest of the body")
	}
	if n, h, err := s.Next([]byte("GET /c HTTP/1.1\r\nHost: b\r\n\r\n")); err != nil || h == nil || h.Path != "/c" || n == 0 {
		t.Fatalf("next head after a skipped body: %d %v %v", n, h, err)
	}
	chunked := "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
	s = ReqStream{MaxHead: 4096}
	for _, part := range []string{chunked, "a\r\n"} {
		if _, _, err := s.Next([]byte(part)); err != nil {
			t.Fatal(err)
		}
	}
	if s.Skip(11) || !s.Skip(10) {
		t.Fatal("chunk data: skip past its end taken, or within it refused")
	}
	if s.Skip(2) {
		t.Fatal("skipped the CRLF after chunk data")
	}
	if n, _, err := s.Next([]byte("\r\n0\r\n\r\n")); n != 2 || err != nil {
		t.Fatalf("chunk end after a skip: %d %v", n, err)
	}
}
