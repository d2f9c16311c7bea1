package audit

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"egressd/policy"
)

// TestReportDoesNotStallRecording: a report is built without the ledger's
// lock held, so the events the proxy, the DNS forwarder and capture record
// meanwhile are counted at once, not after the report (at the ledger's
// bounds it costs about a second of CPU, polled every few seconds). The
// report stays a snapshot: an event recorded while it is built is in the
// next report, not in it. reportBuildHook stops the build half way, so
// the test does not depend on how long a build takes.
func TestReportDoesNotStallRecording(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")
	deny("tracker.example", "192.168.50.24", "aa:bb:cc:00:00:0b")
	deny("still.example", "192.168.50.30", "")

	var lockHeld bool
	done, release := holdReport(t, l, func() {
		if l.mu.TryLock() {
			l.mu.Unlock()
		} else {
			lockHeld = true
		}
	})
	if lockHeld {
		close(release)
		<-done
		t.Fatal("the ledger's lock is held while the report is built: every event recorded meanwhile waits for it")
	}
	// A new client (and MAC) of an entry the report lists, and a new
	// entry, recorded while the report is built.
	late := func(name, client, mac string) Event {
		return Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Minute),
			Client: netip.MustParseAddr(client), ClientPort: 50000, ClientMAC: mac,
			Dest: netip.MustParseAddr("203.0.113.10"), DestPort: 443, Proto: "tcp", Name: name,
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	}
	emitted := make(chan struct{})
	go func() {
		l.Emit(late("tracker.example", "192.168.50.25", "aa:bb:cc:00:00:0c"))
		l.Emit(late("new.example", "192.168.50.26", ""))
		close(emitted)
	}()
	select {
	case <-emitted:
	case <-time.After(30 * time.Second):
		close(release)
		<-done
		t.Fatal("Emit did not return while the report was built")
	}
	close(release)
	r := <-done

	count := func(r *Report) (flows uint64, clients int, entries int) {
		for _, d := range r.Dropped {
			if d.Dest == "tracker.example" {
				flows, clients = d.Flows, d.ClientCount
			}
		}
		return flows, clients, len(r.Dropped)
	}
	if f, c, n := count(r); f != 2 || c != 2 || n != 2 || r.Totals.Flows != 3 {
		t.Errorf("report built while events came: tracker.example %d flows, %d clients, %d entries, %d flows in all; want 2, 2, 2, 3 (a snapshot of before)", f, c, n, r.Totals.Flows)
	}
	if f, c, n := count(l.Report(ReportOptions{Now: reportNow})); f != 3 || c != 3 || n != 3 {
		t.Errorf("next report: tracker.example %d flows, %d clients, %d entries; want 3, 3, 3", f, c, n)
	}
}

// holdReport starts a report of l and returns once its build is stopped
// half way (reportBuildHook, after at), until release is closed; done
// gives the report.
func holdReport(t *testing.T, l *Ledger, at func()) (done chan *Report, release chan struct{}) {
	building, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	reportBuildHook = func(*Ledger) {
		once.Do(func() {
			at()
			close(building)
			<-release
		})
	}
	t.Cleanup(func() { reportBuildHook = nil })
	done = make(chan *Report)
	go func() { done <- l.Report(ReportOptions{Now: reportNow}) }()
	<-building
	return done, release
}

// TestReportsOneAtATime: a report asked for while another is made waits
// for it, then is made (a report of when it was asked): two at once, each
// at the ledger's bounds, would hold twice the memory (about 386 MB
// allocated each, BenchmarkReportDroppedFull). The hooks make the order
// certain: the first build stops half way until the second caller waits
// (or, wrongly, builds too).
func TestReportsOneAtATime(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")

	var mu sync.Mutex
	builds := 0
	firstIn, release, secondIn, waiting := make(chan struct{}), make(chan struct{}), make(chan struct{}), make(chan struct{})
	reportBuildHook = func(*Ledger) {
		mu.Lock()
		builds++
		n := builds
		mu.Unlock()
		switch n {
		case 1:
			close(firstIn)
			<-release
		case 2:
			close(secondIn)
		}
	}
	reportWaitHook = func() { close(waiting) }
	t.Cleanup(func() { reportBuildHook, reportWaitHook = nil, nil })
	first, second := make(chan *Report, 1), make(chan *Report, 1)
	go func() { first <- l.Report(ReportOptions{Now: reportNow}) }()
	<-firstIn
	go func() {
		deny("tracker.example", "192.168.50.24", "") // asked after this event: the report counts it
		second <- l.Report(ReportOptions{Now: reportNow})
	}()
	select {
	case <-secondIn:
		close(release)
		<-first
		<-second
		t.Fatal("a second report was built while the first was: two at once, each with its memory")
	case <-waiting:
	}
	close(release)
	if r := <-first; r.Totals.Flows != 1 {
		t.Errorf("first report: %d flows, want 1", r.Totals.Flows)
	}
	if r := <-second; r.Totals.Flows != 2 {
		t.Errorf("second report: %d flows, want 2", r.Totals.Flows)
	}
	if builds != 2 {
		t.Errorf("%d reports built, want 2", builds)
	}
}
