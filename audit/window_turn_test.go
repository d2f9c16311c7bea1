package audit

import (
	"context"
	"errors"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"egressd/policy"
)

// TestWindowReadsOneAtATime: windows' (Since) reads of the event log, each
// into a ledger of its own, take turns (windowReads at once), and a
// window's ledger is let go before the next read begins: at the ledger's
// bounds each is as big as the ledger, and before, N requests for
// since=30d read N of them in parallel. A window report that waits for
// its turn to read gives up when its caller leaves, having read nothing.
func TestWindowReadsOneAtATime(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	waiting := make(chan struct{}, 10)
	windowWaitHook = func() { waiting <- struct{}{} }
	t.Cleanup(func() { windowWaitHook = nil })
	var active, most atomic.Int32
	in := make(chan struct{}, 10)
	gate := make(chan struct{})
	ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(30 * time.Minute),
		Client: netip.MustParseAddr("192.168.50.23"), ClientPort: 40001, ClientMAC: "aa:bb:cc:00:00:0a",
		Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: "tracker.example",
		Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	l.mu.Lock()
	l.history = func(ctx context.Context, since time.Time, fn func(Event)) error {
		a := active.Add(1)
		defer active.Add(-1)
		for m := most.Load(); a > m && !most.CompareAndSwap(m, a); m = most.Load() {
		}
		in <- struct{}{}
		<-gate
		fn(ev)
		return nil
	}
	l.mu.Unlock()

	opt := ReportOptions{Now: reportNow, Since: t0}
	first, second := make(chan *Report, 1), make(chan *Report, 1)
	go func() { first <- l.Report(opt) }()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	third := make(chan error, 1)
	fail := func(format string, args ...any) {
		cancel()
		close(gate)
		<-first
		<-second
		<-third
		t.Fatalf(format, args...)
	}
	select {
	case <-in:
	case <-time.After(30 * time.Second):
		close(gate)
		t.Fatal("a window's report did not read the event log")
	}
	go func() { second <- l.Report(opt) }()
	go func() {
		_, err := l.ReportContext(ctx, opt)
		third <- err
	}()
	for range 2 {
		select {
		case <-waiting:
		case <-in:
			fail("a second window's read of the event log began while the first's was under way")
		case <-time.After(30 * time.Second):
			fail("the second and third window reports neither waited nor read")
		}
	}
	cancel()
	if err := <-third; !errors.Is(err, context.Canceled) {
		t.Errorf("a window report whose caller left while it waited to read: %v, want context.Canceled", err)
	}
	close(gate)
	for i, c := range []chan *Report{first, second} {
		if r := <-c; r.Totals.Flows != 1 || len(r.Dropped) != 1 {
			t.Errorf("window report %d: %d flows, %d dropped entries; want 1 and 1 (the log's)", i+1, r.Totals.Flows, len(r.Dropped))
		}
	}
	if got := len(in); got != 1 {
		t.Errorf("%d more reads of the event log after the first; want 1 (the second's; the third left before its turn)", got)
	}
	if m := most.Load(); m != 1 {
		t.Errorf("%d windows read the event log at once, want 1", m)
	}
}
