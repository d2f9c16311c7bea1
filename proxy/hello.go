package proxy

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Errors of the peek. Each becomes its own deny reason.
var (
	errHelloTooLarge  = errors.New("proxy: client hello larger than the cap")
	errHelloMalformed = errors.New("proxy: client hello does not parse")
	errDuplicateSNI   = errors.New("proxy: client hello has more than one server name")
	errHelloCaptured  = errors.New("proxy: client hello captured") // internal: stops the handshake
)

// recorder reads from r and keeps every byte it read, up to max; past max
// it fails with errHelloTooLarge. The recorded bytes are replayed to the
// destination, so nothing read for the peek is lost.
type recorder struct {
	r   io.Reader
	buf []byte
	max int
}

func (rc *recorder) Read(p []byte) (int, error) {
	room := rc.max - len(rc.buf)
	if room <= 0 {
		return 0, errHelloTooLarge
	}
	if len(p) > room {
		p = p[:room]
	}
	n, err := rc.r.Read(p)
	rc.buf = append(rc.buf, p[:n]...)
	return n, err
}

// fill reads until at least n bytes are recorded, taking what is there
// in reads of up to fillChunk bytes (so it may record more than n): a
// ClientHello that has arrived is read in one system call, and
// readClientHello then parses it from the recording without reading the
// socket again (a read of exactly the missing bytes took one call for the
// first byte and more for the rest).
func (rc *recorder) fill(n int) error {
	tmp := fillBufs.Get().(*[fillChunk]byte)
	defer fillBufs.Put(tmp)
	for len(rc.buf) < n {
		if _, err := rc.Read(tmp[:]); err != nil {
			return err
		}
	}
	return nil
}

// fillChunk is the most fill reads at once: a ClientHello with a
// post-quantum key share (about 1.8 KB) fits.
const fillChunk = 4096

// fillBufs holds fill's read buffers. A buffer on fill's stack escapes
// (the read goes through an interface), so it cost every connection a 4 KB
// allocation, more than the fast path's whole parse; Read copies what it
// reads into the recording, so nothing keeps a pooled buffer.
var fillBufs = sync.Pool{New: func() any { return new([fillChunk]byte) }}

// replayReader serves recorded bytes first: crypto/tls consumes what the
// recorder already holds (the sniffed first bytes) before reading more.
type replayReader struct {
	pre []byte
	rc  *recorder
}

func (r *replayReader) Read(p []byte) (int, error) {
	if len(r.pre) > 0 {
		n := copy(p, r.pre)
		r.pre = r.pre[n:]
		return n, nil
	}
	return r.rc.Read(p)
}

// helloConn is the net.Conn crypto/tls parses the hello from: reads come
// from the recorder, writes (the alert crypto/tls sends when the hook
// aborts) go nowhere.
type helloConn struct{ r io.Reader }

func (c helloConn) Read(p []byte) (int, error)     { return c.r.Read(p) }
func (helloConn) Write(p []byte) (int, error)      { return len(p), nil }
func (helloConn) Close() error                     { return nil }
func (helloConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (helloConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (helloConn) SetDeadline(time.Time) error      { return nil }
func (helloConn) SetReadDeadline(time.Time) error  { return nil }
func (helloConn) SetWriteDeadline(time.Time) error { return nil }

// clientHello is what the proxy keeps of a ClientHello.
type clientHello struct {
	ServerName string // the (outer) SNI, "" when absent
	ECH        bool   // an encrypted_client_hello extension is present (real or GREASE)
	ALPN       []string
	Fast       bool // parseHelloFast read it, not crypto/tls (readClientHello sets it)
}

// Extension numbers.
const (
	extServerName = 0x0000
	extECH        = 0xfe0d
)

// readClientHello reads the ClientHello from rc (the bytes rc already
// recorded, then the connection). It returns errDuplicateSNI,
// errHelloTooLarge, errHelloMalformed or the read error (a timeout, EOF).
// ch.Fast tells which parser read it.
//
// Fast path: when the recorded bytes hold the whole hello (the common
// case: it arrives in the first read), parseHelloFast parses it in place,
// without crypto/tls, for a fraction of the cost (compare
// BenchmarkReadClientHello and BenchmarkReadClientHelloTLS). A hello of
// more than one TCP segment (a post-quantum key share makes it about
// 1.8 KB) may be cut by that read; while the recording is a well-framed
// start of one that helloShort says is not all there, readClientHello
// reads what has arrived (rc.fill, within the connection's read deadline
// and rc.max) and parses again, at most maxHelloFills times. A read that
// fails leaves the rest to readClientHelloTLS, which meets the same error
// (the deadline has passed, the cap is reached, the stream has ended) and
// classifies it as before. Everything read is recorded, for the replay.
//
// The fast path takes only hellos it validates at least as strictly as
// crypto/tls does up to the point where readClientHelloTLS's hook runs,
// and reports false for everything else (an extension it does not know,
// an unusual server name, odd framing, any error); those go to
// readClientHelloTLS unchanged, so crypto/tls still decides every error
// and its classification. A hello the fast path takes is therefore one
// crypto/tls takes too, with the same ServerName, ALPN list and ECH flag:
// no parser differential on the SNI (THREATS.md A5).
// FuzzHelloFastAgreesWithCryptoTLS and the TestHelloFast tests check that
// against the crypto/tls of the toolchain in use; rerun the fuzz target
// when the Go version changes.
func readClientHello(rc *recorder) (ch clientHello, err error) {
	defer func() {
		if r := recover(); r != nil { // neither parser may panic; if one does, fail closed
			ch, err = clientHello{}, fmt.Errorf("%w: panic: %v", errHelloMalformed, r)
		}
	}()
	fast, ok := parseHelloFast(rc.buf)
	for i := 0; !ok && i < maxHelloFills && len(rc.buf) < rc.max && helloShort(rc.buf); i++ {
		if rc.fill(len(rc.buf)+1) != nil {
			break // crypto/tls meets the error again and classifies it
		}
		fast, ok = parseHelloFast(rc.buf)
	}
	if ok {
		fast.Fast = true
		return fast, nil
	}
	return readClientHelloTLS(rc)
}

// maxHelloFills bounds the reads readClientHello makes for the fast path
// after the first: enough for a 16 KB hello read a 1448-byte segment at a
// time, few enough that a client dribbling its hello a byte per segment
// does not make the proxy rescan the recording once per byte (past the
// bound, crypto/tls reads the rest, as it reads any other hello).
const maxHelloFills = 16

// readClientHelloTLS lets crypto/tls parse the ClientHello from rc (after
// the bytes rc already recorded): it starts a server handshake over a replay
// of the recording whose GetConfigForClient hook keeps what the proxy needs
// and stops the handshake. Errors as for readClientHello.
func readClientHelloTLS(rc *recorder) (ch clientHello, err error) {
	defer func() {
		if r := recover(); r != nil { // crypto/tls must not panic; if it does, fail closed
			ch, err = clientHello{}, fmt.Errorf("%w: panic: %v", errHelloMalformed, r)
		}
	}()
	got := false
	cfg := &tls.Config{
		GetConfigForClient: func(info *tls.ClientHelloInfo) (*tls.Config, error) {
			got = true
			ch.ServerName = info.ServerName
			ch.ALPN = append([]string(nil), info.SupportedProtos...)
			for _, e := range info.Extensions {
				if e == extECH {
					ch.ECH = true
				}
			}
			return nil, errHelloCaptured
		},
	}
	rr := &replayReader{pre: append([]byte(nil), rc.buf...), rc: rc}
	herr := tls.Server(helloConn{rr}, cfg).Handshake()
	if got {
		return ch, nil
	}
	// Why it failed: our own limits and read errors first, then a closer
	// look for the duplicate-SNI case crypto/tls only calls "error decoding
	// message".
	switch {
	case errors.Is(herr, errHelloTooLarge):
		return ch, errHelloTooLarge
	case isTimeout(herr), errors.Is(herr, io.EOF), errors.Is(herr, io.ErrUnexpectedEOF), errors.Is(herr, net.ErrClosed):
		return ch, herr
	}
	if n, ok := countServerNames(rc.buf); ok && n > 1 {
		return ch, errDuplicateSNI
	}
	return ch, fmt.Errorf("%w: %v", errHelloMalformed, herr)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// countServerNames reassembles the handshake message from TLS records and
// counts host names: every server_name extension and every host_name entry
// in them. It reports false when the bytes are not a complete ClientHello.
// It never panics on any input (fuzzed with the peek).
func countServerNames(b []byte) (int, bool) {
	// Reassemble the handshake payload from handshake records.
	var hs []byte
	for len(b) >= 5 {
		if b[0] != 0x16 {
			return 0, false
		}
		n := int(binary.BigEndian.Uint16(b[3:5]))
		if len(b) < 5+n {
			break
		}
		hs = append(hs, b[5:5+n]...)
		b = b[5+n:]
		if len(hs) >= 4 && len(hs) >= 4+int(hs[1])<<16|int(hs[2])<<8|int(hs[3]) {
			break
		}
	}
	if len(hs) < 4 || hs[0] != 1 {
		return 0, false
	}
	mlen := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
	if len(hs) < 4+mlen {
		return 0, false
	}
	m := hs[4 : 4+mlen]
	// legacy_version(2) random(32)
	if len(m) < 34 {
		return 0, false
	}
	m = m[34:]
	skip := func(lenBytes int) bool {
		if len(m) < lenBytes {
			return false
		}
		n := 0
		for i := 0; i < lenBytes; i++ {
			n = n<<8 | int(m[i])
		}
		if len(m) < lenBytes+n {
			return false
		}
		m = m[lenBytes+n:]
		return true
	}
	if !skip(1) || !skip(2) || !skip(1) { // session id, cipher suites, compression
		return 0, false
	}
	if len(m) < 2 {
		return 0, true // no extensions
	}
	el := int(binary.BigEndian.Uint16(m))
	m = m[2:]
	if len(m) < el {
		return 0, false
	}
	m = m[:el]
	count := 0
	for len(m) >= 4 {
		typ := binary.BigEndian.Uint16(m)
		l := int(binary.BigEndian.Uint16(m[2:]))
		if len(m) < 4+l {
			return count, false
		}
		body := m[4 : 4+l]
		m = m[4+l:]
		if typ != extServerName {
			continue
		}
		if len(body) < 2 {
			count++
			continue
		}
		list := body[2:]
		if ll := int(binary.BigEndian.Uint16(body)); ll < len(list) {
			list = list[:ll]
		}
		entries := 0
		for len(list) >= 3 {
			nl := int(binary.BigEndian.Uint16(list[1:3]))
			if len(list) < 3+nl {
				break
			}
			if list[0] == 0 {
				entries++
			}
			list = list[3+nl:]
		}
		if entries == 0 {
			entries = 1
		}
		count += entries
	}
	return count, true
}
