package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"golang.org/x/net/http2/hpack"

	"egressd/audit"
	"egressd/policy"
)

// h2cPolicy: docs.paths.test is reachable on 8081 only under /public/,
// allowed.test at host level.
const h2cPolicy = `version: 1
mode: %s
rules:
  - name: allowed
    to: ["allowed.test"]
    ports: [8081/tcp]
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [8081/tcp, 443/tcp]
`

const h2cPort = 8081

// h2cTopo is newTopo with h2cPolicy, an origin on the server's port 8081
// that speaks HTTP/1 and HTTP/2 with prior knowledge (h2c) and keeps the
// paths it served, and our DNS having given docs.paths.test out as
// spoofV4 and allowed.test as srvV4.
func h2cTopo(t *testing.T, mode string) (*topo, func() []string) {
	t.Helper()
	tp := newTopo(t, topoOpts{mode: mode, config: func(c *Config) { c.Inspect = false }})
	eng, err := policy.Compile("h2c.yaml", []byte(fmt.Sprintf(h2cPolicy, mode)))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)
	tp.facts.add(clientV4, spoofV4, "docs.paths.test")
	tp.facts.add(clientV4, srvV4, "allowed.test")
	var mu sync.Mutex
	var served []string
	ln, err := tp.s.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", h2cPort))
	if err != nil {
		t.Fatal(err)
	}
	// h2c.NewHandler takes prior knowledge and the Upgrade: h2c dance.
	srv := &http.Server{Handler: h2c.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		served = append(served, r.Proto+" "+r.URL.Path)
		mu.Unlock()
		fmt.Fprintf(w, "proto=%s path=%s", r.Proto, r.URL.Path)
	}), &http2.Server{})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return tp, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), served...)
	}
}

// h2cGet sends one HTTP/2 request with prior knowledge over c.
func h2cGet(c net.Conn, host, path string) (string, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	cc, err := (&http2.Transport{AllowHTTP: true}).NewClientConn(c)
	if err != nil {
		return "", err
	}
	defer cc.Close()
	req, _ := http.NewRequest("GET", "http://"+host+path, nil)
	resp, err := cc.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, b), err
}

// TestH2CPathRules: HTTP/2 with prior knowledge on a plain-HTTP port shows
// the proxy no HTTP/1 request head, so the path of a host/path rule cannot
// be checked on it. A name that only a host/path rule allows is refused
// then (path-unseen), on the transparent path and through a CONNECT of the
// explicit proxy alike, as HTTP/1 to a path outside the rule is; so is a
// client that stays silent past the first-byte wait and then sends an
// HTTP/1 request. A name a host-level rule allows stays reachable over
// h2c. In audit mode the connection goes through and the event says what
// enforce would do (THREATS.md C6).
func TestH2CPathRules(t *testing.T) {
	tp, served := h2cTopo(t, "enforce")
	docs := netip.AddrPortFrom(spoofV4, h2cPort)
	flow := func(t *testing.T, c net.Conn) audit.Event {
		t.Helper()
		return tp.ev.wait(t, "flow", func(ev audit.Event) bool {
			return ev.Kind == audit.KindFlow && int(ev.ClientPort) == localPort(c)
		})
	}
	notServed := func(t *testing.T, path string) {
		t.Helper()
		for _, s := range served() {
			if strings.HasSuffix(s, " "+path) {
				t.Errorf("the origin served %q", s)
			}
		}
	}

	t.Run("h1-path-refused", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, docs)
		io.WriteString(c, req("docs.paths.test", "/private-h1"))
		codes, _, err := readResponses(c, bufio.NewReader(c), 1)
		if err != nil || codes[0] != 403 {
			t.Fatalf("want 403: %v %v", err, codes)
		}
		notServed(t, "/private-h1")
	})
	t.Run("h2c-path-host", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, docs)
		out, err := h2cGet(c, "docs.paths.test", "/private-h2c")
		if err == nil {
			t.Errorf("h2c to a path outside the rule got through: %q", out)
		}
		notServed(t, "/private-h2c")
		ev := flow(t, c)
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != policy.ReasonPathUnseen || ev.Name != "docs.paths.test" || ev.NameSource != audit.NameDNSLearned || !ev.NoPath {
			t.Errorf("event %+v", ev)
		}
	})
	t.Run("silent-then-h1", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, docs)
		time.Sleep(600 * time.Millisecond) // past the topology's 300 ms first-byte wait
		io.WriteString(c, req("docs.paths.test", "/private-late"))
		// Where only a host/path rule would allow it, the proxy waits for
		// the client's bytes past the first-byte wait: the request is read
		// and refused by its path.
		if codes, _, err := readResponses(c, bufio.NewReader(c), 1); err != nil || codes[0] != 403 {
			t.Errorf("a request sent after the first-byte wait: %v %v, want 403", codes, err)
		}
		notServed(t, "/private-late")
		if ev := flow(t, c); ev.Reason != policy.ReasonPath || !ev.Enforced || ev.Path != "/private-late" {
			t.Errorf("event %+v", ev)
		}
	})
	t.Run("h2c-upgrade", func(t *testing.T) {
		// README: an h2c upgrade the origin accepts is refused at the
		// HTTP/2 preface (http-malformed); the origin serves the upgrade
		// request itself (on an allowed path), never a later stream.
		c := tp.dialFromClient(t, netip.Addr{}, docs)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "GET /public/up HTTP/1.1\r\nHost: docs.paths.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("want the origin's 101: %v %v", resp, err)
		}
		c.Write(append([]byte(http2.ClientPreface), h2Frames(3, "docs.paths.test", "/private-upgrade")...))
		rest, _ := io.ReadAll(br)
		if !strings.Contains(string(rest), "403") || !strings.Contains(string(rest), ReasonHTTPBad) {
			t.Errorf("after the preface: %q, want the 403 page (http-malformed)", rest)
		}
		notServed(t, "/private-upgrade")
	})
	t.Run("silent", func(t *testing.T) {
		// Silent until the hello deadline (2 s here): path-unseen.
		c := tp.dialFromClient(t, netip.Addr{}, docs)
		if got := readAll(c, 10*time.Second); len(got) != 0 {
			t.Errorf("a silent client got %q", got)
		}
		if ev := flow(t, c); ev.Reason != policy.ReasonPathUnseen || !ev.Enforced || !ev.NoPath {
			t.Errorf("event %+v", ev)
		}
	})
	t.Run("silent-then-tls", func(t *testing.T) {
		// A TLS client silent past the first-byte wait is still read as
		// TLS (host level, as HTTPS without inspection), not refused as
		// cleartext without a path.
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(spoofV4, 443))
		time.Sleep(600 * time.Millisecond)
		body, err := tp.tlsGet(c, "docs.paths.test", "/late-tls", nil)
		if err != nil || !strings.Contains(body, "path=/late-tls") {
			t.Errorf("late TLS hello: %q %v", body, err)
		}
		if ev := flow(t, c); ev.Verdict != policy.Allow || ev.Rule != "docs" || ev.NameSource != audit.NameSNI || ev.NoPath {
			t.Errorf("event %+v", ev)
		}
	})
	t.Run("explicit-connect-late-tls", func(t *testing.T) {
		// A TLS client silent past the first-byte wait after the 200 is
		// still read as TLS (host level).
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(gwLanV4, explicitPort))
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "CONNECT docs.paths.test:443 HTTP/1.1\r\nHost: docs.paths.test:443\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		time.Sleep(600 * time.Millisecond)
		body, err := tp.tlsGet(&bufConn{c, br}, "docs.paths.test", "/late-connect", nil)
		if err != nil || !strings.Contains(body, "path=/late-connect") {
			t.Errorf("late TLS in the tunnel: %q %v", body, err)
		}
	})
	t.Run("h2c-host-level", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, h2cPort))
		out, err := h2cGet(c, "allowed.test", "/any-h2c")
		if err != nil || out != "200 proto=HTTP/2.0 path=/any-h2c" {
			t.Errorf("h2c to a host-level name: %q %v", out, err)
		}
		// No path showed (NoPath): a replay under a candidate that
		// narrows allowed.test to a path drops it (path-unseen).
		if ev := flow(t, c); ev.Verdict != policy.Allow || ev.Rule != "allowed" || !ev.NoPath {
			t.Errorf("event %+v", ev)
		}
	})
	t.Run("explicit-connect-h2c", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(gwLanV4, explicitPort))
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "CONNECT docs.paths.test:%d HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", h2cPort, h2cPort)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			out, err := h2cGet(&bufConn{c, br}, "docs.paths.test", "/private-connect")
			if err == nil {
				t.Errorf("h2c in a CONNECT tunnel to a path outside the rule got through: %q", out)
			}
		}
		notServed(t, "/private-connect")
		ev := tp.ev.wait(t, "connect flow", func(ev audit.Event) bool {
			return ev.Kind == audit.KindFlow && ev.NameSource == audit.NameConnect && ev.Name == "docs.paths.test" && ev.DestPort == h2cPort
		})
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != policy.ReasonPathUnseen || !ev.NoPath {
			t.Errorf("event %+v", ev)
		}
	})
}

// TestH2CPathRulesAudit: in audit mode the h2c connection goes through,
// and its event says enforce would refuse it.
func TestH2CPathRulesAudit(t *testing.T) {
	tp, served := h2cTopo(t, "audit")
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(spoofV4, h2cPort))
	out, err := h2cGet(c, "docs.paths.test", "/private-audit")
	if err != nil || !strings.Contains(out, "path=/private-audit") {
		t.Errorf("audit mode: %q %v", out, err)
	}
	c.Close()
	ev := tp.ev.wait(t, "flow", func(ev audit.Event) bool {
		return ev.Kind == audit.KindFlow && int(ev.ClientPort) == localPort(c)
	})
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Reason != policy.ReasonPathUnseen || ev.Mode != policy.ModeAudit {
		t.Errorf("event %+v", ev)
	}

	c = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(gwLanV4, explicitPort))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT docs.paths.test:%d HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", h2cPort, h2cPort)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT in audit mode: %v %v", resp, err)
	}
	out, err = h2cGet(&bufConn{c, br}, "docs.paths.test", "/private-audit-connect")
	if err != nil || !strings.Contains(out, "path=/private-audit-connect") {
		t.Errorf("audit mode, CONNECT: %q %v", out, err)
	}
	c.Close()
	ev = tp.ev.wait(t, "connect flow", func(ev audit.Event) bool {
		return ev.Kind == audit.KindFlow && ev.NameSource == audit.NameConnect && ev.Name == "docs.paths.test"
	})
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Reason != policy.ReasonPathUnseen {
		t.Errorf("CONNECT event %+v", ev)
	}
	if len(served()) != 2 {
		t.Errorf("the origin served %q, want both requests", served())
	}
}

// bufConn reads what a bufio.Reader already holds first.
type bufConn struct {
	net.Conn
	br *bufio.Reader
}

func (c *bufConn) Read(b []byte) (int, error) { return c.br.Read(b) }

// TestExplicitH2C: the explicit proxy serves HTTP/1 only. HTTP/2 with
// prior knowledge sent to it gets a 400 and reaches no origin; an h2c
// upgrade request is forwarded without its upgrade (the origin, which
// would switch, answers it over HTTP/1.1), so no HTTP/2 stream with an
// unchecked path can follow it.
func TestExplicitH2C(t *testing.T) {
	var mu sync.Mutex
	var served []string
	originLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		served = append(served, r.Proto+" "+r.URL.Path)
		mu.Unlock()
		fmt.Fprintf(w, "proto=%s path=%s", r.Proto, r.URL.Path)
	})
	// The origin accepts both prior knowledge and the Upgrade: h2c dance.
	srv := &http.Server{Handler: h2c.NewHandler(h, &http2.Server{})}
	go srv.Serve(originLn)
	t.Cleanup(func() { srv.Close() })
	port := originLn.Addr().(*net.TCPAddr).Port
	eng, err := policy.Compile("p.yaml", []byte(fmt.Sprintf("version: 1\nmode: enforce\nrules:\n  - name: docs\n    to: [\"docs.paths.test/public/*\"]\n    ports: [%d/tcp]\n", port)))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{AllowSpecial: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, OwnAddrs: []netip.Addr{}, StateDir: t.TempDir()}, Deps{
		Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		Resolver: startDNS(t, map[string][]netip.Addr{"docs.paths.test": {netip.MustParseAddr("127.0.0.1")}}),
	})
	if err != nil {
		t.Fatal(err)
	}
	addr := serveExplicitLoopback(t, p)
	auth := fmt.Sprintf("docs.paths.test:%d", port)
	frames := func(stream uint32, path string) []byte { return h2Frames(stream, auth, path) }
	dial := func(t *testing.T) (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	t.Run("prior-knowledge", func(t *testing.T) {
		c, br := dial(t)
		c.Write(append([]byte(http2.ClientPreface), frames(1, "/private-pri")...))
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 400 {
			t.Fatalf("want 400: %v %v", resp, err)
		}
	})
	t.Run("upgrade", func(t *testing.T) {
		c, br := dial(t)
		fmt.Fprintf(c, "GET http://%s/public/x HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", auth, auth)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "proto=HTTP/1.1 path=/public/x" {
			t.Fatalf("want the request served over HTTP/1.1 without the upgrade: %d %q", resp.StatusCode, body)
		}
		c.Write(append([]byte(http2.ClientPreface), frames(3, "/private-upgrade")...))
		io.Copy(io.Discard, br)
	})
	mu.Lock()
	defer mu.Unlock()
	for _, s := range served {
		if strings.Contains(s, "private") {
			t.Errorf("the origin served %q", s)
		}
	}
}

// h2Frames is a client's SETTINGS frame and one GET's HEADERS frame on
// stream, after the preface.
func h2Frames(stream uint32, authority, path string) []byte {
	var b, hb bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings()
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", authority}, {":path", path}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
	return b.Bytes()
}
