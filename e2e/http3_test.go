package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// The HTTP/3 test's names: one a rule of its own opens on 443/udp, one no
// rule allows; a second name of the first's address, its own rule's
// (TestHTTP3OtherNames). Each has a quic-go HTTP/3 server on UDP 443 of its address
// (nginx has TCP 443 there).
const (
	h3Rule    = "e2e-h3"
	h3Allowed = dockerName
	h3AllowIP = dockerIP4
	h3Denied  = trackerName
	h3DenyIP  = trackerIP
	h3Second  = "second.h3.example"
	h3Rule2   = "e2e-h3-second"
)

const h3Rules = `
  - name: ` + h3Rule + `
    why: HTTP/3 (QUIC) to one name, for the end-to-end HTTP/3 test
    to: ["` + h3Allowed + `"]
    ports: [443/udp]
`

// h3Server is a quic-go HTTP/3 server in the internet namespace. A client
// whose port is in retry is asked to validate its address (a Retry); the
// handler answers with the SNI it read and whether the request came in
// 0-RTT.
type h3Server struct {
	mu    sync.Mutex
	retry map[int]bool // client ports sent a Retry
}

type h3ConnKey struct{}

func (tp *topo) startH3Server(t *testing.T, addrs ...string) *h3Server {
	t.Helper()
	s := &h3Server{retry: map[int]bool{}}
	cert, err := tls.LoadX509KeyPair(filepath.Join(tp.dir, "leaf.pem"), filepath.Join(tp.dir, "leaf.key"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http3.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, _ := r.Context().Value(h3ConnKey{}).(*quic.Conn)
			var used0RTT, hrr bool
			var sni string
			var group tls.CurveID
			if c != nil {
				st := c.ConnectionState()
				used0RTT, sni, group, hrr = st.Used0RTT, st.TLS.ServerName, st.TLS.CurveID, st.TLS.HelloRetryRequest
			}
			fmt.Fprintf(w, "h3 sni=%s host=%s 0rtt=%v group=%s hrr=%v\n", sni, r.Host, used0RTT, group, hrr)
		}),
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			return context.WithValue(ctx, h3ConnKey{}, c)
		},
	}
	// Go's defaults: X25519MLKEM768 first, as the client's.
	tlsCfg := http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	for _, a := range addrs {
		pc, err := tp.inet.ListenPacket("udp", a)
		if err != nil {
			t.Fatal(err)
		}
		tr := &quic.Transport{Conn: pc, VerifySourceAddress: func(from net.Addr) bool {
			ua, ok := from.(*net.UDPAddr)
			s.mu.Lock()
			defer s.mu.Unlock()
			return ok && s.retry[ua.Port]
		}}
		ln, err := tr.ListenEarly(tlsCfg, &quic.Config{Allow0RTT: true})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { defer close(done); srv.ServeListener(ln) }()
		t.Cleanup(func() {
			srv.Close()
			ln.Close()
			tr.Close()
			pc.Close()
			<-done
		})
	}
	return s
}

// requireRetry makes the server answer port's first Initial with a Retry.
func (s *h3Server) requireRetry(port int) {
	s.mu.Lock()
	s.retry[port] = true
	s.mu.Unlock()
}

// dgramLog is a client's UDP socket that notes what it sent before the
// first datagram came back, and the first byte of that datagram: a hello
// too long for one Initial is sent in two datagrams before any answer; a
// Retry packet has the long-header type 3.
type dgramLog struct {
	net.PacketConn
	mu        sync.Mutex
	sent      []int // datagram sizes, before the first answer
	answered  bool
	firstByte byte
}

func (l *dgramLog) WriteTo(p []byte, a net.Addr) (int, error) {
	l.mu.Lock()
	if !l.answered {
		l.sent = append(l.sent, len(p))
	}
	l.mu.Unlock()
	return l.PacketConn.WriteTo(p, a)
}

func (l *dgramLog) ReadFrom(p []byte) (int, net.Addr, error) {
	n, a, err := l.PacketConn.ReadFrom(p)
	l.mu.Lock()
	if err == nil && n > 0 && !l.answered {
		l.answered, l.firstByte = true, p[0]
	}
	l.mu.Unlock()
	return n, a, err
}

// before returns the sizes sent before the first answer, and its first
// byte.
func (l *dgramLog) before() ([]int, byte, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]int(nil), l.sent...), l.firstByte, l.answered
}

// h3Client is one UDP socket of the LAN client with a QUIC transport on
// it: every connection it makes (a resumption too) has its source port.
type h3Client struct {
	log   *dgramLog
	tr    *quic.Transport
	port  int
	cache tls.ClientSessionCache
	pool  *tls.Config
}

func (tp *topo) newH3Client(t *testing.T) *h3Client {
	t.Helper()
	pc, err := tp.lan.ListenPacket("udp", lanClient4+":0")
	if err != nil {
		t.Fatal(err)
	}
	l := &dgramLog{PacketConn: pc}
	c := &h3Client{log: l, tr: &quic.Transport{Conn: l}, port: pc.LocalAddr().(*net.UDPAddr).Port,
		cache: tls.NewLRUClientSessionCache(4), pool: &tls.Config{RootCAs: tp.pool}}
	t.Cleanup(func() { c.tr.Close(); pc.Close() })
	return c
}

// get makes one HTTP/3 request for https://name/ to ip:443 on a new
// connection (method http3.MethodGet0RTT: in 0-RTT when the session cache
// holds a ticket) and returns the body.
func (c *h3Client) get(name, ip, method string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tc := c.pool.Clone()
	tc.ClientSessionCache = c.cache
	rt := &http3.Transport{
		TLSClientConfig: tc,
		QUICConfig:      &quic.Config{HandshakeIdleTimeout: 4 * time.Second},
		Dial: func(ctx context.Context, _ string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
			return c.tr.DialEarly(ctx, &net.UDPAddr{IP: net.ParseIP(ip), Port: 443}, tc, qc)
		},
	}
	defer rt.Close()
	req, err := http.NewRequestWithContext(ctx, method, "https://"+name+"/", nil)
	if err != nil {
		return "", err
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return strings.TrimSpace(string(b)), err
}

// TestHTTP3 (THREATS.md B2): a real HTTP/3 client and server (quic-go) through
// the gateway. Go's ClientHello offers ML-KEM and spans two Initials; the
// client picks a random DCID length, pads and coalesces; a server may ask
// for a Retry; a resumption sends 0-RTT. Audit mode: every request
// succeeds, and capture records each flow under the QUIC SNI, credited to
// the rule that opens 443/udp or as the deny it would be. Enforce mode:
// UDP 443 to the allowed name is let out, to the denied name rejected.
func TestHTTP3(t *testing.T) {
	tp := newTopo(t)
	srv := tp.startH3Server(t, h3AllowIP+":443", h3DenyIP+":443")

	// Without egressd both servers answer: the checks below would see it.
	for _, c := range [][2]string{{h3Allowed, h3AllowIP}, {h3Denied, h3DenyIP}} {
		if body, err := tp.newH3Client(t).get(c[0], c[1], http.MethodGet); err != nil || !strings.Contains(body, "sni="+c[0]) {
			t.Fatalf("without egressd, HTTP/3 to %s at %s: %q %v", c[0], c[1], body, err)
		}
	}

	t.Run("audit", func(t *testing.T) {
		d := newDaemon(t, tp, "audit")
		d.writePolicy(append(testPolicy(t), h3Rules...))
		d.start()
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("egressd output:\n%s", d.logs())
			}
		})
		for _, n := range []string{h3Allowed, h3Denied} {
			if rcode, addrs := tp.dig(t, n, "A"); rcode != "NOERROR" || len(addrs) == 0 {
				t.Fatalf("dig %s: %s %v", n, rcode, addrs)
			}
		}
		type h3Case struct {
			what, name, ip string
			retry, resume  bool
			verdict, rule  string
			port           int
		}
		cases := []*h3Case{
			{what: "allowed", name: h3Allowed, ip: h3AllowIP, verdict: "allow", rule: h3Rule},
			{what: "allowed, Retry", name: h3Allowed, ip: h3AllowIP, retry: true, verdict: "allow", rule: h3Rule},
			{what: "allowed, 0-RTT resumption", name: h3Allowed, ip: h3AllowIP, resume: true, verdict: "allow", rule: h3Rule},
			{what: "denied", name: h3Denied, ip: h3DenyIP, verdict: "deny"},
			{what: "denied, Retry", name: h3Denied, ip: h3DenyIP, retry: true, verdict: "deny"},
		}
		for _, c := range cases {
			cl := tp.newH3Client(t)
			c.port = cl.port
			if c.retry {
				srv.requireRetry(cl.port)
			}
			body, err := cl.get(c.name, c.ip, http.MethodGet)
			if err != nil || !strings.Contains(body, "sni="+c.name) || !strings.Contains(body, "0rtt=false") {
				t.Errorf("%s: HTTP/3 GET https://%s/ in audit mode: %q %v", c.what, c.name, body, err)
				continue
			}
			// An X25519MLKEM768 key share (1,216 bytes) in the first
			// hello: more than one 1,280-byte Initial carries.
			sent, first, _ := cl.log.before()
			if !strings.Contains(body, "group=X25519MLKEM768 hrr=false") {
				t.Errorf("%s: the server says %q: want the ML-KEM key share in the client's first hello (two Initials)", c.what, body)
			}
			if isRetry := first&0xf0 == 0xf0; isRetry != c.retry {
				t.Errorf("%s: first answer's byte %#x (Retry %v), want Retry %v", c.what, first, isRetry, c.retry)
			}
			t.Logf("%s: port %d sent %v before the first answer (%#x): %s", c.what, cl.port, sent, first, body)
			if c.resume {
				// The ticket of the first connection: a new connection
				// from the same socket sends its GET in 0-RTT.
				time.Sleep(200 * time.Millisecond)
				body, err := cl.get(c.name, c.ip, http3.MethodGet0RTT)
				if err != nil || !strings.Contains(body, "sni="+c.name) || !strings.Contains(body, "0rtt=true") {
					t.Errorf("%s: the resumed GET: %q %v, want one answered in 0-RTT", c.what, body, err)
				}
			}
		}
		// Capture records a UDP flow when it ends: a clean stop ends them.
		time.Sleep(300 * time.Millisecond)
		d.stop()
		evs := d.allEvents()
		for _, c := range cases {
			var got []flowEvent
			for _, ev := range evs {
				if ev.Kind == "flow" && ev.Proto == "udp" && ev.ClientPort == c.port && ev.Dest == c.ip && ev.DestPort == 443 {
					got = append(got, ev)
				}
			}
			if len(got) != 1 {
				t.Errorf("%s: %d capture events for port %d, want 1: %v\nflows:\n%s", c.what, len(got), c.port, got, d.events())
				continue
			}
			ev := got[0]
			if ev.Name != c.name || ev.NameSource != "quic-sni" || ev.Verdict != c.verdict || ev.Rule != c.rule || ev.Enforced {
				t.Errorf("%s: recorded as %v; want %s from the QUIC SNI, %s, rule %q, not enforced (audit)", c.what, ev, c.name, c.verdict, c.rule)
			} else {
				t.Logf("%s: %v", c.what, ev)
			}
		}
	})

	t.Run("enforce", func(t *testing.T) {
		d := newDaemon(t, tp, "enforce")
		d.writePolicy(append(testPolicy(t), h3Rules...))
		d.start()
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("egressd output:\n%s", d.logs())
			}
		})
		if rcode, addrs := tp.dig(t, h3Allowed, "A"); rcode != "NOERROR" || len(addrs) == 0 {
			t.Fatalf("dig %s: %s %v", h3Allowed, rcode, addrs)
		}
		ok := tp.newH3Client(t)
		if body, err := ok.get(h3Allowed, h3AllowIP, http.MethodGet); err != nil || !strings.Contains(body, "sni="+h3Allowed) {
			t.Errorf("HTTP/3 to %s (rule %s opens 443/udp) in enforce mode: %q %v", h3Allowed, h3Rule, body, err)
		}
		bad := tp.newH3Client(t)
		if body, err := bad.get(h3Denied, h3DenyIP, http.MethodGet); err == nil {
			t.Errorf("HTTP/3 to %s (no rule) in enforce mode got through: %q", h3Denied, body)
		} else {
			t.Logf("HTTP/3 to %s in enforce mode: %v", h3Denied, err)
		}
		if sent, _, answered := bad.log.before(); answered {
			t.Errorf("HTTP/3 to %s in enforce mode: the server answered (the client sent %v)", h3Denied, sent)
		}
		time.Sleep(300 * time.Millisecond)
		d.stop()
		for _, c := range []struct {
			port                    int
			ip, name, verdict, rule string
			enforced                bool
		}{
			{ok.port, h3AllowIP, h3Allowed, "allow", h3Rule, false},
			{bad.port, h3DenyIP, h3Denied, "deny", "", true},
		} {
			var got []flowEvent
			for _, ev := range d.allEvents() {
				if ev.Kind == "flow" && ev.Proto == "udp" && ev.ClientPort == c.port && ev.Dest == c.ip && ev.DestPort == 443 {
					got = append(got, ev)
				}
			}
			if len(got) != 1 {
				t.Errorf("%s: %d capture events for port %d, want 1: %v\nflows:\n%s", c.name, len(got), c.port, got, d.events())
				continue
			}
			ev := got[0]
			if ev.Name != c.name || ev.NameSource != "quic-sni" || ev.Verdict != c.verdict || ev.Rule != c.rule || ev.Enforced != c.enforced {
				t.Errorf("%s in enforce mode: recorded as %v; want %s from the QUIC SNI, %s, rule %q, enforced %v", c.name, ev, c.name, c.verdict, c.rule, c.enforced)
			} else {
				t.Logf("enforce, %s: %v", c.name, ev)
			}
		}
	})
}

// TestHTTP3OtherNames: one quic-go Transport (one UDP socket, one client
// port) makes two HTTP/3 connections to one server address, each naming
// another host, each host allowed by a rule of its own, both names
// resolved through the gateway to that address (quic-go's shared
// Transport, an HTTP/3 client's pool). Audit mode: both requests succeed;
// capture records one flow, under the first connection's name, with the
// second's in other_names, and the report credits the flow to both rules
// (the second's would otherwise be listed unused).
func TestHTTP3OtherNames(t *testing.T) {
	tp := newTopo(t)
	tp.startH3Server(t, h3AllowIP+":443")
	d := newDaemon(t, tp, "audit")
	d.writePolicy(append(testPolicy(t), h3Rules+`
  - name: `+h3Rule2+`
    why: a second name of the HTTP/3 server's address (TestHTTP3OtherNames)
    to: ["`+h3Second+`"]
    ports: [443/udp]
`...))
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
		}
	})
	for _, n := range []string{h3Allowed, h3Second} {
		if rcode, addrs := tp.dig(t, n, "A"); rcode != "NOERROR" || len(addrs) != 1 || addrs[0] != h3AllowIP {
			t.Fatalf("dig %s: %s %v, want %s", n, rcode, addrs, h3AllowIP)
		}
	}
	cl := tp.newH3Client(t)
	for _, n := range []string{h3Allowed, h3Second} {
		if body, err := cl.get(n, h3AllowIP, http.MethodGet); err != nil || !strings.Contains(body, "sni="+n) {
			t.Fatalf("HTTP/3 GET https://%s/ at %s on the shared transport: %q %v", n, h3AllowIP, body, err)
		}
	}
	// Capture records a UDP flow when it ends: a clean stop ends them.
	time.Sleep(300 * time.Millisecond)
	d.stop()
	var got []flowEvent
	for _, ev := range d.allEvents() {
		if ev.Kind == "flow" && ev.Proto == "udp" && ev.ClientPort == cl.port && ev.Dest == h3AllowIP && ev.DestPort == 443 {
			got = append(got, ev)
		}
	}
	if len(got) != 1 {
		t.Fatalf("%d capture events for port %d, want 1: %v\nflows:\n%s", len(got), cl.port, got, d.events())
	}
	ev := got[0]
	if ev.Name != h3Allowed || ev.NameSource != "quic-sni" || ev.Verdict != "allow" || ev.Rule != h3Rule ||
		len(ev.OtherNames) != 1 || ev.OtherNames[0] != h3Second {
		t.Errorf("recorded as %v other_names %q; want %s from the QUIC SNI, allowed by %s, other_names [%s]", ev, ev.OtherNames, h3Allowed, h3Rule, h3Second)
	}
	r, out := d.reportStateJSON()
	flows := map[string]uint64{}
	for _, rr := range r.Rules {
		flows[rr.Name] = rr.Flows
	}
	if flows[h3Rule] != 1 || flows[h3Rule2] != 1 {
		t.Errorf("report: %s %d flows, %s %d; want the flow credited to both\n%s", h3Rule, flows[h3Rule], h3Rule2, flows[h3Rule2], out)
	}
	for _, u := range r.UnusedRules {
		if u == h3Rule2 {
			t.Errorf("report lists %s unused\n%s", h3Rule2, out)
		}
	}
}
