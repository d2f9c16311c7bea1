package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/audit"
)

// lockedBuf is a log output the test reads while the proxy writes it.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Split(strings.TrimSpace(l.b.String()), "\n")
}

// TestLongClientTextBounded: a name, path or CONNECT authority of tens of
// kilobytes, which a LAN client chooses, reaches the event log, the ledger,
// the decision line and the 403 page shortened to the same value (a name
// to 255 bytes, a path to 2 KiB, ending in "…") with its length kept
// (name_len, path_len); a valid name is kept whole. Before, each went
// whole into the journal and the log line (a client could push the
// history out of the rotating journal hundreds of times faster than
// ordinary events) while the ledger cut names at 255 bytes, so the two
// disagreed.
func TestLongClientTextBounded(t *testing.T) {
	dir := t.TempDir()
	ledger := audit.NewLedger(nil, audit.LedgerOptions{})
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, FlushInterval: 20 * time.Millisecond}, ledger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	go func() { j.Run(ctx); close(runDone) }()
	closeJournal := sync.OnceFunc(func() { cancel(); <-runDone; j.Close() })
	t.Cleanup(closeJournal)
	logs := &lockedBuf{}
	tp := newTopo(t, topoOpts{mode: "enforce", deps: func(d *Deps) {
		d.Sink = audit.Tee(d.Sink, j)
		d.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	}})

	// net/http, under the explicit proxy, refuses markup in a Host line
	// (400) and a head over 64 KiB (431); the transparent proxy's parser
	// takes both.
	longName := strings.Repeat("a", 30000) + "<script>.allowed.test"
	plainName := strings.Repeat("a", 20000) + ".allowed.test"
	shortPath := "/public/" + strings.Repeat("p", 20000)
	longPath := "/public/" + strings.Repeat("p", 30000) + "<script>"
	cases := []struct {
		name, raw      string
		explicit       bool
		wantName       string // the original name in the event
		wantPath       string // and path
		wantStatus     int
		wantPageNoEcho string // must not be in the response whole
	}{
		{name: "transparent Host", raw: "GET /x HTTP/1.1\r\nHost: " + longName + "\r\n\r\n",
			wantName: longName, wantPath: "/x", wantStatus: 403, wantPageNoEcho: longName},
		{name: "transparent path", raw: "GET " + strings.Replace(longPath, "/public/", "/private/", 1) + " HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n",
			wantName: "docs.paths.test", wantPath: strings.Replace(longPath, "/public/", "/private/", 1), wantStatus: 403,
			wantPageNoEcho: strings.Replace(longPath, "/public/", "/private/", 1)},
		{name: "transparent allowed path", raw: "GET " + longPath + " HTTP/1.1\r\nHost: docs.paths.test\r\nConnection: close\r\n\r\n",
			wantName: "docs.paths.test", wantPath: longPath, wantStatus: 200},
		{name: "explicit absolute-form", explicit: true, raw: "GET http://" + plainName + shortPath + " HTTP/1.1\r\nHost: " + plainName + "\r\n\r\n",
			wantName: plainName, wantPath: shortPath, wantStatus: 403, wantPageNoEcho: plainName},
		{name: "explicit CONNECT", explicit: true, raw: "CONNECT " + longName + ":443 HTTP/1.1\r\n\r\n",
			wantName: longName, wantStatus: 403, wantPageNoEcho: longName},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var c interface {
				io.ReadWriter
				SetDeadline(time.Time) error
				Close() error
			}
			if tc.explicit {
				c = tp.dialExplicit(t)
			} else {
				tp.facts.add(clientV4, srvV4, "docs.paths.test")
				c = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 80))
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(c, tc.raw); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: strings.Fields(tc.raw)[0]})
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantStatus {
				t.Fatalf("status %d, want %d: %.300q", resp.StatusCode, tc.wantStatus, body)
			}
			if tc.wantPageNoEcho != "" {
				if bytes.Contains(body, []byte(tc.wantPageNoEcho[:4096])) || len(body) > 8<<10 {
					t.Errorf("the 403 page (%d bytes) echoes the client's %d bytes whole", len(body), len(tc.wantPageNoEcho))
				}
				if bytes.Contains(body, []byte("<script>")) {
					t.Errorf("the 403 page holds the client's markup unescaped: %.400q", body)
				}
			}
			c.Close()
			tp.ev.wait(t, "of "+tc.name, func(ev audit.Event) bool {
				return ev.Name == tc.wantName && ev.Path == tc.wantPath
			})
		})
	}
	// A TLS server name as long (crypto/tls takes any name; the hello
	// may be 64 KiB).
	sni := strings.Repeat("s", 30000) + ".allowed.test"
	c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tls.Client(c, &tls.Config{ServerName: sni, RootCAs: tp.pki.pool}).Handshake(); err == nil {
		t.Error("the handshake with a 30 KB server name succeeded")
	}
	c.Close()
	tp.ev.wait(t, "of the long server name", func(ev audit.Event) bool { return ev.Name == sni })
	cases = append(cases, struct {
		name, raw      string
		explicit       bool
		wantName       string
		wantPath       string
		wantStatus     int
		wantPageNoEcho string
	}{name: "transparent SNI", wantName: sni})

	closeJournal()
	b, err := os.ReadFile(filepath.Join(dir, audit.CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	type jev struct {
		Name    string `json:"name"`
		NameLen int    `json:"name_len"`
		Path    string `json:"path"`
		PathLen int    `json:"path_len"`
		Verdict string `json:"verdict"`
	}
	var evs []jev
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if len(line) > 8<<10 {
			t.Errorf("an event line of %d bytes: %.200s", len(line), line)
		}
		var e jev
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("%v: %.200s", err, line)
		}
		evs = append(evs, e)
	}
	for _, tc := range cases {
		found := false
		for _, e := range evs {
			if e.Name != boundedAs(tc.wantName, 255) || e.Path != boundedAs(tc.wantPath, 2048) {
				continue
			}
			found = true
			if want := lenIfLonger(tc.wantName, 255); e.NameLen != want {
				t.Errorf("%s: name_len %d, want %d", tc.name, e.NameLen, want)
			}
			if want := lenIfLonger(tc.wantPath, 2048); e.PathLen != want {
				t.Errorf("%s: path_len %d, want %d", tc.name, e.PathLen, want)
			}
		}
		if !found {
			t.Errorf("%s: no event in the journal with name %.60q (%d bytes) and path %.60q (%d bytes)",
				tc.name, boundedAs(tc.wantName, 255), len(boundedAs(tc.wantName, 255)), boundedAs(tc.wantPath, 2048), len(boundedAs(tc.wantPath, 2048)))
		}
	}
	// The ledger holds the name the journal holds.
	rep := ledger.Report(audit.ReportOptions{})
	found := false
	for _, d := range rep.Dropped {
		if strings.HasPrefix(d.Dest, "aaaa") {
			found = true
			if d.Dest != boundedAs(longName, 255) && d.Dest != boundedAs(plainName, 255) {
				t.Errorf("the ledger's dropped destination is %q (%d bytes), the journal's %q (%d bytes)",
					d.Dest[200:], len(d.Dest), boundedAs(longName, 255)[200:], len(boundedAs(longName, 255)))
			}
		}
	}
	if !found {
		t.Error("no dropped destination for the long name in the ledger")
	}
	// The decision lines carry the same shortened values and the lengths.
	// finish emits the event before it writes the line: the last one may
	// be on its way still.
	isDecision := func(line string) bool {
		var m map[string]any
		return json.Unmarshal([]byte(line), &m) == nil && m["msg"] == audit.CanonicalMessage
	}
	lines := logs.lines()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); lines = logs.lines() {
		n := 0
		for _, line := range lines {
			if len(line) <= 8<<10 && isDecision(line) {
				n++
			}
		}
		if n >= len(cases) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	decisions := 0
	for _, line := range lines {
		if len(line) > 8<<10 {
			t.Errorf("a log line of %d bytes: %.300s", len(line), line)
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil || m["msg"] != audit.CanonicalMessage {
			continue
		}
		decisions++
		if n, _ := m["name"].(string); strings.HasPrefix(n, "aaaa") || strings.HasPrefix(n, "ssss") {
			if (n != boundedAs(longName, 255) || m["name_len"] != float64(len(longName))) &&
				(n != boundedAs(plainName, 255) || m["name_len"] != float64(len(plainName))) &&
				(n != boundedAs(sni, 255) || m["name_len"] != float64(len(sni))) {
				t.Errorf("decision line: name %.60q (%d bytes), name_len %v", n, len(n), m["name_len"])
			}
		}
	}
	if decisions < len(cases) {
		t.Errorf("%d decision lines, want at least %d", decisions, len(cases))
	}
}

// boundedAs is s as the event log keeps it: whole up to max bytes, else
// its first max-3 bytes and "…" (the test's strings are ASCII).
func boundedAs(s string, max int) string {
	if len(s) <= max {
		return s
	}
	return s[:max-3] + "…"
}

func lenIfLonger(s string, max int) int {
	if len(s) <= max {
		return 0
	}
	return len(s)
}

// TestDenyPageFallbackEscapes: when the operator's deny page template
// fails to execute (a field DenyInfo does not have), the plain fallback
// page, still served as text/html, HTML-escapes the client's name and
// keeps it short. Before, it echoed the CONNECT authority raw: a client
// chose markup the browser ran (XSS in the deny page).
func TestDenyPageFallbackEscapes(t *testing.T) {
	addr, _, _, _ := loopbackExplicit(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.DenyPage = "<p>{{.NoSuchField}}</p>" })
	for _, name := range []string{"x<script>y", strings.Repeat("a", 30000) + "<script>"} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "CONNECT %s:443 HTTP/1.1\r\n\r\n", name)
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		c.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("status %d, want 403: %.200q", resp.StatusCode, body)
		}
		if bytes.Contains(body, []byte("<script>")) || !bytes.Contains(body, []byte("&lt;script&gt;")) && len(name) < 255 {
			t.Errorf("%s: the fallback deny page (%s) does not escape the name: %.300q", name[:min(len(name), 40)], resp.Header.Get("Content-Type"), body)
		}
		if len(body) > 4<<10 {
			t.Errorf("the fallback deny page is %d bytes for a name of %d", len(body), len(name))
		}
	}
}
