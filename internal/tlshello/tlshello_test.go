package tlshello

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"egressd/internal/tlshello/hellotest"
)

// tlsResult is what crypto/tls reads of a hello, up to its
// GetConfigForClient hook.
type tlsResult struct {
	ServerName string
	ECH        bool // an encrypted_client_hello or ESNI extension
	ALPN       []string
}

// tlsHello lets crypto/tls read the hello at the start of b, as a server
// handshake whose GetConfigForClient hook stops it. more: crypto/tls
// wanted more bytes than b holds.
func tlsHello(b []byte) (res tlsResult, err error, more bool) {
	errStop := errors.New("stop")
	got := false
	cfg := &tls.Config{GetConfigForClient: func(info *tls.ClientHelloInfo) (*tls.Config, error) {
		got = true
		res.ServerName = info.ServerName
		res.ALPN = info.SupportedProtos
		for _, e := range info.Extensions {
			res.ECH = res.ECH || e == extECH || e == extESNI
		}
		return nil, errStop
	}}
	herr := tls.Server(readOnlyConn{bytes.NewReader(b)}, cfg).Handshake()
	if got {
		return res, nil, false
	}
	return res, herr, errors.Is(herr, io.EOF) || errors.Is(herr, io.ErrUnexpectedEOF)
}

// readOnlyConn is a net.Conn that reads from r and discards writes.
type readOnlyConn struct{ r io.Reader }

func (c readOnlyConn) Read(p []byte) (int, error)     { return c.r.Read(p) }
func (readOnlyConn) Write(p []byte) (int, error)      { return len(p), nil }
func (readOnlyConn) Close() error                     { return nil }
func (readOnlyConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (readOnlyConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (readOnlyConn) SetDeadline(time.Time) error      { return nil }
func (readOnlyConn) SetReadDeadline(time.Time) error  { return nil }
func (readOnlyConn) SetWriteDeadline(time.Time) error { return nil }

// otherRecordFirst reports whether a record of another type than
// handshake comes in b before the handshake records hold a whole message:
// crypto/tls skips warning alerts there, Read refuses them.
func otherRecordFirst(b []byte) bool {
	hs := 0
	for len(b) >= 5 {
		if b[0] != recordHandshake {
			return true
		}
		n := int(b[3])<<8 | int(b[4])
		if len(b) < 5+n {
			return false
		}
		if hs == 0 && n >= 4 {
			m := 4 + (int(b[6])<<16 | int(b[7])<<8 | int(b[8]))
			if n >= m {
				return false
			}
		}
		hs += n
		b = b[5+n:]
	}
	return false
}

// checkAgrees is Read's contract with crypto/tls, on any bytes: it never
// panics nor modifies b, reads the same with and without scratch, and
// where crypto/tls decides (it wants no more bytes) and the hello is within
// MaxBytes, Read takes b exactly when crypto/tls does (except records of
// another type among the hello's, which Read alone refuses) and reads the
// same server name and ECH flag. A second server name is a hello both
// refuse. A hello Read leaves short is one crypto/tls does not take.
func checkAgrees(t testing.TB, b []byte) (Hello, error) {
	t.Helper()
	orig := bytes.Clone(b)
	h, err := Read(b, nil)
	scratch := []byte{1, 2, 3}
	h2, err2 := Read(b, &scratch)
	if !bytes.Equal(b, orig) {
		t.Fatalf("Read modified its input")
	}
	if h != h2 || err != err2 {
		t.Fatalf("Read with scratch %+v %v, without %+v %v", h2, err2, h, err)
	}
	if h.DupSNI && err == nil {
		t.Fatalf("two server names, and taken: %x", b)
	}
	if errors.Is(err, ErrTooLarge) {
		return h, err
	}
	res, terr, more := tlsHello(b)
	switch {
	case errors.Is(err, ErrShort):
		if terr == nil {
			t.Fatalf("crypto/tls takes a hello Read says is short: %x", b)
		}
	case more:
		if err == nil {
			t.Fatalf("Read takes a hello crypto/tls wants more of: %x", b)
		}
	case err == nil && terr != nil:
		t.Fatalf("Read takes a hello crypto/tls refuses (%v): %x", terr, b)
	case err != nil && terr == nil && !otherRecordFirst(b):
		t.Fatalf("Read refuses (%v, %+v) a hello crypto/tls takes (%+v): %x", err, h, res, b)
	case err == nil && (h.SNI != res.ServerName || h.ECH != res.ECH):
		t.Fatalf("Read read %+v, crypto/tls %+v: %x", h, res, b)
	}
	return h, err
}

// checkPlain is checkAgrees, and reports whether Read takes b as Plain:
// the hellos the proxy takes without asking crypto/tls.
func checkPlain(t testing.TB, b []byte) (Hello, bool) {
	t.Helper()
	h, err := checkAgrees(t, b)
	return h, err == nil && h.Plain
}

// namedHello is a ClientHello for the tables and the fuzz seeds.
type namedHello struct {
	name string
	b    []byte
}

// realHello is a hello a real client sends and what it carries.
type realHello struct {
	namedHello
	sni  string
	alpn []string
	ech  bool
}

// realHellos are the hellos of real clients the fast path must take (it
// saves nothing otherwise). The curl hello was recorded from curl 7.88.1
// with OpenSSL 3.0 connecting to a local listener.
func realHellos(tb testing.TB) []realHello {
	h2 := []string{"h2", "http/1.1"}
	curl, err := os.ReadFile("testdata/clienthello-curl7.88-openssl3.0.bin")
	if err != nil {
		tb.Fatal(err)
	}
	return []realHello{
		{namedHello{"go", goHello(tb, "www.allowed.test", nil)}, "www.allowed.test", nil, false},
		{namedHello{"go-alpn-mlkem", goHello(tb, "www.allowed.test", &tls.Config{NextProtos: h2})}, "www.allowed.test", h2, false},
		{namedHello{"go-alpn-x25519", goHello(tb, "www.allowed.test", &tls.Config{NextProtos: h2,
			CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256}})}, "www.allowed.test", h2, false},
		{namedHello{"go-tls12", goHello(tb, "www.allowed.test", &tls.Config{NextProtos: h2, MaxVersion: tls.VersionTLS12})}, "www.allowed.test", h2, false},
		{namedHello{"go-no-sni", goHello(tb, "192.0.2.1", &tls.Config{NextProtos: []string{"http/1.1"}})}, "", []string{"http/1.1"}, false},
		{namedHello{"go-psk", resumedHello(tb, tls.VersionTLS13)}, "www.allowed.test", h2, false},
		{namedHello{"go-tls12-ticket", resumedHello(tb, tls.VersionTLS12)}, "www.allowed.test", h2, false},
		{namedHello{"go-ech-outer", goHello(tb, "secret.allowed.test", &tls.Config{NextProtos: h2,
			EncryptedClientHelloConfigList: echConfigList(tb, "public.allowed-ech.test")})}, "public.allowed-ech.test", h2, true},
		{namedHello{"curl-openssl", curl}, "www.allowed.test", h2, false},
		{namedHello{"chrome-grease", chromeHello("www.allowed.test")}, "www.allowed.test", h2, true},
		{namedHello{"chrome-100-byte-records", refragment(chromeHello("www.allowed.test"), 100)}, "www.allowed.test", h2, true},
		{namedHello{"ech-outer", buildHello(sniExt("public.example"), echOuterExt())}, "public.example", nil, true},
	}
}

// helloSeeds are the fuzz seeds: the proxy's FuzzClientHello's, the real hellos, the
// captures' hellos, and each one's extension block alone (the fuzz target
// also reads its input as an extension block, see FuzzReadAgreesWithCryptoTLS).
func helloSeeds(tb testing.TB) [][]byte {
	seeds := [][]byte{
		goHello(tb, "www.allowed.test", nil),
		refragment(goHello(tb, "a.test", nil), 3),
		buildHello(sniExt("allowed.test"), sniExt("evil.test")),
		buildHello(sniExt("allowed.test", "evil.test")),
		buildHello(sniExt("a.test.")),
		buildHello(sniExt("public.example"), echOuterExt()),
		{0x16, 0x03, 0x01, 0xff, 0xff},
		{0x16, 0x03, 0x01, 0x00, 0x00},
	}
	for _, h := range realHellos(tb) {
		seeds = append(seeds, h.b)
	}
	for _, h := range captureHellos(tb) {
		seeds = append(seeds, h.b)
	}
	for _, s := range slices.Clone(seeds) {
		if e, ok := extBlock(s); ok {
			seeds = append(seeds, e)
		}
	}
	// Small extension blocks: one well-formed instance of each extension
	// type the fast path checks, then all of them in one block.
	var all []byte
	for _, e := range extSamples() {
		seeds = append(seeds, e)
		all = append(all, e...)
	}
	return append(seeds, all)
}

// extSamples are one well-formed instance of each extension type the fast
// path checks or skips, pre_shared_key last.
func extSamples() [][]byte {
	return [][]byte{
		sniExt("www.allowed.test"),
		ext(extStatusRequest, []byte{1, 0, 0, 0, 0}),
		ext(extSupportedGroups, []byte{0, 4, 0x11, 0xec, 0, 0x1d}),
		ext(extECPointFormats, []byte{1, 0}),
		ext(extSignatureAlgs, []byte{0, 4, 4, 3, 8, 4}),
		ext(extSignatureAlgsCert, []byte{0, 2, 4, 3}),
		ext(extALPN, []byte{0, 3, 2, 'h', '2'}),
		ext(extSCT, nil),
		ext(extExtendedMaster, nil),
		ext(extSessionTicket, []byte{1, 2, 3}),
		ext(extEarlyData, nil),
		ext(extSupportedVersions, []byte{2, 3, 4}),
		ext(extCookie, []byte{0, 1, 9}),
		ext(extPSKModes, []byte{1, 1}),
		ext(extKeyShare, []byte{0, 6, 0, 0x1d, 0, 2, 7, 7}),
		ext(extQUICTransportParam, []byte{1, 2}),
		ext(extRenegotiationInfo, []byte{0}),
		ext(21, []byte{0, 0, 0}),
		ext(0x1a1a, nil),
		echOuterExt(),
		ext(extPreSharedKey, []byte{0, 7, 0, 1, 'x', 0, 0, 0, 1, 0, 3, 2, 5, 5}),
	}
}

// FuzzReadAgreesWithCryptoTLS holds Read to crypto/tls (checkAgrees), on
// any input: as recorded bytes, and, so that the fuzzer reaches the
// extension checks without first having to get the framing right, as the
// extension block of an otherwise well-formed hello. The proxy and capture
// both read hellos with Read: a hello it takes and crypto/tls refuses, or
// one it reads another name from, is a parser differential (THREATS.md
// A5); one it refuses and crypto/tls takes is a flow egressd cuts for
// nothing, in enforce mode and in the audit report alike.
func FuzzReadAgreesWithCryptoTLS(f *testing.F) {
	for _, s := range helloSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkAgrees(t, b)
		if h, ok := helloWithExtBlock(b); ok {
			checkAgrees(t, h)
		}
	})
}

// TestRealHellos: Read takes the hellos real clients send as Plain (the
// proxy saves nothing otherwise) and reads them as crypto/tls does.
func TestRealHellos(t *testing.T) {
	for _, c := range realHellos(t) {
		t.Run(c.name, func(t *testing.T) {
			h, ok := checkPlain(t, c.b)
			if !ok {
				t.Fatalf("not Plain (extensions %v)", extTypes(c.b))
			}
			res, _, _ := tlsHello(c.b)
			if h.SNI != c.sni || h.ECH != c.ech || !slices.Equal(res.ALPN, c.alpn) {
				t.Errorf("got %+v (crypto/tls ALPN %q), want SNI %q ALPN %q ECH %v", h, res.ALPN, c.sni, c.alpn, c.ech)
			}
		})
	}
}

// TestThreats: THREATS.md A5's odd names. Read takes only the IP literal
// and upper case as Plain; the others are refused, as crypto/tls refuses
// them, or taken but not Plain, so the proxy has crypto/tls confirm them.
func TestThreats(t *testing.T) {
	const (
		notPlain = iota // Read must not take it as Plain
		plain           // Read must take it as Plain, reading it as crypto/tls
	)
	const (
		ok  = iota // taken
		dup        // malformed, two server names
		bad        // malformed
	)
	nameType1 := ext(0, []byte{0x00, 0x0e, 0x01, 0x00, 0x0b, 'e', 'v', 'i', 'l', '.', 'e', 'x', 'a', 'm', 'p', 'l'})
	mixed := ext(0, []byte{0x00, 0x1d, 0x00, 0x00, 0x0c, 'a', 'l', 'l', 'o', 'w', 'e', 'd', '.', 't', 'e', 's', 't',
		0x01, 0x00, 0x0b, 'e', 'v', 'i', 'l', '.', 'e', 'x', 'a', 'm', 'p', 'l'})
	for _, c := range []struct {
		name    string
		in      []byte
		want    int
		verdict int
	}{
		{"dup-ext", buildHello(sniExt("allowed.test"), sniExt("evil.test")), notPlain, dup},
		{"dup-entry", buildHello(sniExt("allowed.test", "evil.test")), notPlain, dup},
		{"dup-empty-ext-then-name", buildHello(ext(0, []byte{0, 0}), sniExt("evil.test")), notPlain, dup},
		{"trailing-dot", buildHello(sniExt("allowed.test.")), notPlain, bad},
		{"nul", buildHello(sniExt("allowed.test\x00.evil.example")), notPlain, ok},
		{"non-ascii", buildHello(sniExt("allowed.tést")), notPlain, ok},
		{"high-byte", buildHello(sniExt("allowed.t\xffst")), notPlain, ok},
		{"empty-name", buildHello(sniExt("")), notPlain, bad},
		{"name-type-1", buildHello(nameType1), notPlain, ok},
		{"host-and-type-1", buildHello(mixed), notPlain, ok},
		{"leading-dot", buildHello(sniExt(".allowed.test")), notPlain, ok},
		{"empty-label", buildHello(sniExt("allowed..test")), notPlain, ok},
		{"port", buildHello(sniExt("allowed.test:443")), notPlain, ok},
		{"space", buildHello(sniExt("allowed.test evil.example")), notPlain, ok},
		{"ipv6-literal", buildHello(sniExt("2001:db8::1")), notPlain, ok},
		{"too-long", buildHello(sniExt(strings.Repeat("a.", 127) + "test")), notPlain, ok},
		{"ip-literal", buildHello(sniExt("104.236.167.107")), plain, ok},
		{"upper-case", buildHello(sniExt("WWW.Allowed.TEST")), plain, ok},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, isPlain := checkPlain(t, c.in)
			if isPlain != (c.want == plain) {
				t.Errorf("Plain: %v", isPlain)
			}
			_, err := Read(c.in, nil)
			got := ok
			switch {
			case err != nil && h.DupSNI:
				got = dup
			case err != nil:
				got = bad
			}
			if got != c.verdict {
				t.Errorf("Read: %+v, %v", h, err)
			}
		})
	}
}

// TestSkippedExtensions: every extension type a Plain hello may carry
// unread is one crypto/tls ignores too, whatever its body. A Go release that
// starts checking one of them fails here, before it can open a differential.
func TestSkippedExtensions(t *testing.T) {
	n := 0
	for typ := 0; typ <= 0xffff; typ++ {
		if !skippedExt(uint16(typ)) {
			continue
		}
		n++
		for _, body := range [][]byte{nil, {0xff}, {0x00, 0x05, 0x01, 0x02}, bytes.Repeat([]byte{0xfe}, 300)} {
			h := buildHello(sniExt("a.test"), ext(uint16(typ), body))
			res, err, _ := tlsHello(h)
			if err != nil || res.ServerName != "a.test" {
				t.Errorf("crypto/tls does not ignore extension %#04x with body %x: %v", typ, body, err)
			}
			if _, ok := checkPlain(t, h); !ok {
				t.Errorf("extension %#04x makes a hello not Plain", typ)
			}
		}
	}
	if n != 12+16 {
		t.Errorf("%d skipped types, want 12 named and 16 GREASE", n)
	}
}

// TestEveryExtension: a well-formed instance of each extension type Read
// checks is taken as Plain, alone and all together, and read as crypto/tls
// reads it.
func TestEveryExtension(t *testing.T) {
	var all []byte
	for _, e := range extSamples() {
		all = append(all, e...)
		h, _ := helloWithExtBlock(e)
		if _, ok := checkPlain(t, h); !ok {
			t.Errorf("extension %x is not Plain", e)
		}
	}
	h, _ := helloWithExtBlock(all)
	if ch, ok := checkPlain(t, h); !ok || ch.SNI != "www.allowed.test" || !ch.ECH {
		t.Errorf("all extensions: %+v, %v", ch, ok)
	}
}

// TestExtensionEdges: each extension type Read checks, well-formed and at
// the edges of crypto/tls's rules (empty lists, empty entries, odd lengths,
// a byte too many or too few, a changed byte), alone and among the others,
// is taken or refused as crypto/tls takes or refuses it.
func TestExtensionEdges(t *testing.T) {
	edges := []struct {
		typ  uint16
		body []byte
	}{
		{extServerName, []byte{0, 0}},
		{extServerName, []byte{0, 3, 0, 0, 0}},
		{extServerName, []byte{0, 4, 0, 0, 1, 'a', 0}},
		{extALPN, []byte{0, 1, 0}},
		{extALPN, []byte{0, 0}},
		{extALPN, []byte{0, 4, 1, 'a', 1, 'b'}},
		{extALPN, []byte{0, 3, 1, 'a', 0}},
		{extKeyShare, []byte{0, 0}},
		{extKeyShare, []byte{0, 4, 0, 0x1d, 0, 0}},
		{extKeyShare, []byte{0, 5, 0, 0x1d, 0, 1, 1, 0}},
		{extSupportedGroups, []byte{0, 0}},
		{extSupportedGroups, []byte{0, 3, 0, 0x1d, 0}},
		{extSignatureAlgs, []byte{0, 0}},
		{extSignatureAlgs, []byte{0, 1, 4}},
		{extSignatureAlgsCert, []byte{0, 0}},
		{extSignatureAlgsCert, []byte{0, 3, 4, 3, 8}},
		{extECPointFormats, []byte{0}},
		{extSupportedVersions, []byte{0}},
		{extSupportedVersions, []byte{1, 3}},
		{extSupportedVersions, []byte{3, 3, 4, 3}},
		{extCookie, []byte{0, 0}},
		{extPSKModes, []byte{0}},
		{extRenegotiationInfo, []byte{1, 0}},
		{extStatusRequest, []byte{1, 0, 0, 0, 0, 0}},
		{extStatusRequest, []byte{1, 0, 0, 0}},
		{extExtendedMaster, []byte{0}},
		{extSCT, []byte{0}},
		{extEarlyData, []byte{0}},
		{extSessionTicket, nil},
		{extQUICTransportParam, nil},
		{extPreSharedKey, []byte{0, 6, 0, 0, 0, 0, 0, 0, 0, 2, 1, 5}},   // empty label
		{extPreSharedKey, []byte{0, 7, 0, 1, 'x', 0, 0, 0, 1, 0, 0}},    // no binders
		{extPreSharedKey, []byte{0, 7, 0, 1, 'x', 0, 0, 0, 1, 0, 1, 0}}, // empty binder
		{extPreSharedKey, []byte{0, 0, 0, 2, 1, 5}},                     // no identities
		{extECH, nil},
		{extECH, []byte{1}},
		{extECH, []byte{2}},
		{extECH, []byte{0, 0, 1, 0, 1, 1, 0, 0, 0, 0}},
		{extECH, []byte{0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 9}},
	}
	var exts [][]byte
	for _, e := range extSamples() {
		exts = append(exts, e)
	}
	for _, e := range edges {
		exts = append(exts, ext(e.typ, e.body))
	}
	// Each extension, then variants: every byte of its body set to 0, 1,
	// 0xff or off by one; the body cut short or one byte longer.
	check := func(e []byte) {
		for _, block := range [][]byte{
			e,
			append(sniExt("a.test"), e...),
			append(bytes.Clone(e), ext(extSCT, nil)...), // not last (pre_shared_key must be)
			append(bytes.Clone(e), e...),                // twice
		} {
			if h, ok := helloWithExtBlock(block); ok {
				checkAgrees(t, h)
			}
		}
	}
	for _, e := range exts {
		typ, body := e[:2], e[4:]
		check(e)
		for i := range body {
			for _, v := range []byte{0, 1, 0xff, body[i] + 1, body[i] - 1} {
				b := bytes.Clone(body)
				b[i] = v
				check(ext(binary.BigEndian.Uint16(typ), b))
			}
			check(ext(binary.BigEndian.Uint16(typ), body[:i]))
		}
		check(ext(binary.BigEndian.Uint16(typ), append(bytes.Clone(body), 0)))
	}
}

// TestFraming: the record and handshake limits crypto/tls applies to the
// first message are applied by Read too, and MaxBytes; odd framing crypto/tls
// takes is taken but not Plain.
func TestFraming(t *testing.T) {
	// padded is a ClientHello message (with its header) of exactly n bytes
	// after the header, the rest padding.
	padded := func(n int) []byte {
		body := append([]byte{0x03, 0x03}, make([]byte, 32)...)
		body = append(body, 0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00)
		pad := n - len(body) - 2 - 4
		e := ext(21, make([]byte, pad))
		body = binary.BigEndian.AppendUint16(body, uint16(len(e)))
		body = append(body, e...)
		return append([]byte{typeClientHello, byte(n >> 16), byte(n >> 8), byte(n)}, body...)
	}
	alert := []byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 90} // warning, user_canceled: crypto/tls skips it
	// records cuts a handshake message into records of at most n bytes.
	records := func(hs []byte, n int) []byte {
		var out []byte
		for len(hs) > 0 {
			k := min(n, len(hs))
			out = binary.BigEndian.AppendUint16(append(out, 0x16, 0x03, 0x01), uint16(k))
			out = append(out, hs[:k]...)
			hs = hs[k:]
		}
		return out
	}
	oddSuites := rawHello([]byte{0x00, 0x03, 0x13, 0x01, 0x13}, sniExt("a.test"))
	ccs := []byte{0x14, 0x03, 0x01, 0x00, 0x01, 0x01}
	go12 := goHello(t, "a.test", &tls.Config{MaxVersion: tls.VersionTLS12})
	oldVersion := bytes.Clone(go12)
	oldVersion[1], oldVersion[2] = 0, 2 // crypto/tls takes any record version below 16.0
	// The largest hello within MaxBytes in records of 16384 bytes: 4
	// records (20 header bytes) and 65516 bytes of message.
	largest := records(padded(MaxBytes-20-4), 16384)
	for _, c := range []struct {
		name  string
		in    []byte
		err   error
		plain bool
	}{
		{"record-16384", records(padded(16380), 16384), nil, true},
		{"record-16385", records(padded(16381), 16385), ErrMalformed, false},
		{"largest", largest, nil, true},
		{"largest-in-one-more-record", records(padded(MaxBytes-20-4), 16000), ErrTooLarge, false},
		{"one-byte-over", records(padded(MaxBytes-20-4+1), 16384), ErrTooLarge, false},
		{"message-65536", records(padded(65536), 16384), ErrTooLarge, false},
		{"message-65537", records(padded(65537), 16384), ErrTooLarge, false},
		{"odd-cipher-suites", oddSuites, ErrMalformed, false},
		{"empty-record-first", append([]byte{0x16, 0x03, 0x01, 0x00, 0x00}, go12...), ErrMalformed, false},
		{"ccs-between-fragments", append(append(refragment(go12, 100)[:105], ccs...), refragment(go12, 100)[105:]...), ErrMalformed, false},
		{"alert-between-fragments", append(append(refragment(go12, 100)[:105], alert...), refragment(go12, 100)[105:]...), ErrMalformed, false},
		{"alert-first", append(bytes.Clone(alert), go12...), ErrMalformed, false},
		{"record-version-0x0a03", append([]byte{0x16, 0x0a, 0x03}, go12[3:]...), nil, false},
		{"record-version-0x0002", oldVersion, nil, false},
		{"record-version-0x1003", append([]byte{0x16, 0x10, 0x03}, go12[3:]...), ErrMalformed, false},
		{"server-hello-type", append(append([]byte(nil), go12[:5]...), append([]byte{0x02}, go12[6:]...)...), ErrMalformed, false},
		{"second-message-in-record", records(append(bytes.Clone(go12[5:]), 0x01, 0x00, 0x00, 0x00), 16384), nil, false},
		{"record-longer-than-sent", append(append([]byte(nil), go12[:3]...), append(binary.BigEndian.AppendUint16(nil, uint16(len(go12)-5+10)), go12[5:]...)...), ErrShort, false},
		{"bytes-after-the-record", append(bytes.Clone(go12), 0x17, 0x03, 0x03, 0x00, 0x01, 0xff), nil, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, err := checkAgrees(t, c.in)
			if err != c.err || (err == nil && h.Plain) != c.plain {
				_, terr, _ := tlsHello(c.in)
				t.Errorf("Read: %+v, %v; want %v, Plain %v (crypto/tls: %v)", h, err, c.err, c.plain, terr)
			}
		})
	}
}

// TestMutations: every one-byte change, deletion and truncation of a few
// real hellos is taken or refused as crypto/tls takes or refuses it, and
// read as it reads it (a deterministic complement to the fuzz target).
func TestMutations(t *testing.T) {
	var seeds [][]byte
	for _, h := range realHellos(t) {
		switch h.name {
		case "go-alpn-x25519", "go-psk", "go-tls12-ticket", "curl-openssl", "ech-outer":
			seeds = append(seeds, h.b)
		}
	}
	seeds = append(seeds, refragment(seeds[0], 40))
	for _, h := range seeds {
		for i := range h {
			for _, v := range []byte{0x00, 0xff, h[i] + 1, h[i] - 1} {
				m := bytes.Clone(h)
				m[i] = v
				checkAgrees(t, m)
			}
			checkAgrees(t, slices.Delete(bytes.Clone(h), i, i+1))
			if _, err := checkAgrees(t, h[:i]); err != ErrShort {
				t.Fatalf("the first %d bytes of a %d-byte hello: %v, want ErrShort", i, len(h), err)
			}
		}
	}
}

// TestCaptures: the ClientHellos in the real captures (read in place) are
// read as crypto/tls reads them, and each one crypto/tls takes is Plain,
// except those with a legacy ESNI extension (0xffce, Firefox 2018-2020),
// which the proxy has crypto/tls confirm, and QUIC draft hellos, whose
// transport parameters have the drafts' codepoint (0xffa5, unknown to
// crypto/tls, so not Plain; no client sends it over TCP).
func TestCaptures(t *testing.T) {
	hellos := captureHellos(t)
	if len(hellos) == 0 {
		abs, _ := filepath.Abs(capturesDir)
		t.Fatalf("no ClientHellos found in %s (the shared corpus must be checked out beside the repository)", abs)
	}
	for _, h := range hellos {
		ch, ok := checkPlain(t, h.b)
		_, err, _ := tlsHello(h.b)
		exts := extTypes(h.b)
		t.Logf("%s: Plain %v %+v; crypto/tls error %v; extensions %v", h.name, ok, ch, err, exts)
		esni := slices.ContainsFunc(exts, func(e string) bool {
			return strings.HasPrefix(e, "0xffce/") || strings.HasPrefix(e, "0xffa5/")
		})
		if err == nil && !ok && !esni {
			t.Errorf("%s: not Plain (extensions %v)", h.name, exts)
		}
	}
}

// TestCaptureHellosMatchTshark: the fuzz targets are seeded with every
// ClientHello of the real captures (THREATS.md C3): captureHellos finds in
// each file at least as many as tshark counts there (tshark-counts.tsv),
// those over QUIC included. It may find more: tshark does not read TLS on
// port 80 nor a hello with a segment missing.
func TestCaptureHellosMatchTshark(t *testing.T) {
	tsv, err := os.ReadFile(filepath.Join(capturesDir, "tshark-counts.tsv"))
	if err != nil {
		t.Fatalf("the real captures are missing (%v): they are expected in %s, read in place", err, capturesDir)
	}
	found := map[string]int{}
	for _, h := range captureHellos(t) {
		file, _, _ := strings.Cut(h.name, "#")
		found[file]++
	}
	files := 0
	for _, line := range strings.Split(strings.TrimSpace(string(tsv)), "\n")[1:] {
		fs := strings.Split(line, "\t")
		want, err := strconv.Atoi(fs[3])
		if err != nil || len(fs) != 12 {
			t.Fatalf("tshark-counts.tsv: bad line %q", line)
		}
		if want > 0 {
			files++
		}
		if got := found[filepath.Base(fs[0])]; got < want {
			t.Errorf("%s: %d ClientHellos found, tshark counts %d", fs[0], got, want)
		}
	}
	if files < 16 {
		t.Errorf("tshark counts ClientHellos in %d files, want at least 16", files)
	}
}

// ---- hello sources ----

// chromeHello is shaped like a Chrome 131+ ClientHello: GREASE cipher
// suite, extensions, group, key share and version, an ML-KEM key share, ALPS
// and a GREASE ECH extension (about 1.9 KB).
func chromeHello(sni string) []byte {
	grease := func(i int) uint16 { g := uint16(i)<<4 | 0x0a; return g<<8 | g }
	u16s := func(prefix int, vs ...uint16) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.BigEndian.AppendUint16(b, v)
		}
		if prefix == 1 {
			return append([]byte{byte(len(b))}, b...)
		}
		return append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)
	}
	var ks []byte
	for _, s := range []struct {
		group uint16
		n     int
	}{{grease(3), 1}, {0x11ec, 1216}, {0x001d, 32}} {
		ks = binary.BigEndian.AppendUint16(ks, s.group)
		ks = binary.BigEndian.AppendUint16(ks, uint16(s.n))
		ks = append(ks, bytes.Repeat([]byte{0x5a}, s.n)...)
	}
	ks = append(binary.BigEndian.AppendUint16(nil, uint16(len(ks))), ks...)
	ech := []byte{0x00, 0x00, 0x01, 0x00, 0x01, 0x7c, 0x00, 0x20}
	ech = append(ech, bytes.Repeat([]byte{0x33}, 32)...)
	ech = append(ech, 0x00, 0xd0)
	ech = append(ech, bytes.Repeat([]byte{0x44}, 0xd0)...)
	return rawHello(
		u16s(2, grease(1), 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8,
			0xc013, 0xc014, 0x009c, 0x009d, 0x002f, 0x0035),
		ext(grease(2), nil),
		sniExt(sni),
		ext(23, nil),
		ext(0xff01, []byte{0}),
		ext(10, u16s(2, grease(3), 0x11ec, 0x001d, 0x0017, 0x0018)),
		ext(11, []byte{1, 0}),
		ext(35, nil),
		ext(16, []byte{0x00, 0x0c, 0x02, 'h', '2', 0x08, 'h', 't', 't', 'p', '/', '1', '.', '1'}),
		ext(5, []byte{1, 0, 0, 0, 0}),
		ext(13, u16s(2, 0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)),
		ext(18, nil),
		ext(51, ks),
		ext(45, []byte{1, 1}),
		ext(43, u16s(1, grease(5), 0x0304, 0x0303)),
		ext(27, []byte{2, 0, 2}),
		ext(17613, []byte{0, 3, 2, 'h', '2'}),
		ext(0xfe0d, ech),
		ext(grease(9), []byte{0}),
	)
}

// rawHello is one handshake record holding a ClientHello with the given
// cipher suite list (with its length) and exactly the given extensions.
func rawHello(suites []byte, exts ...[]byte) []byte {
	body := []byte{0x03, 0x03}
	body = append(body, bytes.Repeat([]byte{0x11}, 32)...) // random
	body = append(body, 32)
	body = append(body, bytes.Repeat([]byte{0x22}, 32)...) // session id
	body = append(body, suites...)
	body = append(body, 0x01, 0x00)
	var e []byte
	for _, x := range exts {
		e = append(e, x...)
	}
	body = binary.BigEndian.AppendUint16(body, uint16(len(e)))
	body = append(body, e...)
	return helloRecord(body)
}

// helloRecord wraps a ClientHello body in its handshake header and one
// record.
func helloRecord(body []byte) []byte {
	hs := append([]byte{typeClientHello, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	rec := binary.BigEndian.AppendUint16([]byte{0x16, 0x03, 0x01}, uint16(len(hs)))
	return append(rec, hs...)
}

// helloWithExtBlock makes exts the extension block of a minimal hello (one
// record); false when it does not fit.
func helloWithExtBlock(exts []byte) ([]byte, bool) {
	body := append([]byte{0x03, 0x03}, make([]byte, 32)...)
	body = append(body, 0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00)
	if len(body)+2+len(exts)+4 > MaxRecord {
		return nil, false
	}
	body = binary.BigEndian.AppendUint16(body, uint16(len(exts)))
	return helloRecord(append(body, exts...)), true
}

// extBlock returns the extension block of the hello in b.
func extBlock(b []byte) ([]byte, bool) {
	msg, ok := message(b)
	if !ok {
		return nil, false
	}
	s := reader(msg[4:])
	ok1 := s.skip(34)
	_, ok2 := s.prefixed8()
	_, ok3 := s.prefixed16()
	_, ok4 := s.prefixed8()
	e, ok5 := s.prefixed16()
	return e, ok1 && ok2 && ok3 && ok4 && ok5
}

// message joins the handshake records at the start of b into the first
// message, for the tests' own look at it.
func message(b []byte) ([]byte, bool) {
	var hs []byte
	for len(b) >= 5 && b[0] == recordHandshake {
		n := int(b[3])<<8 | int(b[4])
		if len(b) < 5+n {
			break
		}
		hs = append(hs, b[5:5+n]...)
		b = b[5+n:]
		if len(hs) >= 4 {
			if m := 4 + (int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])); len(hs) >= m {
				return hs[:m], true
			}
		}
	}
	return nil, false
}

// extTypes lists the extension types of the hello in b, for messages.
func extTypes(b []byte) []string {
	b, ok := extBlock(b)
	if !ok {
		return nil
	}
	e := reader(b)
	var out []string
	for len(e) > 0 {
		typ, ok1 := e.u16()
		d, ok2 := e.prefixed16()
		if !ok1 || !ok2 {
			return append(out, "truncated")
		}
		out = append(out, fmt.Sprintf("%#x/%d", typ, len(d)))
	}
	return out
}

// testCert is a self-signed certificate for www.allowed.test.
func testCert(tb testing.TB) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"www.allowed.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// resumedHello is the ClientHello a Go client sends to resume a session it
// got from a first handshake at version vers: a pre_shared_key extension
// in TLS 1.3, a session_ticket with a ticket in TLS 1.2.
func resumedHello(tb testing.TB, vers uint16) []byte {
	h2 := []string{"h2", "http/1.1"}
	cfg := &tls.Config{ServerName: "www.allowed.test", InsecureSkipVerify: true, NextProtos: h2,
		MaxVersion: vers, ClientSessionCache: tls.NewLRUClientSessionCache(1)}
	cert := testCert(tb)
	// Over loopback TCP, not net.Pipe: a TLS 1.3 server writes its tickets
	// before it reads the client's Finished, which needs a buffer between.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	deadline := time.Now().Add(5 * time.Second)
	srvErr := make(chan error, 1)
	go func() {
		c2, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		c2.SetDeadline(deadline)
		s := tls.Server(c2, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: h2, MaxVersion: vers})
		_, err = s.Write([]byte{1}) // after the handshake (and, in TLS 1.3, the tickets)
		s.Close()
		srvErr <- err
	}()
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	c1.SetDeadline(deadline)
	c := tls.Client(c1, cfg)
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		tb.Fatal(err)
	}
	c.Close()
	if err := <-srvErr; err != nil {
		tb.Fatal(err)
	}
	h := goHello(tb, "www.allowed.test", cfg)
	want := uint16(extPreSharedKey)
	if vers == tls.VersionTLS12 {
		want = extSessionTicket
	}
	for _, e := range extTypes(h) {
		if strings.HasPrefix(e, fmt.Sprintf("%#x/", want)) && !strings.HasSuffix(e, "/0") {
			return h
		}
	}
	tb.Fatalf("the second hello does not resume: %v", extTypes(h))
	return nil
}

// echConfigList is an ECHConfigList with one X25519/HKDF-SHA256/AES-128-GCM
// config for publicName (draft-ietf-tls-esni-22, section 4), so that a Go
// client sends a real outer hello.
func echConfigList(tb testing.TB, publicName string) []byte {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	pub := k.PublicKey().Bytes()
	c := []byte{0x2a, 0x00, 0x20} // config_id, DHKEM(X25519, HKDF-SHA256)
	c = binary.BigEndian.AppendUint16(c, uint16(len(pub)))
	c = append(c, pub...)
	c = append(c, 0x00, 0x04, 0x00, 0x01, 0x00, 0x01) // HKDF-SHA256, AES-128-GCM
	c = append(c, 0)                                  // maximum_name_length
	c = append(c, byte(len(publicName)))
	c = append(c, publicName...)
	c = append(c, 0x00, 0x00) // no extensions
	cfg := binary.BigEndian.AppendUint16([]byte{0xfe, 0x0d}, uint16(len(c)))
	cfg = append(cfg, c...)
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(cfg))), cfg...)
}

// capturesDir holds the project's real captures; they are read in place,
// never copied (they are not ours to ship).
const capturesDir = "../../../shared/pcaps"

// captureHellos returns the ClientHellos in the real captures: for each TCP
// flow whose first payload starts a handshake record holding a ClientHello,
// its first bytes in sequence order (at most 70,000, enough for any
// ClientHello crypto/tls takes); for each UDP flow whose client Initials
// carry a whole ClientHello, that hello in TLS records (quicFlow). The
// captures must be there, as capture's tests require: it fails the test
// without them.
func captureHellos(tb testing.TB) []namedHello {
	if _, err := os.Stat(capturesDir); err != nil {
		tb.Fatalf("the real captures are missing (%v): they are expected in %s, read in place", err, capturesDir)
	}
	files, _ := filepath.Glob(filepath.Join(capturesDir, "*", "*.pcap*"))
	var out []namedHello
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			tb.Fatal(err)
		}
		var src gopacket.PacketDataSource
		var lt layers.LinkType
		if r, err := pcapgo.NewReader(bytes.NewReader(data)); err == nil {
			src, lt = r, r.LinkType()
		} else if r, err := pcapgo.NewNgReader(bytes.NewReader(data), pcapgo.DefaultNgReaderOptions); err == nil {
			src, lt = r, r.LinkType()
		} else {
			continue
		}
		type seg struct {
			seq  uint32
			data []byte
		}
		flows := map[string][]seg{}
		var order []string
		quic := map[string]*quicFlow{}
		var quicOrder []string
		for {
			pd, _, err := src.ReadPacketData()
			if err != nil {
				break
			}
			p := gopacket.NewPacket(pd, lt, gopacket.Default)
			tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
			nl := p.NetworkLayer()
			if udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP); udp != nil && nl != nil && len(udp.Payload) > 0 && udp.Payload[0]&0x80 != 0 {
				k := fmt.Sprintf("%v:%d>%v:%d", nl.NetworkFlow().Src(), udp.SrcPort, nl.NetworkFlow().Dst(), udp.DstPort)
				if quic[k] == nil {
					quic[k] = &quicFlow{crypto: map[uint64][]byte{}}
					quicOrder = append(quicOrder, k)
				}
				quic[k].add(udp.Payload)
				continue
			}
			if tcp == nil || nl == nil || len(tcp.Payload) == 0 {
				continue
			}
			k := fmt.Sprintf("%v:%d>%v:%d", nl.NetworkFlow().Src(), tcp.SrcPort, nl.NetworkFlow().Dst(), tcp.DstPort)
			if _, ok := flows[k]; !ok {
				order = append(order, k)
			}
			flows[k] = append(flows[k], seg{tcp.Seq, bytes.Clone(tcp.Payload)})
		}
		n := 0
		for _, k := range order {
			ss := flows[k]
			if len(ss[0].data) < 6 || ss[0].data[0] != 0x16 || ss[0].data[5] != typeClientHello {
				continue
			}
			base := ss[0].seq
			sort.SliceStable(ss, func(i, j int) bool { return int32(ss[i].seq-base) < int32(ss[j].seq-base) })
			var buf []byte
			for _, s := range ss {
				off := int(int32(s.seq - base))
				if off < 0 || off > len(buf) || len(buf) >= 70000 {
					continue
				}
				if off+len(s.data) > len(buf) {
					buf = append(buf, s.data[len(buf)-off:]...)
				}
			}
			out = append(out, namedHello{fmt.Sprintf("%s#%d", filepath.Base(f), n), buf})
			n++
		}
		for _, k := range quicOrder {
			if h := quic[k].hello(); h != nil {
				out = append(out, namedHello{fmt.Sprintf("%s#%d", filepath.Base(f), n), h})
				n++
			}
		}
	}
	return out
}

// BenchmarkRead: Read on a recorded Go ML-KEM hello (about 1.8 KB, one
// record, read in place). proxy's BenchmarkReadClientHello adds the
// recorder's first read.
func BenchmarkRead(b *testing.B) {
	h := goHello(b, "www.allowed.test", nil)
	b.ReportAllocs()
	b.SetBytes(int64(len(h)))
	for b.Loop() {
		if ch, err := Read(h, nil); err != nil || !ch.Plain || ch.SNI == "" {
			b.Fatal("not taken")
		}
	}
}

// TestShort: Read says ErrShort for every proper prefix of hellos it
// takes, and for nothing else: not for a complete hello, not for bytes no
// more bytes can make a hello.
func TestShort(t *testing.T) {
	h := goHello(t, "www.allowed.test", nil)
	for _, c := range []namedHello{
		{"go", h},
		{"go-100-byte-records", refragment(h, 100)},
		{"go-1-byte-records", refragment(h, 1)},
		{"chrome-grease", chromeHello("www.allowed.test")},
		{"ech-outer", buildHello(sniExt("public.example"), echOuterExt())},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := Read(c.b, nil); err != nil {
				t.Errorf("a complete hello: %v", err)
			}
			if _, err := Read(append(bytes.Clone(c.b), 0x17, 0x03, 0x03, 0x00, 0x01, 0xff), nil); err != nil {
				t.Errorf("a complete hello and a record after it: %v", err)
			}
			for i := range c.b {
				if _, err := Read(c.b[:i], nil); err != ErrShort {
					t.Fatalf("the first %d bytes of a %d-byte hello: %v", i, len(c.b), err)
				}
			}
		})
	}

	// A record of n bytes holding the start of a ClientHello message whose
	// header says mlen.
	record := func(n, mlen int, body ...byte) []byte {
		r := []byte{0x16, 0x03, 0x01, byte(n >> 8), byte(n), typeClientHello, byte(mlen >> 16), byte(mlen >> 8), byte(mlen)}
		return append(r, body...)
	}
	withType := func(typ byte) []byte {
		b := bytes.Clone(h[:1000])
		b[5] = typ
		return b
	}
	for _, c := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"largest-record-header", []byte{0x16, 0x03, 0x01, 0x40, 0x00}, ErrShort},
		{"largest-record-partial-header", []byte{0x16, 0x03, 0x01, 0x40}, ErrShort},
		{"largest-message", record(16384, MaxBytes-4-5*4), ErrShort},
		{"message-over-MaxBytes-with-headers", record(16384, MaxBytes-4-5*4+1), ErrTooLarge},
		{"message-over-MaxBytes-small-record", record(4, MaxBytes-4-5*4), ErrTooLarge},
		{"largest-message-partial-header", []byte{0x16, 0x03, 0x01, 0x00, 0x02, typeClientHello, 0x00}, ErrShort},
		{"message-ends-with-record", record(100, 96, 0xaa), ErrShort},
		{"message-continues-next-record", record(4, 500), ErrShort},
		{"next-record-partial-header", append(record(4, 500), 0x16, 0x03, 0x01, 0x01), ErrShort},
		{"record-ends-past-message", record(500, 100, 0xaa), ErrShort}, // crypto/tls reads on: a second message may follow
		{"record-version-0x02", []byte{0x16, 0x02}, ErrShort},          // crypto/tls takes it

		{"record-type-application-data", append([]byte{0x17}, h[1:1000]...), ErrMalformed},
		{"record-type-alert", []byte{0x15}, ErrMalformed},
		{"record-version-0x10", []byte{0x16, 0x10}, ErrMalformed},
		{"second-record-version-0x10", append(record(4, 500), 0x16, 0x10), ErrMalformed},
		{"zero-length-record", []byte{0x16, 0x03, 0x01, 0x00, 0x00}, ErrMalformed},
		{"zero-length-record-then-hello", append([]byte{0x16, 0x03, 0x01, 0x00, 0x00}, h[:100]...), ErrMalformed},
		{"record-16385", []byte{0x16, 0x03, 0x01, 0x40, 0x01}, ErrMalformed},
		{"server-hello-type", withType(2), ErrMalformed},
		{"server-hello-type-alone", []byte{0x16, 0x03, 0x01, 0x00, 0x10, 0x02}, ErrMalformed},
		{"message-65537", record(100, 65537), ErrTooLarge},
		{"message-over-max-partial-header", []byte{0x16, 0x03, 0x01, 0x00, 0x02, typeClientHello, 0x02}, ErrShort},
		{"complete-in-small-record", record(4, 0), ErrMalformed},
	} {
		if _, got := Read(c.in, nil); got != c.want {
			t.Errorf("%s: Read %v, want %v", c.name, got, c.want)
		}
	}
}

// FuzzShort: a prefix of bytes Read takes, or of bytes it leaves short, is
// short or taken too (more bytes never turn a refusal into a hello), and
// the verdict on bytes it takes does not change with bytes after them. The
// prefix is the input's first cut bytes.
func FuzzShort(f *testing.F) {
	for _, s := range helloSeeds(f) {
		f.Add(s, uint16(len(s)/2))
		f.Add(s, uint16(7))
	}
	f.Fuzz(func(t *testing.T, b []byte, cut uint16) {
		h, err := Read(b, nil)
		p := b[:int(cut)%(len(b)+1)]
		ph, perr := Read(p, nil)
		switch {
		case (err == nil || err == ErrShort) && perr != nil && perr != ErrShort:
			t.Fatalf("Read %v on %x, but %v on its first %d bytes", err, b, perr, len(p))
		case perr == nil && (err != nil || h != ph):
			t.Fatalf("Read %+v on %x, but %+v %v with more bytes: %x", ph, p, h, err, b)
		}
	})
}

// ---- ClientHello crafting ----

// The hellos are hellotest's, shared with the proxy's and capture's tests.
var (
	goHello     = hellotest.GoHello
	ext         = hellotest.Ext
	sniExt      = hellotest.SNIExt
	echOuterExt = hellotest.ECHOuterExt
	buildHello  = hellotest.Build
	refragment  = hellotest.Refragment
)

// TestNamed: an IP literal, with or without brackets, names no server; an
// IPv6 literal with a zone is a (malformed) name, as the proxy reads it.
func TestNamed(t *testing.T) {
	for sni, want := range map[string]bool{
		"":               false,
		"a.allowed.test": true,
		"203.0.113.9":    false,
		"2001:db8::1":    false,
		"[2001:db8::1]":  false,
		"::ffff:1.2.3.4": false,
		"fe80::1%eth0":   true,
		"[203.0.113.9":   true,
		"1.2.3":          true, // numeric forms are names; policy refuses them
	} {
		if got := Named(sni); got != want {
			t.Errorf("Named(%q) = %v, want %v", sni, got, want)
		}
	}
}
