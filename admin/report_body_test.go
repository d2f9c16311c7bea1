package admin

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"egressd/audit"
)

// errReporter is the real ledger, asked through a report that waits until
// the request's context ends, and says why it ended.
type errReporter struct {
	*audit.Ledger
	in  chan struct{} // a report was asked for
	end chan error    // the context's error when it ended
}

func (r *errReporter) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	r.in <- struct{}{}
	<-ctx.Done()
	r.end <- ctx.Err()
	return nil, ctx.Err()
}

// TestReportWithBodyClientLeaves: a report request that announces a body
// it never sends, then leaves, neither holds its slot (and, with since=, the
// window's read of the event log) until the 60 s write timeout nor is built
// for no one. net/http notices a client that left only once the request's
// body was read to its end; before, such a request's report went on, its
// context ended by the timeout (context.DeadlineExceeded) rather than by
// the client leaving, so four of them, sent and dropped in a loop, kept
// every report refused.
func TestReportWithBodyClientLeaves(t *testing.T) {
	l, _ := testLedger(t, nil)
	rep := &errReporter{Ledger: l, in: make(chan struct{}, 10), end: make(chan error, 10)}
	s, err := New(Config{}, Deps{Reporter: rep, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	for _, tc := range []struct{ path, hdr string }{
		{"/report.json?since=30d", "Content-Length: 5\r\n"},
		{"/", "Transfer-Encoding: chunked\r\n"},
	} {
		c, err := net.Dial("tcp", ts.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("GET " + tc.path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n" + tc.hdr + "\r\n")); err != nil {
			t.Fatal(err)
		}
		answered := make(chan int, 1)
		go func() {
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				answered <- 0
				return
			}
			resp.Body.Close()
			answered <- resp.StatusCode
		}()
		select {
		case <-rep.in:
			// Its report is under way: the client leaves.
			c.Close()
			select {
			case err := <-rep.end:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("%s with %q, client gone: the report's context ended with %v, want context.Canceled (the client left)", tc.path, tc.hdr, err)
				}
			case <-time.After(90 * time.Second):
				t.Fatalf("%s with %q, client gone: the report's context did not end", tc.path, tc.hdr)
			}
			<-answered
		case code := <-answered:
			c.Close()
			if code == http.StatusOK || code == 0 {
				t.Errorf("%s with %q: answered %d before the report was asked for; want it refused", tc.path, tc.hdr, code)
			}
		case <-time.After(30 * time.Second):
			c.Close()
			t.Fatalf("%s with %q: neither answered nor asked for a report", tc.path, tc.hdr)
		}
	}
}
