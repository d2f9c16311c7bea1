package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"egressd/audit"

	"egressd/policy"
)

// testPolicyNoAllowed is testPolicy without its rule "allowed" (and the
// others but vpn): the reload that removes the rule.
const testPolicyNoAllowed = `version: 1
mode: %s
rules:
  - name: vpn
    to: [198.18.2.4/32]
    ports: [8443/tcp, 8444/tcp]
`

// testPolicyDocsOnly is testPolicy without its rule "allowed": the host/path
// rule docs stays.
const testPolicyDocsOnly = `version: 1
mode: %s
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [443/tcp, 80/tcp]
  - name: vpn
    to: [198.18.2.4/32]
    ports: [8443/tcp, 8444/tcp]
`

// liveTLS is an open TLS connection to the test origin that makes one
// keep-alive request after another.
type liveTLS struct {
	raw net.Conn // the client's socket (for its events)
	tc  *tls.Conn
	br  *bufio.Reader
}

// get makes one request on the connection and returns the body, or an
// error when the connection is gone.
func (l *liveTLS) get(path string) (string, error) {
	l.tc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(l.tc, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, l.tc.ConnectionState().ServerName); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(l.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// waitClosed waits up to 10 s for the proxy to close the connection: a
// read ends with EOF or a reset, not with the deadline.
func (l *liveTLS) waitClosed(t *testing.T, what string) {
	t.Helper()
	l.tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := l.tc.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: still open after the reload (read: %v)", what, err)
	}
}

// startTLS does the TLS handshake for name over c and a first request.
func (tp *topo) startTLS(t *testing.T, c net.Conn, name string) *liveTLS {
	t.Helper()
	return tp.startTLSWith(t, c, name, tp.pki.pool, "/before")
}

// startTLSWith is startTLS trusting roots, with a first request for path.
func (tp *topo) startTLSWith(t *testing.T, c net.Conn, name string, roots *x509.CertPool, path string) *liveTLS {
	t.Helper()
	tc := tls.Client(c, &tls.Config{ServerName: name, RootCAs: roots})
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("%s: handshake: %v", name, err)
	}
	l := &liveTLS{raw: c, tc: tc, br: bufio.NewReader(tc)}
	if body, err := l.get(path); err != nil || !strings.Contains(body, "sni="+name) || !strings.Contains(body, "path="+path) {
		t.Fatalf("%s: first request: %q %v", name, body, err)
	}
	return l
}

// connect opens a CONNECT tunnel to authority through the explicit proxy.
func (tp *topo) connect(t *testing.T, authority string) net.Conn {
	t.Helper()
	c := tp.dialExplicit(t)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", authority, authority)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s: %v %v", authority, resp, err)
	}
	if br.Buffered() > 0 {
		t.Fatalf("CONNECT %s: bytes after the 200", authority)
	}
	c.SetDeadline(time.Time{})
	return c
}

// echoes checks that c (a tunnel to the echo service) carries msg both
// ways.
func echoes(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("echo %q: write: %v", msg, err)
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
		t.Fatalf("echo %q: read %q: %v", msg, b, err)
	}
}

// swap compiles the policy and swaps it in as a reload does, then tells
// the proxy (the daemon calls Redecide after a successful reload).
func (tp *topo) swap(t *testing.T, src string) {
	t.Helper()
	eng, err := policy.Compile("reloaded.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)
	tp.proxy.Redecide()
}

// liveTunnels are one of each kind of tunnel the tests reload under.
type liveTunnels struct {
	tlsT, tlsC   *liveTLS // www.allowed.test, transparent and CONNECT
	echoT, echoC net.Conn // the echo service (rule vpn), transparent and CONNECT
}

func (tp *topo) openTunnels(t *testing.T) liveTunnels {
	t.Helper()
	var lt liveTunnels
	lt.tlsT = tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test")
	lt.tlsC = tp.startTLS(t, tp.connect(t, "www.allowed.test:443"), "www.allowed.test")
	lt.echoT = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(echoV4, 8443))
	echoes(t, lt.echoT, "before-transparent")
	lt.echoC = tp.connect(t, "198.18.2.4:8443")
	echoes(t, lt.echoC, "before-connect")
	return lt
}

// checkEchoSurvives: a tunnel a reload still allows carries bytes both
// ways after it, and its record is the allowed one, not closed by the
// proxy.
func checkEchoSurvives(t *testing.T, tp *topo, c net.Conn, what string) {
	t.Helper()
	echoes(t, c, "after-"+what)
	c.(interface{ CloseWrite() error }).CloseWrite()
	if rest := readAll(c, 5*time.Second); len(rest) != 0 {
		t.Errorf("%s: %q after the half-close", what, rest)
	}
	// The echo's port too: a tunnel from the same client port to another
	// destination (the transparent TLS one) is another connection.
	ev := tp.ev.wait(t, what, func(ev audit.Event) bool { return byClient(c)(ev) && ev.DestPort == 8443 })
	if ev.Verdict != policy.Allow || ev.Rule != "vpn" || ev.Close == closeRevoked || ev.BytesIn != ev.BytesOut || ev.BytesIn == 0 {
		t.Errorf("%s: event %+v", what, ev)
	}
}

// TestReloadRevokes: a reload that removes a rule closes the open tunnels
// only that rule allowed, transparent and CONNECT, and leaves those
// another rule allows running with their bytes.
func TestReloadRevokes(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	lt := tp.openTunnels(t)

	tp.swap(t, fmt.Sprintf(testPolicyNoAllowed, "enforce"))

	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent", lt.tlsT}, {"connect", lt.tlsC}} {
		l.c.waitClosed(t, l.what)
		ev := tp.ev.wait(t, l.what, byClient(l.c.raw))
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != policy.ReasonNoRule || ev.Close != closeRevoked ||
			ev.Mode != policy.ModeEnforce || ev.Name != "www.allowed.test" || ev.BytesIn == 0 {
			t.Errorf("%s: event %+v", l.what, ev)
		}
	}
	checkEchoSurvives(t, tp, lt.echoT, "transparent-echo")
	checkEchoSurvives(t, tp, lt.echoC, "connect-echo")
	if n := tp.revoked("enforce"); n != 2 {
		t.Errorf("revoked{enforce} = %v, want 2", n)
	}
}

// TestReloadAuditRecords: in audit mode a reload closes nothing; an open
// tunnel the new policy denies goes on, and its record says the deny (not
// enforced), so the report counts it as one enforce would drop.
func TestReloadAuditRecords(t *testing.T) {
	tp := newTopo(t, topoOpts{mode: "audit"})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	lt := tp.openTunnels(t)

	tp.swap(t, fmt.Sprintf(testPolicyNoAllowed, "audit"))
	// Another reload that denies them too: recorded already, not counted
	// (nor logged) again.
	tp.swap(t, fmt.Sprintf(testPolicyNoAllowed, "audit"))

	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent", lt.tlsT}, {"connect", lt.tlsC}} {
		if body, err := l.c.get("/after"); err != nil || !strings.Contains(body, "path=/after") {
			t.Fatalf("%s: audit mode cut the tunnel: %q %v", l.what, body, err)
		}
		l.c.tc.Close()
		ev := tp.ev.wait(t, l.what, byClient(l.c.raw))
		if ev.Verdict != policy.Deny || ev.Enforced || ev.Reason != policy.ReasonNoRule || ev.Mode != policy.ModeAudit || ev.Close == closeRevoked {
			t.Errorf("%s: event %+v", l.what, ev)
		}
	}
	checkEchoSurvives(t, tp, lt.echoT, "transparent-echo")
	checkEchoSurvives(t, tp, lt.echoC, "connect-echo")
	if n := tp.revoked("audit"); n != 2 {
		t.Errorf("revoked{audit} = %v, want 2", n)
	}
}

// TestReloadAuditToEnforce: the README's rollout. Tunnels opened in audit
// mode to a name the policy denies run until the reload that switches to
// enforce, which closes them; the allowed ones go on.
func TestReloadAuditToEnforce(t *testing.T) {
	tp := newTopo(t, topoOpts{mode: "audit"})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	evilT := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "evil.example")
	evilC := tp.startTLS(t, tp.connect(t, "evil.example:443"), "evil.example")
	okT := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test")
	okC := tp.startTLS(t, tp.connect(t, "www.allowed.test:443"), "www.allowed.test")

	tp.swap(t, fmt.Sprintf(testPolicy, "enforce"))

	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent", evilT}, {"connect", evilC}} {
		l.c.waitClosed(t, l.what)
		ev := tp.ev.wait(t, l.what, byClient(l.c.raw))
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Mode != policy.ModeEnforce || ev.Close != closeRevoked || ev.Name != "evil.example" {
			t.Errorf("%s: event %+v", l.what, ev)
		}
	}
	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent-allowed", okT}, {"connect-allowed", okC}} {
		if body, err := l.c.get("/after"); err != nil || !strings.Contains(body, "path=/after") {
			t.Fatalf("%s: %q %v", l.what, body, err)
		}
		l.c.tc.Close()
		ev := tp.ev.wait(t, l.what, byClient(l.c.raw))
		if ev.Verdict != policy.Allow || ev.Rule != "allowed" || ev.Close == closeRevoked {
			t.Errorf("%s: event %+v", l.what, ev)
		}
	}
}

// testPolicyEvil is testPolicy with a rule for evil.example: the rule
// egressd report --suggest proposes for it, added.
const testPolicyEvil = testPolicy + `  - name: evil
    to: [evil.example]
    ports: [443/tcp]
`

// TestReloadAuditCredits: in audit mode a reload that allows an open
// connection the record says enforce would drop takes that back, as
// capture does for its flows: its record becomes the allowing rule's, in
// OpenFlows while it is open and in its event at close. Both ways a
// connection comes to be a would-be deny: denied at its start (the rule
// the operator adds for it), and allowed, then denied by a reload that
// removed its rule (put back). A reload to enforce that allows a would-be
// deny of audit mode credits it too, and closes nothing.
func TestReloadAuditCredits(t *testing.T) {
	for _, to := range []string{"audit", "enforce"} {
		t.Run(to, func(t *testing.T) {
			tp := newTopo(t, topoOpts{mode: "audit"})
			tp.facts.add(clientV4, srvV4, "www.allowed.test", "evil.example")
			lt := tp.openTunnels(t)
			evilT := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "evil.example")
			evilC := tp.startTLS(t, tp.connect(t, "evil.example:443"), "evil.example")
			conns := []struct {
				what       string
				c          *liveTLS
				rule, name string
			}{
				{"transparent", lt.tlsT, "allowed", "www.allowed.test"},
				{"connect", lt.tlsC, "allowed", "www.allowed.test"},
				{"transparent-evil", evilT, "evil", "evil.example"},
				{"connect-evil", evilC, "evil", "evil.example"},
			}
			listed := func(when string, allowed map[string]bool) {
				t.Helper()
				open := tp.proxy.OpenFlows()
				for _, c := range conns {
					i := slices.IndexFunc(open, byClient(c.c.raw))
					if i < 0 {
						t.Errorf("%s: %s not listed", when, c.what)
						continue
					}
					ev := open[i]
					if allowed[c.rule] && (ev.Verdict != policy.Allow || ev.Rule != c.rule) ||
						!allowed[c.rule] && (ev.Verdict != policy.Deny || ev.Rule != "" || ev.Enforced) {
						t.Errorf("%s: %s listed as %+v, want allowed %v", when, c.what, ev, allowed[c.rule])
					}
				}
			}
			listed("open", map[string]bool{"allowed": true})
			tp.swap(t, fmt.Sprintf(testPolicyNoAllowed, "audit"))
			listed("rule allowed removed", nil)
			tp.swap(t, fmt.Sprintf(testPolicyEvil, to))
			listed("rules allowed and evil", map[string]bool{"allowed": true, "evil": true})

			for _, c := range conns {
				if body, err := c.c.get("/after"); err != nil || !strings.Contains(body, "path=/after") {
					t.Fatalf("%s: cut: %q %v", c.what, body, err)
				}
				c.c.tc.Close()
				ev := tp.ev.wait(t, c.what, byClient(c.c.raw))
				if ev.Verdict != policy.Allow || ev.Rule != c.rule || ev.Enforced ||
					ev.Mode != policy.Mode(to) || ev.Close == closeRevoked || ev.Name != c.name {
					t.Errorf("%s: event %+v", c.what, ev)
				}
			}
			if n := tp.revoked("audit"); n != 2 {
				t.Errorf("revoked{audit} = %v, want 2 (the reload that removed allowed)", n)
			}
			if n := tp.revoked("enforce"); n != 0 {
				t.Errorf("revoked{enforce} = %v, want 0", n)
			}
		})
	}
}

// TestReloadVouchedOnce: a tunnel whose address our DNS vouched for at
// its start is not cut by a reload because that answer has expired since
// (the spoof check is not made again; THREATS.md A2), while an audit-mode
// tunnel that was never vouched for is refused when enforce comes.
func TestReloadVouchedOnce(t *testing.T) {
	res := &switchResolver{}
	tp := newTopo(t, topoOpts{mode: "audit", deps: func(d *Deps) { res.r = d.Resolver; d.Resolver = res }})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	ok := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test")
	spoof := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(spoofV4, 443)), "www.allowed.test")
	// The DNS answer expires, and the resolver no longer gives srvV4 for
	// it either: a new connection would not be vouched for.
	tp.facts.mu.Lock()
	clear(tp.facts.m)
	tp.facts.mu.Unlock()
	res.off.Store(true)

	tp.swap(t, fmt.Sprintf(testPolicy, "enforce"))

	spoof.waitClosed(t, "spoofed")
	ev := tp.ev.wait(t, "spoofed", byClient(spoof.raw))
	if ev.Verdict != policy.Deny || ev.Reason != ReasonSNIMismatch || !ev.Enforced || ev.Close != closeRevoked {
		t.Errorf("spoofed: event %+v", ev)
	}
	if body, err := ok.get("/after"); err != nil || !strings.Contains(body, "path=/after") {
		t.Fatalf("vouched tunnel cut by the reload: %q %v", body, err)
	}
	ok.tc.Close()
	ev = tp.ev.wait(t, "vouched", byClient(ok.raw))
	if ev.Verdict != policy.Allow || ev.Close == closeRevoked {
		t.Errorf("vouched: event %+v", ev)
	}
}

// switchResolver is a resolver that finds nothing once off.
type switchResolver struct {
	r   Resolver
	off atomic.Bool
}

func (s *switchResolver) LookupNetIP(ctx context.Context, name string) ([]netip.Addr, error) {
	if s.off.Load() {
		return nil, errors.New("switchResolver: off")
	}
	return s.r.LookupNetIP(ctx, name)
}

// revoked reads egress_proxy_reload_revoked_total{mode}.
func (tp *topo) revoked(mode string) float64 {
	var m dto.Metric
	tp.proxy.met.revoked.WithLabelValues(mode).Write(&m)
	return m.GetCounter().GetValue()
}

// TestReloadInspected: inspected connections (a host/path rule decides
// their host) are decided again too, at host level: a reload that keeps
// their rule leaves them open, requests going on in them, while the spliced
// tunnels of the rule it removed are closed; the reload that removes their
// rule closes them.
func TestReloadInspected(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	tp.facts.add(clientV4, srvV4, "www.allowed.test", "docs.paths.test")
	_, caPEM, err := LoadOrCreateCA(tp.state)
	if err != nil {
		t.Fatal(err)
	}
	ca := x509.NewCertPool()
	ca.AppendCertsFromPEM(caPEM)
	docsT := tp.startTLSWith(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "docs.paths.test", ca, "/public/a")
	docsC := tp.startTLSWith(t, tp.connect(t, "docs.paths.test:443"), "docs.paths.test", ca, "/public/b")
	okT := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test")

	tp.swap(t, fmt.Sprintf(testPolicyDocsOnly, "enforce"))
	okT.waitClosed(t, "spliced")
	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent", docsT}, {"connect", docsC}} {
		if body, err := l.c.get("/public/after"); err != nil || !strings.Contains(body, "path=/public/after") {
			t.Fatalf("%s: inspected connection cut by a reload that keeps its rule: %q %v", l.what, body, err)
		}
	}

	tp.swap(t, fmt.Sprintf(testPolicyNoAllowed, "enforce"))
	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent", docsT}, {"connect", docsC}} {
		l.c.waitClosed(t, l.what)
		ev := tp.ev.wait(t, l.what, func(ev audit.Event) bool { return byClient(l.c.raw)(ev) && ev.Kind == audit.KindFlow })
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Close != closeRevoked || ev.Name != "docs.paths.test" {
			t.Errorf("%s: event %+v", l.what, ev)
		}
	}
	if n := tp.revoked("enforce"); n != 3 {
		t.Errorf("revoked{enforce} = %v, want 3", n)
	}
}

// TestReloadSwappedNotAnnounced: a connection decided with a policy the
// daemon has swapped in but not yet announced (Redecide comes after the
// firewall took the new policy) is not decided again under the old one,
// which would close a tunnel only the new policy's rule allows.
func TestReloadSwappedNotAnnounced(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	tp.swap(t, fmt.Sprintf(testPolicyNoAllowed, "enforce"))
	eng, err := policy.Compile("reloaded.yaml", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)
	l := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test")
	tp.proxy.Redecide()
	if body, err := l.get("/after"); err != nil || !strings.Contains(body, "path=/after") {
		t.Fatalf("tunnel the new policy allows cut by the reload: %q %v", body, err)
	}
	if n := tp.revoked("enforce"); n != 0 {
		t.Errorf("revoked{enforce} = %v, want 0", n)
	}
}

// BenchmarkLiveRegister: what registering a forwarded connection for
// reloads costs it (addLive, then stampLive at its end), with the
// closures the transparent path makes.
func BenchmarkLiveRegister(b *testing.B) {
	eng, err := policy.Compile("b.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: a\n    to: [\"*.allowed.test\"]\n    ports: [443/tcp]\n"))
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Config{OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(eng)})
	if err != nil {
		b.Fatal(err)
	}
	client, dest := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("198.18.2.2")
	v := verdict{name: "www.allowed.test", src: audit.NameSNI, how: byName, vouched: true,
		in: policy.Input{Client: client, Dest: dest, Port: 443, Proto: policy.TCP, Name: "www.allowed.test"}}
	ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Client: client, ClientPort: 40000, Dest: dest, DestPort: 443, Proto: "tcp", Name: v.name}
	var a, c net.Conn
	b.ReportAllocs()
	for b.Loop() {
		at := p.policyNow()
		f := &flowRecord{ev: ev}
		lc := p.addLive(at, f, func(e *policy.Engine) policy.Decision { return p.again(e, v) }, closeBoth(a, c))
		p.stampLive(lc, &f.ev)
		p.unlist(f) // finish, after the event
	}
}

// keepAliveDocsOnly is keepAlivePolicy without its rule "allowed".
const keepAliveDocsOnly = `version: 1
mode: %s
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [8080/tcp]
`

// explicitUpgrade opens a WebSocket-style upgrade to url through the
// explicit proxy (the recording origin answers 101, then echoes) and
// checks the echo.
func explicitUpgrade(t *testing.T, tp *topo, url, host string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c := tp.dialExplicit(t)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n", url, host)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade %s: %v %v", url, resp, err)
	}
	upgradeEchoes(t, c, br, "before")
	return c, br
}

func upgradeEchoes(t *testing.T, c net.Conn, br *bufio.Reader, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	frame := "\x82\x85abcd" + msg
	io.WriteString(c, frame)
	got := make([]byte, len(frame))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != frame {
		t.Fatalf("echo %q after the upgrade: %v %q", msg, err, got)
	}
}

// upgradeClosed waits up to 10 s for the proxy to close c.
func upgradeClosed(t *testing.T, c net.Conn, br *bufio.Reader, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := br.ReadByte()
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: still open after the reload (read: %v)", what, err)
	}
}

// TestReloadExplicitUpgrade: a WebSocket upgrade through the explicit
// proxy (plain HTTP, then a long-lived stream both ways) is decided again
// by a reload as a tunnel is: closed when the new policy denies its host,
// kept when another rule still allows it.
func TestReloadExplicitUpgrade(t *testing.T) {
	tp, _ := keepAliveTopo(t, "enforce")
	ws, wsr := explicitUpgrade(t, tp, "http://www.allowed.test:8080/ws", "www.allowed.test:8080")
	docs, docsr := explicitUpgrade(t, tp, "http://docs.paths.test:8080/public/ws", "docs.paths.test:8080")

	tp.swap(t, fmt.Sprintf(keepAliveDocsOnly, "enforce"))

	upgradeClosed(t, ws, wsr, "www.allowed.test")
	ev := tp.ev.wait(t, "revoked upgrade", byClient(ws))
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != policy.ReasonNoRule || ev.Close != closeRevoked ||
		ev.Mode != policy.ModeEnforce || ev.Name != "www.allowed.test" || ev.BytesOut == 0 || ev.BytesIn == 0 {
		t.Errorf("revoked upgrade: event %+v", ev)
	}
	upgradeEchoes(t, docs, docsr, "after")
	docs.Close()
	ev = tp.ev.wait(t, "kept upgrade", byClient(docs))
	if ev.Verdict != policy.Allow || ev.Rule != "docs" || ev.Close == closeRevoked {
		t.Errorf("kept upgrade: event %+v", ev)
	}
	if n := tp.revoked("enforce"); n != 1 {
		t.Errorf("revoked{enforce} = %v, want 1", n)
	}
}

// TestReloadExplicitUpgradeAudit: in audit mode the upgraded stream the
// new policy denies goes on, and its record says the deny, not enforced.
func TestReloadExplicitUpgradeAudit(t *testing.T) {
	tp, ev := reloadedUpgradeAudit(t, "http://www.allowed.test:8080/ws", keepAliveDocsOnly)
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Reason != policy.ReasonNoRule || ev.Mode != policy.ModeAudit || ev.Close == closeRevoked {
		t.Errorf("audited upgrade: event %+v", ev)
	}
	if n := tp.revoked("audit"); n != 1 {
		t.Errorf("revoked{audit} = %v, want 1", n)
	}
}

// TestReloadExplicitRawTargetAudit: in audit mode an explicit request
// whose target carries raw bytes 0x80 and above (http-malformed, not
// enforced) is forwarded; a reload decides it again with the same check as
// its start, so a policy that allows its host does not credit it: its
// record still says http-malformed.
func TestReloadExplicitRawTargetAudit(t *testing.T) {
	_, ev := reloadedUpgradeAudit(t, "http://www.allowed.test:8080/caf\xc3\xa9/ws", keepAlivePolicy)
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Reason != ReasonHTTPBad || ev.Mode != policy.ModeAudit || ev.Close == closeRevoked {
		t.Errorf("raw-target upgrade: event %+v, want the deny %s kept", ev, ReasonHTTPBad)
	}
}

// reloadedUpgradeAudit opens an upgrade to url (on www.allowed.test:8080)
// through the explicit proxy in audit mode, reloads to policyFmt (audit),
// checks the stream goes on, closes it, and returns its record.
func reloadedUpgradeAudit(t *testing.T, url, policyFmt string) (*topo, audit.Event) {
	t.Helper()
	tp, _ := keepAliveTopo(t, "audit")
	ws, wsr := explicitUpgrade(t, tp, url, "www.allowed.test:8080")

	tp.swap(t, fmt.Sprintf(policyFmt, "audit"))

	upgradeEchoes(t, ws, wsr, "after")
	ws.Close()
	return tp, tp.ev.wait(t, "audited upgrade", byClient(ws))
}

// plainKeepAlive opens a transparent plain-HTTP connection to the
// recording origin and makes one request after another on it, each
// answered 200.
func plainKeepAlive(t *testing.T, tp *topo, reqs ...[2]string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, originPort))
	t.Cleanup(func() { c.Close() })
	br := bufio.NewReader(c)
	for _, r := range reqs {
		plainGet(t, c, br, r[0], r[1])
	}
	return c, br
}

func plainGet(t *testing.T, c net.Conn, br *bufio.Reader, host, path string) {
	t.Helper()
	io.WriteString(c, req(host, path))
	codes, bodies, err := readResponses(c, br, 1)
	if err != nil || codes[0] != 200 {
		t.Fatalf("%s%s: %v %v %q", host, path, err, codes, bodies)
	}
}

// TestReloadPlainLatestRequest: a transparent plain-HTTP connection is
// decided again on its latest request, the one the connection carries
// now, not on its first: a reload that denies the first request's host
// keeps a connection whose latest request went to a host still allowed,
// and closes one whose latest request went to a host it denies.
func TestReloadPlainLatestRequest(t *testing.T) {
	tp, _ := keepAliveTopo(t, "enforce")
	// First www.allowed.test (rule allowed), then docs (rule docs).
	kept, keptr := plainKeepAlive(t, tp, [2]string{"www.allowed.test", "/a"}, [2]string{"docs.paths.test", "/public/b"})
	// First docs, then www.allowed.test.
	cut, cutr := plainKeepAlive(t, tp, [2]string{"docs.paths.test", "/public/c"}, [2]string{"www.allowed.test", "/d"})

	tp.swap(t, fmt.Sprintf(keepAliveDocsOnly, "enforce"))

	if !closedAfter(cut, cutr, 10*time.Second) {
		t.Fatal("connection whose latest request the reload denies: still open")
	}
	ev := tp.ev.wait(t, "revoked", func(ev audit.Event) bool { return byClient(cut)(ev) && ev.Kind == audit.KindFlow })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Close != closeRevoked || ev.Reason != policy.ReasonNoRule {
		t.Errorf("revoked: event %+v", ev)
	}
	plainGet(t, kept, keptr, "docs.paths.test", "/public/e")
	kept.Close()
	ev = tp.ev.wait(t, "kept", func(ev audit.Event) bool { return byClient(kept)(ev) && ev.Kind == audit.KindFlow })
	if ev.Verdict != policy.Allow || ev.Close == closeRevoked {
		t.Errorf("kept: event %+v", ev)
	}
	if n := tp.revoked("enforce"); n != 1 {
		t.Errorf("revoked{enforce} = %v, want 1", n)
	}
}

// TestReloadExplicitStream: a long response through the explicit proxy
// (server-sent events) is decided again too: the reload that denies its
// host cuts it, and its record says so.
func TestReloadExplicitStream(t *testing.T) {
	tp, _ := keepAliveTopo(t, "enforce")
	c := tp.dialExplicit(t)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET http://www.allowed.test:8080/events HTTP/1.1\r\nHost: www.allowed.test:8080\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("events: %v %v", resp, err)
	}
	first := make([]byte, len("data: first\n\n"))
	if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "data: first\n\n" {
		t.Fatalf("first event: %q %v", first, err)
	}

	tp.swap(t, fmt.Sprintf(keepAliveDocsOnly, "enforce"))

	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(resp.Body)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("event stream: still open after the reload (read %q: %v)", rest, err)
	}
	ev := tp.ev.wait(t, "revoked stream", byClient(c))
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Close != closeRevoked || ev.Name != "www.allowed.test" || ev.Path != "/events" {
		t.Errorf("revoked stream: event %+v", ev)
	}
}

// testPolicyNoDocs is testPolicy without its host/path rule docs.
const testPolicyNoDocs = `version: 1
mode: %s
rules:
  - name: allowed
    to: ["*.allowed.test", "allowed.test"]
    ports: [443/tcp, 80/tcp]
`

// TestReloadInspectedPlainLatest: a plain-HTTP connection inspected for
// its first request's host/path rule is decided again on its latest
// request too: a reload that denies the first request's host keeps one
// whose latest request went to a host still allowed, and closes one whose
// latest request went back to the denied host.
func TestReloadInspectedPlainLatest(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	tp.facts.add(clientV4, srvV4, "www.allowed.test", "docs.paths.test")
	dest := netip.AddrPortFrom(srvV4, 80)
	open := func(reqs ...[2]string) (net.Conn, *bufio.Reader) {
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		t.Cleanup(func() { c.Close() })
		br := bufio.NewReader(c)
		for _, r := range reqs {
			plainGet(t, c, br, r[0], r[1])
		}
		return c, br
	}
	kept, keptr := open([2]string{"docs.paths.test", "/public/a"}, [2]string{"www.allowed.test", "/b"})
	cut, cutr := open([2]string{"docs.paths.test", "/public/c"}, [2]string{"www.allowed.test", "/d"}, [2]string{"docs.paths.test", "/public/e"})

	tp.swap(t, fmt.Sprintf(testPolicyNoDocs, "enforce"))

	if !closedAfter(cut, cutr, 10*time.Second) {
		t.Fatal("connection whose latest request the reload denies: still open")
	}
	ev := tp.ev.wait(t, "revoked", func(ev audit.Event) bool { return byClient(cut)(ev) && ev.Kind == audit.KindFlow })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Close != closeRevoked {
		t.Errorf("revoked: event %+v", ev)
	}
	plainGet(t, kept, keptr, "www.allowed.test", "/f")
	kept.Close()
	ev = tp.ev.wait(t, "kept", func(ev audit.Event) bool { return byClient(kept)(ev) && ev.Kind == audit.KindFlow })
	if ev.Close == closeRevoked {
		t.Errorf("kept: event %+v", ev)
	}
}

// TestExplicitUpgradeOriginCloses: when the origin ends an upgraded
// stream through the explicit proxy, the client's connection is closed
// too (goproxy left it open, hijacked and forgotten, until the client
// spoke again), and the record is written.
func TestExplicitUpgradeOriginCloses(t *testing.T) {
	tp, _ := keepAliveTopo(t, "enforce")
	c, br := explicitUpgrade(t, tp, "http://www.allowed.test:8080/once/ws", "www.allowed.test:8080")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after the origin closed: %v, want EOF", err)
	}
	ev := tp.ev.wait(t, "upgrade", byClient(c))
	if ev.Verdict != policy.Allow || ev.BytesOut == 0 || ev.BytesIn == 0 {
		t.Errorf("event %+v", ev)
	}
}

// TestRedecideLoadsEngineUnderLock: a redecideOne that loaded the engine
// of one reload, and got the connection's lock only after the walk of a
// later reload decided it (allowed), must not decide it again under the
// older engine: that would close a connection the policy in force allows.
func TestRedecideLoadsEngineUnderLock(t *testing.T) {
	compile := func() *policy.Engine {
		eng, err := policy.Compile("r.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: a\n    to: [\"*.allowed.test\"]\n    ports: [443/tcp]\n"))
		if err != nil {
			t.Fatal(err)
		}
		return eng
	}
	e0, e1, e2 := compile(), compile(), compile()
	p, err := New(Config{OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(e0)})
	if err != nil {
		t.Fatal(err)
	}
	var staleDecided, closed atomic.Bool
	decide := func(e *policy.Engine) policy.Decision {
		if e == e1 { // the older reload's policy denies it
			staleDecided.Store(true)
			return policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: "no-rule", Mode: policy.ModeEnforce}
		}
		return policy.Decision{Verdict: policy.Allow, Rule: "a", Mode: policy.ModeEnforce}
	}
	ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Verdict: policy.Allow, Mode: policy.ModeEnforce}
	lc := p.addLive(p.policyNow(), &flowRecord{ev: ev}, decide, func() { closed.Store(true) })

	p.current.Store(e1) // reload 1 published
	lc.mu.Lock()
	done := make(chan struct{})
	go func() {
		p.redecideOne(lc) // reload 1's walk (or a late addLive)
		close(done)
	}()
	// Wait until it waits for the connection's lock.
	deadline := time.Now().Add(10 * time.Second)
	for buf := make([]byte, 1<<20); ; {
		s := string(buf[:runtime.Stack(buf, true)])
		blocked := false
		for g := range strings.SplitSeq(s, "\n\n") {
			if strings.Contains(g, "redecideOne") && strings.Contains(g, "Mutex).Lock") {
				blocked = true
			}
		}
		if blocked {
			break
		}
		if time.Now().After(deadline) {
			lc.mu.Unlock()
			t.Fatal("redecideOne never waited for the lock")
		}
		time.Sleep(time.Millisecond)
	}
	// Reload 2 publishes e2, and its walk decides the connection under it
	// (allowed) while the first one still waits.
	p.current.Store(e2)
	lc.eng = e2
	lc.mu.Unlock()
	<-done
	if staleDecided.Load() || closed.Load() {
		t.Errorf("decided again under the older reload's policy (closed: %v)", closed.Load())
	}
	if d, revoked := p.endLive(lc); d != nil || revoked {
		t.Errorf("endLive = %+v, %v; want no deny", d, revoked)
	}
}

// TestReloadNarrowedToPaths: with --inspect, a reload that narrows a
// host-level rule to a host/path rule closes the TLS tunnels spliced under
// it (transparent and CONNECT): their paths cannot be seen, and a new
// connection to the host would be inspected, each request decided on its
// path. Kept, they would go on to any path.
func TestReloadNarrowedToPaths(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	tlsT := tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test")
	tlsC := tp.startTLS(t, tp.connect(t, "www.allowed.test:443"), "www.allowed.test")

	tp.swap(t, `version: 1
mode: enforce
rules:
  - name: allowed
    to: ["www.allowed.test/public/*"]
    ports: [443/tcp, 80/tcp]
`)
	for _, l := range []struct {
		what string
		c    *liveTLS
	}{{"transparent", tlsT}, {"connect", tlsC}} {
		l.c.waitClosed(t, l.what)
		ev := tp.ev.wait(t, l.what, byClient(l.c.raw))
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != policy.ReasonPathUnseen || ev.Close != closeRevoked || ev.Name != "www.allowed.test" {
			t.Errorf("%s: event %+v", l.what, ev)
		}
	}
}

// blackHoleDNS is a DNS server on loopback that reads every query and
// never answers (an upstream that went dark), counting what it receives.
type blackHoleDNS struct {
	addr    string
	queries atomic.Int64
	marks   chan struct{}
	client  net.Conn
}

func startBlackHoleDNS(t *testing.T) *blackHoleDNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	b := &blackHoleDNS{addr: pc.LocalAddr().String(), marks: make(chan struct{}, 1)}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if string(buf[:n]) == "mark" {
				b.marks <- struct{}{}
				continue
			}
			b.queries.Add(1)
		}
	}()
	if b.client, err = net.Dial("udp", b.addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.client.Close() })
	return b
}

// received returns the queries the server has read, once it has read
// every datagram sent to it before the call (a marker sent now comes
// after them).
func (b *blackHoleDNS) received(t *testing.T) int64 {
	t.Helper()
	b.client.Write([]byte("mark"))
	select {
	case <-b.marks:
	case <-time.After(10 * time.Second):
		t.Fatal("the black-hole DNS server did not read its marker")
	}
	return b.queries.Load()
}

// TestReloadNeverVouchedNoLookup: a reload decides the connections that
// were never vouched for (audit-mode sni-mismatch) on local facts only:
// it sends no query to the resolver, so a resolver that never answers
// cannot hold Redecide (and the daemon's main loop, which handles SIGTERM
// too) for the lookup timeout per connection. Switched to enforce, they
// are closed, still sni-mismatch.
func TestReloadNeverVouchedNoLookup(t *testing.T) {
	bh := startBlackHoleDNS(t)
	tp := newTopo(t, topoOpts{mode: "audit",
		config: func(c *Config) { c.LookupTimeout = 100 * time.Millisecond },
		deps:   func(d *Deps) { d.Resolver = dnsResolver{addr: bh.addr} }})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	const n = 8
	var spoofed []*liveTLS
	for range n {
		spoofed = append(spoofed, tp.startTLS(t, tp.dialAtFirstWrite(t, netip.AddrPortFrom(spoofV4, 443)), "www.allowed.test"))
	}
	before := bh.received(t)
	if before < n {
		t.Fatalf("the resolver got %d queries for %d new connections: the test does not reach the lookup", before, n)
	}

	tp.swap(t, fmt.Sprintf(testPolicy, "audit")) // the same rules, a new engine
	if got := bh.received(t) - before; got != 0 {
		t.Errorf("Redecide sent %d queries to the resolver; want none (local facts only)", got)
	}
	for i, l := range spoofed {
		if body, err := l.get("/after"); err != nil || !strings.Contains(body, "path=/after") {
			t.Fatalf("audit mode: connection %d cut by the reload: %q %v", i, body, err)
		}
	}

	tp.swap(t, fmt.Sprintf(testPolicy, "enforce"))
	if got := bh.received(t) - before; got != 0 {
		t.Errorf("Redecide (to enforce) sent %d queries to the resolver; want none", got)
	}
	for i, l := range spoofed {
		l.waitClosed(t, fmt.Sprint("spoofed ", i))
		ev := tp.ev.wait(t, "spoofed", byClient(l.raw))
		if ev.Verdict != policy.Deny || ev.Reason != ReasonSNIMismatch || !ev.Enforced || ev.Close != closeRevoked {
			t.Errorf("spoofed %d: event %+v", i, ev)
		}
	}
}

// TestAgainUnknownFailsClosed: a verdict that does not say how it was
// made (the zero decidedBy: a literal that forgot it) is denied by a
// reload, in the new engine's mode; an allowed byBytes one stays allowed.
func TestAgainUnknownFailsClosed(t *testing.T) {
	eng, err := policy.Compile("b.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: a\n    to: [\"*.allowed.test\"]\n    ports: [443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(eng)})
	if err != nil {
		t.Fatal(err)
	}
	allowed := policy.Decision{Verdict: policy.Allow, Rule: "a", RuleIndex: 0, Mode: policy.ModeAudit}
	in := policy.Input{Client: clientV4, Dest: srvV4, Port: 443, Proto: policy.TCP, Name: "www.allowed.test"}
	d := p.again(eng, verdict{d: allowed, name: "www.allowed.test", src: audit.NameSNI, in: in})
	if d.Allowed() || d.Mode != policy.ModeEnforce || d.Reason != ReasonUndecidable {
		t.Errorf("unknown how: again = %+v; want an enforce-mode deny %s", d, ReasonUndecidable)
	}
	if d := p.again(eng, verdict{d: allowed, how: byBytes, in: in}); !d.Allowed() || d.Mode != policy.ModeEnforce {
		t.Errorf("byBytes allowed: again = %+v; want allowed, enforce mode", d)
	}
}
