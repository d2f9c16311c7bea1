package main

import (
	"context"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"egressd/admin"
	"egressd/audit"
)

// slowLedger is the real ledger, whose reports take took (a long since=
// window's read).
type slowLedger struct {
	*audit.Ledger
	took time.Duration
}

func (l slowLedger) ReportContext(ctx context.Context, opt audit.ReportOptions) (*audit.Report, error) {
	select {
	case <-time.After(l.took):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return l.Ledger.ReportContext(ctx, opt)
}

// TestReportWaitsForLongWindow: `egressd report --since` waits for a
// report as long as the daemon may take over one (admin.MaxReportTime),
// not a fixed 30 s of its own: a long window read through a browser or
// curl reached its operator, and through the project's own command not.
// What it waits for a daemon to answer at all (daemonWait, shortened
// here) is not a bound on the report's wait.
func TestReportWaitsForLongWindow(t *testing.T) {
	if reportWait < admin.MaxReportTime {
		t.Errorf("egressd report waits %v for a report, the daemon may take %v", reportWait, admin.MaxReportTime)
	}
	defer func(d time.Duration) { daemonWait = d }(daemonWait)
	daemonWait = 500 * time.Millisecond
	l := recordEvents(t, t.TempDir())
	s, err := admin.New(admin.Config{}, admin.Deps{Reporter: slowLedger{l, 4 * daemonWait}})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	code, out, stderr := runCmd(t, "report", "--admin", strings.TrimPrefix(ts.URL, "http://"), "--since", "30d", "--json")
	if code != 0 || !strings.Contains(out, `"totals"`) {
		t.Errorf("a report made in 4 times the daemon's answer wait: exit %d, %s; want the report", code, stderr)
	}
}

// TestReportDaemonNotAnswering: a daemon that takes the connection and
// answers nothing (hung) fails the command after daemonWait, not after
// the minutes a report may take.
func TestReportDaemonNotAnswering(t *testing.T) {
	defer func(d time.Duration) { daemonWait = d }(daemonWait)
	daemonWait = time.Second
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	held := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held <- c
		}
	}()
	defer func() {
		ln.Close()
		for len(held) > 0 {
			(<-held).Close()
		}
	}()
	type result struct {
		code   int
		stderr string
	}
	got := make(chan result, 1)
	go func() {
		code, _, stderr := runCmd(t, "report", "--admin", ln.Addr().String())
		got <- result{code, stderr}
	}()
	select {
	case r := <-got:
		if r.code != exitFail || !strings.Contains(r.stderr, "not answering") {
			t.Errorf("a daemon that answers nothing: exit %d, %q; want %d saying it does not answer", r.code, r.stderr, exitFail)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("a daemon that answers nothing: egressd report still waiting 60 s on, its answer wait %v", daemonWait)
	}
}
