package admin

import (
	"context"
	"errors"
	"net/http/httptest"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/testnet"
)

// leavingReporter is the real ledger, asked through a report that waits
// (as one waits for another's build) until the request's context ends.
type leavingReporter struct {
	*audit.Ledger
	in    chan struct{}
	ended chan error
}

func (r *leavingReporter) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	close(r.in)
	select {
	case <-ctx.Done():
	case <-time.After(30 * time.Second):
	}
	rep, err := r.Ledger.ReportContext(ctx, opt)
	r.ended <- err
	return rep, err
}

// askLeaving asks for url on a request of its own and returns how to
// leave (cancel: the client closes its connection) and the request's
// error, once it ended (nil: it was answered). Its client gives up after
// a minute, so that a test that is wrong fails rather than hangs.
func askLeaving(t *testing.T, url string) (cancel context.CancelFunc, got <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return cancel, testnet.Get(ctx, url)
}

// TestReportGivesUpWhenClientLeaves: the report handlers ask for the
// report with the request's context, so a client that leaves while its
// report waits for its turn (`egressd report` gives up after 30 s) costs
// no build: the ledger is told, and answers no report.
func TestReportGivesUpWhenClientLeaves(t *testing.T) {
	l, _ := testLedger(t, nil)
	for _, path := range []string{"/", "/report.json", "/report.json?since=7d"} {
		rep := &leavingReporter{Ledger: l, in: make(chan struct{}), ended: make(chan error, 1)}
		s, err := New(Config{}, Deps{Reporter: rep})
		if err != nil {
			t.Fatal(err)
		}
		ts := httptest.NewServer(s.Handler())
		cancel, got := askLeaving(t, ts.URL+path)
		select {
		case <-rep.in:
		case err := <-got:
			cancel()
			ts.Close()
			t.Fatalf("%s: answered (%v) without asking for the report with the request's context", path, err)
		}
		cancel()
		if err := <-got; !errors.Is(err, context.Canceled) {
			t.Errorf("%s: the client's request: %v, want it canceled", path, err)
		}
		if err := <-rep.ended; !errors.Is(err, context.Canceled) {
			t.Errorf("%s: the ledger's report after the client left: %v, want context.Canceled (no report built)", path, err)
		}
		ts.Close()
	}
}
