package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"egressd/audit"
	"egressd/internal/httpwire"
	"egressd/internal/logjson"
	"egressd/policy"
)

// Close reasons of a plain-HTTP connection and of its later requests.
const (
	closeRequestDenied = "request-denied" // a later request was refused (enforce): 403, then closed
	closeForwarded     = "forwarded"      // a request event: forwarded to the origin
)

// httpBufSize is the client-to-origin buffer of a plain-HTTP connection
// (the size of one read; a head longer than it grows it up to
// HelloMaxBytes plus this).
const httpBufSize = 16 << 10

// decideHTTP decides one plain-HTTP request head on the transparent
// listener: by its Host (or absolute-form authority) and path when it names
// one, else by address. in carries the connection (client, original
// destination, port); the destination must be vouched for the name, as for
// an SNI. Host/path rules apply to the path (plain HTTP shows it without a
// CA).
//
// Path rules match the path without its query. A path that an origin may
// read as another one (dot segments, encoded dots, slashes or
// backslashes, double encoding) is refused when only a host/path rule
// allows the request (reason path-form): a glob must not be passed by
// "/allowed/../other".
func (p *Proxy) decideHTTP(ctx context.Context, eng *policy.Engine, in policy.Input, h *httpwire.Head) verdict {
	in = p.withMAC(eng, in)
	in.Path, _, _ = strings.Cut(h.Path, "?")
	var v verdict
	if _, lit := literalAddr(h.Host); h.Host == "" || lit {
		v = p.decideAddr(eng, in, audit.NameNone)
	} else {
		name := h.Host
		if n, ok := policy.NormalizeName(name); ok {
			name = n
		}
		in.Name = name
		v = p.decideName(ctx, eng, in, audit.NameHost)
	}
	hin := in
	hin.Name = v.name
	v.d = eng.PathForm(hin, in.Path, v.d)
	return v
}

// httpErrDecision is the deny for a request head or stream the proxy
// refuses.
func httpErrDecision(eng *policy.Engine, err error) policy.Decision {
	switch {
	case errors.Is(err, httpwire.ErrHostMismatch):
		return denyDecision(eng, ReasonHostMismatch)
	case errors.Is(err, errHelloTooLarge), errors.Is(err, httpwire.ErrHeadTooLarge):
		return denyDecision(eng, ReasonHelloTooLarge)
	case errors.Is(err, errPeekBudget):
		return denyDecision(eng, ReasonLimit)
	case errors.Is(err, httpwire.ErrHeadFraming):
		return denyDecision(eng, ReasonHTTPFraming)
	case isTimeout(err):
		return denyDecision(eng, ReasonHelloTimeout)
	default:
		return denyDecision(eng, ReasonHTTPBad)
	}
}

// httpUpstream is the client-to-origin direction of an allowed (or, in
// audit mode, would-be denied) plain HTTP/1.x connection: instead of a
// splice, a copy through a bounded buffer that finds every request head
// with an httpwire.ReqStream and decides it before forwarding a byte of it
// (THREATS.md C6). The origin-to-client direction stays spliced.
//
// A later request that is denied in enforce mode is not forwarded: the
// proxy half-closes toward the origin (which finishes the responses to the
// requests before it, then closes), and the tunnel answers the client with
// the 403 after the origin's last byte, then closes. In audit mode it is
// forwarded and recorded. Anything the parser refuses (ambiguous framing,
// a malformed or oversized head, a head that does not complete within
// HelloTimeout) is denied the same way in enforce mode; in audit mode it
// is recorded and the rest of the connection is spliced unparsed.
type httpUpstream struct {
	p      *Proxy
	base   policy.Input // client, original destination, port
	f      *flowRecord  // the connection's record
	s      httpwire.ReqStream
	held   []byte // bytes read with the first head, after it
	denied bool   // a later request was refused (enforce)
	// latest is the verdict of the latest request head decided on the
	// connection (the first, until another comes), what a reload decides
	// again (latestAgain); lc is the connection's registration.
	latest atomic.Pointer[verdict]
	lc     *liveConn
}

// latestAgain decides the connection again under eng (a reload) on its
// latest request: the request the connection carries now. Not on its
// first: a keep-alive connection that went to host A, then to B, is
// B's now, and A being denied later says nothing about it; nor on every
// request since: that would cut it for a host it no longer talks to.
// Each later request is decided when it comes anyway. An upgraded
// connection's latest request is the upgrade. Left: with pipelining, the
// responses to requests before the latest may still be coming.
func (u *httpUpstream) latestAgain(eng *policy.Engine) policy.Decision {
	return u.p.again(eng, *u.latest.Load())
}

// newHTTPUpstream follows a connection whose first head h has been
// decided and will be replayed; rest are the bytes read after it.
func (p *Proxy) newHTTPUpstream(in policy.Input, f *flowRecord, h *httpwire.Head, v verdict, rest []byte) *httpUpstream {
	u := &httpUpstream{p: p, base: in, f: f, held: rest}
	u.latest.Store(&v)
	u.s.MaxHead = p.cfg.HelloMaxBytes
	u.s.Start(h)
	return u
}

// run is the tunnel's upstream copy (tunnel.up).
func (u *httpUpstream) run(t *tunnel) (int64, error) {
	client, server := t.client, t.server
	// A small buffer, grown (up to a whole head plus a read) only while a
	// head larger than it is being read, and given back after.
	small := max(httpBufSize, len(u.held))
	buf := make([]byte, small)
	data := buf[:copy(buf, u.held)]
	u.held = nil
	var out int64
	var headStart time.Time
	idle := t.idle(client)
	clearDeadline := func() {
		headStart = time.Time{}
		if t.halfClosed.Load() && t.halfIdle > 0 {
			client.SetReadDeadline(time.Now().Add(t.halfIdle))
		} else {
			client.SetReadDeadline(time.Time{})
		}
	}
	for {
		for len(data) > 0 {
			k, h, err := u.s.Next(data)
			if errors.Is(err, httpwire.ErrNeedMore) {
				break
			}
			if err != nil {
				if u.refuse(t, err) {
					return out, nil
				}
				u.s.GiveUp()
				continue
			}
			if h != nil {
				if !headStart.IsZero() {
					clearDeadline()
				}
				if u.request(t, h) {
					return out, nil
				}
			}
			w, err := server.Write(data[:k])
			out += int64(w)
			if err != nil {
				return out, err
			}
			data = data[k:]
			if idle != nil {
				idle()
			}
		}
		if u.s.Tunnel() {
			// Upgraded, or given up in audit mode: splice the rest.
			if !headStart.IsZero() {
				clearDeadline()
			}
			n, err := copyConn(server, client, idle)
			return out + n, err
		}
		switch {
		case len(data) == len(buf) && len(buf) < u.s.MaxHead+httpBufSize:
			// A head or line longer than the buffer: grow it.
			buf = make([]byte, min(2*len(buf), u.s.MaxHead+httpBufSize))
		case len(data) == 0 && len(buf) > small:
			buf = make([]byte, small)
		}
		data = buf[:copy(buf, data)]
		if len(data) > 0 && u.s.InHead() && headStart.IsZero() {
			// A head has begun: it must complete in time (slowloris).
			headStart = time.Now()
			client.SetReadDeadline(headStart.Add(u.p.cfg.HelloTimeout))
		}
		n, err := client.Read(buf[len(data):])
		data = buf[:len(data)+n]
		if n > 0 {
			continue
		}
		switch {
		case err == nil:
			continue
		case errors.Is(err, io.EOF):
			// The client is done. Bytes held end inside a head or a
			// framing line: the origin would never see a complete request
			// in them; in audit mode they go through all the same.
			if len(data) > 0 && u.mode() == policy.ModeAudit {
				w, err := server.Write(data)
				out += int64(w)
				if err != nil {
					return out, err
				}
			}
			return out, nil
		case errors.Is(err, os.ErrDeadlineExceeded) && !headStart.IsZero() && !t.halfClosed.Load():
			if u.refuse(t, err) {
				return out, nil
			}
			clearDeadline()
			u.s.GiveUp()
		default:
			return out, err
		}
	}
}

func (u *httpUpstream) mode() policy.Mode { return u.p.deps.Policy.Load().Mode() }

// request decides a later request head and records it; true when it is
// refused (enforce mode) and the connection is being closed.
func (u *httpUpstream) request(t *tunnel, h *httpwire.Head) bool {
	at := u.p.policyNow()
	in := u.base
	in.Now = time.Now()
	v := u.p.decideHTTP(context.Background(), at.eng, in, h)
	u.latest.Store(&v)
	if u.lc != nil && u.p.gen.Load() != at.gen {
		// A reload's Redecide began since the engine was loaded: its
		// walk may have decided the connection on the request before.
		u.p.redecideAgain(u.lc)
	}
	ev := requestEvent(&u.f.ev, in.Now)
	path, _, _ := strings.Cut(h.Path, "?") // the query stays out of events and logs
	ev.Name, ev.NameSource, ev.Path = v.name, v.src, path
	ev.Stamp(v.d)
	return u.finish(t, ev, v, path, nil)
}

// refuse records a request the parser refused or whose head did not
// complete in time; true when the connection is being closed.
func (u *httpUpstream) refuse(t *tunnel, err error) bool {
	eng := u.p.deps.Policy.Load()
	now := time.Now()
	v := verdict{d: httpErrDecision(eng, err), src: audit.NameNone, how: byBytes}
	ev := requestEvent(&u.f.ev, now)
	ev.NameSource = audit.NameNone
	ev.Stamp(v.d)
	return u.finish(t, ev, v, "", err)
}

// requestEvent starts the event of one request on the connection whose
// record is c: its 5-tuple and its client's MAC, at now.
func requestEvent(c *audit.Event, now time.Time) audit.Event {
	return audit.Event{Kind: audit.KindRequest, Source: audit.SourceProxy, Time: now,
		Client: c.Client, ClientPort: c.ClientPort, ClientMAC: c.ClientMAC, Dest: c.Dest, DestPort: c.DestPort, Proto: c.Proto}
}

// finish emits the request's event and canonical line and, when the
// request is refused in enforce mode, stops the upstream: the origin gets
// EOF, the client the 403 after the origin's last byte.
func (u *httpUpstream) finish(t *tunnel, ev audit.Event, v verdict, path string, perr error) bool {
	refused := v.enforced()
	u.p.emitRequest("transparent", ev, perr)
	if !refused {
		return false
	}
	u.denied = true
	host := v.name
	if host == "" {
		host = ev.Dest.String()
	}
	t.setDeny(u.p.httpDeny(DenyInfo{Host: host, Path: path, Client: ev.Client.String(), Rule: v.d.Rule, Reason: v.d.Reason}))
	closeWrite(t.server)
	t.halfClose(t.server)
	// Read (and drop) what the client still sends until it closes, for a
	// bounded time and amount, so that closing does not reset the
	// connection before the client has read the 403.
	t.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.CopyN(io.Discard, t.client, 256<<10)
	t.client.SetReadDeadline(time.Time{})
	return true
}

// emitRequest sends a request event (stamped: forwarded, or denied when
// refused) to the sink and writes its canonical line for listener.
func (p *Proxy) emitRequest(listener string, ev audit.Event, err error) {
	ev.Close = closeForwarded
	if ev.Enforced {
		ev.Close = closeDenied
	}
	p.deps.Sink.Emit(ev)
	p.met.requestDone(ev.Verdict, ev.Mode)
	level := slog.LevelInfo
	if ev.Verdict == policy.Deny {
		level = slog.LevelWarn
	}
	if !p.log.Enabled(context.Background(), level) || audit.QuietLine(p.deps.Sink, &ev) {
		return
	}
	var buf [audit.FlowAttrsMax + 2]slog.Attr
	attrs := append(ev.AppendFlowAttrs(buf[:0]), slog.String("listener", listener))
	if err != nil {
		attrs = append(attrs, slog.String(audit.LogError, audit.ErrorText(err)))
	}
	logjson.Log(context.Background(), p.log, level, audit.CanonicalMessage, attrs...)
}
