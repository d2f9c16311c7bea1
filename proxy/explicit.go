package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/elazarl/goproxy"

	"egressd/audit"
	"egressd/internal/httpwire"
	"egressd/internal/netutil"
	"egressd/policy"
)

// connectState is what a CONNECT (or a transparent connection handed to
// goproxy for inspection) decided; inspected requests read it from
// ProxyCtx.UserData.
type connectState struct {
	host        string         // normalised name; "" for an IP literal
	at          policyAt       // the policy the CONNECT was decided with
	addr        netip.AddrPort // the destination dialled
	client      netip.AddrPort
	mac         net.HardwareAddr // the client's, when the policy at the start named MACs; nil: none
	src         audit.NameSource
	transparent bool
	// rec is the connection's record, its one flow: each request in it
	// is a request event (audit.KindRequest), as on plain HTTP.
	rec *flowRecord
	// firstIsFlow: rec was decided on the first request (plain HTTP
	// handed over by the transparent listener) and stands for it, as a
	// plain-HTTP connection's flow does.
	firstIsFlow bool
	// plain: the connection is cleartext HTTP handed over by the
	// transparent listener. Nothing binds it to its first Host (no SNI,
	// no CONNECT authority), so each request is decided on its own Host,
	// as the request follower decides it without inspection.
	plain bool
	// requestSeen ends the deadline that bounds the inspected
	// connection's TLS handshake and first request head (goproxy sets
	// none); nil when there is none.
	requestSeen func()
	// noPath is the decision for a tunnel that turns out not to be TLS,
	// when only a host/path rule allows the CONNECT (Input.NoPath): its
	// cleartext shows no path the proxy reads. Zero when a host-level
	// rule allows it.
	noPath policy.Decision
	// clear follows the cleartext of the inspected connection and says,
	// request by request, whether the head parser refuses its head
	// (inspectConn); wrap puts the client connection goproxy is handed
	// behind it. Both are set by handleConnect.
	clear *clearStream
	wrap  func(net.Conn) net.Conn
	// latest is the verdict of the latest request of a plain connection
	// (plain): what a reload decides it again on, at host level; lc is
	// its registration. Set by inspectTransparent.
	latest *atomic.Pointer[verdict]
	lc     *liveConn
}

type dialKey struct{}
type transparentKey struct{}
type hijackKey struct{}

// newGoproxy builds the goproxy server with its unsafe defaults turned
// off: upstream certificates are verified, no proxy environment variables
// are followed, every phase has a timeout, CONNECT is default-deny.
func (p *Proxy) newGoproxy() *goproxy.ProxyHttpServer {
	gp := goproxy.NewProxyHttpServer()
	gp.Logger = log.New(slogWriter{p.log}, "", 0)
	gp.Verbose = false
	gp.AllowHTTP2 = false
	gp.KeepAcceptEncoding = true // pass the client's Accept-Encoding through, do not recompress
	gp.Tr = &http.Transport{
		Proxy:                 nil, // never HTTP(S)_PROXY from the environment
		DialContext:           p.transportDial,
		TLSClientConfig:       &tls.Config{RootCAs: p.cfg.UpstreamRoots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   p.cfg.DialTimeout,
		ResponseHeaderTimeout: 60 * time.Second,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   16,
		ForceAttemptHTTP2:     false,
		DisableCompression:    true,
	}
	refuse := func(*http.Request, string, string) (net.Conn, error) {
		return nil, errors.New("proxy: goproxy's own CONNECT dialer is not used")
	}
	gp.ConnectDial = nil
	gp.ConnectDialWithReq = refuse
	gp.NonproxyHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "egressd: this is an HTTP proxy; send absolute-form requests or CONNECT", http.StatusBadRequest)
	})
	gp.OnRequest().HandleConnectFunc(p.handleConnect)
	gp.OnRequest().DoFunc(p.handleRequest)
	return gp
}

// slogWriter bridges goproxy's Printf logger to slog at debug level.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(b []byte) (int, error) {
	w.l.Debug("goproxy", "msg", strings.TrimSpace(string(b)))
	return len(b), nil
}

// transportDial is the http.Transport's dialer: it dials only the address
// the request's decision chose (a context value), never the URL's host.
func (p *Proxy) transportDial(ctx context.Context, _, _ string) (net.Conn, error) {
	ap, ok := ctx.Value(dialKey{}).(netip.AddrPort)
	if !ok {
		return nil, errors.New("proxy: request has no decided destination")
	}
	c, err := p.dial(ctx, ap)
	if err != nil {
		return nil, err
	}
	p.setKeepAlive(c) // pooled by the transport, not in the connection set
	return c, nil
}

// ServeExplicit serves the explicit HTTP/CONNECT proxy on ln until ln
// fails or the proxy is closed. It returns nil when SetExplicitAddrs
// closed ln.
func (p *Proxy) ServeExplicit(ln net.Listener) error {
	srv := &http.Server{
		Handler:           p.explicitHandler(),
		ReadHeaderTimeout: p.cfg.HelloTimeout,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    p.cfg.HelloMaxBytes,
		ErrorLog:          log.New(slogWriter{p.log}, "", 0),
		// A reload that denies a forwarded request closes its client's
		// connection (explicitRoundTrip).
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, clientConnKey{}, c)
		},
		ConnState: p.explicitConnState,
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	p.servers[srv] = struct{}{}
	p.mu.Unlock()
	p.ownAddrs()
	// The wrapper waits out EMFILE and the like on the same listener
	// (keepExplicit would close it) with its own pause, which Close and
	// p.done end: http.Server's would sleep up to a second through them,
	// and log each retry (TestServeExplicitOutOfFDsStops). SetExplicitAddrs
	// retiring ln closes the wrapper (retryLns), ending a pause too: closing
	// ln under it left the pause to run out, up to a second
	// (TestExplicitRetiredPauseEnds).
	rl := netutil.NewRetryListener(ln, p.done, func(err error) { p.acceptFailing("explicit", ln, err) })
	p.explicitMu.Lock()
	p.retryLns[ln] = rl
	p.explicitMu.Unlock()
	err := srv.Serve(peekListener{rl, p})
	p.explicitMu.Lock()
	delete(p.retryLns, ln)
	p.explicitMu.Unlock()
	p.forgetAcceptFailing("explicit", ln) // no accept on ln calls it again
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	if p.retiredExplicit(ln) {
		p.retireServer(srv)
		return nil
	}
	// ln failed: the server's connections finish their request as those
	// of a retired one (keepExplicit opens another listener).
	p.retireServer(srv)
	return err
}

// explicitConnState gives every connection of the explicit listener a
// connection slot (acquire) from accept to close, as the transparent
// listener does: without one, a client could open any number of
// connections and hold each in an unfinished request head (up to
// HelloMaxBytes of it, for HelloTimeout) or idle between requests, each
// with a goroutine and its buffers. A connection over a limit is closed
// at once (counted and logged by acquire; no event: no request was read).
// A hijacked connection (a CONNECT) gives its slot back, and the tunnel
// takes one of its own (tunnelConnect) or this one (takeExplicitSlot).
func (p *Proxy) explicitConnState(c net.Conn, state http.ConnState) {
	switch state {
	case http.StateNew:
		client := addrPortOf(c.RemoteAddr()).Addr()
		dev, ok := p.acquireDevice(client)
		if !ok {
			if tc, ok := bareConn(c).(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			c.Close()
			return
		}
		p.explicitSlots.Store(c, explicitSlot{client, dev})
	case http.StateHijacked, http.StateClosed:
		if sl, ok := p.explicitSlots.LoadAndDelete(c); ok {
			p.release(sl.(explicitSlot).client)
		}
		if state == http.StateHijacked {
			bareConn(c) // the request head's bytes go back to the peek budget
		}
	}
}

// explicitSlot is a connection's slot of the explicit listener: its
// client, and its device's MAC as text as the slot found it ("": none).
type explicitSlot struct {
	client netip.Addr
	dev    string
}

// slotDevice returns the MAC of the device of r's client as text, as
// its connection's slot found it (no lookup of its own): "" when the
// connection holds no slot or the client has no device.
func (p *Proxy) slotDevice(r *http.Request) string {
	if c, ok := r.Context().Value(clientConnKey{}).(net.Conn); ok {
		if sl, ok := p.explicitSlots.Load(c); ok {
			return sl.(explicitSlot).dev
		}
	}
	return ""
}

// takeExplicitSlot gives the caller the connection slot of r's client
// connection, which the caller then releases: an inspected CONNECT's
// connection keeps the slot it was accepted with (acquiring a second one
// before the hijack gave the first back would count it twice). When the
// connection has none (a test's handler without the listener), it
// acquires one.
func (p *Proxy) takeExplicitSlot(r *http.Request, client netip.Addr) bool {
	if c, ok := r.Context().Value(clientConnKey{}).(net.Conn); ok {
		if _, ok := p.explicitSlots.LoadAndDelete(c); ok {
			return true
		}
	}
	return p.acquire(client)
}

// explicitHandler checks proxy authentication (407) before goproxy.
//
// A 407 is recorded as a refused request (audit.KindRequest), not as a
// flow: a browser's first request or CONNECT gets it and the same request
// with credentials follows, on a new connection (this one closes). Had the
// challenge been a flow, each authenticated connection would count as two
// flows and its host as a dropped one; as a request it counts in the
// dropped entry's requests, so a client that never authenticates is still
// in the report.
func (p *Proxy) explicitHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if pc, ok := r.Context().Value(clientConnKey{}).(*peekConn); ok {
			// The head is read: its bytes go back to the peek
			// budget; the next request's head counts again.
			pc.headRead()
			defer pc.nextHead()
		}
		if auth := p.authOK(r); auth != authGranted {
			ca := addrPortOf(tcpAddrString(r.RemoteAddr))
			ev := audit.Event{Kind: audit.KindRequest, Source: audit.SourceProxy, Time: time.Now(),
				Client: audit.ClientAddr(ca.Addr()), ClientPort: ca.Port(), ClientMAC: p.slotDevice(r), DestPort: challengedPort(r), Proto: "tcp", Name: r.URL.Hostname(), NameSource: audit.NameConnect}
			ev.Stamp(denyDecision(p.deps.Policy.Load(), ReasonAuth))
			ev.Enforced = true // refused in audit mode too
			p.emitRequest("explicit", ev, nil)
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("Connection", "close")
			if auth == authBusy {
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(http.StatusServiceUnavailable)
				io.WriteString(w, "egressd: too many proxy password checks at once; try again\n")
				return
			}
			w.Header().Set("Proxy-Authenticate", `Basic realm="egressd"`)
			w.WriteHeader(http.StatusProxyAuthRequired)
			io.WriteString(w, "egressd: proxy authentication required (HTTP Basic, realm \"egressd\")\n")
			return
		}
		if r.Method == http.MethodConnect {
			kp := &keepPipelined{ResponseWriter: w}
			w, r = kp, r.WithContext(context.WithValue(r.Context(), hijackKey{}, kp))
		}
		p.gp.ServeHTTP(w, r)
	})
}

// challengedPort is the destination port a request refused with 407 asked
// for: a CONNECT authority's port, an absolute URL's port, else the
// scheme's (80 for http, 443 for https; net/http leaves a CONNECT's
// scheme empty); 0 when it names none readable.
func challengedPort(r *http.Request) uint16 {
	if ps := r.URL.Port(); ps != "" {
		if !httpwire.ValidPort(ps) {
			return 0
		}
		n, _ := strconv.Atoi(ps)
		return uint16(n)
	}
	switch strings.ToLower(r.URL.Scheme) {
	case "http":
		return 80
	case "https":
		return 443
	}
	return 0
}

// keepPipelined makes Hijack hand over the bytes net/http read past the
// CONNECT head with the connection: a client may send its first bytes (a
// ClientHello) without waiting for the 200, and goproxy's ConnectHijack
// passes the bare connection on, which would drop them. The returned
// connection replays them (a *pipelinedConn); the returned reader is
// empty, so goproxy's other actions do not read them twice.
//
// For an inspected CONNECT, handleConnect sets p, client and f, having
// taken a connection slot for client: the hijacked connection then gets a
// read deadline that bounds the TLS handshake and the first request head
// (goproxy reads them without one), until inspectedRequest ends it; it is
// tracked (Close closes it), and closing it gives the slot back and
// finishes f, the connection's flow, with the bytes it carried.
type keepPipelined struct {
	http.ResponseWriter
	p      *Proxy
	client netip.Addr
	f      *flowRecord
	conn   net.Conn // the hijacked connection, when inspected
	// wrap puts the connection behind the inspected connection's
	// request follower (connectState.wrap), when inspected.
	wrap func(net.Conn) net.Conn
	// at and decide register the inspected connection for a reload
	// (addLive): the policy it was decided with, and its re-decision.
	at     policyAt
	decide func(*policy.Engine) policy.Decision
}

func (k *keepPipelined) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := k.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	c, rw, err := h.Hijack()
	c = bareConn(c)  // a *net.TCPConn again: the tunnel splices it
	var early uint64 // bytes the client sent with the CONNECT head, read already
	if err == nil {
		early = uint64(rw.Reader.Buffered())
	}
	if k.p != nil {
		if err != nil {
			k.p.release(k.client)
			k.f.err, k.f.ev.Close = err, closeReset
			k.p.finish(k.f)
			return c, rw, err
		}
		c.SetReadDeadline(time.Now().Add(k.p.cfg.HelloTimeout))
		k.conn = c
		k.p.trackConn(c) // or closed at once: the proxy is closing
		raw := c
		lc := k.p.addLive(k.at, k.f, k.decide, func() { raw.Close() })
		ic := &inspectedClient{Conn: c}
		ic.done = func() {
			k.p.untrackConn(k.conn)
			k.p.release(k.client)
			k.f.ev.BytesOut, k.f.ev.BytesIn = ic.read.Load()+early, ic.written.settled()
			k.p.stampLive(lc, &k.f.ev)
			k.p.finish(k.f)
		}
		c = ic
	}
	if err != nil {
		return c, rw, err
	}
	if early > 0 {
		pre, _ := rw.Reader.Peek(rw.Reader.Buffered())
		c = &pipelinedConn{Conn: c, pre: bytes.Clone(pre)}
	} else if k.wrap == nil {
		return c, rw, nil
	}
	if k.wrap != nil {
		c = k.wrap(c)
	}
	return c, bufio.NewReadWriter(bufio.NewReader(c), rw.Writer), nil
}

// inspectedClient is the hijacked connection of an inspected CONNECT as
// goproxy holds it: it counts the bytes read and written (goproxy may do
// both at once, for a WebSocket), and closing it (once) calls done.
type inspectedClient struct {
	net.Conn
	read    atomic.Uint64
	written writeCount
	once    sync.Once
	done    func()
}

func (c *inspectedClient) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.read.Add(uint64(n))
	return n, err
}

func (c *inspectedClient) Write(b []byte) (int, error) {
	return c.written.write(func() (int, error) { return c.Conn.Write(b) })
}

func (c *inspectedClient) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.done)
	return err
}

// pipelinedConn is a hijacked CONNECT connection whose first bytes were
// read already: Read returns them first.
type pipelinedConn struct {
	net.Conn
	pre []byte
}

func (c *pipelinedConn) Read(b []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(b, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// authOK checks a request's proxy credentials; authGranted when the
// proxy asks for none.
func (p *Proxy) authOK(r *http.Request) authResult {
	set := p.userDigests.Load()
	if len(p.cfg.ProxyUsers) == 0 && set == nil {
		return authGranted
	}
	h := r.Header.Get("Proxy-Authorization")
	// The scheme is a case-insensitive token (RFC 9110 section 11.1).
	if len(h) < 6 || !strings.EqualFold(h[:6], "Basic ") {
		return authDenied
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(h[6:]))
	if err != nil {
		return authDenied
	}
	user, pass, ok := strings.Cut(string(raw), ":")
	if !ok {
		return authDenied
	}
	if want, ok := p.cfg.ProxyUsers[user]; ok {
		if subtle.ConstantTimeCompare([]byte(pass), []byte(want)) == 1 {
			return authGranted
		}
		return authDenied
	}
	if set != nil {
		return p.checkDigestUser(r.Context(), set, addrPortOf(tcpAddrString(r.RemoteAddr)).Addr().Unmap(), user, pass)
	}
	return authDenied
}

// SetProxyUserDigests replaces the users of Config.ProxyUserDigests (egressd
// run's reload of --proxy-users), and forgets the passwords checked
// against the old ones, unless the users and their secrets are the same
// (a reload of an unchanged file keeps them); requests already
// authenticated are not asked again. An empty map is refused: it would
// open a proxy that asked for users to anyone.
func (p *Proxy) SetProxyUserDigests(users map[string]UserSecret) error {
	if len(users) == 0 {
		return errors.New("proxy: no proxy users (the explicit proxy would be open to anyone)")
	}
	for u := range users {
		if u == "" {
			return errors.New("proxy: a proxy user has an empty name")
		}
		if _, ok := p.cfg.ProxyUsers[u]; ok {
			return fmt.Errorf("proxy: proxy user %q has both a password and a digest", u)
		}
	}
	if cur := p.userDigests.Load(); cur != nil && maps.EqualFunc(cur.users, users, UserSecret.equal) {
		return nil
	}
	p.userDigests.Store(newUserSet(maps.Clone(users)))
	return nil
}

func tcpAddrString(s string) net.Addr {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return &net.TCPAddr{}
	}
	return net.TCPAddrFromAddrPort(ap)
}

// decideTarget decides an explicit request's authority (CONNECT host:port
// or an absolute URL's host) and picks the address to dial: an IP literal
// is decided by address alone; a name is decided, then resolved through
// the configured upstreams, and the first address outside the guarded
// ranges is used (THREATS.md A2, F1, F4, F5).
func (p *Proxy) decideTarget(ctx context.Context, eng *policy.Engine, client netip.Addr, mac net.HardwareAddr, host string, port uint16, path string, src audit.NameSource) (verdict, netip.AddrPort) {
	in := policy.Input{Client: client, ClientMAC: mac, Port: port, Proto: policy.TCP, Path: path, Now: time.Now()}
	if a, ok := literalAddr(host); ok {
		in.Dest = a
		v := p.decideAddr(eng, in, audit.NameNone)
		if v.d.Allowed() {
			// decideAddr guarded the unmapped form only when it was
			// allowed by address; guard the literal as written too.
			if p.guardRefuses(eng, in) {
				v.d = denyDecision(eng, ReasonSpecialRange)
			}
		}
		return v, netip.AddrPortFrom(a.Unmap(), port)
	}
	if numericForm(host) {
		return verdict{d: denyDecision(eng, ReasonIPLiteral), name: host, src: src, how: byBytes}, netip.AddrPort{}
	}
	name, ok := policy.NormalizeName(host)
	if !ok {
		return verdict{d: denyDecision(eng, policy.ReasonInvalidName), name: host, src: src, how: byBytes}, netip.AddrPort{}
	}
	in.Name = name
	// Decided on the name alone (no destination yet: the proxy resolves
	// it itself, so nothing is spoofed); a reload decides it so again
	// (againConnect).
	v := verdict{name: name, src: src, how: byName, in: in, vouched: true}
	v.d = eng.Decide(in)
	if v.d.Allowed() {
		v.inspect = p.needsInspection(eng, in)
	}
	if v.enforced() {
		// Refused whatever it resolves to: not looked up, for the lookup
		// would carry a denied name to the upstream resolvers (an
		// exfiltration channel our DNS closes for such names).
		return v, netip.AddrPort{}
	}
	if p.deps.Resolver == nil {
		if v.d.Allowed() {
			v.d = denyDecision(eng, ReasonResolve)
		}
		return v, netip.AddrPort{}
	}
	lctx, cancel := context.WithTimeout(ctx, p.cfg.LookupTimeout)
	addrs, err := p.deps.Resolver.LookupNetIP(lctx, name)
	cancel()
	if err != nil || len(addrs) == 0 {
		// A failed lookup is a deny (THREATS.md G4); in audit mode there is
		// nothing to connect to either, and the caller refuses (502).
		v.d = denyDecision(eng, ReasonResolve)
		return v, netip.AddrPort{}
	}
	var special bool
	for _, a := range addrs {
		in.Dest = a
		if p.guardRefuses(eng, in) {
			special = true
			continue
		}
		return v, netip.AddrPortFrom(a.Unmap(), port)
	}
	if special && v.d.Allowed() {
		v.d = denyDecision(eng, ReasonSpecialRange)
	}
	in.Dest = addrs[0]
	if d, ok := p.selfDecision(eng, in); ok {
		v.d = d
	}
	return v, netip.AddrPortFrom(addrs[0].Unmap(), port)
}

// splitHostPortStrict splits a CONNECT authority; the port is required.
func splitHostPortStrict(hp string) (string, uint16, bool) {
	h, port, ok := httpwire.SplitAuthority(hp)
	if !ok || port == "" {
		return "", 0, false
	}
	n, _ := strconv.Atoi(port)
	return h, uint16(n), true
}

// handleConnect decides a CONNECT.
func (p *Proxy) handleConnect(host string, ctx *goproxy.ProxyCtx) (*goproxy.ConnectAction, string) {
	r := ctx.Req
	if st, ok := r.Context().Value(transparentKey{}).(*connectState); ok {
		// A transparent connection handed over for inspection.
		ctx.UserData = st
		return p.inspectAction(st, host, ctx), host
	}
	ca := addrPortOf(tcpAddrString(r.RemoteAddr))
	f := &flowRecord{listener: "explicit", ev: audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: time.Now(),
		Client: audit.ClientAddr(ca.Addr()), ClientPort: ca.Port(), Proto: "tcp", NameSource: audit.NameConnect}}
	at := p.policyNow()
	eng := at.eng
	reject := func(v verdict, code int) (*goproxy.ConnectAction, string) {
		f.ev.Stamp(v.d)
		f.ev.Enforced, f.ev.Close = true, closeDenied
		p.finish(f)
		if code == http.StatusForbidden {
			shown := v.name
			if shown == "" {
				shown = host
			}
			ctx.Resp = p.denyResponse(r, DenyInfo{Host: shown, Client: ca.Addr().String(), Rule: v.d.Rule, Reason: v.d.Reason})
		} else {
			ctx.Resp = plainResponse(r, code, v.d.Reason)
		}
		return &goproxy.ConnectAction{Action: goproxy.ConnectReject}, host
	}
	h, port, ok := splitHostPortStrict(host)
	if !ok {
		f.ev.Name = host
		return reject(verdict{d: denyDecision(eng, ReasonHTTPBad), name: host, how: byBytes}, http.StatusBadRequest)
	}
	f.ev.DestPort = port
	mac := p.clientMAC(eng, ca.Addr())
	if mac != nil {
		f.ev.ClientMAC = mac.String()
	} else {
		f.ev.ClientMAC = p.slotDevice(r)
	}
	v, addr := p.decideTarget(r.Context(), eng, ca.Addr(), mac, h, port, "", audit.NameConnect)
	f.ev.Name, f.ev.NameSource = v.name, v.src
	if v.src == audit.NameNone {
		f.ev.NameSource = audit.NameConnect
		f.ev.Name = ""
	}
	if addr.IsValid() {
		f.ev.Dest = addr.Addr()
	}
	if v.enforced() {
		return reject(v, http.StatusForbidden)
	}
	if !addr.IsValid() {
		return reject(v, http.StatusBadGateway)
	}
	st := &connectState{host: v.name, addr: addr, client: ca, mac: mac, src: audit.NameConnect, at: at}
	if v.d.Allowed() {
		in := policy.Input{Client: ca.Addr(), ClientMAC: mac, Dest: addr.Addr(), Port: port, Proto: policy.TCP, Name: v.name, NoPath: true, Now: time.Now()}
		if d := eng.Decide(in); !d.Allowed() {
			st.noPath = d
		}
	}
	if v.inspect && v.d.Allowed() {
		if _, err := p.ensureCA(); err == nil {
			kp, _ := r.Context().Value(hijackKey{}).(*keepPipelined)
			if kp != nil && !p.takeExplicitSlot(r, ca.Addr()) {
				f.ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonLimit, Mode: v.d.Mode})
				f.ev.Enforced, f.ev.Close = true, closeLimit
				p.finish(f)
				ctx.Resp = plainResponse(r, http.StatusServiceUnavailable, ReasonLimit)
				return &goproxy.ConnectAction{Action: goproxy.ConnectReject}, host
			}
			f.ev.Stamp(v.d)
			f.ev.Close = "inspected"
			st.rec = f
			if kp == nil {
				p.finish(f)
			} else {
				// The connection's flow ends when the connection does.
				kp.p, kp.client, kp.f = p, ca.Addr(), f
				kp.at, kp.decide = at, func(e *policy.Engine) policy.Decision { return p.againConnect(e, hostLevel(v), addr, false) }
				st.requestSeen = func() {
					if kp.conn != nil {
						kp.conn.SetReadDeadline(time.Time{})
					}
				}
			}
			ctx.UserData = st
			if kp == nil {
				return &goproxy.ConnectAction{Action: goproxy.ConnectMitm, TLSConfig: p.mitmTLSConfig}, host
			}
			act := p.inspectAction(st, host, ctx)
			kp.wrap = st.wrap
			return act, host
		} else if eng.Mode() == policy.ModeEnforce {
			f.err = err
			return reject(verdict{d: denyDecision(eng, "inspection-unavailable"), name: v.name}, http.StatusForbidden)
		}
	}
	return &goproxy.ConnectAction{Action: goproxy.ConnectHijack, Hijack: func(req *http.Request, client net.Conn, _ *goproxy.ProxyCtx) {
		p.tunnelConnect(client, st, v, f)
	}}, host
}

// inspectAction is the goproxy action of an inspected connection: goproxy
// reads its requests from behind an inspectConn, which terminates TLS for
// host and follows the cleartext (st.clear). goproxy sees cleartext only;
// the TLS it would terminate is TLS inside the inspected TLS, refused.
func (p *Proxy) inspectAction(st *connectState, host string, ctx *goproxy.ProxyCtx) *goproxy.ConnectAction {
	st.wrap = func(c net.Conn) net.Conn {
		// Set before goproxy reads a request (it hijacks first).
		st.clear = newClearStream(p.cfg.HelloMaxBytes)
		return &inspectConn{Conn: c, cs: st.clear, tlsConfig: func() (*tls.Config, error) { return p.mitmTLSConfig(host, ctx) }}
	}
	nested := func(string, *goproxy.ProxyCtx) (*tls.Config, error) {
		return nil, errors.New("proxy: TLS inside an inspected TLS connection")
	}
	return &goproxy.ConnectAction{Action: goproxy.ConnectMitm, TLSConfig: nested}
}

// plainResponse is a short text response for errors that are not policy
// denies (bad request, no route).
func plainResponse(req *http.Request, code int, reason string) *http.Response {
	body := fmt.Sprintf("egressd: %s (%s)\n", http.StatusText(code), reason)
	resp := &http.Response{
		StatusCode: code, Status: fmt.Sprintf("%d %s", code, http.StatusText(code)),
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"Content-Type": {"text/plain; charset=utf-8"}},
		Body:   nopCloser{bytes.NewReader([]byte(body))}, ContentLength: int64(len(body)),
		Request: req, Close: true,
	}
	return resp
}

// tunnelConnect dials the decided address and splices an accepted CONNECT.
func (p *Proxy) tunnelConnect(client net.Conn, st *connectState, v verdict, f *flowRecord) {
	f.ev.Stamp(v.d)
	defer p.finish(f)
	if !p.trackConn(client) {
		f.ev.Close = closeShutdown
		return
	}
	defer p.untrackConn(client)
	defer client.Close()
	if !p.acquire(st.client.Addr()) {
		f.ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonLimit, Mode: v.d.Mode})
		f.ev.Enforced, f.ev.Close = true, closeLimit
		io.WriteString(client, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 38\r\nConnection: close\r\n\r\negressd: too many connections, retry\n")
		return
	}
	defer p.release(st.client.Addr())
	server, err := p.dial(context.Background(), st.addr)
	if err != nil {
		f.err, f.ev.Close = err, closeDial
		io.WriteString(client, "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 39\r\nConnection: close\r\n\r\negressd: cannot connect to destination\n")
		return
	}
	if !p.trackDialed(server) {
		f.ev.Close = closeShutdown
		return
	}
	defer p.untrackConn(server)
	if _, err := io.WriteString(client, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		server.Close()
		f.err, f.ev.Close = err, closeReset
		return
	}
	// Bytes the client sent before the 200 go first; then the bare
	// connection, which splices.
	var pre []byte
	if pc, ok := client.(*pipelinedConn); ok {
		pre, client = pc.pre, pc.Conn
	}
	if st.noPath.Reason != "" {
		// Only a host/path rule allows it: TLS inside is decided at host
		// level (the path is encrypted, as on the transparent path);
		// cleartext, or a client silent until the hello deadline, shows
		// no path the proxy reads (HTTP/2 with prior knowledge, say).
		if len(pre) == 0 {
			var b [1]byte
			client.SetReadDeadline(time.Now().Add(p.cfg.HelloTimeout))
			n, _ := client.Read(b[:])
			client.SetReadDeadline(time.Time{})
			pre = b[:n]
		}
		if len(pre) == 0 || pre[0] != 0x16 {
			f.ev.Stamp(st.noPath)
			f.ev.NoPath = true
			if f.ev.Enforced {
				server.Close()
				f.ev.Close = closeDenied
				return
			}
		}
	}
	early := len(pre)
	if early > 0 {
		if _, err := server.Write(pre); err != nil {
			server.Close()
			f.err, f.ev.Close = err, closeReset
			return
		}
	}
	noPath := f.ev.NoPath
	lc := p.addLiveShared(st.at, f, func(e *policy.Engine) policy.Decision { return p.againConnect(e, v, st.addr, noPath) }, closeBoth(client, server))
	out, in, reason := p.pipe(client, server)
	p.endLive(lc) // before the record is written (addLiveShared)
	f.ev.BytesOut, f.ev.BytesIn, f.ev.Close = uint64(out)+uint64(early), uint64(in), reason
	p.stampLive(lc, &f.ev)
}

// againConnect decides a CONNECT tunnel to addr again under eng (a
// reload): its authority as decideTarget decided it, the address it
// dialled guarded as there, and, when the tunnel turned out not to be
// TLS (noPath), as a tunnel without a path.
func (p *Proxy) againConnect(eng *policy.Engine, v verdict, addr netip.AddrPort, noPath bool) policy.Decision {
	d := p.again(eng, v)
	if !d.Allowed() {
		return d
	}
	in := p.withMAC(eng, v.in)
	in.Now, in.Dest, in.Name = time.Now(), addr.Addr(), v.name
	if p.guardRefuses(eng, in) {
		return denyDecision(eng, ReasonSpecialRange)
	}
	if noPath {
		in.NoPath = true
		if nd := eng.Decide(in); !nd.Allowed() {
			return nd
		}
	}
	return d
}

// handleRequest decides a plain HTTP request of the explicit proxy, or a
// request inside an inspected connection, on host and path.
//
// A forwarded request's record is finished when its response has been
// relayed (explicitRoundTrip), not when it is decided: until then it is
// registered for a reload, as a tunnel is, for a response may last as
// long as one (a WebSocket upgrade, which goproxy splices both ways; a
// stream of server-sent events).
func (p *Proxy) handleRequest(req *http.Request, ctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
	if req.URL.Path == "" && req.URL.Opaque == "" {
		// An absolute-form target without a path ("http://host",
		// "https://host?q") asks for "/", and Go's transport sends "/":
		// decided so. An empty path is an unknown one to the policy,
		// which host/path rules allow at host level.
		req.URL.Path, req.URL.RawPath = "/", ""
	}
	if st, ok := ctx.UserData.(*connectState); ok {
		ctx.RoundTripper = goproxy.RoundTripperFunc(p.inspectedRoundTrip)
		return p.inspectedRequest(p.policyNow(), st, req)
	}
	at := p.policyNow()
	eng := at.eng
	ca := addrPortOf(tcpAddrString(req.RemoteAddr))
	f := &flowRecord{listener: "explicit", ev: audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: time.Now(),
		Client: audit.ClientAddr(ca.Addr()), ClientPort: ca.Port(), Proto: "tcp", NameSource: audit.NameHost, Path: req.URL.EscapedPath()}}
	forwarded := false
	defer func() {
		if !forwarded {
			p.finish(f)
		}
	}()
	if !strings.EqualFold(req.URL.Scheme, "http") {
		f.ev.Stamp(denyDecision(eng, ReasonHTTPBad))
		f.ev.Enforced, f.ev.Close = true, closeDenied
		return req, plainResponse(req, http.StatusBadRequest, "only http:// URLs; use CONNECT for https")
	}
	host := req.URL.Hostname()
	port := uint16(80)
	if ps := req.URL.Port(); ps != "" {
		if !httpwire.ValidPort(ps) {
			f.ev.Stamp(denyDecision(eng, ReasonHTTPBad))
			f.ev.Enforced, f.ev.Close = true, closeDenied
			return req, plainResponse(req, http.StatusBadRequest, "bad port")
		}
		n, _ := strconv.Atoi(ps)
		port = uint16(n)
	}
	f.ev.DestPort = port
	mac := p.clientMAC(eng, ca.Addr())
	if mac != nil {
		f.ev.ClientMAC = mac.String()
	} else {
		f.ev.ClientMAC = p.slotDevice(req)
	}
	// The path as sent (escaped), as on the transparent path: the policy
	// matches its normal form (policy.NormalPath); one an origin may read
	// as another does not pass a host/path glob (path-form).
	v, addr := p.decideTarget(req.Context(), eng, ca.Addr(), mac, host, port, req.URL.EscapedPath(), audit.NameHost)
	hin := policy.Input{Client: ca.Addr(), ClientMAC: mac, Port: port, Proto: policy.TCP, Name: v.name, Now: time.Now()}
	if v.name == "" {
		hin.Dest = addr.Addr()
	}
	v.d = targetForm(eng, req.RequestURI, eng.PathForm(hin, req.URL.EscapedPath(), v.d))
	f.ev.Name, f.ev.NameSource = v.name, v.src
	if addr.IsValid() {
		f.ev.Dest = addr.Addr()
	}
	f.ev.Stamp(v.d)
	if v.enforced() {
		f.ev.Close = closeDenied
		shown := v.name
		if shown == "" {
			shown = host
		}
		return req, p.denyResponse(req, DenyInfo{Host: shown, Path: req.URL.EscapedPath(), Client: ca.Addr().String(), Rule: v.d.Rule, Reason: v.d.Reason})
	}
	if !addr.IsValid() {
		f.ev.Close = closeDial
		return req, plainResponse(req, http.StatusBadGateway, v.d.Reason)
	}
	f.ev.Close = "forwarded"
	dropConnectionFields(req.Header)
	escaped, target := req.URL.EscapedPath(), req.RequestURI
	decide := func(e *policy.Engine) policy.Decision {
		// A reload decides it with the checks of its start: the
		// path's form and the target's bytes.
		d := p.againConnect(e, v, addr, false)
		hin := p.withMAC(e, hin)
		hin.Now = time.Now()
		return targetForm(e, target, e.PathForm(hin, escaped, d))
	}
	client, _ := req.Context().Value(clientConnKey{}).(net.Conn)
	forwarded = true
	ctx.RoundTripper = goproxy.RoundTripperFunc(func(req *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
		return p.explicitRoundTrip(req, at, f, decide, client)
	})
	return req.WithContext(context.WithValue(req.Context(), dialKey{}, addr)), nil
}

// targetForm is d, or http-malformed where the explicit proxy's request
// target, as sent, has a byte the transparent and inspected paths refuse
// (httpwire.TargetBytes: raw bytes 0x80 and above, UTF-8 net/http took
// and re-encodes). A request's start and a reload's re-check decide so.
func targetForm(eng *policy.Engine, target string, d policy.Decision) policy.Decision {
	if !httpwire.TargetBytes(target) {
		return denyDecision(eng, ReasonHTTPBad)
	}
	return d
}

// clientConnKey is the context key of an explicit proxy request's client
// connection (ServeExplicit's ConnContext).
type clientConnKey struct{}

// explicitRoundTrip forwards an allowed plain request of the explicit
// proxy and registers it for a reload (addLive) until its response has
// been relayed: the response body's end (EOF, an error, or goproxy's
// Close) ends the registration and finishes f, the request's record. A
// reload that denies it in enforce mode closes the client's connection
// and the origin's: for an upgraded stream (101), both directions.
func (p *Proxy) explicitRoundTrip(req *http.Request, at policyAt, f *flowRecord, decide func(*policy.Engine) policy.Decision, client net.Conn) (*http.Response, error) {
	resp, err := p.gp.Tr.RoundTrip(req)
	if err != nil {
		p.finish(f)
		return nil, err
	}
	b := &liveBody{ReadCloser: resp.Body}
	lc := p.addLive(at, f, decide, func() {
		if client != nil {
			client.Close()
		}
		b.ReadCloser.Close()
	})
	b.done = func() {
		f.ev.BytesIn, f.ev.BytesOut = b.read.Load(), b.written.settled()
		p.stampLive(lc, &f.ev)
		p.finish(f)
	}
	if _, ok := resp.Body.(io.Writer); ok {
		// An upgraded connection: goproxy writes the client's bytes to it.
		resp.Body = &liveRWBody{liveBody: b, client: client}
	} else {
		resp.Body = b
	}
	return resp, nil
}

// liveBody is the response body of a forwarded explicit request as goproxy
// relays it: it counts the bytes read (and, upgraded, written), and its
// end (EOF, a read error, or Close, whichever comes first) calls done once.
type liveBody struct {
	io.ReadCloser
	read    atomic.Uint64
	written writeCount
	once    sync.Once
	done    func()
}

func (b *liveBody) Read(buf []byte) (int, error) {
	n, err := b.ReadCloser.Read(buf)
	b.read.Add(uint64(n))
	if err != nil {
		b.once.Do(b.done)
	}
	return n, err
}

func (b *liveBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

// liveRWBody is a liveBody of an upgraded connection (101): the body is
// the origin's connection, which goproxy writes the client's bytes to.
// Closing it closes the client's connection too: goproxy closes the body
// once either side has ended, but leaves the client's connection it
// hijacked open, so a stream the origin ended would hang on until the
// client spoke again. The client's bytes are all relayed by then (the
// copy toward the client has ended, or the client has).
//
// Its end (a read's error, or Close) closes the origin's connection
// before done, which ends a Write to it in flight and so lets done wait
// for its count (writeCount).
type liveRWBody struct {
	*liveBody
	client net.Conn
}

func (b *liveRWBody) Read(buf []byte) (int, error) {
	n, err := b.ReadCloser.Read(buf)
	b.read.Add(uint64(n))
	if err != nil {
		b.end()
	}
	return n, err
}

func (b *liveRWBody) Close() error {
	err := b.end()
	if b.client != nil {
		b.client.Close()
	}
	return err
}

// end closes the origin's connection and calls done once.
func (b *liveRWBody) end() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

func (b *liveRWBody) Write(buf []byte) (int, error) {
	return b.written.write(func() (int, error) { return b.ReadCloser.(io.Writer).Write(buf) })
}

// writeCount counts the bytes written to a connection whose record
// another goroutine finishes: the goroutine that relays one direction of
// an upgraded stream is not the one that ends it, and the peer may have
// acted on bytes (the origin echoed them, the client read them) before
// the Write that sent them returned and counted them. settled, called
// once the connection is closed (which ends a Write in flight), waits
// for that count.
type writeCount struct {
	mu sync.RWMutex // held shared by each write until its bytes are counted
	n  atomic.Uint64
}

func (w *writeCount) write(f func() (int, error)) (int, error) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	n, err := f()
	w.n.Add(uint64(n))
	return n, err
}

// settled returns the count once no write is in flight; the connection
// must be closed first, or it waits for a write that may block.
func (w *writeCount) settled() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n.Load()
}

// dropConnectionFields removes the header fields the client named in
// Connection: they are for this hop only (RFC 9110 section 7.6.1), and
// goproxy removes Connection itself but not the fields it names. Upgrade
// stays: goproxy keeps "Connection: Upgrade" for a WebSocket handshake.
func dropConnectionFields(h http.Header) {
	for _, v := range h.Values("Connection") {
		for f := range strings.SplitSeq(v, ",") {
			if f = strings.Trim(f, " \t"); f != "" && !strings.EqualFold(f, "Upgrade") && !strings.EqualFold(f, "Connection") {
				h.Del(f)
			}
		}
	}
}

// inspectedRequest decides one request inside an inspected connection on
// its host and path. A request for the host the connection was decided
// for is decided on its path; one whose Host names another host (domain
// fronting, THREATS.md A1) is decided on that host at the connection's
// address, as decideHTTP decides it, and its event carries the
// connection's host as Front; one whose Host is no usable name, or
// disagrees with its absolute-form target, is refused (host-mismatch). On
// cleartext (st.plain) each request is decided on its own Host and path,
// as decideHTTP decides it. The request is recorded as a request event
// (the connection is the flow), as a later request on plain HTTP is.
func (p *Proxy) inspectedRequest(at policyAt, st *connectState, req *http.Request) (*http.Request, *http.Response) {
	eng := at.eng
	ev := requestEvent(&st.rec.ev, time.Now())
	ev.Name, ev.NameSource, ev.Path = st.host, st.src, req.URL.EscapedPath()
	first := st.firstIsFlow
	st.firstIsFlow = false
	if st.requestSeen != nil {
		// The handshake and a head are done: the request's body, and the
		// connection after it, are not bounded by the head deadline.
		st.requestSeen()
	}
	var headErr error
	if st.clear != nil {
		if st.clear.tls.Load() {
			// goproxy read it as cleartext, behind the inspectConn
			// that terminated TLS.
			req.URL.Scheme = "https"
		}
		headErr = st.clear.next()
	}
	host, _ := policy.NormalizeName(req.URL.Hostname())
	var d policy.Decision
	if headErr != nil {
		// As without inspection: a Host line that disagrees with the
		// absolute-form target (which net/http drops), or a head the
		// request follower refuses.
		d = httpErrDecision(eng, headErr)
	} else if st.plain {
		in := policy.Input{Client: st.client.Addr(), ClientMAC: st.mac, Dest: st.addr.Addr(), Port: st.addr.Port(), Proto: policy.TCP, Now: time.Now()}
		v := p.decideHTTP(req.Context(), eng, in, &httpwire.Head{Host: req.URL.Hostname(), Path: req.URL.EscapedPath()})
		d, ev.Name, ev.NameSource = v.d, v.name, v.src
		if st.latest != nil {
			// A reload decides the connection on its latest request, as
			// a plain one not inspected (httpUpstream.latestAgain).
			st.latest.Store(&v)
			if st.lc != nil && p.gen.Load() != at.gen {
				p.redecideAgain(st.lc)
			}
		}
	} else if _, lit := literalAddr(req.URL.Hostname()); host != st.host && host != "" && !lit {
		// Domain fronting (THREATS.md A1): the Host names another host
		// than the connection was opened for. Decided on that host, at
		// the connection's address, as a connection to it would be (the
		// address must be one of its own: A2); the request goes out with
		// that name (the upstream TLS verifies it), never under the
		// connection's verdict, and the event says it was fronted.
		in := policy.Input{Client: st.client.Addr(), ClientMAC: st.mac, Dest: st.addr.Addr(), Port: st.addr.Port(), Proto: policy.TCP, Now: time.Now()}
		v := p.decideHTTP(req.Context(), eng, in, &httpwire.Head{Host: req.URL.Hostname(), Path: req.URL.EscapedPath()})
		d, ev.Name, ev.NameSource, ev.Front = v.d, v.name, v.src, st.host
	} else if host != st.host {
		d = denyDecision(eng, ReasonHostMismatch)
	} else {
		// The path as the origin gets it (escaped, as on the
		// transparent path and in capture): the policy matches its
		// normal form (policy.NormalPath), not net/http's decoding.
		in := p.withMAC(eng, policy.Input{Client: st.client.Addr(), ClientMAC: st.mac, Dest: st.addr.Addr(), Port: st.addr.Port(), Proto: policy.TCP, Name: st.host, Path: req.URL.EscapedPath()})
		d = eng.Decide(in)
		d = eng.PathForm(in, req.URL.EscapedPath(), d)
	}
	ev.Stamp(d)
	if !first || !d.Allowed() {
		// An allowed first request the connection's flow stands for is
		// not recorded twice.
		p.emitRequest("inspect", ev, nil)
	}
	if ev.Enforced {
		// The 403 closes the connection.
		st.rec.ev.Close = closeRequestDenied
		shown := ev.Name
		if shown == "" {
			shown = st.addr.Addr().String()
		}
		return req, p.denyResponse(req, DenyInfo{Host: shown, Path: req.URL.EscapedPath(), Client: st.client.Addr().String(), Rule: d.Rule, Reason: d.Reason})
	}
	dropConnectionFields(req.Header)
	return req.WithContext(context.WithValue(req.Context(), dialKey{}, st.addr)), nil
}

// inspectedRoundTrip forwards an inspected request. When the origin
// cannot be reached (dial, certificate verification, no answer), the
// client gets a 502 and the error is logged: goproxy would close the
// client's connection without a word.
func (p *Proxy) inspectedRoundTrip(req *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
	resp, err := p.gp.Tr.RoundTrip(req)
	if err != nil {
		p.log.Warn("proxy: inspected request failed upstream", "host", audit.Clip(req.URL.Host, audit.MaxNameBytes), audit.LogError, audit.ErrorText(err))
		return plainResponse(req, http.StatusBadGateway, "the destination did not answer or failed verification"), nil
	}
	return resp, nil
}

// mitmTLSConfig is the TLS configuration for an inspected connection: a
// leaf for the host signed by the inspection CA (certStore.leaf, not
// goproxy's signer: see signLeaf).
func (p *Proxy) mitmTLSConfig(host string, _ *goproxy.ProxyCtx) (*tls.Config, error) {
	ca, err := p.ensureCA()
	if err != nil {
		return nil, err
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	// Names are matched without regard to case (by the policy and by
	// clients), and a trailing dot names the same host: one leaf, and one
	// cache entry, for all spellings. The leaf names the host without the
	// dot, as clients check it (curl and OpenSSL drop the dot first).
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	leaf, err := p.certs.leaf(ca.cert, host)
	if err != nil {
		return nil, fmt.Errorf("proxy: leaf for %s: %w", host, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{*leaf}}, nil
}

// inspectTransparent hands a redirected connection whose host has
// host/path rules to goproxy as if the client had sent CONNECT: goproxy
// terminates TLS with a leaf from our CA (or reads plain HTTP), and
// handleRequest decides every request on host and path.
func (p *Proxy) inspectTransparent(c *net.TCPConn, at policyAt, recorded []byte, orig netip.AddrPort, v verdict, isTLS bool, f *flowRecord) error {
	if _, err := p.ensureCA(); err != nil {
		return err
	}
	st := &connectState{host: v.name, addr: orig, client: netip.AddrPortFrom(addrPortOf(c.RemoteAddr()).Addr(), f.ev.ClientPort), mac: v.in.ClientMAC, src: v.src, transparent: true,
		rec: f, firstIsFlow: !isTLS, plain: !isTLS}
	// goproxy reads the TLS handshake and the first request head without
	// a deadline: bound them as the hello was.
	c.SetReadDeadline(time.Now().Add(p.cfg.HelloTimeout))
	st.requestSeen = func() { c.SetReadDeadline(time.Time{}) }
	hostport := net.JoinHostPort(v.name, strconv.Itoa(int(orig.Port())))
	req := (&http.Request{
		Method: http.MethodConnect, URL: &url.URL{Host: hostport}, Host: hostport,
		RemoteAddr: st.client.String(), Header: http.Header{},
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
	}).WithContext(context.WithValue(context.Background(), transparentKey{}, st))
	f.ev.Close = "inspected"
	rc := &replayConn{TCPConn: c, r: io.MultiReader(bytes.NewReader(recorded), c), swallow: true}
	// A reload decides the connection again at host level (each request
	// in it is decided under the policy of its time anyway), a plain one
	// on its latest request (inspectedRequest): closing the client's side
	// ends goproxy's reads and writes, and with them the request in
	// flight to the origin.
	again := func(e *policy.Engine) policy.Decision { return p.again(e, hostLevel(v)) }
	if !isTLS {
		st.latest = new(atomic.Pointer[verdict])
		st.latest.Store(&v)
		again = func(e *policy.Engine) policy.Decision { return p.again(e, hostLevel(*st.latest.Load())) }
	}
	lc := p.addLive(at, f, again, func() { c.Close() })
	st.lc = lc
	rc.onClose = func() {
		p.untrackConn(c)
		p.release(st.client.Addr())
		f.ev.BytesOut, f.ev.BytesIn = rc.read.Load(), rc.written.settled()
		p.stampLive(lc, &f.ev)
		p.finish(f)
	}
	p.gp.ServeHTTP(&hijackWriter{conn: rc, st: st}, req)
	return nil
}

// replayConn is the client connection as goproxy sees it for transparent
// inspection: reads replay the peeked bytes first; the "200 OK" goproxy
// writes for the synthetic CONNECT is swallowed (the client never sent
// one); the bytes read and written are counted (goproxy may do both at
// once, for a WebSocket); Close reports the end of the connection once.
type replayConn struct {
	*net.TCPConn
	r       io.Reader
	swallow bool
	closed  bool
	onClose func()
	read    atomic.Uint64
	written writeCount
}

func (c *replayConn) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.read.Add(uint64(n))
	return n, err
}

func (c *replayConn) Write(b []byte) (int, error) {
	if c.swallow {
		c.swallow = false
		if bytes.HasPrefix(b, []byte("HTTP/1.")) {
			return len(b), nil
		}
	}
	return c.written.write(func() (int, error) { return c.TCPConn.Write(b) })
}

func (c *replayConn) Close() error {
	err := c.TCPConn.Close()
	if !c.closed {
		c.closed = true
		if c.onClose != nil {
			c.onClose()
		}
	}
	return err
}

// hijackWriter is the http.ResponseWriter for the synthetic CONNECT.
type hijackWriter struct {
	conn net.Conn
	st   *connectState // its wrap, set by handleConnect, takes the connection
	h    http.Header
}

func (w *hijackWriter) Header() http.Header {
	if w.h == nil {
		w.h = http.Header{}
	}
	return w.h
}
func (w *hijackWriter) Write(b []byte) (int, error) { return w.conn.Write(b) }
func (w *hijackWriter) WriteHeader(int)             {}
func (w *hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c := w.conn
	if w.st != nil && w.st.wrap != nil {
		c = w.st.wrap(c)
	}
	return c, bufio.NewReadWriter(bufio.NewReader(bytes.NewReader(nil)), bufio.NewWriter(c)), nil
}
