package proxy

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestExplicitIgnoresProxyEnv: the explicit proxy follows no proxy
// environment variable. With HTTP_PROXY, HTTPS_PROXY, ALL_PROXY (both
// cases) naming a loopback trap listener, a plain-HTTP request, a request
// in an inspected CONNECT and one in a CONNECT tunnel without inspection
// all reach the origin in origin form, and the trap accepts nothing.
// (goproxy's defaults read them: its transport's Proxy is
// http.ProxyFromEnvironment, and its CONNECT dialer dials https_proxy.)
// The transport's dialer goes to the decided address whatever the proxy
// setting, so a proxy setting would show as a request in proxy form to
// the origin (a CONNECT in clear to the TLS origin, which fails), not as
// a connection to the trap; the test checks both. Note: net/http reads
// the environment once per process, so this test only fails a transport
// that follows it if it runs before anything else in the process used
// http.ProxyFromEnvironment.
func TestExplicitIgnoresProxyEnv(t *testing.T) {
	trap, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var trapped atomic.Int32
	go func() {
		for {
			c, err := trap.Accept()
			if err != nil {
				return
			}
			trapped.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { trap.Close() })
	for _, k := range []string{"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"} {
		t.Setenv(k, "http://"+trap.Addr().String())
	}
	t.Setenv("NO_PROXY", "")
	t.Setenv("no_proxy", "")

	var mu sync.Mutex
	var seen []string
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Method+" "+r.RequestURI)
		mu.Unlock()
		echoHandler(w, r)
	})
	get := func(t *testing.T, rw io.ReadWriter, target, host string) {
		t.Helper()
		fmt.Fprintf(rw, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, host)
		resp, err := http.ReadResponse(bufio.NewReader(rw), nil)
		if err != nil {
			t.Fatalf("GET %s: %v", target, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %s, want 200", target, resp.StatusCode, body)
		}
	}
	for _, inspect := range []bool{true, false} {
		t.Run(fmt.Sprintf("inspect=%v", inspect), func(t *testing.T) {
			addr, plainPort, tlsPort, caPool := loopbackExplicitOrigin(t, docsPublicPolicy, func(c *Config) { c.Inspect = inspect }, nil, origin)
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(20 * time.Second))
			host := fmt.Sprintf("docs.paths.test:%d", plainPort)
			get(t, conn, "http://"+host+"/public/plain", host)

			host = fmt.Sprintf("docs.paths.test:%d", tlsPort)
			if inspect {
				_, tc := inspectDocs(t, addr, tlsPort, caPool)
				get(t, tc, "/public/inspected", host)
				return
			}
			c, code := connectDocs(t, addr, tlsPort)
			if code != http.StatusOK {
				t.Fatalf("CONNECT %s: %d, want 200", host, code)
			}
			// The test's origin certificate; this client checks only that the tunnel reaches it.
			get(t, tls.Client(c, &tls.Config{ServerName: "docs.paths.test", InsecureSkipVerify: true}), "/public/tunnel", host)
		})
	}
	if n := trapped.Load(); n != 0 {
		t.Errorf("the proxy environment's listener accepted %d connections, want 0", n)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, want := range []string{"GET /public/plain", "GET /public/inspected", "GET /public/tunnel"} {
		if !slices.Contains(seen, want) {
			t.Errorf("the origin did not get %q; it got %q", want, seen)
		}
	}
}
