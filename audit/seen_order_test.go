package audit

import (
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// seenSpan is one entry's first and last seen in a report.
type seenSpan struct{ first, last time.Time }

// reportSpans returns the first and last seen of the rule rule, the
// dropped entry dest and the first alarm of r (zero spans where absent).
func reportSpans(r *Report, rule, dest string) (rs, ds, as seenSpan) {
	if u := ruleByName(r, rule); u != nil {
		rs = seenSpan{u.FirstSeen, u.LastSeen}
	}
	for _, d := range r.Dropped {
		if d.Dest == dest {
			ds = seenSpan{d.FirstSeen, d.LastSeen}
		}
	}
	if len(r.Alarms) > 0 {
		as = seenSpan{r.Alarms[0].FirstSeen, r.Alarms[0].LastSeen}
	}
	return rs, ds, as
}

// outOfOrderEvents are flows under "ntp", would-be drops of
// late.example and alarms of one client, each at t0, t0+1m and t0+2m
// but arriving middle, last, first, as components emit them (a flow when
// it ends, a decision when it is made).
func outOfOrderEvents() []Event {
	var evs []Event
	for i, at := range []time.Duration{time.Minute, 2 * time.Minute, 0} {
		ok := seqEvent(10+i, t0.Add(at))
		ok.Rule, ok.Proto, ok.DestPort = "ntp", "udp", 123
		drop := seqEvent(20+i, t0.Add(at))
		drop.Verdict, drop.Rule, drop.Reason, drop.Name = policy.Deny, "", policy.ReasonNoRule, "late.example"
		alarm := Event{Kind: KindAlarm, Source: SourceDNS, Time: t0.Add(at), Client: netip.MustParseAddr("192.168.10.7"),
			ClientMAC: "02:00:00:00:00:07", Proto: "udp", Name: "t.tenant.example", Count: 512, Verdict: policy.Allow,
			Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel"}
		evs = append(evs, ok, drop, alarm)
	}
	return evs
}

// TestSeenOutOfOrder: first and last seen of a rule, a dropped entry and
// an alarm are the earliest and latest event times, whatever order the
// events arrive in: live, and after the events' file was rotated out
// into the summary (OpenJournal, LoadDir).
func TestSeenOutOfOrder(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	want := seenSpan{t0, t0.Add(2 * time.Minute)}
	check := func(name string, l *Ledger) {
		t.Helper()
		rs, ds, as := reportSpans(l.Report(ReportOptions{Now: reportNow}), "ntp", "late.example")
		for what, got := range map[string]seenSpan{"rule": rs, "dropped entry": ds, "alarm": as} {
			if !got.first.Equal(want.first) || !got.last.Equal(want.last) {
				t.Errorf("%s: %s seen %s..%s, want %s..%s", name, what, got.first, got.last, want.first, want.last)
			}
		}
	}
	l := NewLedger(eng, LedgerOptions{})
	for _, ev := range outOfOrderEvents() {
		l.Emit(ev)
	}
	check("live", l)

	dir := t.TempDir()
	cfg := JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2}
	j, _, err := OpenJournal(cfg, NewLedger(eng, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	rotateOut(t, j, outOfOrderEvents())
	keptFiles(t, dir, "late.example")
	_, restarted, _ := openJournal(t, cfg, eng)
	check("OpenJournal", restarted)
	loaded, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	check("LoadDir", loaded)
}

// TestSeenLaterReportEarlier: a flow's second report that arrives after
// its first but tells an earlier start (capture's, timed at the SYN,
// after the proxy's, timed at the accept) moves the first seen of where
// the flow counts back to it, for a dropped entry as for a rule.
func TestSeenLaterReportEarlier(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	for _, verdict := range []policy.Verdict{policy.Allow, policy.Deny} {
		l := NewLedger(eng, LedgerOptions{})
		proxy := seqEvent(1, t0.Add(50*time.Millisecond))
		proxy.Name, proxy.Rule = "late.example", "ntp"
		if verdict == policy.Deny {
			proxy.Verdict, proxy.Rule, proxy.Reason = policy.Deny, "", policy.ReasonNoRule
		}
		capture := proxy
		capture.Source, capture.Time = SourceCapture, t0
		l.Emit(proxy)
		l.Emit(capture)
		r := l.Report(ReportOptions{Now: reportNow})
		if r.Totals.Flows != 1 {
			t.Fatalf("%s: %d flows, want the two reports counted once", verdict, r.Totals.Flows)
		}
		rs, ds, _ := reportSpans(r, "ntp", "late.example")
		got := rs
		if verdict == policy.Deny {
			got = ds
		}
		if !got.first.Equal(t0) || !got.last.Equal(t0.Add(50*time.Millisecond)) {
			t.Errorf("%s: seen %s..%s, want %s..%s", verdict, got.first, got.last, t0, t0.Add(50*time.Millisecond))
		}
	}
}

// TestSeenDuplicatesOnly: a summary record of the detail budget that
// holds only duplicates (later reports the ledger merged into a flow it
// counted already; Count 0), read back from the log, widens the dropped
// entry's first seen as the merge did live: capture's report of a flow
// the proxy denied, timed at its SYN before the proxy's accept.
func TestSeenDuplicatesOnly(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	proxy := seqEvent(1, t0.Add(50*time.Millisecond))
	proxy.Verdict, proxy.Rule, proxy.Reason, proxy.Name = policy.Deny, "", policy.ReasonNoRule, "late.example"
	l.add(&proxy)
	dup := proxy
	dup.Source, dup.Time, dup.Until, dup.Duplicates = SourceCapture, t0, t0, 1
	dup.expand(func(e Event) { l.add(&e) })
	_, ds, _ := reportSpans(l.Report(ReportOptions{Now: reportNow}), "", "late.example")
	if !ds.first.Equal(t0) || !ds.last.Equal(proxy.Time) {
		t.Errorf("dropped entry seen %s..%s, want %s..%s", ds.first, ds.last, t0, proxy.Time)
	}
}

// TestSeenZeroTime: an event read back without a time (a damaged or
// hand-made log line), before or after timed ones, does not set the
// first seen of its rule, dropped entry or alarm to the zero time.
func TestSeenZeroTime(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	for _, zeroFirst := range []bool{true, false} {
		l := NewLedger(eng, LedgerOptions{})
		evs := outOfOrderEvents()[:3] // one of each, at t0+1m
		for _, ev := range evs {
			ev.Time, ev.ClientPort = time.Time{}, 999 // another flow
			if zeroFirst {
				l.add(&ev)
			}
		}
		for _, ev := range evs {
			l.add(&ev)
		}
		for _, ev := range evs {
			ev.Time, ev.ClientPort = time.Time{}, 999
			if !zeroFirst {
				l.add(&ev)
			}
		}
		want := seenSpan{t0.Add(time.Minute), t0.Add(time.Minute)}
		rs, ds, as := reportSpans(l.Report(ReportOptions{Now: reportNow}), "ntp", "late.example")
		for what, got := range map[string]seenSpan{"rule": rs, "dropped entry": ds, "alarm": as} {
			if !got.first.Equal(want.first) || !got.last.Equal(want.last) {
				t.Errorf("zero time first %v: %s seen %s..%s, want %s..%s", zeroFirst, what, got.first, got.last, want.first, want.last)
			}
		}
	}
}
