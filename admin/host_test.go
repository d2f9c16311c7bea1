package admin

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuf is a log destination the server's goroutines write while the
// test reads.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// rawGet sends req (a whole request, headers and blank line) on a new
// connection to addr and returns the response.
func rawGet(t *testing.T, addr, req string) (*http.Response, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%q: %v", req, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	return resp, string(b)
}

// TestHostRebinding: DNS rebinding against the admin page. A LAN browser
// on attacker.test, whose DNS then answers with the gateway's address,
// reads http://attacker.test:PORT/report.json as its own origin: the
// request reaches the admin server with Host attacker.test[:PORT]. The
// server answers only to an IP literal, localhost and the names it is
// given (Config.Hosts), and says 421 to anything else, on every path,
// with a short plain body and one log line. Before, it served every
// client's flows to any Host.
func TestHostRebinding(t *testing.T) {
	l, _ := testLedger(t, nil)
	var logs syncBuf
	s, err := New(Config{Hosts: []string{"gw.example.lan", "Admin.Example.LAN.", "kiosk.example.lan"}},
		Deps{Reporter: l, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	addr := ts.Listener.Addr().String()
	_, port, _ := net.SplitHostPort(addr)

	req := func(target, host string) string {
		r := "GET " + target + " HTTP/1.1\r\nConnection: close\r\n"
		if host != "" {
			r += "Host: " + host + "\r\n"
		}
		return r + "\r\n"
	}
	for _, c := range []struct {
		name, req string
		ok        bool
	}{
		{"evil name", req("/report.json", "attacker.test"), false},
		{"evil name with port", req("/report.json", "attacker.test:"+port), false},
		{"evil name, trailing dot", req("/report.json", "attacker.test.:"+port), false},
		{"localhost under an evil name", req("/report.json", "localhost.attacker.test:"+port), false},
		{"IP under an evil name", req("/report.json", "127.0.0.1.attacker.test:"+port), false},
		{"sub-name of a configured one", req("/report.json", "x.gw.example.lan:"+port), false},
		{"evil name, html", req("/", "attacker.test:"+port), false},
		{"evil name, metrics", req("/metrics", "attacker.test:"+port), false},
		{"evil name, healthz", req("/healthz", "attacker.test:"+port), false},
		{"evil name, readyz", req("/readyz", "attacker.test:"+port), false},
		{"evil name, 404 path", req("/nothing", "attacker.test:"+port), false},
		// The absolute form names the host the request is for; Go takes
		// it over the Host header.
		{"absolute-form, evil host", req("http://attacker.test:"+port+"/report.json", "127.0.0.1:"+port), false},
		{"IPv4 with port", req("/report.json", "127.0.0.1:"+port), true},
		{"IPv4", req("/report.json", "127.0.0.1"), true},
		{"LAN IPv4", req("/report.json", "198.18.1.1:9901"), true},
		{"[::1] with port", req("/report.json", "[::1]:"+port), true},
		{"[::1]", req("/report.json", "[::1]"), true},
		{"[2001:db8::1] with port", req("/report.json", "[2001:db8::1]:"+port), true},
		{"localhost", req("/report.json", "localhost"), true},
		{"LOCALHOST. with port", req("/report.json", "LOCALHOST.:"+port), true},
		{"configured name", req("/report.json", "gw.example.lan:"+port), true},
		{"configured name, other case, dot", req("/report.json", "GW.Example.Lan."), true},
		{"configured name given with case and dot", req("/report.json", "admin.example.lan:"+port), true},
		{"absolute-form, IP host", req("http://127.0.0.1:"+port+"/report.json", "127.0.0.1:"+port), true},
		// HTTP/1.0 without Host: no browser sends it (a browser always
		// names the host), so it is no rebinding.
		{"HTTP/1.0 without Host", "GET /report.json HTTP/1.0\r\n\r\n", true},
	} {
		resp, body := rawGet(t, addr, c.req)
		if c.ok {
			if resp.StatusCode != 200 || !strings.Contains(body, `"rules"`) {
				t.Errorf("%s: %d %.200q, want 200 and the report", c.name, resp.StatusCode, body)
			}
			continue
		}
		if resp.StatusCode != http.StatusMisdirectedRequest {
			t.Errorf("%s: %d %.200q, want 421", c.name, resp.StatusCode, body)
			continue
		}
		if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") || len(body) > 200 ||
			strings.Contains(body, "vendor-cloud") || strings.Contains(body, "192.168.") || strings.Contains(body, "egress_") {
			t.Errorf("%s: 421 with %s %q, want a short plain body", c.name, resp.Header.Get("Content-Type"), body)
		}
	}
	// Go's server refuses a Host that is not ASCII (400); the handler,
	// mounted elsewhere, does not fold Unicode into a name either.
	if s.hostOK("\u212aiosk.example.lan") || !s.hostOK("KIOSK.example.lan") {
		t.Errorf("hostOK folds the Kelvin sign into k, or not KIOSK into kiosk")
	}
	lines := strings.Count(logs.String(), "does not answer to")
	if lines < 1 || !strings.Contains(logs.String(), "attacker.test") {
		t.Errorf("no log line for the refused requests:\n%s", logs.String())
	}
	// A page that fetches in a loop does not flood the log: the first
	// refusal logs a line, the next ones within the minute are counted
	// into the next line.
	if lines != 1 {
		t.Errorf("%d log lines for the refused requests within a minute, want 1:\n%s", lines, logs.String())
	}
	s.now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	rawGet(t, addr, req("/report.json", "attacker.test"))
	if got := logs.String(); strings.Count(got, "does not answer to") != 2 || !strings.Contains(got, "refused=") {
		t.Errorf("after a minute a refusal logs again, with the count of those not logged:\n%s", got)
	}
}

// TestHeadersAgainstOtherOrigins: no response lets another origin read
// it or a page frame or sniff it: no Access-Control-Allow-Origin (to a
// request with an Origin, or a preflight), nosniff and frame-ancestors
// 'none' (and X-Frame-Options) on the JSON, the metrics, the page, the
// health answers and the 421.
func TestHeadersAgainstOtherOrigins(t *testing.T) {
	l, _ := testLedger(t, nil)
	s, err := New(Config{}, Deps{Reporter: l, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	addr := ts.Listener.Addr().String()
	for _, c := range []struct{ method, path, host string }{
		{"GET", "/report.json", addr},
		{"GET", "/", addr},
		{"GET", "/metrics", addr},
		{"GET", "/healthz", addr},
		{"GET", "/readyz", addr},
		{"GET", "/report.json?since=bogus", addr},
		{"GET", "/nothing", addr},
		{"OPTIONS", "/report.json", addr},
		{"GET", "/report.json", "attacker.test"},
	} {
		resp, body := rawGet(t, addr, fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nOrigin: http://attacker.test\r\n"+
			"Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n", c.method, c.path, c.host))
		h := resp.Header
		what := fmt.Sprintf("%s %s (Host %s): %d", c.method, c.path, c.host, resp.StatusCode)
		for k := range h {
			if strings.HasPrefix(strings.ToLower(k), "access-control-") {
				t.Errorf("%s sends %s: %q", what, k, h.Get(k))
			}
		}
		if h.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: X-Content-Type-Options %q, want nosniff (%.80q)", what, h.Get("X-Content-Type-Options"), body)
		}
		if !strings.Contains(h.Get("Content-Security-Policy"), "frame-ancestors 'none'") || h.Get("X-Frame-Options") != "DENY" {
			t.Errorf("%s: CSP %q, X-Frame-Options %q: want frame-ancestors 'none' and DENY", what, h.Get("Content-Security-Policy"), h.Get("X-Frame-Options"))
		}
		if h.Get("Cross-Origin-Resource-Policy") != "same-origin" {
			t.Errorf("%s: Cross-Origin-Resource-Policy %q, want same-origin", what, h.Get("Cross-Origin-Resource-Policy"))
		}
	}
}

// FuzzHostOK: the Host check never panics, ignores case, and answers to
// no name that merely ends or begins with one it answers to: a name
// under localhost, under a configured name, or an IP address followed
// by a label.
func FuzzHostOK(f *testing.F) {
	for _, h := range []string{"", "attacker.test", "attacker.test:9901", "127.0.0.1:9901", "[::1]:9901", "[::1]", "localhost",
		"LOCALHOST.", "gw.example.lan:80", "127.0.0.1.attacker.test", "[fe80::1%25eth0]:1", "::1", "[gw.example.lan]", "0x7f.1"} {
		f.Add(h)
	}
	s := &Server{hosts: map[string]bool{"gw.example.lan": true}}
	f.Fuzz(func(t *testing.T, h string) {
		ok := s.hostOK(h)
		if ok != s.hostOK(strings.ToUpper(h)) && strings.ToUpper(h) != h && !strings.ContainsAny(h, "%") {
			t.Errorf("hostOK(%q) = %v, upper case differs", h, ok)
		}
		if !ok || h == "" || strings.ContainsAny(h, "[]:") {
			return
		}
		for _, x := range []string{h + ".attacker.test", "attacker." + h, h + "x.test"} {
			if s.hostOK(x) {
				t.Errorf("hostOK(%q) and hostOK(%q) both true", h, x)
			}
		}
	})
}
