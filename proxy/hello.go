package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"egressd/internal/tlshello"
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
//
// Past peekFree bytes the recording takes its room from the proxy's peek
// budget (share; peekbudget.go), and a read that does not fit fails with
// errPeekBudget. The caller gives the share back once the recording has
// been replayed.
type recorder struct {
	r     io.Reader
	buf   []byte
	max   int
	share peekShare
}

func (rc *recorder) Read(p []byte) (int, error) {
	room := rc.max - len(rc.buf)
	if room <= 0 {
		return 0, errHelloTooLarge
	}
	if len(p) > room {
		p = p[:room]
	}
	k := rc.share.fit(len(rc.buf), len(p))
	if k == 0 {
		return 0, errPeekBudget
	}
	p = p[:k]
	n, err := rc.r.Read(p)
	rc.grow(n)
	rc.buf = append(rc.buf, p[:n]...)
	return n, err
}

// grow makes room for n more bytes: doubling, but within what the share
// holds (so the recording's memory is what the budget counts) and max.
func (rc *recorder) grow(n int) {
	need := len(rc.buf) + n
	if need <= cap(rc.buf) {
		return
	}
	c := max(need, 2*cap(rc.buf), 512)
	if rc.share.b != nil {
		c = min(c, peekFree+rc.share.held)
	}
	c = max(min(c, rc.max), need)
	nb := make([]byte, len(rc.buf), c)
	copy(nb, rc.buf)
	rc.buf = nb
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
// allocation, more than tlshello's whole parse; Read copies what it
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
	Fast       bool   // tlshello alone took or refused it, without crypto/tls (readClientHello sets it)
}

// readClientHello reads the ClientHello from rc (the bytes rc already
// recorded, then the connection). It returns errDuplicateSNI,
// errHelloTooLarge, errHelloMalformed or the read error (a timeout, EOF).
// ch.Fast tells whether crypto/tls was asked too.
//
// tlshello.Read decides, the parser capture reads hellos with too, so that
// audit mode reports what enforce mode does. When the recorded bytes hold
// the whole hello (the common case: it arrives in the first read), it
// parses it in place, for a fraction of crypto/tls's cost (compare
// BenchmarkReadClientHello and BenchmarkReadClientHelloTLS). A hello of
// more than one TCP segment (a post-quantum key share makes it about
// 1.8 KB) may be cut by that read; while tlshello.Read says it is short,
// readClientHello reads what has arrived (rc.fill, within the connection's
// read deadline and rc.max) and parses again, at most maxHelloFills times.
// Past that bound, or when a read fails, crypto/tls reads the rest through
// readClientHelloTLS (and meets the same error: the deadline has passed,
// the cap is reached, the stream has ended), then tlshello reads the
// recording. Everything read is recorded, for the replay.
//
// A hello tlshello refuses is refused (duplicate-sni when it names two
// servers, else hello-malformed, or hello-too-large) without asking
// crypto/tls. One it takes as Plain (every field of a kind it checks one
// by one against crypto/tls: what real clients send) is taken. Any other
// it takes is taken only if crypto/tls takes it too and reads the same
// server name, so a gap between tlshello and the crypto/tls of the
// toolchain in use can refuse a hello, never let one through with another
// name (THREATS.md A5); tlshello's FuzzReadAgreesWithCryptoTLS looks for
// such gaps: rerun it when the Go version changes.
func readClientHello(rc *recorder) (ch clientHello, err error) {
	defer func() {
		if r := recover(); r != nil { // neither parser may panic; if one does, fail closed
			ch, err = clientHello{}, fmt.Errorf("%w: panic: %v", errHelloMalformed, r)
		}
	}()
	h, herr := tlshello.Read(rc.buf, nil)
	for i := 0; herr == tlshello.ErrShort && i < maxHelloFills && len(rc.buf) < rc.max; i++ {
		if rc.fill(len(rc.buf)+1) != nil {
			break // crypto/tls meets the error again and classifies it
		}
		h, herr = tlshello.Read(rc.buf, nil)
	}
	switch {
	case herr == nil && h.Plain:
		return clientHello{ServerName: h.SNI, ECH: h.ECH, Fast: true}, nil
	case herr == nil:
		return confirmHello(rc, h)
	case herr != tlshello.ErrShort:
		// The name read before the fault, for the record (capture
		// reports the same); it decides nothing.
		return clientHello{ServerName: h.SNI, Fast: true}, helloError(h, herr)
	}
	// A slow client: crypto/tls reads the rest, then tlshello decides.
	tch, terr := readClientHelloTLS(rc)
	if h, herr = tlshello.Read(rc.buf, nil); herr == tlshello.ErrShort && terr != nil {
		return ch, terr // a timeout, the end of the stream, the cap
	}
	if herr != nil {
		return clientHello{ServerName: h.SNI}, helloError(h, herr)
	}
	return agree(h, tch, terr)
}

// maxHelloFills bounds the reads readClientHello makes for tlshello after
// the first: enough for a 16 KB hello read a 1448-byte segment at a time,
// few enough that a client dribbling its hello a byte per segment does not
// make the proxy rescan the recording once per byte (past the bound,
// crypto/tls reads the rest, as it reads any other hello).
const maxHelloFills = 16

// helloError is the proxy's error for what tlshello.Read refused.
func helloError(h tlshello.Hello, err error) error {
	switch {
	case err == tlshello.ErrTooLarge:
		return errHelloTooLarge
	case h.DupSNI:
		return errDuplicateSNI
	}
	return fmt.Errorf("%w: %v", errHelloMalformed, err)
}

// confirmHello has crypto/tls read the hello tlshello took from the
// recording (complete: nothing more is read) and agree.
func confirmHello(rc *recorder, h tlshello.Hello) (clientHello, error) {
	tch, terr := readClientHelloTLS(rc)
	return agree(h, tch, terr)
}

// agree takes h, which tlshello took, if crypto/tls took it too (terr nil)
// and read the same server name.
func agree(h tlshello.Hello, tch clientHello, terr error) (clientHello, error) {
	switch {
	case terr != nil:
		return clientHello{}, fmt.Errorf("%w: crypto/tls refuses what tlshello takes: %v", errHelloMalformed, terr)
	case tch.ServerName != h.SNI:
		return clientHello{}, fmt.Errorf("%w: crypto/tls reads server name %q, tlshello %q", errHelloMalformed, tch.ServerName, h.SNI)
	}
	return clientHello{ServerName: h.SNI, ECH: h.ECH}, nil
}

// readClientHelloTLS lets crypto/tls parse the ClientHello from rc (after
// the bytes rc already recorded): it starts a server handshake over a replay
// of the recording whose GetConfigForClient hook keeps what the proxy needs
// and stops the handshake. It returns errHelloTooLarge, the read error (a
// timeout, EOF) or errHelloMalformed.
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
			for _, e := range info.Extensions {
				if e == extECH || e == extESNI {
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
	switch {
	case errors.Is(herr, errHelloTooLarge):
		return ch, errHelloTooLarge
	case errors.Is(herr, errPeekBudget):
		return ch, errPeekBudget
	case isTimeout(herr), errors.Is(herr, io.EOF), errors.Is(herr, io.ErrUnexpectedEOF), errors.Is(herr, net.ErrClosed):
		return ch, herr
	}
	return ch, fmt.Errorf("%w: %v", errHelloMalformed, herr)
}

// Extension numbers crypto/tls's hook reports.
const (
	extECH  = 0xfe0d
	extESNI = 0xffce
)

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
