package proxy

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestExplicitInspectedInnerHost (THREATS.md A4): an inspected CONNECT
// to docs.paths.test whose inner ClientHello and request name another
// host (Host header or absolute-form target) is decided per request on
// that host at the CONNECT's address, as a connection to it would be
// (TestTransparentInspectedFronting): evil.example, which a rule allows,
// is refused as sni-mismatch, the address not being one of its own, and
// never under the CONNECT host's verdict; a request naming the CONNECT
// host on an allowed path is served (control), in absolute form too. An absolute-form target naming the CONNECT host with a Host line
// naming another (THREATS.md A1) is refused as host-mismatch, as the
// transparent proxy without inspection and capture refuse it: before,
// net/http dropped the Host line and the request was forwarded.
func TestExplicitInspectedInnerHost(t *testing.T) {
	addr, _, tlsPort, caPool := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
  - name: evil-public
    to: ["evil.example"]
    ports: [%[2]d/tcp]
`, nil)
	auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
	evil := fmt.Sprintf("evil.example:%d", tlsPort)
	for _, c := range []struct {
		name, sni, head, reason string
		code                    int
	}{
		{"control", "docs.paths.test", "GET /public/ok HTTP/1.1\r\nHost: " + auth + "\r\n\r\n", "", 200},
		{"inner-host", "docs.paths.test", "GET /public/x HTTP/1.1\r\nHost: " + evil + "\r\n\r\n", ReasonSNIMismatch, 403},
		{"inner-sni-and-host", "evil.example", "GET /public/x HTTP/1.1\r\nHost: " + evil + "\r\n\r\n", ReasonSNIMismatch, 403},
		{"inner-absolute", "docs.paths.test", "GET https://" + evil + "/public/x HTTP/1.1\r\nHost: " + evil + "\r\n\r\n", ReasonSNIMismatch, 403},
		{"absolute-control", "docs.paths.test", "GET https://" + auth + "/public/ok HTTP/1.1\r\nHost: " + auth + "\r\n\r\n", "", 200},
		{"absolute-ours-host-evil", "docs.paths.test", "GET https://" + auth + "/public/x HTTP/1.1\r\nHost: " + evil + "\r\n\r\n", ReasonHostMismatch, 403},
		{"absolute-ours-host-port", "docs.paths.test", "GET https://" + auth + "/public/x HTTP/1.1\r\nHost: docs.paths.test:1\r\n\r\n", ReasonHostMismatch, 403},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, code := connectDocs(t, addr, tlsPort)
			if code != http.StatusOK {
				t.Fatalf("CONNECT: %d", code)
			}
			// The client is the attacker's: it skips verification when its
			// SNI is not the CONNECT host's leaf.
			tc := tls.Client(conn, &tls.Config{ServerName: c.sni, RootCAs: caPool, InsecureSkipVerify: c.sni != "docs.paths.test"})
			io.WriteString(tc, c.head)
			resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.code || resp.Header.Get("X-Egressd-Reason") != c.reason {
				t.Errorf("%d %q %q, want %d %q", resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), body, c.code, c.reason)
			}
		})
	}
}

// TestExplicitAuthorityForms (THREATS.md D2, Smokescreen CVE-2022-29188):
// authorities in forms a lax parser reads as an allowed host — brackets
// around a name, doubled brackets, an unbracketed IPv6 address, ports
// with leading zeros, signs, out of range or named — are refused on
// CONNECT and in absolute-form requests; the plain forms are allowed
// (control), case and a trailing dot included (D1).
func TestExplicitAuthorityForms(t *testing.T) {
	addr, plainPort, tlsPort, _ := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, nil)
	send := func(t *testing.T, head string) int {
		t.Helper()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(conn, head)
		resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
		if err != nil {
			return 0 // closed without a response: refused
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	ok := func(a string) bool { return a == "docs.paths.test" || a == "DOCS.Paths.Test." }
	for _, host := range []string{"docs.paths.test", "DOCS.Paths.Test.", "[docs.paths.test]", "[[docs.paths.test]]", "docs.paths.test@127.0.0.1"} {
		for _, port := range []string{fmt.Sprint(tlsPort)} {
			a := host + ":" + port
			code := send(t, "CONNECT "+a+" HTTP/1.1\r\nHost: "+a+"\r\n\r\n")
			if ok(host) != (code == 200) {
				t.Errorf("CONNECT %s: %d", a, code)
			}
		}
	}
	for _, port := range []string{"0" + fmt.Sprint(tlsPort), "-12", "91337", "https", "+" + fmt.Sprint(tlsPort), ""} {
		a := "docs.paths.test:" + port
		if code := send(t, "CONNECT "+a+" HTTP/1.1\r\nHost: "+a+"\r\n\r\n"); code == 200 {
			t.Errorf("CONNECT %s: %d", a, code)
		}
	}
	if code := send(t, "CONNECT 2001:DB8::1337 HTTP/1.1\r\nHost: 2001:DB8::1337\r\n\r\n"); code == 200 {
		t.Errorf("CONNECT 2001:DB8::1337: %d", code)
	}
	for _, host := range []string{"docs.paths.test", "DOCS.Paths.Test.", "[docs.paths.test]", "[[docs.paths.test]]"} {
		a := fmt.Sprintf("%s:%d", host, plainPort)
		code := send(t, "GET http://"+a+"/x HTTP/1.1\r\nHost: "+a+"\r\n\r\n")
		if ok(host) != (code == 200) {
			t.Errorf("GET http://%s/x: %d", a, code)
		}
	}
	for _, port := range []string{"0" + fmt.Sprint(plainPort), "-12", "91337", "https"} {
		a := "docs.paths.test:" + port
		if code := send(t, "GET http://"+a+"/x HTTP/1.1\r\nHost: "+a+"\r\n\r\n"); code == 200 {
			t.Errorf("GET http://%s/x: %d", a, code)
		}
	}
}

// TestRotatedAnswers (THREATS.md A3): the gateway's own lookup of a name
// can return other addresses than the client was given (round-robin,
// geo-DNS). An address our DNS gave this client for the name is vouched
// for whatever a fresh lookup says now; the same address for a client our
// DNS told nothing is not (sni-mismatch), so the allow comes from the
// client's own answers, not from the lookup.
func TestRotatedAnswers(t *testing.T) {
	tp := newTopo(t, topoOpts{config: func(c *Config) { c.Inspect = false }})
	// The fresh lookup of www.allowed.test returns srvV4 and srvV6 only;
	// the client was told spoofV4 earlier, and then srvV4.
	tp.facts.add(clientV4, spoofV4, "www.allowed.test")
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	for _, c := range []struct {
		what   string
		src    netip.Addr
		allow  bool
		reason string
	}{
		{"the client's first answer", clientV4, true, policy.ReasonAllowed},
		{"another client", client2V4, false, ReasonSNIMismatch},
	} {
		t.Run(c.what, func(t *testing.T) {
			conn := tp.dialAtFirstWriteFrom(t, c.src, netip.AddrPortFrom(spoofV4, 443))
			body, err := tp.tlsGet(conn, "www.allowed.test", "/rotated", nil)
			if (err == nil && strings.Contains(body, "path=/rotated")) != c.allow {
				t.Errorf("%q %v, want allowed %v", body, err, c.allow)
			}
			ev := tp.ev.wait(t, "flow", func(ev audit.Event) bool {
				return ev.Kind == audit.KindFlow && int(ev.ClientPort) == localPort(conn) && ev.Client == c.src
			})
			if ev.Reason != c.reason || ev.Dest != spoofV4 {
				t.Errorf("event %+v, want %s", ev, c.reason)
			}
		})
	}
}

// TestExplicitSlowHead (THREATS.md C4): a client of the explicit proxy
// that sends its request head a byte at a time, or nothing at all, is
// closed once HelloTimeout has passed since it connected, as a transparent
// hello is; it cannot hold its connection by dripping bytes.
func TestExplicitSlowHead(t *testing.T) {
	const timeout = 500 * time.Millisecond
	addr, _, tlsPort, _ := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.HelloTimeout = timeout })
	head := fmt.Sprintf("CONNECT docs.paths.test:%d HTTP/1.1\r\nHost: docs.paths.test:%d\r\nX-Pad: %s\r\n\r\n", tlsPort, tlsPort, strings.Repeat("a", 200))
	for _, drip := range []bool{true, false} {
		t.Run(fmt.Sprintf("drip=%v", drip), func(t *testing.T) {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			start := time.Now()
			closed := make(chan struct{})
			go func() {
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				io.Copy(io.Discard, c)
				close(closed)
			}()
			// At most 200 bytes, 100 ms apart: 20 s, far past the timeout.
			for i := 0; i < 200; i++ {
				select {
				case <-closed:
					i = 200
					continue
				case <-time.After(100 * time.Millisecond):
				}
				if drip {
					if _, err := c.Write([]byte{head[i]}); err != nil {
						break
					}
				}
			}
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("the proxy held a slow head for %v (timeout %v)", took, timeout)
			}
		})
	}
}

// TestTransparentAsteriskForm: "OPTIONS *" names no path under a
// host/path rule's glob, so a host only such a rule allows refuses it
// (path-not-allowed), as any other path outside the rule; before, the
// asterisk form had an empty path, which host/path rules read as unknown
// (host level) and let through (THREATS.md C6).
func TestTransparentAsteriskForm(t *testing.T) {
	tp, o := keepAliveTopo(t, "enforce")
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, originPort))
	io.WriteString(c, "OPTIONS * HTTP/1.1\r\nHost: docs.paths.test\r\nX-Marker: asterisk-form\r\n\r\n")
	codes, bodies, err := readResponses(c, bufio.NewReader(c), 1)
	if err != nil || codes[0] != 403 || !strings.Contains(bodies[0], policy.ReasonPath) {
		t.Errorf("OPTIONS * to docs.paths.test: %v %v %q, want the 403 page (%s)", err, codes, bodies, policy.ReasonPath)
	}
	if raw, _ := o.saw(); strings.Contains(raw, "asterisk-form") {
		t.Errorf("the origin read the request: %q", raw)
	}
	// A host a host-level rule allows answers it (control).
	c = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, originPort))
	io.WriteString(c, "OPTIONS * HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n")
	if codes, _, err := readResponses(c, bufio.NewReader(c), 1); err != nil || codes[0] == 403 {
		t.Errorf("OPTIONS * to www.allowed.test: %v %v", err, codes)
	}
}

// TestExplicitInspectedLaterAbsoluteHost (THREATS.md A1): on an inspected
// CONNECT, TLS or cleartext inside, a later request whose absolute-form
// target names the CONNECT host and whose Host line names another is
// refused as host-mismatch, after an allowed one on the same connection.
// Before, net/http (goproxy) dropped the Host line and it was forwarded.
func TestExplicitInspectedLaterAbsoluteHost(t *testing.T) {
	addr, plainPort, tlsPort, caPool := loopbackExplicit(t, docsPublicPolicy, nil)
	for _, c := range []struct {
		name   string
		port   int
		scheme string
	}{{"tls", tlsPort, "https"}, {"cleartext", plainPort, "http"}} {
		t.Run(c.name, func(t *testing.T) {
			conn, code := connectDocs(t, addr, c.port)
			if code != http.StatusOK {
				t.Fatalf("CONNECT: %d", code)
			}
			var rw io.ReadWriter = conn
			if c.scheme == "https" {
				rw = tls.Client(conn, &tls.Config{ServerName: "docs.paths.test", RootCAs: caPool})
			}
			br := bufio.NewReader(rw)
			auth := fmt.Sprintf("docs.paths.test:%d", c.port)
			for _, r := range []struct {
				head, reason string
				code         int
			}{
				{"GET " + c.scheme + "://" + auth + "/public/ok HTTP/1.1\r\nHost: " + auth + "\r\n\r\n", "", 200},
				{"GET " + c.scheme + "://" + auth + "/public/x HTTP/1.1\r\nHost: evil.example\r\n\r\n", ReasonHostMismatch, 403},
			} {
				io.WriteString(rw, r.head)
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("%q: %v", r.head, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != r.code || resp.Header.Get("X-Egressd-Reason") != r.reason {
					t.Errorf("%q: %d %q %q, want %d %q", r.head, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), body, r.code, r.reason)
				}
			}
		})
	}
}

// TestTransparentInspectedFronting (THREATS.md A1, domain fronting): with
// --inspect, a request inside a TLS connection whose SNI is docs.paths.test
// (inspected: it has host/path rules) and whose Host names another host is
// decided on that host, at the connection's address, as a connection to it
// would be: allowed where a rule allows the host and the address is one of
// its own (www.allowed.test resolves to the same server), refused with the
// host's own reason otherwise (no rule: evil.example; an allowed name the
// address was not given out for: sni-mismatch). Each request event names
// the Host and carries the SNI as Front. In audit mode the refused request
// is forwarded and recorded as a would-deny with the same marker. Before,
// every such request was host-mismatch, recorded under the SNI's name: the
// report said nothing of the name the request was for.
func TestTransparentInspectedFronting(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t, topoOpts{mode: mode})
			pool := inspectionPool(t, tp)
			for _, w := range []struct {
				host, verdict, rule, reason string
			}{
				{"docs.paths.test", "allow", "docs", ""}, // control
				{"www.allowed.test", "allow", "allowed", ""},
				{"api.allowed.test", "deny", "", ReasonSNIMismatch},
				{"evil.example", "deny", "", policy.ReasonNoRule},
			} {
				// One connection each: a refusal closes it.
				c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
				tc := tls.Client(c, &tls.Config{ServerName: "docs.paths.test", RootCAs: pool})
				fmt.Fprintf(tc, "GET /public/x HTTP/1.1\r\nHost: %s\r\n\r\n", w.host)
				resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
				if err != nil {
					t.Fatalf("Host %s: %v", w.host, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 && !strings.HasPrefix(string(body), "sni="+w.host+" host="+w.host+" ") {
					// egressd's own TLS to the origin names the host
					// the request was decided on.
					t.Errorf("Host %s: the origin saw %q", w.host, body)
				}
				code, reason := 200, ""
				if w.verdict == "deny" && mode == "enforce" {
					// In audit mode it is forwarded: the origin serves
					// every name (its certificate covers them).
					code, reason = 403, w.reason
				}
				if resp.StatusCode != code || resp.Header.Get("X-Egressd-Reason") != reason {
					t.Errorf("Host %s: %d %q, want %d %q", w.host, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), code, reason)
				}
				port := localPort(c)
				ev := tp.ev.wait(t, "the request for "+w.host, func(ev audit.Event) bool {
					return int(ev.ClientPort) == port && ev.Kind == audit.KindRequest
				})
				front := "docs.paths.test"
				if w.host == front {
					front = ""
				}
				if ev.Name != w.host || string(ev.Verdict) != w.verdict || ev.Rule != w.rule || ev.Reason != w.reason && w.reason != "" || ev.Front != front ||
					ev.Enforced != (mode == "enforce" && w.verdict == "deny") {
					t.Errorf("Host %s: event for %s: %s rule %q reason %q front %q enforced=%v, want %s rule %q reason %q front %q",
						w.host, ev.Name, ev.Verdict, ev.Rule, ev.Reason, ev.Front, ev.Enforced, w.verdict, w.rule, w.reason, front)
				}
			}
		})
	}
}

// inspectionPool is a pool holding the inspection CA of tp's proxy, for a
// client that trusts it.
func inspectionPool(t *testing.T, tp *topo) *x509.CertPool {
	t.Helper()
	_, caPEM, err := LoadOrCreateCA(tp.state)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return pool
}

// TestTransparentInspectedEmptyPath: inside an inspected TLS connection of
// the transparent proxy, an absolute-form target without a path
// ("https://docs.paths.test", with or without a query) is a request for
// "/", which "docs.paths.test/public/*" does not name: refused in enforce
// mode, recorded as a would-be deny in audit mode. Before, net/http's empty
// path reached the policy as an unknown one, allowed at host level, and
// the origin served "/".
func TestTransparentInspectedEmptyPath(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t, topoOpts{mode: mode})
			pool := inspectionPool(t, tp)
			for _, target := range []string{"https://docs.paths.test", "https://docs.paths.test?page=private"} {
				c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
				tc := tls.Client(c, &tls.Config{ServerName: "docs.paths.test", RootCAs: pool})
				fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n", target)
				resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
				if err != nil {
					t.Fatalf("%s: %v", target, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				code, reason := 403, policy.ReasonPath
				if mode == "audit" {
					code, reason = 200, ""
				}
				if resp.StatusCode != code || resp.Header.Get("X-Egressd-Reason") != reason {
					t.Errorf("%s: %d %q %q, want %d %q", target, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), body, code, reason)
				}
				port := localPort(c)
				ev := tp.ev.wait(t, "the request for "+target, func(ev audit.Event) bool {
					return int(ev.ClientPort) == port && ev.Kind == audit.KindRequest
				})
				if ev.Verdict != policy.Deny || ev.Reason != policy.ReasonPath || ev.Path != "/" {
					t.Errorf("%s: event %s %q path %q, want deny %q path /", target, ev.Verdict, ev.Reason, ev.Path, policy.ReasonPath)
				}
			}
		})
	}
}

// TestExplicitInspectedAuth: with proxy users (--proxy-users) and a
// host/path rule, a CONNECT without credentials is challenged (407) and an
// authenticated one to the path-ruled host is inspected like any other:
// each request inside is decided on its path (another tenant's path is
// refused in enforce mode, forwarded and recorded as a would-be deny in
// audit mode, under the rule's name), whatever Proxy-Authorization it
// carries (the tunnel's credentials, a stranger's, none), and that field
// never reaches the origin; a CONNECT inside the tunnel is refused as
// http-malformed (in audit mode forwarded and recorded so).
func TestExplicitInspectedAuth(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			ev := &events{}
			addr, _, tlsPort, caPool := loopbackExplicitSink(t, strings.Replace(docsPublicPolicy, "mode: enforce", "mode: "+mode, 1),
				func(c *Config) { c.ProxyUsers = map[string]string{"alice": "s3cret"} }, ev)
			auth := fmt.Sprintf("docs.paths.test:%d", tlsPort)
			if _, code := connectDocsWith(t, addr, tlsPort, ""); code != http.StatusProxyAuthRequired {
				t.Fatalf("CONNECT without credentials: %d, want 407", code)
			}
			const alice = "Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n" // alice:s3cret
			for _, r := range []struct{ head, path, reason string }{
				{"GET /public/ok HTTP/1.1\r\nHost: " + auth + "\r\n" + alice + "\r\n", "/public/ok", ""},
				{"GET /private HTTP/1.1\r\nHost: " + auth + "\r\n" + alice + "\r\n", "/private", policy.ReasonPath},
				{"GET /private HTTP/1.1\r\nHost: " + auth + "\r\nProxy-Authorization: Basic Ym9iOng=\r\n\r\n", "/private", policy.ReasonPath},
				{"GET /private HTTP/1.1\r\nHost: " + auth + "\r\n\r\n", "/private", policy.ReasonPath},
			} {
				c, code := connectDocsWith(t, addr, tlsPort, alice)
				if code != http.StatusOK {
					t.Fatalf("authenticated CONNECT: %d", code)
				}
				tc := tls.Client(c, &tls.Config{ServerName: "docs.paths.test", RootCAs: caPool})
				io.WriteString(tc, r.head)
				resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
				if err != nil {
					t.Fatalf("%q: %v (not inspected?)", r.head, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				code, reason := 403, r.reason
				if r.reason == "" || mode == "audit" {
					code, reason = 200, ""
				}
				if resp.StatusCode != code || resp.Header.Get("X-Egressd-Reason") != reason {
					t.Errorf("%q: %d %q %q, want %d %q", r.head, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), body, code, reason)
				}
				if code == 200 && (!strings.Contains(string(body), "path="+r.path) || resp.Header.Get("X-Seen-Proxy-Authorization") != "") {
					t.Errorf("%q: the origin saw %q, Proxy-Authorization %q", r.head, body, resp.Header.Get("X-Seen-Proxy-Authorization"))
				}
				if r.reason != "" {
					port := localPort(c)
					e := ev.wait(t, "the request for "+r.path, func(e audit.Event) bool {
						return int(e.ClientPort) == port && e.Kind == audit.KindRequest
					})
					if e.Verdict != policy.Deny || e.Reason != r.reason || e.Path != r.path || e.Name != "docs.paths.test" || e.Enforced != (mode == "enforce") {
						t.Errorf("%q: event %s %q %s%s enforced=%v", r.head, e.Verdict, e.Reason, e.Name, e.Path, e.Enforced)
					}
				}
			}
			// A CONNECT inside the inspected tunnel is refused as a
			// malformed head (in audit mode forwarded, as every request,
			// and recorded as a would-be deny).
			c, code := connectDocsWith(t, addr, tlsPort, alice)
			if code != http.StatusOK {
				t.Fatalf("authenticated CONNECT: %d", code)
			}
			tc := tls.Client(c, &tls.Config{ServerName: "docs.paths.test", RootCAs: caPool})
			fmt.Fprintf(tc, "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n%s\r\n", alice)
			resp, err := http.ReadResponse(bufio.NewReader(tc), &http.Request{Method: http.MethodConnect})
			if mode == "enforce" && err == nil && (resp.StatusCode != 403 || resp.Header.Get("X-Egressd-Reason") != ReasonHTTPBad) {
				t.Errorf("CONNECT inside the inspected tunnel: %d %q", resp.StatusCode, resp.Header.Get("X-Egressd-Reason"))
			}
			port := localPort(c)
			e := ev.wait(t, "the inner CONNECT", func(e audit.Event) bool {
				return int(e.ClientPort) == port && e.Kind == audit.KindRequest
			})
			if e.Verdict != policy.Deny || e.Reason != ReasonHTTPBad || e.Enforced != (mode == "enforce") {
				t.Errorf("CONNECT inside the inspected tunnel: event %s %q enforced=%v", e.Verdict, e.Reason, e.Enforced)
			}
		})
	}
}

// TestTransparentFrontingIntoPathRule (THREATS.md A1, residual): with
// --inspect, a TLS connection whose SNI is www.allowed.test (a host rule
// allows it: spliced, not inspected) to an address it shares with
// docs.paths.test reaches docs.paths.test/private when its encrypted Host
// names docs.paths.test: the proxy never sees the Host. The flow is
// recorded under the SNI and its rule. Only hosts with path rules are
// decrypted, and a host rule's host is not one; the test shows the
// residual so that a change to it is seen. The control: the same request
// under the path-ruled SNI is refused.
func TestTransparentFrontingIntoPathRule(t *testing.T) {
	tp := newTopo(t, topoOpts{mode: "enforce"})
	pool := inspectionPool(t, tp)
	for _, sni := range []string{"docs.paths.test", "www.allowed.test"} {
		c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
		roots := pool
		if sni != "docs.paths.test" {
			roots = tp.pki.pool // spliced: the origin's own certificate
		}
		tc := tls.Client(c, &tls.Config{ServerName: sni, RootCAs: roots})
		io.WriteString(tc, "GET /private HTTP/1.1\r\nHost: docs.paths.test\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil {
			t.Fatalf("SNI %s: %v", sni, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		tc.Close()
		if sni == "docs.paths.test" {
			if resp.StatusCode != 403 || resp.Header.Get("X-Egressd-Reason") != policy.ReasonPath {
				t.Errorf("SNI %s: %d %q, want 403 %q", sni, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), policy.ReasonPath)
			}
			continue
		}
		if resp.StatusCode != 200 || string(body) != "sni=www.allowed.test host=docs.paths.test path=/private" {
			t.Errorf("SNI %s: %d %q: the residual changed (update README's Security table)", sni, resp.StatusCode, body)
		}
		port := localPort(c)
		ev := tp.ev.wait(t, "the fronted flow", func(ev audit.Event) bool {
			return int(ev.ClientPort) == port && ev.Kind == audit.KindFlow
		})
		if ev.Name != "www.allowed.test" || ev.Rule != "allowed" || ev.Verdict != policy.Allow {
			t.Errorf("SNI %s: flow recorded as %s %s rule %q", sni, ev.Name, ev.Verdict, ev.Rule)
		}
	}
}

// TestTransparentInspectedEntryForms: with --inspect, docs.paths.test
// (only "docs.paths.test/public/*" allows it) reached on 443 in ways other
// than a fresh handshake naming it — a session the client tries to resume
// (tickets from an earlier inspected connection), no SNI and an IP-literal
// SNI to the address our DNS gave the client for it, cleartext HTTP — is
// inspected all the same: each request is decided on its path, another
// path refused in enforce mode and recorded as a would-be deny under the
// name in audit mode. (The inspected TLS ends at egressd: a session
// resumes, if at all, with egressd, which reads every request after the
// handshake as after a full one; each connection's tls.Config is new, so
// its ticket keys are its own and none resumed here; crypto/tls accepts
// no early data.)
func TestTransparentInspectedEntryForms(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t, topoOpts{mode: mode})
			pool := inspectionPool(t, tp)
			tp.facts.add(clientV4, srvV4, "docs.paths.test")
			cache := tls.NewLRUClientSessionCache(4)
			ports := map[uint16]bool{}
			for _, w := range []struct {
				name string
				cfg  *tls.Config // nil: cleartext
			}{
				{"fresh", &tls.Config{ServerName: "docs.paths.test", RootCAs: pool, ClientSessionCache: cache}},
				{"resumed", &tls.Config{ServerName: "docs.paths.test", RootCAs: pool, ClientSessionCache: cache}},
				{"tls12-resumed", &tls.Config{ServerName: "docs.paths.test", RootCAs: pool, ClientSessionCache: cache, MaxVersion: tls.VersionTLS12}},
				{"tls12-resumed-again", &tls.Config{ServerName: "docs.paths.test", RootCAs: pool, ClientSessionCache: cache, MaxVersion: tls.VersionTLS12}},
				{"no-sni", &tls.Config{InsecureSkipVerify: true}},
				{"cleartext", nil},
			} {
				c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
				var rw io.ReadWriter = c
				reqs := "GET /private HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n"
				if w.cfg != nil {
					tc := tls.Client(c, w.cfg)
					if err := tc.Handshake(); err != nil {
						t.Fatalf("%s: %v", w.name, err)
					}
					rw = tc
					// An allowed request first: the refusal is of a
					// later one on the same connection.
					reqs = "GET /public/x HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n" + reqs
				}
				io.WriteString(rw, reqs)
				br := bufio.NewReader(rw)
				var resp *http.Response
				for range strings.Count(reqs, "GET ") {
					var err error
					if resp, err = http.ReadResponse(br, nil); err != nil {
						t.Fatalf("%s: %v", w.name, err)
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if mode == "enforce" && (resp.StatusCode != 403 || resp.Header.Get("X-Egressd-Reason") != policy.ReasonPath) {
					t.Errorf("%s: /private: %d %q, want 403 %q", w.name, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), policy.ReasonPath)
				}
				port := localPort(c)
				ports[uint16(port)] = true
				c.Close() // a first request is its connection's flow, recorded at its end
				ev := tp.ev.wait(t, w.name+": the request for /private", func(ev audit.Event) bool {
					return int(ev.ClientPort) == port && ev.Path == "/private" && (ev.Kind == audit.KindRequest || w.cfg == nil)
				})
				if ev.Verdict != policy.Deny || ev.Reason != policy.ReasonPath || ev.Name != "docs.paths.test" || ev.Enforced != (mode == "enforce") {
					t.Errorf("%s: event %s %s %q %s enforced=%v", w.name, ev.Kind, ev.Verdict, ev.Reason, ev.Name, ev.Enforced)
				}
			}
			// An IP-literal SNI (crypto/tls sends none for an address;
			// openssl sends what it is given).
			out, _ := tp.c.Run("sh", "-c", "printf 'GET /private HTTP/1.1\\r\\nHost: docs.paths.test\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -connect "+srvV4.String()+":443 -servername "+srvV4.String()+" -quiet -ign_eof 2>&1")
			want := "HTTP/1.1 403 Forbidden"
			if mode == "audit" {
				want = "HTTP/1.1 200 OK"
			}
			if !strings.Contains(out, want) || mode == "enforce" && !strings.Contains(out, "X-Egressd-Reason: "+policy.ReasonPath) {
				t.Errorf("IP-literal SNI: openssl says %q, want %q", out, want)
			}
			ev := tp.ev.wait(t, "the IP-literal SNI's request for /private", func(ev audit.Event) bool {
				return ev.Kind == audit.KindRequest && ev.Path == "/private" && !ports[ev.ClientPort]
			})
			if ev.Verdict != policy.Deny || ev.Reason != policy.ReasonPath || ev.Name != "docs.paths.test" || ev.Enforced != (mode == "enforce") {
				t.Errorf("IP-literal SNI: event %s %q %s enforced=%v", ev.Verdict, ev.Reason, ev.Name, ev.Enforced)
			}
		})
	}
}
