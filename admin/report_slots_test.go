package admin

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/audit"
)

// panicSince is the window whose report panics (panicReporter).
var panicSince = time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)

// panicReporter is the real ledger, but a report over since=panicSince
// panics in the handler (net/http recovers it and drops the connection).
type panicReporter struct{ *audit.Ledger }

func (r panicReporter) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	if opt.Since.Equal(panicSince) {
		panic("admin test: a report that panics")
	}
	return r.Ledger.ReportContext(ctx, opt)
}

// runServer runs s (configured on 127.0.0.1:0) until the test ends and
// returns the address it listens on.
func runServer(t *testing.T, s *Server) string {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	for range 500 {
		if addr := s.Addr(); addr != "127.0.0.1:0" {
			return addr
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the admin server does not listen after 5 s")
	return ""
}

// TestReportSlotsFreedOnEveryPath: against Run's server on loopback, every
// way out of a report's handler gives its slot back: a bad since= (400), a
// request with a body (400), a HEAD, HTML and JSON, a handler that panics,
// a client gone before the answer or in the middle of reading it, a
// request for another host (421, which takes none). After a few rounds of
// each, no slot is held and maxReports reports are served at once.
func TestReportSlotsFreedOnEveryPath(t *testing.T) {
	l, _ := testLedger(t, nil)
	s, err := New(Config{Addr: "127.0.0.1:0"}, Deps{Reporter: panicReporter{l}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	addr := runServer(t, s)
	raw := func(req string, read int) {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		if read > 0 {
			io.ReadFull(c, make([]byte, read))
		}
	}
	do := func(method, path, host string) {
		req, err := http.NewRequest(method, "http://"+addr+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if host != "" {
			req.Host = host
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return // the panic's dropped connection
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	for range 3 {
		var wg sync.WaitGroup
		for _, path := range []string{"/", "/report.json"} {
			for _, f := range []func(){
				func() { do("GET", path+"?since=bogus", "") },
				func() { do("GET", path+"?since="+panicSince.Format(time.RFC3339), "") },
				func() { do("HEAD", path, "") },
				func() { do("HEAD", path+"?since=7d", "") },
				func() { do("GET", path+"?since=7d", "") },
				func() { do("GET", path, "attacker.test") },
				func() { raw("GET "+path+"?since=7d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 0) },
				func() { raw("GET "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 200) },
				func() { raw("GET "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\n", 0) },
				func() { raw("GET "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc", 20) },
			} {
				wg.Add(1)
				go func() { defer wg.Done(); f() }()
			}
		}
		wg.Wait()
	}
	waitSlotsFree(t, s, 60*time.Second, "every request ended")
	// All maxReports slots serve.
	for range maxReports {
		s.reports <- struct{}{}
	}
	code, h, body := get(t, "http://"+addr+"/report.json")
	for range maxReports {
		<-s.reports
	}
	if code != http.StatusServiceUnavailable || h.Get("Retry-After") == "" {
		t.Errorf("with the slots taken: %d %q, want 503 with Retry-After", code, body)
	}
	if code, _, body := get(t, "http://"+addr+"/report.json"); code != http.StatusOK || !strings.Contains(string(body), "totals") {
		t.Errorf("a report after all: %d %.200s, want 200", code, body)
	}
}
