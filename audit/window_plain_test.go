package audit

import (
	"context"
	"testing"
	"time"
)

// TestPlainReportNotBehindWindow: a plain report (no Since) is built while
// a window's report holds the window turn (windowReads) and reads the
// event log, and while a second window's report waits for that turn: the
// window turn is the windows' alone, so a client looping on since=30d
// delays no plain report.
func TestPlainReportNotBehindWindow(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	in := make(chan struct{}, 10)
	gate := make(chan struct{})
	waiting := make(chan struct{}, 10)
	windowWaitHook = func() { waiting <- struct{}{} }
	t.Cleanup(func() { windowWaitHook = nil })
	l.mu.Lock()
	l.history = func(ctx context.Context, since time.Time, fn func(Event)) error {
		in <- struct{}{}
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
		return nil
	}
	l.mu.Unlock()
	opt := ReportOptions{Now: reportNow, Since: t0}
	win := make(chan *Report, 2)
	go func() { win <- l.Report(opt) }()
	select {
	case <-in:
	case <-time.After(30 * time.Second):
		close(gate)
		t.Fatal("the window's report did not read the event log")
	}
	go func() { win <- l.Report(opt) }()
	select {
	case <-waiting:
	case <-time.After(30 * time.Second):
		close(gate)
		t.Fatal("the second window's report did not wait for the first's read")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := l.ReportContext(ctx, ReportOptions{Now: reportNow})
	close(gate)
	if err != nil || r == nil {
		t.Errorf("a plain report while a window read the log and another waited: %v; want it built", err)
	}
	<-win
	<-win
}
