package audit

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"egressd/policy"
)

// TestReportCountsOpenFlows: a UDP exchange still open (capture reports a
// UDP flow only after 60 s of silence, or a minute after it began) keeps
// its rule off the unused list of the live report and counts once, as
// open; the flow's report when it ends then counts it once, not twice,
// and the ledger itself (what a restart rebuilds) counts only what events
// said.
func TestReportCountsOpenFlows(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	now := t0.Add(time.Hour)
	ntp := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.7", mac: "02:00:00:00:00:07", cport: 40123,
		dest: "203.0.113.123", dport: 123, proto: "udp", out: 48, in: 48}.event(eng)
	// A TCP connection capture decided, not reported yet, and the proxy's
	// view of the same connection: one flow.
	tcpCap := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.5", cport: 41000,
		dest: "17.1.2.3", dport: 5223, proto: "tcp", out: 10}.event(eng)
	tcpPx := tcpCap
	tcpPx.Source, tcpPx.Time, tcpPx.BytesOut = SourceProxy, tcpCap.Time.Add(3*time.Millisecond), 20
	// An NTP exchange of before, ended and reported: the open one's counts
	// are added to its rule's without changing the ledger's.
	prior := fev{kind: KindFlow, src: SourceCapture, at: 50 * time.Minute, client: "192.168.10.7", mac: "02:00:00:00:00:07", cport: 40100,
		dest: "203.0.113.123", dport: 123, proto: "udp", out: 10, in: 10}.event(eng)
	l.Emit(prior)
	var mu sync.Mutex
	open := []Event{ntp, tcpCap, tcpPx}
	l.SetOpenFlows(func() []Event {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(open)
	})
	rule := func(r *Report, name string) (RuleReport, bool) {
		for _, u := range r.Rules {
			if u.Name == name {
				return u, true
			}
		}
		return RuleReport{}, false
	}
	check := func(what string, r *Report, openWant uint64) {
		t.Helper()
		if slices.Contains(r.UnusedRules, "ntp") || slices.Contains(r.UnusedRules, "apple-apns") {
			t.Errorf("%s: unused rules %v list a rule in use", what, r.UnusedRules)
		}
		u, ok := rule(r, "ntp")
		if !ok || u.Flows != 2 || u.BytesOut != 58 || !u.LastSeen.Equal(ntp.Time.UTC()) || !u.FirstSeen.Equal(prior.Time.UTC()) ||
			!slices.Equal(u.Clients, []string{"192.168.10.7"}) {
			t.Errorf("%s: ntp = %+v (found %v), want 2 flows, 58 bytes out, last seen %v", what, u, ok, ntp.Time)
		}
		a, ok := rule(r, "apple-apns")
		if !ok || a.Flows != 1 || a.BytesOut != 20 {
			t.Errorf("%s: apple-apns = %d flows, %d out (found %v); want 1, 20", what, a.Flows, a.BytesOut, ok)
		}
		if r.Totals.Flows != 3 || r.Totals.Allowed != 3 {
			t.Errorf("%s: totals %d flows, %d allowed; want 3, 3", what, r.Totals.Flows, r.Totals.Allowed)
		}
		if r.OpenFlows != openWant || u.OpenFlows != min(openWant, 1) {
			t.Errorf("%s: open flows %d, ntp's %d; want %d, %d", what, r.OpenFlows, u.OpenFlows, openWant, min(openWant, 1))
		}
	}
	check("open", l.Report(ReportOptions{Now: now}), 2)

	// The ledger itself counted only the event: without the open flows
	// the report is what the event log says (a restart, --state-dir).
	if r := l.Report(ReportOptions{Now: now}); r.Totals.Events != 1 {
		t.Errorf("open flows were counted as events: %d events, want 1", r.Totals.Events)
	}
	l.SetOpenFlows(nil)
	r := l.Report(ReportOptions{Now: now})
	if u, _ := rule(r, "ntp"); u.Flows != 1 || u.BytesOut != 10 || !u.LastSeen.Equal(prior.Time.UTC()) || r.Totals.Flows != 1 ||
		!slices.Contains(r.UnusedRules, "apple-apns") || r.OpenFlows != 0 {
		t.Fatalf("the ledger changed with the open flows: ntp %+v, totals %+v, unused %v", u, r.Totals, r.UnusedRules)
	}
	l.SetOpenFlows(func() []Event {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(open)
	})

	// The flows' final reports arrive while the tables still list them
	// (or the snapshot raced them): each still counts once.
	endNTP := ntp
	endNTP.Close, endNTP.Duration = "idle", 1
	l.Emit(endNTP)
	endTCP := tcpPx
	endTCP.Close, endTCP.Duration = "eof", 5
	l.Emit(endTCP)
	check("closed, still listed open", l.Report(ReportOptions{Now: now}), 0)

	mu.Lock()
	open = nil
	mu.Unlock()
	check("closed", l.Report(ReportOptions{Now: now}), 0)
}

// TestReportOpenFlowsSince: a windowed report counts the open flows that
// began in the window, once.
func TestReportOpenFlowsSince(t *testing.T) {
	dir := t.TempDir()
	eng := loadPolicy(t, "policy.yaml")
	j, _, err := OpenJournal(JournalConfig{Dir: dir}, NewLedger(eng, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	l := j.Ledger()
	ntp := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.7", cport: 40123,
		dest: "203.0.113.123", dport: 123, proto: "udp", out: 48, in: 48}.event(eng)
	old := ntp
	old.ClientPort, old.Time = 40124, t0
	l.SetOpenFlows(func() []Event { return []Event{ntp, old} })
	r := l.Report(ReportOptions{Now: t0.Add(2 * time.Hour), Since: t0.Add(30 * time.Minute)})
	var flows uint64
	for _, u := range r.Rules {
		if u.Name == "ntp" {
			flows = u.Flows
		}
	}
	if flows != 1 || slices.Contains(r.UnusedRules, "ntp") || r.OpenFlows != 1 {
		t.Errorf("window: ntp %d flows, %d open, unused %v; want 1 flow (the one begun in the window), 1 open", flows, r.OpenFlows, r.UnusedRules)
	}
}

// TestReportOpenFlowsSinceReportedMeanwhile: a windowed report reads the
// event log, then asks for the open flows. A flow whose report comes in
// between (after the log was read, before the open flows were listed) is
// in neither: it must still count once, as open (asking first, a flow
// both listed and read from the log counts once).
func TestReportOpenFlowsSinceReportedMeanwhile(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	ntp := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.7", cport: 40123,
		dest: "203.0.113.123", dport: 123, proto: "udp", out: 48, in: 48}.event(eng)
	var mu sync.Mutex
	reported := false
	l.SetOpenFlows(func() []Event {
		mu.Lock()
		defer mu.Unlock()
		if reported {
			return nil
		}
		return []Event{ntp}
	})
	logged := false
	l.history = func(_ context.Context, since time.Time, fn func(Event)) error {
		mu.Lock()
		defer mu.Unlock()
		if logged {
			end := ntp
			end.Close, end.Duration = "idle", 1
			fn(end)
		}
		// The flow's report comes now: capture no longer lists it,
		// and the log holds it from the next read on.
		reported, logged = true, true
		return nil
	}
	r := l.Report(ReportOptions{Now: t0.Add(2 * time.Hour), Since: t0.Add(30 * time.Minute)})
	var flows uint64
	for _, u := range r.Rules {
		if u.Name == "ntp" {
			flows = u.Flows
		}
	}
	if flows != 1 || slices.Contains(r.UnusedRules, "ntp") {
		t.Errorf("window: ntp %d flows (%d open), unused %v; want the flow reported meanwhile counted once", flows, r.OpenFlows, r.UnusedRules)
	}
}

// TestReportOpenFlowsProxyWins: a transparent connection the proxy
// forwards is listed open by capture (its packets on the LAN) and by the
// proxy: it counts once, as the proxy decided it (the name it read, the
// rule it allowed by), in either order of the lists, as the two reports
// would count once closed. A tunnel through the explicit proxy, listed
// only by the proxy, counts as well.
func TestReportOpenFlowsProxyWins(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	// Capture saw no name (a hello it could not read): no rule allows
	// the address.
	capt := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.5", cport: 41000,
		dest: "203.0.113.9", dport: 443, proto: "tcp", out: 10}.event(eng)
	px := fev{kind: KindFlow, src: SourceProxy, at: time.Hour, client: "192.168.10.5", cport: 41000,
		dest: "203.0.113.9", dport: 443, proto: "tcp", name: "api.nirovision.com", nsrc: NameSNI}.event(eng)
	tunnel := fev{kind: KindFlow, src: SourceProxy, at: time.Hour, client: "192.168.10.5", cport: 41001,
		dest: "203.0.113.10", dport: 443, proto: "tcp", name: "hub.docker.io", nsrc: NameConnect}.event(eng)
	if capt.Verdict != policy.Deny || px.Rule != "vendor-cloud" || tunnel.Rule != "vendor-cloud" {
		t.Fatalf("fixture: capture %s %q, proxy %s %q, tunnel %q", capt.Verdict, capt.Rule, px.Verdict, px.Rule, tunnel.Rule)
	}
	for _, open := range [][]Event{{capt, px, tunnel}, {px, capt, tunnel}, {tunnel, capt, px}} {
		l := NewLedger(eng, LedgerOptions{})
		l.SetOpenFlows(func() []Event { return slices.Clone(open) })
		r := l.Report(ReportOptions{Now: t0.Add(2 * time.Hour)})
		var vc RuleReport
		for _, u := range r.Rules {
			if u.Name == "vendor-cloud" {
				vc = u
			}
		}
		if vc.Flows != 2 || vc.OpenFlows != 2 || len(r.Dropped) != 0 || r.Totals.Flows != 2 || r.Totals.Dropped != 0 || r.OpenFlows != 2 || r.Totals.Events != 0 {
			t.Errorf("order %s %s %s: vendor-cloud %d flows (%d open), %d dropped entries, totals %+v, %d open; want 2 (2 open), none dropped, 2 open, no event",
				open[0].Source, open[1].Source, open[2].Source, vc.Flows, vc.OpenFlows, len(r.Dropped), r.Totals, r.OpenFlows)
		}
	}
}

// TestReportOpenFlowsWhileEmitting: reports that count open flows, made
// while events come in to the rules, dropped entries and ECH counts the
// open flows touch, count each open flow once and leave the ledger as the
// events made it (under -race: the report's overlay shares nothing the
// ledger changes).
func TestReportOpenFlowsWhileEmitting(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	var open []Event
	for i := range 64 {
		ntp := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.7", cport: uint16(50000 + i),
			dest: "203.0.113.123", dport: 123, proto: "udp", out: 48, in: 48}.event(eng)
		drop := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.8", cport: uint16(50000 + i),
			dest: "198.51.100.9", dport: 443, proto: "tcp", name: "tracker.example", nsrc: NameSNI}.event(eng)
		open = append(open, ntp, drop)
	}
	l.SetOpenFlows(func() []Event { return slices.Clone(open) })
	const events = 2000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range events {
			ev := fev{kind: KindFlow, src: SourceCapture, at: 30 * time.Minute, client: "192.168.10.9", cport: uint16(1024 + i),
				dest: "203.0.113.123", dport: 123, proto: "udp", out: 1}.event(eng)
			if i%2 == 1 {
				ev = fev{kind: KindFlow, src: SourceProxy, at: 30 * time.Minute, client: "192.168.10.9", cport: uint16(1024 + i),
					dest: "198.51.100.9", dport: 443, proto: "tcp", name: "tracker.example", nsrc: NameSNI}.event(eng)
				ev.Filtered = "ech"
				ev.Client = netip.AddrFrom4([4]byte{192, 168, 11, byte(i / 2)}) // new clients: the ECH list grows
			}
			l.Emit(ev)
		}
	}()
	for i := 0; ; i++ {
		r := l.Report(ReportOptions{Now: t0.Add(2 * time.Hour)})
		if r.OpenFlows != uint64(len(open)) || r.Totals.Flows != r.Totals.Events+uint64(len(open)) {
			t.Fatalf("report %d: %d open flows, totals %+v; want %d open, each event a flow and each open flow one", i, r.OpenFlows, r.Totals, len(open))
		}
		select {
		case <-done:
			l.SetOpenFlows(nil)
			if r := l.Report(ReportOptions{Now: t0.Add(2 * time.Hour)}); r.Totals.Flows != events || r.Totals.Events != events || r.OpenFlows != 0 {
				t.Fatalf("the ledger after the reports: totals %+v, %d open; want %d flows, none open", r.Totals, r.OpenFlows, events)
			}
			return
		default:
		}
	}
}
