package admin

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRefusedLogConcurrent: refusals arriving at once (a page's fetch
// loop, many connections) log one line within the minute, and the line
// after counts every refusal since the last line: none lost, none
// counted twice (go test -race).
func TestRefusedLogConcurrent(t *testing.T) {
	l, _ := testLedger(t, nil)
	var logs syncBuf
	s, err := New(Config{}, Deps{Reporter: l, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var clock atomic.Int64
	clock.Store(time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC).UnixNano())
	s.now = func() time.Time { return time.Unix(0, clock.Load()) }
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	addr := ts.Listener.Addr().String()
	const n = 40
	var wg sync.WaitGroup
	codes := make(chan int, n)
	for range n {
		wg.Go(func() {
			resp, _ := rawGet(t, addr, "GET /report.json HTTP/1.1\r\nHost: attacker.test\r\nConnection: close\r\n\r\n")
			codes <- resp.StatusCode
		})
	}
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != http.StatusMisdirectedRequest {
			t.Errorf("a concurrent refused request got %d, want 421", c)
		}
	}
	if got := strings.Count(logs.String(), "does not answer to"); got != 1 {
		t.Fatalf("%d log lines for %d refusals within a minute, want 1:\n%s", got, n, logs.String())
	}
	if !strings.Contains(logs.String(), "refused=1\n") {
		t.Errorf("the first line counts itself only:\n%s", logs.String())
	}
	clock.Add(int64(refusedEvery))
	rawGet(t, addr, "GET /healthz HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
	m := regexp.MustCompile(`host=other.test .*refused=(\d+)`).FindStringSubmatch(logs.String())
	if m == nil || m[1] != fmt.Sprint(n) {
		t.Errorf("the line a minute later: %v, want refused=%d (the %d not logged and itself):\n%s", m, n, n-1, logs.String())
	}
}

// TestHostFormsNoBrowserNames: Host spellings of an address or of
// localhost that a browser never sends (it normalizes 0x7f.1 and
// 2130706433 to 127.0.0.1, and 127.0.0.1. too) are refused rather than
// guessed at, a name that spells an address in its labels is a name
// (1.2.3.4.nip.io resolves on the attacker's word), and Go's server
// itself refuses userinfo, two Host headers and non-ASCII (400).
func TestHostFormsNoBrowserNames(t *testing.T) {
	l, _ := testLedger(t, nil)
	s, err := New(Config{Hosts: []string{"gw.example.lan"}}, Deps{Reporter: l, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	addr := ts.Listener.Addr().String()
	for _, c := range []struct {
		hosts string // the Host lines
		want  int
	}{
		{"Host: 0x7f.1", 421},
		{"Host: 2130706433", 421},
		{"Host: 127.0.0.1.", 421},
		{"Host: 127.1", 421},
		{"Host: 1.2.3.4.nip.io", 421},
		{"Host: 127.0.0.1.nip.io:80", 421},
		{"Host: 7f000001.rbndr.us", 421},
		{"Host: localhost..", 421},
		{"Host: foo.localhost", 421},
		{"Host: [attacker.test]:80", 421},
		{"Host: user@127.0.0.1", 400},
		{"Host: 127.0.0.1@attacker.test", 400},
		{"Host: localhost:80@attacker.test", 400},
		{"Host: 127.0.0.1\r\nHost: attacker.test", 400},
		{"Host: attacker.test\r\nHost: 127.0.0.1", 400},
		{"Host: b\xc3\xbccher.example.lan", 400},
		{"Host: [::ffff:127.0.0.1]:80", 200},
		{"Host: [fe80::1%25eth0]:80", 200},
		{"Host: localhost.", 200},
		{"Host: LocalHost.:80", 200},
	} {
		resp, body := rawGet(t, addr, "GET /report.json HTTP/1.1\r\n"+c.hosts+"\r\nConnection: close\r\n\r\n")
		if resp.StatusCode != c.want {
			t.Errorf("%q: %d %.80q, want %d", c.hosts, resp.StatusCode, body, c.want)
		}
	}
}

// TestHostH2 pins that the check is on the HTTP/2 :authority too, were
// the admin server to speak cleartext HTTP/2 (it does not: Run's server
// has Go's default protocols, HTTP/2 over TLS only): Go puts :authority
// in Request.Host, which hostOK reads.
func TestHostH2(t *testing.T) {
	l, _ := testLedger(t, nil)
	s, err := New(Config{}, Deps{Reporter: l, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(s.Handler())
	ts.Config.Protocols = new(http.Protocols)
	ts.Config.Protocols.SetUnencryptedHTTP2(true)
	ts.Start()
	defer ts.Close()
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	_, port, _ := net.SplitHostPort(ts.Listener.Addr().String())
	for host, want := range map[string]int{"attacker.test:" + port: 421, "127.0.0.1:" + port: 200, "localhost": 200} {
		req, _ := http.NewRequest("GET", ts.URL+"/report.json", nil)
		req.Host = host
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 2 || resp.StatusCode != want {
			t.Errorf(":authority %s: %s %d, want HTTP/2 %d", host, resp.Proto, resp.StatusCode, want)
		}
	}
	// And Run's server does not speak it: the preface gets no HTTP/2
	// SETTINGS frame.
	s2, err := New(Config{Addr: "127.0.0.1:0"}, Deps{Reporter: l, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s2.Run(t.Context()) }()
	deadline := time.Now().Add(10 * time.Second)
	for s2.Addr() == "127.0.0.1:0" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := net.DialTimeout("tcp", s2.Addr(), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"))
	buf := make([]byte, 64)
	k, _ := conn.Read(buf)
	if k >= 9 && buf[3] == 0x4 {
		t.Errorf("Run's server answered the HTTP/2 preface with a SETTINGS frame (%q): cleartext HTTP/2, which no browser speaks", buf[:k])
	}
	s2.Close()
	<-done
}

// TestCheckHostMessage: a name of --admin-hosts the check refuses gets a
// message that names what it takes ('_' too) and, for a name that is not
// ASCII, the form a browser sends in Host (its xn-- form).
func TestCheckHostMessage(t *testing.T) {
	for h, want := range map[string]string{
		"gw.example.lan:9901": "letters, digits, '-', '_', '.'",
		"bücher.example.lan":  "xn--",
		"gw_1.example.lan":    "",
		"xn--bcher-kva.lan":   "",
	} {
		err := CheckHost(h)
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("CheckHost(%q) = %v, want an error saying %q", h, err, want)
		}
	}
}
