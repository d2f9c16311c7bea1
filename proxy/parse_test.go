package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"egressd/internal/httpwire"
	"egressd/internal/tlshello"
	"egressd/internal/tlshello/hellotest"
	"egressd/policy"
)

// TestLooksHTTP: any method starts an HTTP request, as long as a space and
// an origin-form or absolute http target follow it; other protocols'
// first bytes do not, and the answer needs only a bounded prefix.
func TestLooksHTTP(t *testing.T) {
	for _, c := range []struct {
		in        string
		yes, more bool
	}{
		{"GET ", true, false},
		{"GE", false, true},
		{"PROPFIND /x HTTP/1.1\r\n", true, false},
		{"FOO http://a.test/ HTTP/1.1", true, false},
		{"foo HTTP://a", true, false},
		{"PROPFIND", false, true},
		{"PROPFIND ", false, true},
		{"PROPFIND ht", false, true},
		{"PROPFIND x", false, false},
		{"FOO * HTTP/1.1", false, false},
		{"SSH-2.0-OpenSSH_9.6\r\n", false, false},
		{"EHLO client.test\r\n", false, false},
		{"\x00\x00\x00\x01", false, false},
		{strings.Repeat("A", httpwire.MaxMethodLen+1), false, false},
		{" /x", false, false},
	} {
		if yes, more := looksHTTP([]byte(c.in)); yes != c.yes || more != c.more {
			t.Errorf("%q: yes %v more %v, want %v %v", c.in, yes, more, c.yes, c.more)
		}
	}
}

func TestNumericForm(t *testing.T) {
	for s, want := range map[string]bool{
		"2130706433": true, "0x7f.1": true, "127.1": true, "0177.0.0.1": true, "1.2.3.4.": true,
		"example.com": false, "x1.example": false, "0x7f.example": false, "a.0xzz": false,
	} {
		if got := numericForm(s); got != want {
			t.Errorf("numericForm(%q) = %v", s, got)
		}
	}
}

// TestSpecialRanges: THREATS.md F1/F2 addresses are guarded; a CIDR rule
// naming the range opens it, "0.0.0.0/0" does not.
func TestSpecialRanges(t *testing.T) {
	own := []netip.Addr{netip.MustParseAddr("198.18.1.1")}
	for _, s := range []string{"127.0.0.1", "169.254.169.254", "100.100.100.200", "::1", "fe80::1", "::ffff:169.254.169.254",
		"::ffff:127.0.0.1", "::ffff:8.8.8.8", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2001:0:4136:e378::1", "fd00:ec2::254",
		"198.18.1.1", "224.0.0.1", "0.0.0.0", "168.63.129.16"} {
		if _, ok := policy.New(&policy.Policy{}).SpecialRange(netip.MustParseAddr(s), own, nil); !ok {
			t.Errorf("%s is not guarded", s)
		}
	}
	for _, s := range []string{"198.18.2.2", "203.0.113.9", "2001:db8::1", "10.1.2.3"} {
		if _, ok := policy.New(&policy.Policy{}).SpecialRange(netip.MustParseAddr(s), own, nil); ok {
			t.Errorf("%s is guarded", s)
		}
	}
	eng, err := policy.Compile("g.yaml", []byte(`version: 1
rules:
  - name: all
    to: [0.0.0.0/0, "::/0"]
    ports: [443/tcp]
  - name: meta
    to: [169.254.169.254/32]
    ports: [80/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	meta := netip.MustParseAddr("169.254.169.254")
	if _, refused := eng.GuardRefuses(policy.Input{Dest: meta, Port: 443, Proto: policy.TCP}, nil, nil); !refused {
		t.Error("0.0.0.0/0 opened the metadata address")
	}
	if _, refused := eng.GuardRefuses(policy.Input{Dest: meta, Port: 80, Proto: policy.TCP}, nil, nil); refused {
		t.Error("a /32 rule did not open the metadata address")
	}
	mapped := netip.MustParseAddr("::ffff:169.254.169.254")
	_, refused80 := eng.GuardRefuses(policy.Input{Dest: mapped, Port: 80, Proto: policy.TCP}, nil, nil)
	_, refused443 := eng.GuardRefuses(policy.Input{Dest: mapped, Port: 443, Proto: policy.TCP}, nil, nil)
	if refused80 || !refused443 {
		t.Error("mapped form not guarded as its IPv4 address")
	}
}

var goHello = hellotest.GoHello

func TestReadClientHello(t *testing.T) {
	h := goHello(t, "www.allowed.test", nil)
	recs := refragment(h, 100)
	alertBetween := append(append(bytes.Clone(recs[:105]), 0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 90), recs[105:]...) // warning, user_canceled
	dupVersion16 := buildHello(sniExt("a.test"), sniExt("b.test"))
	dupVersion16[1] = 0x10
	for _, c := range []struct {
		name string
		in   []byte
		sni  string
		err  error
	}{
		{"go", h, "www.allowed.test", nil},
		{"1-byte-records", refragment(h, 1), "www.allowed.test", nil},
		{"3-byte-records", refragment(h, 3), "www.allowed.test", nil},
		{"no-sni", goHello(t, "192.0.2.1", nil), "", nil},
		{"ech-outer", buildHello(sniExt("public.example"), echOuterExt()), "public.example", nil},
		// A refused hello keeps the name read before the fault, for the
		// record (capture reports it so); it decides nothing.
		{"dup-ext", buildHello(sniExt("a.test"), sniExt("b.test")), "a.test", errDuplicateSNI},
		{"dup-entry", buildHello(sniExt("a.test", "b.test")), "a.test", errDuplicateSNI},
		{"trailing-dot", buildHello(sniExt("a.test.")), "a.test.", errHelloMalformed},
		{"truncated", h[:len(h)/2], "", io.ErrUnexpectedEOF},
		{"server-hello", []byte{0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00}, "", errHelloMalformed},
		// Where the proxy read a hello otherwise than capture until both
		// read hellos with internal/tlshello (capture's TestHelloStrictAsCryptoTLS
		// and TestHelloAsTheProxy): a warning alert between the hello's
		// records (crypto/tls skips it), a second server name where
		// crypto/tls refuses the records or the server_name list (only
		// the proxy's old countServerNames read past them), a hello announcing more than
		// 64 KiB (crypto/tls: a malformed message).
		{"alert-between-records", alertBetween, "", errHelloMalformed},
		{"dup-in-record-over-16384", buildHello(sniExt("a.test"), sniExt("b.test"), ext(21, make([]byte, 16500))), "", errHelloMalformed},
		{"dup-in-record-version-0x10", dupVersion16, "", errHelloMalformed},
		{"dup-past-the-server-name-list", buildHello(ext(0, []byte{0xff, 0xff, 0, 0, 1, 'a', 0, 0, 1, 'b'})), "", errHelloMalformed},
		{"announces-over-64KiB", []byte{0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x20, 0x00}, "", errHelloTooLarge},
	} {
		// Each case twice: as peek calls it, after a first read recorded
		// what had arrived (the fast path where it applies), and with
		// nothing recorded yet (readClientHello reads the connection for
		// the fast path, crypto/tls after it where it declines).
		for _, mode := range []string{"recorded", "unread"} {
			t.Run(c.name+"/"+mode, func(t *testing.T) {
				rc := &recorder{r: bytes.NewReader(c.in), max: 64 << 10}
				if mode == "recorded" {
					if err := rc.fill(1); err != nil {
						t.Fatal(err)
					}
				}
				ch, err := readClientHello(rc)
				if c.err == io.ErrUnexpectedEOF {
					if err == nil {
						t.Fatal("a truncated hello parsed")
					}
					return
				}
				if !errors.Is(err, c.err) {
					t.Fatalf("err %v, want %v", err, c.err)
				}
				if err != nil && !ch.Fast {
					t.Error("refused with crypto/tls asked: tlshello alone decides a whole hello it refuses")
				}
				if ch.ServerName != c.sni {
					t.Errorf("SNI %q", ch.ServerName)
				}
				if c.name == "ech-outer" && !ch.ECH {
					t.Error("ECH extension not seen")
				}
				if !bytes.Equal(rc.buf, c.in[:len(rc.buf)]) {
					t.Error("recorded bytes differ from the input")
				}
			})
		}
	}
	for _, fill := range []bool{true, false} {
		rc := &recorder{r: bytes.NewReader(h), max: 1024}
		if fill {
			rc.fill(1)
		}
		if _, err := readClientHello(rc); !errors.Is(err, errHelloTooLarge) {
			t.Errorf("size cap (first read %v): %v", fill, err)
		}
	}
}

// FuzzClientHello: the peek never panics, never records more than the
// cap, records exactly the bytes it read, and its verdict is tlshello's on
// the recording (capture's: checkAgreesWithTLSHello).
func FuzzClientHello(f *testing.F) {
	// A Go ML-KEM hello, as one record.
	f.Add(goHello(f, "www.allowed.test", nil))
	// The same, split into 3-byte records.
	f.Add(refragment(goHello(f, "a.test", nil), 3))
	// Two server_name extensions (allowed first, evil second).
	f.Add(buildHello(sniExt("allowed.test"), sniExt("evil.test")))
	// ECH outer extension with a public name.
	f.Add(buildHello(sniExt("public.example"), echOuterExt()))
	// A record header claiming 0xffff bytes and nothing else.
	f.Add([]byte{0x16, 0x03, 0x01, 0xff, 0xff})
	// An empty handshake record.
	f.Add([]byte{0x16, 0x03, 0x01, 0x00, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		// As peek calls it, after a first read recorded what had arrived
		// (the fast path where it applies), with nothing recorded yet, and
		// from a client whose bytes arrive one at a time (readClientHello
		// reads on for the fast path, then crypto/tls does).
		for _, mode := range []string{"first", "unread", "bytewise"} {
			var r io.Reader = bytes.NewReader(b)
			if mode == "bytewise" {
				r = iotest.OneByteReader(r)
			}
			rc := &recorder{r: r, max: 16 << 10}
			if mode != "unread" && rc.fill(1) != nil {
				continue
			}
			var (
				ch  clientHello
				err error
			)
			done := make(chan struct{})
			go func() { ch, err = readClientHello(rc); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatalf("readClientHello hangs on %x", b)
			}
			if len(rc.buf) > 16<<10 || !bytes.Equal(rc.buf, b[:len(rc.buf)]) {
				t.Fatalf("recorded %d bytes that are not the input's prefix", len(rc.buf))
			}
			checkAgreesWithTLSHello(t, rc, ch, err)
		}
	})
}

// BenchmarkReadClientHello: the cost of the peek per connection (a Go
// ML-KEM hello, ~1.8 KB, recorded by a first read as peek does, then parsed
// by the fast path). BenchmarkReadClientHelloTLS is the same through
// crypto/tls, the cost of a hello the fast path leaves to it.
func BenchmarkReadClientHello(b *testing.B) {
	benchmarkHello(b, readClientHello)
}

func BenchmarkReadClientHelloTLS(b *testing.B) {
	benchmarkHello(b, readClientHelloTLS)
}

func benchmarkHello(b *testing.B, read func(*recorder) (clientHello, error)) {
	h := goHello(b, "www.allowed.test", nil)
	b.ReportAllocs()
	b.SetBytes(int64(len(h)))
	for b.Loop() {
		rc := &recorder{r: bytes.NewReader(h), max: 64 << 10}
		if err := rc.fill(1); err != nil {
			b.Fatal(err)
		}
		if ch, err := read(rc); err != nil || ch.ServerName == "" {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecideName: policy, guard and the no-spoofing check for an
// allowed SNI whose address our DNS handed out.
func BenchmarkDecideName(b *testing.B) {
	eng, err := policy.Compile("b.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: a\n    to: [\"*.allowed.test\"]\n    ports: [443/tcp]\n"))
	if err != nil {
		b.Fatal(err)
	}
	f := &facts{}
	client, dest := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("198.18.2.2")
	f.add(client, dest, "www.allowed.test")
	p, err := New(Config{OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(eng), DNS: f})
	if err != nil {
		b.Fatal(err)
	}
	in := policy.Input{Client: client, Dest: dest, Port: 443, Proto: policy.TCP, Name: "www.allowed.test"}
	b.ReportAllocs()
	for b.Loop() {
		if v := p.decideName(context.Background(), eng, in, "sni"); !v.d.Allowed() {
			b.Fatal(v.d)
		}
	}
}

// countingReader counts the reads that reach it.
type countingReader struct {
	r     io.Reader
	reads int
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

// TestHelloOneRead: a ClientHello that has fully arrived (here a Go
// ML-KEM hello, about 1.8 KB) costs the peek one read of the socket: the
// first-byte wait takes all there is, and the fast path parses the
// recording.
func TestHelloOneRead(t *testing.T) {
	h := goHello(t, "www.allowed.test", nil)
	cr := &countingReader{r: bytes.NewReader(h)}
	rc := &recorder{r: cr, max: 64 << 10}
	if err := rc.fill(1); err != nil {
		t.Fatal(err)
	}
	ch, err := readClientHello(rc)
	if err != nil || ch.ServerName != "www.allowed.test" {
		t.Fatalf("hello: %q, %v", ch.ServerName, err)
	}
	if cr.reads != 1 {
		t.Errorf("%d reads for a %d-byte hello that was all there, want 1", cr.reads, len(h))
	}
	if !bytes.Equal(rc.buf, h) {
		t.Error("recorded bytes differ from the hello")
	}
}

// piecesReader is a connection on which the client's bytes arrive in
// pieces: each Read returns what is left of the next piece (at most len(p)
// bytes), then EOF. It counts the reads.
type piecesReader struct {
	pieces [][]byte
	reads  int
}

func (r *piecesReader) Read(p []byte) (int, error) {
	r.reads++
	if len(r.pieces) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.pieces[0])
	if r.pieces[0] = r.pieces[0][n:]; len(r.pieces[0]) == 0 {
		r.pieces = r.pieces[1:]
	}
	return n, nil
}

// cutAt cuts b before each offset.
func cutAt(b []byte, offsets ...int) [][]byte {
	var out [][]byte
	prev := 0
	for _, o := range offsets {
		out = append(out, b[prev:o])
		prev = o
	}
	return append(out, b[prev:])
}

// TestHelloInPieces: a hello whose first read holds only its start (a
// ~1.8 KB ML-KEM hello spans two TCP segments) is read on as far as it
// goes and parsed by the fast path, in one read per piece; the recording
// is exactly the bytes sent. A hello the fast path does not take, or one
// dribbled in more pieces than maxHelloFills, still goes to crypto/tls.
func TestHelloInPieces(t *testing.T) {
	h := goHello(t, "www.allowed.test", nil)
	if len(h) < 1500 {
		t.Fatalf("a %d-byte hello: not an ML-KEM hello", len(h))
	}
	recs := refragment(h, 512) // records of 517 bytes
	small := refragment(h, 1)  // 6 bytes a handshake byte
	// Framing tlshello takes but not as Plain (crypto/tls confirms): a
	// record version other than 3.x.
	oddVersion := append([]byte{0x16, 0x0a}, h[2:]...)
	// An extension tlshello does not know (crypto/tls confirms), in a hello
	// of 2 KB.
	unknownExt := buildHello(sniExt("www.allowed.test"), ext(0x1234, make([]byte, 1500)))
	var dribble []int
	for o := 10; o < len(h); o += 10 {
		dribble = append(dribble, o)
	}
	for _, c := range []struct {
		name  string
		in    []byte
		cuts  []int
		fast  bool // the fast path reads it
		reads int  // reads of the connection, when fast
	}{
		{"after-1000", h, []int{1000}, true, 2},
		{"in-record-header", h, []int{3}, true, 2},
		{"after-record-header", h, []int{5}, true, 2},
		{"in-handshake-header", h, []int{7}, true, 2},
		{"last-byte-missing", h, []int{len(h) - 1}, true, 2},
		{"three-pieces", h, []int{700, 1400}, true, 3},
		{"records/in-a-later-body", recs, []int{2*517 + 100}, true, 2},
		{"records/at-a-boundary", recs, []int{2 * 517}, true, 2},
		{"records/in-a-later-header", recs, []int{2*517 + 2}, true, 2},
		{"1-byte-records", small, []int{4000, 8000}, true, 3},
		{"record-version-0x0a03", oddVersion, []int{1000}, false, 0},
		{"unknown-extension", unknownExt, []int{1000}, false, 0},
		{"dribbled", h, dribble, false, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			pieces := cutAt(c.in, c.cuts...)
			if _, err := tlshello.Read(pieces[0], nil); err != tlshello.ErrShort {
				t.Fatalf("the first piece: %v, want tlshello.ErrShort", err)
			}
			r := &piecesReader{pieces: pieces}
			rc := &recorder{r: r, max: 64 << 10}
			if err := rc.fill(1); err != nil { // as peek does
				t.Fatal(err)
			}
			ch, err := readClientHello(rc)
			if err != nil || ch.ServerName != "www.allowed.test" {
				t.Fatalf("hello: %q, %v", ch.ServerName, err)
			}
			if ch.Fast != c.fast {
				t.Errorf("read by the fast path: %v, want %v", ch.Fast, c.fast)
			}
			if c.fast && r.reads != c.reads {
				t.Errorf("%d reads for %d pieces, want %d", r.reads, len(pieces), c.reads)
			}
			if !bytes.Equal(rc.buf, c.in[:len(rc.buf)]) || (c.fast && len(rc.buf) != len(c.in)) {
				t.Errorf("recorded %d bytes that are not the %d sent", len(rc.buf), len(c.in))
			}
			if c.name == "dribbled" && r.reads <= maxHelloFills+1 {
				t.Errorf("%d reads: crypto/tls read nothing after the fast path gave up", r.reads)
			}
		})
	}
}

// TestHelloInPiecesErrors: when the rest of a hello cut by the first read
// does not come (EOF, a read deadline, the size cap) or turns out
// malformed, readClientHello fails as readClientHelloTLS alone does on the
// same connection (the same class of error, the same bytes recorded),
// except where tlshello refuses what it has recorded before crypto/tls
// would (own): a record over 16384 bytes is malformed at once, as capture
// says, where crypto/tls reads up to 18432 bytes of it first.
func TestHelloInPiecesErrors(t *testing.T) {
	h := goHello(t, "www.allowed.test", nil)
	serverHello := bytes.Clone(h)
	serverHello[5] = 2
	for _, c := range []struct {
		name   string
		pieces [][]byte
		max    int
		err    error // nil: compared with readClientHelloTLS only
		own    bool  // tlshello refuses it before crypto/tls would
	}{
		{"eof", [][]byte{h[:1000]}, 64 << 10, nil, false},
		{"eof-in-record-header", [][]byte{h[:3]}, 64 << 10, nil, false},
		{"size-cap", cutAt(h, 1000), 1500, errHelloTooLarge, false},
		{"server-hello", cutAt(serverHello, 3), 64 << 10, errHelloMalformed, false},
		{"record-16385", [][]byte{{0x16, 0x03}, {0x01, 0x40, 0x01}, make([]byte, 1000)}, 64 << 10, errHelloMalformed, true},
		{"record-18433", [][]byte{{0x16, 0x03}, {0x01, 0x48, 0x01}, make([]byte, 1000)}, 64 << 10, errHelloMalformed, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var (
				errs [2]error
				recs [2][]byte
			)
			for i, read := range []func(*recorder) (clientHello, error){readClientHello, readClientHelloTLS} {
				rc := &recorder{r: &piecesReader{pieces: slices.Clone(c.pieces)}, max: c.max}
				if err := rc.fill(1); err != nil {
					t.Fatal(err)
				}
				_, errs[i] = read(rc)
				recs[i] = rc.buf
			}
			if errs[0] == nil || (c.err != nil && !errors.Is(errs[0], c.err)) {
				t.Fatalf("err %v, want %v", errs[0], c.err)
			}
			if c.own {
				return
			}
			if errClass(errs[0]) != errClass(errs[1]) {
				t.Errorf("err %v; crypto/tls alone: %v", errs[0], errs[1])
			}
			if !bytes.Equal(recs[0], recs[1]) {
				t.Errorf("recorded %d bytes; crypto/tls alone %d", len(recs[0]), len(recs[1]))
			}
		})
	}

	// A client that stops sending after part of its hello (a slowloris):
	// the read deadline ends the fast path's read and crypto/tls's alike.
	t.Run("deadline", func(t *testing.T) {
		c1, c2 := net.Pipe()
		defer c1.Close()
		defer c2.Close()
		go c1.Write(h[:1000])
		c2.SetReadDeadline(time.Now().Add(5 * time.Second))
		rc := &recorder{r: c2, max: 64 << 10}
		if err := rc.fill(1); err != nil {
			t.Fatal(err)
		}
		c2.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := readClientHello(rc)
		if !isTimeout(err) {
			t.Fatalf("err %v, want a timeout", err)
		}
		if !bytes.Equal(rc.buf, h[:1000]) {
			t.Errorf("recorded %d bytes, want the 1000 sent", len(rc.buf))
		}
	})
}

// checkAgreesWithTLSHello: readClientHello's verdict (ch, err) on the bytes rc
// recorded is tlshello.Read's on them, which is capture's: the same server
// name when both take the hello, duplicate-sni, hello-malformed and
// hello-too-large exactly where tlshello says so. A hello tlshello leaves
// short ended in a read error (or the recorder's cap).
func checkAgreesWithTLSHello(t *testing.T, rc *recorder, ch clientHello, err error) {
	t.Helper()
	h, herr := tlshello.Read(rc.buf, nil)
	switch {
	case herr == tlshello.ErrShort:
		if err == nil || errors.Is(err, errHelloMalformed) || errors.Is(err, errDuplicateSNI) {
			t.Fatalf("tlshello: short; the peek: %v: %x", err, rc.buf)
		}
	case herr == tlshello.ErrTooLarge:
		if !errors.Is(err, errHelloTooLarge) {
			t.Fatalf("tlshello: too large; the peek: %v: %x", err, rc.buf)
		}
	case herr != nil && h.DupSNI:
		if !errors.Is(err, errDuplicateSNI) {
			t.Fatalf("tlshello: two server names; the peek: %v: %x", err, rc.buf)
		}
	case herr != nil:
		if !errors.Is(err, errHelloMalformed) {
			t.Fatalf("tlshello: %v; the peek: %v: %x", herr, err, rc.buf)
		}
	case err != nil:
		t.Fatalf("tlshello takes it (%+v); the peek: %v: %x", h, err, rc.buf)
	case ch.ServerName != h.SNI:
		t.Fatalf("tlshello reads %q; the peek %q: %x", h.SNI, ch.ServerName, rc.buf)
	}
}

// errClass is the class of a peek error, as peek maps it to a reason, or
// the error itself for a read error.
func errClass(err error) error {
	for _, e := range []error{errDuplicateSNI, errHelloTooLarge, errHelloMalformed} {
		if errors.Is(err, e) {
			return e
		}
	}
	return err
}
