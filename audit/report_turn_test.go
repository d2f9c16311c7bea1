package audit

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"egressd/policy"
)

// TestReportContextGivesUpWaiting: a report asked for while another is
// built waits for its turn; when its caller's context ends meanwhile (the
// admin API's client went away: `egressd report` gives up after 30 s) it
// gives up, and no report is built for no one. A context ended before
// the call builds nothing either.
func TestReportContextGivesUpWaiting(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")

	var mu sync.Mutex
	builds := 0
	firstIn, release, waiting := make(chan struct{}), make(chan struct{}), make(chan struct{})
	reportBuildHook = func(*Ledger) {
		mu.Lock()
		builds++
		n := builds
		mu.Unlock()
		if n == 1 {
			close(firstIn)
			<-release
		}
	}
	var waitOnce sync.Once
	reportWaitHook = func() { waitOnce.Do(func() { close(waiting) }) }
	t.Cleanup(func() { reportBuildHook, reportWaitHook = nil, nil })
	built := func() int {
		mu.Lock()
		defer mu.Unlock()
		return builds
	}

	first := make(chan *Report, 1)
	go func() { first <- l.Report(ReportOptions{Now: reportNow}) }()
	<-firstIn

	type result struct {
		r   *Report
		err error
	}
	ctx, cancel := context.WithCancel(context.Background())
	second := make(chan result, 1)
	go func() {
		r, err := l.ReportContext(ctx, ReportOptions{Now: reportNow})
		second <- result{r, err}
	}()
	<-waiting
	cancel()
	var res result
	select {
	case res = <-second:
	case <-time.After(30 * time.Second):
		close(release)
		<-first
		res = <-second
		t.Fatalf("a report whose caller's context ended kept waiting for its turn; built after the first: %v, %d builds", res.err, built())
	}
	close(release)
	if r := <-first; r.Totals.Flows != 1 {
		t.Errorf("first report: %d flows, want 1", r.Totals.Flows)
	}
	if res.r != nil || !errors.Is(res.err, context.Canceled) {
		t.Errorf("the report given up: %v, %v; want no report and context.Canceled", res.r != nil, res.err)
	}
	if n := built(); n != 1 {
		t.Errorf("%d reports built, want 1 (the one given up is not built)", n)
	}

	r, err := l.ReportContext(ctx, ReportOptions{Now: reportNow})
	if r != nil || !errors.Is(err, context.Canceled) {
		t.Errorf("a report with its context ended already: %v, %v; want no report and context.Canceled", r != nil, err)
	}
	if n := built(); n != 1 {
		t.Errorf("%d reports built, want 1 (none for a context ended already)", n)
	}
	if r, err := l.ReportContext(context.Background(), ReportOptions{Now: reportNow}); err != nil || r.Totals.Flows != 1 {
		t.Errorf("a report after: %v; want 1 flow", err)
	}
}

// TestWindowReportReadsLogWhileAnotherBuilds: a report of a window
// (since=30d) lists the open flows and reads the event log before its
// turn, not while holding it: a plain report built meanwhile does not
// wait for the read (seconds for a month's log), nor the window's for
// the plain report's build. Only the builds take turns. The log read is
// held until the test lets it go, so the order is certain.
func TestWindowReportReadsLogWhileAnotherBuilds(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")
	done, release := holdReport(t, l, func() {})

	waiting := make(chan struct{})
	var waitOnce sync.Once
	reportWaitHook = func() { waitOnce.Do(func() { close(waiting) }) }
	t.Cleanup(func() { reportWaitHook = nil })
	openIn, histIn, histGo := make(chan struct{}), make(chan struct{}), make(chan struct{})
	open := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Hour),
		Client: netip.MustParseAddr("192.168.50.30"), ClientPort: 41000,
		Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: "open.example",
		Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	l.SetOpenFlows(func() []Event {
		close(openIn)
		return []Event{open}
	})
	l.mu.Lock()
	l.history = func(_ context.Context, since time.Time, fn func(Event)) error {
		select {
		case <-openIn:
		default:
			t.Error("the event log was read before the open flows were listed")
		}
		close(histIn)
		<-histGo
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(30 * time.Minute),
			Client: netip.MustParseAddr("192.168.50.23"), ClientPort: 40001, ClientMAC: "aa:bb:cc:00:00:0a",
			Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: "tracker.example",
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
		fn(ev)
		return nil
	}
	l.mu.Unlock()

	window := make(chan *Report, 1)
	go func() { window <- l.Report(ReportOptions{Now: reportNow, Since: t0}) }()
	select {
	case <-histIn:
	case <-waiting:
		close(release)
		<-done
		close(histGo)
		<-window
		t.Fatal("a window's report waits for another report's build before it reads the event log")
	case <-time.After(30 * time.Second):
		close(release)
		<-done
		close(histGo)
		<-window
		t.Fatal("a window's report did not read the event log while another report was built")
	}
	close(histGo)
	// Its log read done, the window's report waits for its turn: the
	// first's build.
	<-waiting
	close(release)
	if r := <-done; r.Totals.Flows != 1 || r.OpenFlows != 0 {
		t.Errorf("first report: %d flows, %d open; want 1 and 0 (no open flows when it was asked)", r.Totals.Flows, r.OpenFlows)
	}
	r := <-window
	if r.Totals.Flows != 2 || r.OpenFlows != 1 || len(r.Dropped) != 2 {
		t.Errorf("window's report: %d flows, %d open, %d dropped entries; want 2, 1, 2 (the log's and the open one)", r.Totals.Flows, r.OpenFlows, len(r.Dropped))
	}
}

// TestReportOpenFlowsKeepsAllowedNow: a report with open flows (a daemon
// with capture nearly always has some) keeps each dropped entry's
// allowed_now on the ledger, as one without does, so the next report
// decides again only the entries whose inputs changed: here the entry an
// open flow adds a client to, on the report's own copy. And a memo
// decided on that copy is never kept for the ledger's entry after the
// ledger changed that entry too: the copy's clients (with the open flow's
// client) and the ledger's (with a new event's) are then changed as many
// times, yet are not the same clients.
func TestReportOpenFlowsKeepsAllowedNow(t *testing.T) {
	l := NewLedger(compileBase(t, `  - name: still
    to: ["still.example"]
    ports: [443/tcp]
  - name: lan-50
    from: [192.168.50.0/24]
    to: ["tracker.example"]
    ports: [443/tcp]
`), LedgerOptions{})
	deny := captureDenials(l)
	deny("still.example", "192.168.50.23", "")
	deny("tracker.example", "192.168.50.23", "")
	flow := func(client string, port uint16) Event {
		return Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Hour),
			Client: netip.MustParseAddr(client), ClientPort: port,
			Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: "tracker.example",
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	}
	var mu sync.Mutex
	open := []Event{flow("192.168.50.24", 42000)}
	l.SetOpenFlows(func() []Event {
		mu.Lock()
		defer mu.Unlock()
		return open
	})
	decided := 0
	allowedNowHook = func() { decided++ } // each build's own goroutine, one at a time
	t.Cleanup(func() { allowedNowHook = nil })
	report := func(step string, want map[string]string, decisions int) {
		t.Helper()
		decided = 0
		r := l.Report(ReportOptions{Now: reportNow})
		checkAllowedNow(t, step, r, want, decisions, decided)
	}
	want := map[string]string{"still.example": "still", "tracker.example": "lan-50"}
	report("first report", want, 2)
	// still.example's clients are unchanged: from the memo the first
	// kept. tracker.example's open flow adds its client on the copy.
	report("second report", want, 1)

	// While a report with the open flow is built, the ledger records
	// tracker.example from a client off the LAN.
	decided = 0
	done, release := holdReport(t, l, func() {})
	l.Emit(flow("192.168.60.7", 42001))
	close(release)
	checkAllowedNow(t, "the report built meanwhile", <-done, want, 1, decided)
	mu.Lock()
	open = nil
	mu.Unlock()
	report("after", map[string]string{"still.example": "still", "tracker.example": ""}, 1)
}

func checkAllowedNow(t *testing.T, step string, r *Report, want map[string]string, decisions, decided int) {
	t.Helper()
	got := map[string]string{}
	for _, d := range r.Dropped {
		got[d.Dest] = d.AllowedNow
	}
	for dest, rule := range want {
		if g, ok := got[dest]; !ok || g != rule {
			t.Errorf("%s: %s allowed_now %q (listed %v), want %q", step, dest, g, ok, rule)
		}
	}
	if decided != decisions {
		t.Errorf("%s: allowed_now decided %d times, want %d", step, decided, decisions)
	}
}
