package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/httpwire"
	"egressd/internal/netutil"
	"egressd/internal/tlshello"
	"egressd/policy"
)

// What the first bytes of a connection turned out to be.
type streamKind int

const (
	kindOther streamKind = iota // not TLS, not HTTP, or the server speaks first
	kindTLS
	kindHTTP
)

// transparentRecord starts the record of a transparent connection
// accepted at start, and returns the client's socket address.
func transparentRecord(c *net.TCPConn, start time.Time) (*flowRecord, netip.AddrPort) {
	ca := addrPortOf(c.RemoteAddr())
	return &flowRecord{listener: "transparent", ev: audit.Event{
		Kind: audit.KindFlow, Source: audit.SourceProxy, Time: start,
		Client: audit.ClientAddr(ca.Addr()), ClientPort: ca.Port(), Proto: "tcp",
	}}, ca
}

// refuseAtShutdown resets c, a transparent connection accepted while the
// proxy closes (handleTransparent after Close, or one Close took from a
// listener's accept queue), and writes its line and event: denied with
// ReasonShutdown, enforced, to its original destination (the caller read
// it into f with origDst). Without it such a connection had no line and
// no event.
func (p *Proxy) refuseAtShutdown(c *net.TCPConn, f *flowRecord) {
	eng := p.policyNow().eng
	f.ev.Stamp(denyDecision(eng, ReasonShutdown))
	f.ev.Enforced, f.ev.Close = true, closeShutdown
	if mac := p.clientMAC(eng, addrPortOf(c.RemoteAddr()).Addr()); mac != nil {
		f.ev.ClientMAC = mac.String()
	}
	c.SetLinger(0)
	p.clientPort(c, f)
	c.Close()
	p.finish(f)
}

// origDst reads c's original destination (the REDIRECT's) into f's event
// and tells Deps.Accepted that the proxy writes the connection's line.
// Accepted is told the port the client used (clientPort, looked up first
// then): told a port NAT remapped, capture, which sees the client's on
// the LAN, would not know the connection and write a line of its own.
func (p *Proxy) origDst(c *net.TCPConn, f *flowRecord) (netip.AddrPort, error) {
	orig, err := netutil.OriginalDst(c)
	if err != nil {
		return orig, err
	}
	orig = netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port())
	f.ev.Dest, f.ev.DestPort = orig.Addr(), orig.Port()
	if p.deps.Accepted != nil {
		p.clientPort(c, f)
		f.lined = p.deps.Accepted(netip.AddrPortFrom(f.ev.Client, f.ev.ClientPort), orig, func() bool { return clientEnded(c) })
	}
	return orig, nil
}

// handleTransparent serves one redirected connection: original
// destination, peek, decide, then deny or forward. ours: c comes from
// listenTransparent's listener, so it has its keepalive already
// (inherited) and was accepted under that listener's TCP_DEFER_ACCEPT, if
// set.
func (p *Proxy) handleTransparent(c *net.TCPConn, ours bool) {
	start := time.Now()
	// The client's address is the socket's (REDIRECT does not change it),
	// without its zone (audit.ClientAddr); its port may not be
	// (clientPort): the conntrack lookup runs first, inside origDst, when
	// Deps.Accepted is to be told the connection, else after the decision
	// (only the record needs it then).
	f, ca := transparentRecord(c, start)
	// The original destination, and Deps.Accepted told, before the
	// connection is tracked: from then on Close may close it at any
	// instant, and the socket no longer says it. Read after, a Close that
	// raced the tracking (or any of the setup) left the line without a
	// destination and capture untold, which wrote a second line.
	orig, origErr := p.origDst(c, f)
	if p.connsClosed.Load() || !p.trackConn(c) {
		p.refuseAtShutdown(c, f)
		return
	}
	handedOff := false
	defer func() {
		if !handedOff {
			p.untrackConn(c)
			c.Close()
		}
	}()
	at := p.policyNow()
	eng := at.eng
	// The device's MAC, as the slot found it, is the event's unless the
	// policy's lookup (below) gives one.
	dev, ok := p.acquireDevice(ca.Addr())
	f.ev.ClientMAC = dev
	if !ok {
		f.ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonLimit, Mode: eng.Mode()})
		f.ev.Enforced, f.ev.Close = true, closeLimit
		c.SetLinger(0)
		p.clientPort(c, f)
		p.finish(f)
		return
	}
	defer func() {
		if !handedOff {
			p.release(ca.Addr())
			p.clientPort(c, f)
			p.finish(f)
		}
	}()

	if origErr != nil {
		f.err = origErr
		f.ev.Stamp(denyDecision(eng, ReasonNoOrigDst))
		f.ev.Enforced, f.ev.Close = true, closeDenied
		return
	}
	if orig == addrPortOf(c.LocalAddr()) {
		// Addressed to the listener itself, not redirected: an address
		// of the gateway's, perhaps one it gained after its list was read.
		// Dialling it would reach this listener again (selfDecision).
		p.ownAddrs()
		p.addOwn(orig.Addr())
	}
	in := policy.Input{Client: ca.Addr(), Dest: orig.Addr(), Port: orig.Port(), Proto: policy.TCP, Now: start}
	if in.ClientMAC = p.clientMAC(eng, ca.Addr()); in.ClientMAC != nil {
		f.ev.ClientMAC = in.ClientMAC.String()
	}
	if _, ok := lanLoopback(orig.Addr()); ok {
		// Loopback from the LAN, which no rule opens (policy.LANRefuses):
		// the firewall drops 127.0.0.0/8 before the REDIRECT, but not the
		// IPv4-mapped ::ffff:127.0.0.1 in an IPv6 header, which origDst
		// reads unmapped. Dialled, it reached the gateway's own loopback
		// services under a rule naming 127.0.0.1/32 (e2e
		// TestMappedLoopbackTransparent). Refused unread, in audit mode
		// too (selfDecision); so is 0.0.0.0 or :: (lanLoopback), which a
		// forged SYN can carry: dialled, it is the gateway itself.
		f.ev.Stamp(selfRefusal)
		f.ev.Enforced, f.ev.Close = true, closeDenied
		return
	}
	if !ours {
		p.setKeepAlive(c)
	}

	kind, v, head := p.peek(c, eng, in, start, ours && p.deferAccept, vouchLookup)
	defer head.rec.share.release() // the recording is replayed by then
	p.met.peek.Observe(time.Since(start).Seconds())
	f.ev.Stamp(v.d)
	f.ev.Name, f.ev.NameSource = v.name, v.src
	f.ev.NoPath = kind == kindOther // decided with Input.NoPath (peek)
	if kind == kindHTTP && head.Path != "" {
		f.ev.Path = head.Path
	}
	rc := head.rec

	if head.early {
		// The client closed before sending anything: nothing to forward.
		// Or Close did, during the setup or the peek: a shutdown's reset.
		f.ev.Close = closeEarly
		if head.ours {
			f.ev.Stamp(denyDecision(eng, ReasonShutdown))
			f.ev.Enforced, f.ev.Close = true, closeShutdown
		}
		return
	}
	if v.enforced() {
		f.ev.Close = closeDenied
		switch kind {
		case kindTLS:
			c.Write(tlsAlertAccessDenied)
			lingerClose(c)
		case kindHTTP:
			host := v.name
			if host == "" {
				host = orig.Addr().String()
			}
			p.writeHTTPDeny(c, DenyInfo{Host: host, Path: head.Path, Client: ca.Addr().String(), Rule: v.d.Rule, Reason: v.d.Reason})
			lingerClose(c)
		}
		return
	}
	if v.inspect && v.d.Allowed() && (kind == kindTLS || kind == kindHTTP) {
		p.clientPort(c, f) // the inspection's records copy it
		if err := p.inspectTransparent(c, at, rc.buf, orig, v, kind == kindTLS, f); err == nil {
			handedOff = true
			return
		} else {
			// Inspection cannot start (no CA): fail closed in enforce
			// mode, splice in audit mode.
			f.err = err
			if eng.Mode() == policy.ModeEnforce {
				f.ev.Stamp(denyDecision(eng, "inspection-unavailable"))
				f.ev.Close = closeDenied
				return
			}
		}
	}

	server, err := p.dial(context.Background(), orig)
	if err != nil {
		f.err, f.ev.Close = err, closeDial
		return
	}
	if !p.trackDialed(server) {
		f.ev.Close = closeShutdown
		return
	}
	// Plain HTTP whose first head parsed: only that head is replayed now;
	// what came after it goes through the request parser, so that every
	// later request is decided too (httpstream.go).
	first := rc.buf
	var up *httpUpstream
	if kind == kindHTTP && head.head != nil {
		first = rc.buf[:head.head.Len]
		up = p.newHTTPUpstream(in, f, head.head, v, rc.buf[head.head.Len:])
	}
	if len(first) > 0 {
		if _, err := server.Write(first); err != nil {
			p.untrackConn(server)
			server.Close()
			f.err, f.ev.Close = err, closeReset
			return
		}
	}
	// While the origin reads the first bytes: the record's client port,
	// before the tunnel's goroutines own the record.
	p.clientPort(c, f)
	// From here the tunnel's goroutines own both connections, the slot and
	// the record.
	handedOff = true
	replayed := uint64(len(first))
	var upFn func(*tunnel) (int64, error)
	if up != nil {
		upFn = up.run
	}
	// A reload decides it again on what it was decided on here; a plain
	// HTTP connection on its latest request (httpUpstream.latestAgain).
	again := func(e *policy.Engine) policy.Decision { return p.again(e, v) }
	if up != nil {
		again = up.latestAgain
	}
	lc := p.addLiveShared(at, f, again, closeBoth(c, server))
	if up != nil {
		up.lc = lc // before the tunnel's goroutines read it
	}
	p.startTunnelUp(c, server, upFn, func(out, in int64, reason string) {
		p.untrackConn(server)
		p.untrackConn(c)
		p.release(ca.Addr())
		p.endLive(lc) // before the record is written (addLiveShared)
		f.ev.BytesOut = uint64(out) + replayed
		f.ev.BytesIn = uint64(in)
		f.ev.Close = reason
		if up != nil && up.denied && reason != closeShutdown {
			f.ev.Close = closeRequestDenied
		}
		p.stampLive(lc, &f.ev)
		p.finish(f)
	})
}

// clientPort sets the record's client port to the one the client used,
// once per record. After the REDIRECT every destination is our listener,
// so a client that reuses a source port toward another destination while
// the first connection's conntrack entry lingers clashes with it, and NAT
// remaps the source port: the socket then shows a port the client never
// used, and the flow would not match the one capture sees on the LAN.
// Conntrack's original tuple has the client's; one netlink round trip
// (about 5 µs, BenchmarkConntrack in internal/netutil), done for every
// connection since nothing cheaper tells a remapped port from a chosen
// one. Only the port can differ (REDIRECT rewrites the destination, and
// the clash only the source port), and nothing decides on it, so the
// lookup is made after the decision and the forward of the first bytes,
// not before them, unless Deps.Accepted is to be told the connection
// (origDst): then before the decision. Any failure keeps the socket's
// port and is counted; a lookup takes at most netutil's deadline (200 ms,
// for a free socket and the kernel's answer together), so a burst or a
// kernel that does not answer cannot hold a connection undecided.
func (p *Proxy) clientPort(c *net.TCPConn, f *flowRecord) {
	if f.portDone {
		return
	}
	f.portDone = true
	remote := addrPortOf(c.RemoteAddr())
	p.ctOnce.Do(func() {
		if p.deps.Conntrack != nil {
			p.ct = p.deps.Conntrack
			return
		}
		ct, err := netutil.OpenConntrack()
		if err != nil {
			p.log.Warn("proxy: conntrack unavailable: client ports of remapped connections stay as NAT made them", audit.LogError, err.Error())
			return
		}
		p.ctOwn, p.ct = ct, ct
	})
	if p.ct == nil {
		p.met.ctError.Inc()
		return
	}
	orig, err := p.ct.OriginalSource(addrPortOf(c.LocalAddr()), remote)
	switch {
	case errors.Is(err, netutil.ErrNoConntrack):
		p.met.ctNotFound.Inc()
		return
	case errors.Is(err, netutil.ErrConntrackTimeout):
		p.met.ctTimeout.Inc()
		p.log.Debug("proxy: conntrack lookup", audit.LogError, err.Error())
		return
	case err != nil || !orig.IsValid():
		p.met.ctError.Inc()
		p.log.Debug("proxy: conntrack lookup", audit.LogError, fmt.Sprint(err))
		return
	}
	orig = netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port())
	switch {
	case orig == remote:
		p.met.ctSame.Inc()
	case orig.Addr() != remote.Addr():
		// Not a port remap: keep the socket's address and port together.
		p.met.ctError.Inc()
		p.log.Debug("proxy: conntrack lookup: another source address", "conntrack", orig.String(), "socket", remote.String())
	default:
		p.met.ctRemapped.Inc()
		f.ev.ClientPort = orig.Port()
	}
}

// peekResult carries what the peek read.
type peekResult struct {
	rec   *recorder
	Path  string
	early bool           // the client closed before its first byte
	ours  bool           // early: the proxy closed it (Close, at shutdown), not the client
	head  *httpwire.Head // the first HTTP request head, when it parsed
}

// peekSource is what the peek reads a connection's first bytes from: the
// accepted socket (handleTransparent), or the client's stream rebuilt
// from its queued packets (the fast path's flowStream, fastpath.go), so
// that both are decided by the same code on the same bytes. A read past
// the deadline set fails with an error whose Timeout() is true.
type peekSource interface {
	io.Reader
	SetReadDeadline(time.Time) error
}

// peek reads the first bytes within the hello deadline and decides.
// deferred: c is a *net.TCPConn accepted under TCP_DEFER_ACCEPT
// (firstBytes). how says how a ClientHello's server name vouches for the
// destination (decideNameVouched): vouchLookup for a new connection;
// the fast path's decision on the queue's goroutine, which must not
// wait on a lookup, asks vouchLocal first (fastQueue.quick).
func (p *Proxy) peek(c peekSource, eng *policy.Engine, in policy.Input, start time.Time, deferred bool, how vouchBy) (streamKind, verdict, peekResult) {
	rc := &recorder{r: c, max: p.cfg.HelloMaxBytes, share: peekShare{b: p.peekMem, client: in.Client, keyOf: p.keyOf}}
	res := peekResult{rec: rc}
	defer c.SetReadDeadline(time.Time{})
	ctx := context.Background()

	// Cleartext that is not an HTTP/1 request (HTTP/2 with prior
	// knowledge, another protocol, a client silent at first) shows no
	// path the proxy reads: host/path rules do not allow it (NoPath).
	other := in
	other.NoPath = true
	err := p.firstBytes(c, rc, start, deferred)
	if err != nil && isTimeout(err) {
		// The server speaks first (or the client is silent): decide on
		// the address. Where only a host/path rule would allow it, the
		// client's bytes decide after all (a late ClientHello is still
		// TLS, a late request still has its path): wait for them up to
		// the hello deadline.
		v := p.decideAddr(eng, other, audit.NameNone)
		if v.d.Reason != policy.ReasonPathUnseen {
			return kindOther, v, res
		}
		c.SetReadDeadline(start.Add(p.cfg.HelloTimeout))
		if err = rc.fill(1); err != nil && isTimeout(err) {
			return kindOther, v, res
		}
	}
	if err != nil {
		res.early, res.ours = true, errors.Is(err, net.ErrClosed)
		return kindOther, p.decideAddr(eng, other, audit.NameNone), res
	}
	c.SetReadDeadline(start.Add(p.cfg.HelloTimeout))
	if rc.buf[0] == 0x16 {
		ch, err := readClientHello(rc)
		if ch.Fast {
			p.met.helloFast.Inc()
		} else {
			p.met.helloTLS.Inc()
		}
		if err != nil {
			v := verdict{src: audit.NameNone, how: byBytes}
			switch {
			case errors.Is(err, errDuplicateSNI):
				v.d = denyDecision(eng, ReasonDuplicateSNI)
			case errors.Is(err, errHelloTooLarge):
				v.d = denyDecision(eng, ReasonHelloTooLarge)
			case errors.Is(err, errPeekBudget):
				p.peekRefused(in.Client)
				v.d = denyDecision(eng, ReasonLimit)
			case isTimeout(err):
				v.d = denyDecision(eng, ReasonHelloTimeout)
			default:
				v.d = denyDecision(eng, ReasonHelloBad)
				// The server name read before the fault shows what the
				// client asked for, as capture reports it in audit mode.
				if tlshello.Named(ch.ServerName) {
					v.name, v.src = ch.ServerName, audit.NameSNI
				}
			}
			return kindTLS, v, res
		}
		sni := ch.ServerName
		if !tlshello.Named(sni) { // none, or an IP literal: capture decides it so too
			return kindTLS, p.decideAddr(eng, in, audit.NameNoSNI), res
		}
		if n, ok := policy.NormalizeName(sni); ok {
			sni = n
		}
		in.Name = sni
		return kindTLS, p.decideNameVouched(ctx, eng, in, audit.NameSNI, how), res
	}
	for {
		yes, more := looksHTTP(rc.buf)
		if yes {
			break
		}
		if !more {
			return kindOther, p.decideAddr(eng, other, audit.NameNone), res
		}
		if err := rc.fill(len(rc.buf) + 1); err != nil {
			return kindOther, p.decideAddr(eng, other, audit.NameNone), res
		}
	}
	h, err := readHTTPHead(rc)
	res.Path, _, _ = strings.Cut(h.Path, "?") // the query stays out of events and logs
	if errors.Is(err, errPeekBudget) {
		p.peekRefused(in.Client)
	}
	if err != nil {
		return kindHTTP, verdict{d: httpErrDecision(eng, err), src: audit.NameNone, how: byBytes}, res
	}
	res.head = &h
	return kindHTTP, p.decideHTTP(ctx, eng, in, &h), res
}

// firstBytes reads the client's first bytes within the first-byte wait
// (FirstByteWait from accept). Under TCP_DEFER_ACCEPT (deferred) the
// kernel usually held the connection until they came, and they are read at
// once; when they are not there within deferredFirstByteWait, the kernel
// may already have waited deferAcceptWait of silence (it retransmitted the
// SYN-ACK: synAckRetransmitted), and then the client has had its wait and
// the server speaks first. Otherwise (a connection accepted at once, as a
// SYN cookie is, without the kernel's wait) the rest of the first-byte
// wait still applies.
//
// A timeout is the client's silence only if no byte waits in the socket
// (waitingBytes): a read whose deadline has passed fails without looking,
// so a worker that ran late (a gateway short of CPU, with the wait
// already over when its goroutine got to the read) took a client whose
// ClientHello had come at once for a server that speaks first, decided it
// on the address, and reset it.
func (p *Proxy) firstBytes(c peekSource, rc *recorder, start time.Time, deferred bool) error {
	wait := min(p.cfg.FirstByteWait, p.cfg.HelloTimeout)
	tc, isTCP := c.(*net.TCPConn)
	if !deferred || !isTCP || wait <= deferredFirstByteWait {
		c.SetReadDeadline(start.Add(wait))
		return lateLook(c, rc, rc.fill(1))
	}
	c.SetReadDeadline(start.Add(deferredFirstByteWait))
	err := lateLook(c, rc, rc.fill(1))
	if err == nil || !isTimeout(err) || synAckRetransmitted(tc) {
		return err
	}
	c.SetReadDeadline(start.Add(wait))
	return lateLook(c, rc, rc.fill(1))
}

// lateLook returns err, the first-byte wait's read's, unless it is a
// timeout while bytes wait in c's socket: then it reads them (firstBytes).
func lateLook(c peekSource, rc *recorder, err error) error {
	if err == nil || !isTimeout(err) {
		return err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok || !waitingBytes(tc) {
		return err
	}
	// The bytes are there: the read returns at once; peek sets the
	// hello deadline after.
	c.SetReadDeadline(time.Now().Add(deferredFirstByteWait))
	return rc.fill(1)
}

// waitingBytes reports whether bytes wait in c's receive queue (SIOCINQ).
// An error reports false.
func waitingBytes(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	n := 0
	if rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }) != nil || err != nil {
		return false
	}
	return n > 0
}

// deferredFirstByteWait is the first-byte wait after a deferred accept
// before the proxy asks whether the kernel already waited (firstBytes).
const deferredFirstByteWait = 50 * time.Millisecond

// synAckRetransmitted reports whether the kernel retransmitted c's
// SYN-ACK (TCP_INFO's total retransmissions, which a connection accepted
// from a request socket starts with): under TCP_DEFER_ACCEPT, that is the
// kernel's wait for a silent client ending. An error reports false.
func synAckRetransmitted(c *net.TCPConn) bool {
	ti := netutil.TCPInfo(c)
	return ti != nil && ti.Total_retrans > 0
}

// clientEnded reports whether c's client has ended it: the socket is no
// longer established (a reset closed it, a FIN put it in CLOSE-WAIT). An
// error reports true, leaving capture's word as it was before.
func clientEnded(c *net.TCPConn) bool {
	ti := netutil.TCPInfo(c)
	return ti == nil || ti.State != unix.BPF_TCP_ESTABLISHED
}

// readHTTPHead reads from rc until a complete request head is recorded.
func readHTTPHead(rc *recorder) (httpwire.Head, error) {
	var tmp [2048]byte
	for {
		h, err := httpwire.ParseHead(rc.buf)
		if !errors.Is(err, httpwire.ErrHeadIncomplete) {
			return h, err
		}
		if _, err := rc.Read(tmp[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return h, httpwire.ErrHeadIncomplete
			}
			return h, err
		}
	}
}
