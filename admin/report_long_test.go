package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/audit"
)

// slowReporter is the real ledger, asked through a report whose window
// read takes took (a month's log on a slow disk), or until the request's
// context ends: then it says how (ended) and answers no report.
type slowReporter struct {
	*audit.Ledger
	took  time.Duration
	in    chan struct{} // a report was asked for
	ended chan error    // the context's error, when it ended first
}

func (r *slowReporter) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	r.in <- struct{}{}
	select {
	case <-time.After(r.took):
	case <-ctx.Done():
		r.ended <- ctx.Err()
		return nil, ctx.Err()
	}
	return r.Ledger.ReportContext(ctx, opt)
}

// slowServer runs, on loopback, a server whose write timeout is short
// (as a month's since= read is longer than the 60 s) and whose reports
// take took each.
func slowServer(t *testing.T, took, limit time.Duration) (string, *slowReporter) {
	t.Helper()
	l, _ := testLedger(t, nil)
	rep := &slowReporter{Ledger: l, took: took, in: make(chan struct{}, 10), ended: make(chan error, 10)}
	s, err := New(Config{Addr: "127.0.0.1:0"}, Deps{Reporter: rep, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.writeTimeout, s.reportLimit = 300*time.Millisecond, limit
	return runServer(t, s), rep
}

// TestReportLongerThanWriteTimeout: a report whose window read takes
// longer than the write timeout is answered, whole, to its client still
// there. Before, the write deadline (60 s from the request) had passed
// when the report was ready, and its client got a cut connection every
// time, however often it asked again.
func TestReportLongerThanWriteTimeout(t *testing.T) {
	addr, _ := slowServer(t, 1500*time.Millisecond, reportLimit)
	c := &http.Client{Timeout: time.Minute}
	for _, tc := range []struct{ path, want string }{
		{"/report.json?since=7d", `"totals"`},
		{"/?since=30d", "</html>"},
	} {
		resp, err := c.Get("http://" + addr + tc.path)
		if err != nil {
			t.Errorf("%s, read for 5 times the write timeout: %v; want the report", tc.path, err)
			continue
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil || !strings.Contains(string(b), tc.want) {
			t.Errorf("%s, read for 5 times the write timeout: %d, %v, %.200s; want 200 and the whole report", tc.path, resp.StatusCode, err, b)
		}
	}
}

// TestReportPastItsLimit: a report not made within reportLimit (its read
// and its wait for its turns) is given up and answered 503, with a body
// that says to ask for a shorter window, rather than a cut connection.
func TestReportPastItsLimit(t *testing.T) {
	addr, rep := slowServer(t, time.Hour, time.Second)
	c := &http.Client{Timeout: time.Minute}
	resp, err := c.Get("http://" + addr + "/report.json?since=365d")
	if err != nil {
		t.Fatalf("a report past its limit: %v; want 503 saying why", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), "shorter since=") {
		t.Errorf("a report past its limit: %d %q; want 503 asking for a shorter since=", resp.StatusCode, b)
	}
	select {
	case err := <-rep.ended:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("the ledger's read past the limit ended with %v, want its deadline", err)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("the ledger's read was not told to stop")
	}
}

// TestLongReportStopsWhenClientLeaves: a report that reads past the write
// timeout still stops at once when its client leaves: the ledger's read
// is told (context.Canceled), not left to run to reportLimit.
func TestLongReportStopsWhenClientLeaves(t *testing.T) {
	addr, rep := slowServer(t, time.Hour, reportLimit)
	cancel, got := askLeaving(t, "http://"+addr+"/report.json?since=30d")
	select {
	case <-rep.in:
	case err := <-got:
		t.Fatalf("answered (%v) before the report was asked of the ledger", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the report was not asked of the ledger")
	}
	time.Sleep(time.Second) // past the write timeout
	cancel()
	<-got
	select {
	case err := <-rep.ended:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("the ledger's read after its client left ended with %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("the ledger's read was not stopped 30 s after its client left")
	}
}

// TestPipelinedReportStopsWhenClientLeaves: a client that sends a report
// request and the start of the next on the same connection (HTTP/1.1
// pipelining), then leaves, is noticed as one that left: net/http stops
// watching a connection once it reads a byte of the next request, so its
// report's context never ended, and the report held its slots and the one
// window read at a time for the whole reportLimit (10 minutes) for no one.
func TestPipelinedReportStopsWhenClientLeaves(t *testing.T) {
	addr, rep := slowServer(t, time.Hour, reportLimit)
	for _, next := range []string{"G", "GET /report.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"} {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(c, "GET /report.json?since=30d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-rep.in:
		case <-time.After(30 * time.Second):
			c.Close()
			t.Fatal("the report was not asked of the ledger")
		}
		// The next request, sent once the report's is read: net/http
		// reads its first byte, and no more.
		if _, err := io.WriteString(c, next); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		c.Close()
		select {
		case err := <-rep.ended:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("pipelined %q: the ledger's read after its client left ended with %v, want context.Canceled", next, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("pipelined %q: the ledger's read was not stopped 30 s after its client left", next)
		}
	}
}

// bigReporter is the real ledger, whose reports carry notes enough (8 MB)
// to fill a connection's buffers.
type bigReporter struct {
	*audit.Ledger
	in chan struct{} // a report was asked for
}

func (r bigReporter) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	r.in <- struct{}{}
	rep, err := r.Ledger.ReportContext(ctx, opt)
	if err == nil {
		for i := range 80000 {
			rep.Notes = append(rep.Notes, fmt.Sprintf("note %d: %s", i, strings.Repeat("x", 90)))
		}
	}
	return rep, err
}

// TestSlowReaderHoldsNoSlotPastWriteTimeout: a client that asks for a
// report and reads none of it holds its slots for the write timeout from
// the report's making, not for reportLimit too: the write deadline put
// past reportLimit for the making is set again, to writeTimeout, once
// the report is made.
func TestSlowReaderHoldsNoSlotPastWriteTimeout(t *testing.T) {
	l, _ := testLedger(t, nil)
	in := make(chan struct{}, 1)
	s, err := New(Config{Addr: "127.0.0.1:0"}, Deps{Reporter: bigReporter{l, in}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.writeTimeout = 300 * time.Millisecond
	addr := runServer(t, s)
	d := net.Dialer{Timeout: 10 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /report.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// The report is asked, made, and its writing blocks on the client
	// that reads nothing.
	select {
	case <-in:
	case <-time.After(30 * time.Second):
		t.Fatal("the report was not asked of the ledger")
	}
	time.Sleep(time.Second)
	waitSlotsFree(t, s, 30*time.Second, "a client reading nothing of its report")
}
