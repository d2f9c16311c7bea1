package admin

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
)

// gateReporter is the real ledger, asked through a report that waits
// (as one waits for another's build, or reads a month's window) until the
// test opens the gate or the request's context ends.
type gateReporter struct {
	*audit.Ledger
	in   chan struct{} // a report was asked for
	gate chan struct{} // closed: the reports go on
}

func (r *gateReporter) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	r.in <- struct{}{}
	select {
	case <-r.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return r.Ledger.ReportContext(ctx, opt)
}

// TestReportsCapped: at most maxReports reports are in progress at once
// (waiting for their turn, reading their window, built or written); one
// more is answered at once, 503 with Retry-After, counted and logged,
// and asks the ledger for nothing. Before, every request held a goroutine
// and, with since=, a window's ledger read in parallel, for up to 60 s
// each: a client looping on /report.json?since=30d took the memory.
func TestReportsCapped(t *testing.T) {
	l, _ := testLedger(t, nil)
	rep := &gateReporter{Ledger: l, in: make(chan struct{}, 100), gate: make(chan struct{})}
	reg := prometheus.NewRegistry()
	var logs syncBuf
	s, err := New(Config{}, Deps{Reporter: rep, Registry: reg, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	opened := false
	open := func() {
		if !opened {
			opened = true
			close(rep.gate)
		}
	}
	defer open()

	paths := []string{"/report.json?since=7d", "/", "/report.json", "/report.json?since=30d"}
	var wg sync.WaitGroup
	codes := make([]int, maxReports)
	for i := range maxReports {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(ts.URL + paths[i%len(paths)])
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}()
	}
	for i := range maxReports {
		select {
		case <-rep.in:
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of %d reports were asked for", i, maxReports)
		}
	}
	for _, path := range []string{"/report.json?since=30d", "/report.json", "/"} {
		code, h, body := get(t, ts.URL+path)
		if code != http.StatusServiceUnavailable || h.Get("Retry-After") == "" {
			t.Errorf("%s with %d reports in progress: %d, Retry-After %q (%s); want 503 with Retry-After", path, maxReports, code, h.Get("Retry-After"), body)
		}
	}
	select {
	case <-rep.in:
		t.Errorf("a report past the cap was asked of the ledger")
	default:
	}
	if code, _, _ := get(t, ts.URL+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz with the reports capped: %d, want 200", code)
	}
	_, _, m := get(t, ts.URL+"/metrics")
	if !bytes.Contains(m, []byte("egress_admin_reports_refused_total 3")) {
		t.Errorf("/metrics does not count the 3 reports refused:\n%s", grepLines(m, "egress_admin"))
	}
	if got := strings.Count(logs.String(), "admin: too many reports in progress"); got != 1 {
		t.Errorf("%d log lines for the refused reports, want 1 (at most a line a minute):\n%s", got, logs.String())
	}

	open()
	wg.Wait()
	for i, c := range codes {
		if c != http.StatusOK {
			t.Errorf("report %d of those in progress: %d, want 200", i, c)
		}
	}
	// Their slots are free again.
	if code, _, body := get(t, ts.URL+"/report.json?since=7d"); code != http.StatusOK {
		t.Errorf("a report after the others ended: %d (%s), want 200", code, body)
	}
}

// TestReportsCapFreedByLeavingClient: a report whose client leaves while
// it waits gives its slot back, so a client that opens requests and drops
// them does not keep the reports refused.
func TestReportsCapFreedByLeavingClient(t *testing.T) {
	l, _ := testLedger(t, nil)
	rep := &gateReporter{Ledger: l, in: make(chan struct{}, 100), gate: make(chan struct{})}
	s, err := New(Config{}, Deps{Reporter: rep, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	for round := range 3 {
		// The last round's probe, whose client left too, may still hold
		// its slot: a request of this round would be 503 and never ask
		// the ledger (a hang in CI).
		waitSlotsFree(t, s, round)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range maxReports {
			req, err := http.NewRequestWithContext(ctx, "GET", ts.URL+"/report.json?since=7d", nil)
			if err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if resp, err := http.DefaultClient.Do(req); err == nil {
					resp.Body.Close()
				}
			}()
		}
		for i := range maxReports {
			select {
			case <-rep.in:
			case <-time.After(30 * time.Second):
				t.Fatalf("round %d: %d of %d reports asked the ledger", round, i, maxReports)
			}
		}
		cancel()
		wg.Wait()
		// The handlers notice their clients left on their own time: a
		// new report gets a slot once they did, within the 30 s.
		deadline := time.Now().Add(30 * time.Second)
		for {
			req, _ := http.NewRequest("GET", ts.URL+"/report.json", nil)
			ctx2, cancel2 := context.WithCancel(context.Background())
			req = req.WithContext(ctx2)
			got := make(chan int, 1)
			go func() {
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					got <- 0
					return
				}
				resp.Body.Close()
				got <- resp.StatusCode
			}()
			select {
			case <-rep.in: // it got a slot and asked the ledger
				cancel2()
				<-got
			case c := <-got:
				cancel2()
				if c != http.StatusServiceUnavailable {
					t.Fatalf("round %d: %d, want a slot or 503", round, c)
				}
				if time.Now().After(deadline) {
					t.Fatalf("round %d: the reports of clients that left still hold their slots", round)
				}
				time.Sleep(10 * time.Millisecond)
				continue
			}
			break
		}
	}
}

// waitSlotsFree waits until no report holds a slot of s (the handlers of
// clients that left give theirs back on their own time), or fails.
func waitSlotsFree(t *testing.T, s *Server, round int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for len(s.reports) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("round %d: %d report slots still held by clients that left", round, len(s.reports))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// grepLines is the lines of b that contain s.
func grepLines(b []byte, s string) string {
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return fmt.Sprint(out)
}
