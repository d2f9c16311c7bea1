package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// flowPair is one TCP flow as capture and the proxy report it.
func flowPair() (capture, proxy Event) {
	t0 := time.Date(2026, 12, 4, 14, 3, 55, 0, time.UTC)
	base := Event{Kind: KindFlow, Time: t0, Client: netip.MustParseAddr("198.18.1.10"), ClientPort: 40100,
		Dest: netip.MustParseAddr("203.0.113.11"), DestPort: 80, Proto: "tcp", Mode: policy.ModeEnforce}
	capture, proxy = base, base
	capture.Source, proxy.Source = SourceCapture, SourceProxy
	capture.Time = t0.Add(time.Millisecond) // capture's clock for the same flow differs a little
	return capture, proxy
}

// reportOf is the report of a new ledger given events in order.
func reportOf(events ...Event) *Report {
	l := NewLedger(nil, LedgerOptions{})
	for _, ev := range events {
		l.Emit(ev)
	}
	return l.Report(ReportOptions{})
}

func dropOf(r *Report, dest string) *DroppedReport {
	for i := range r.Dropped {
		if r.Dropped[i].Dest == dest && r.Dropped[i].Port == 80 {
			return &r.Dropped[i]
		}
	}
	return nil
}

func ruleOf(r *Report, name string) *RuleReport {
	for i := range r.Rules {
		if r.Rules[i].Name == name {
			return &r.Rules[i]
		}
	}
	return nil
}

// TestProxyReportDecidesFlow: whichever of capture's and the proxy's
// reports of a TCP flow reaches the ledger first, the flow counts where the
// proxy's report puts it.
func TestProxyReportDecidesFlow(t *testing.T) {
	t.Run("capture-deny-then-proxy-deny", func(t *testing.T) {
		// A Host that disagrees with the URL: capture names the flow by the
		// Host, the proxy refuses it with no name.
		c, p := flowPair()
		c.Name, c.Verdict, c.Reason, c.Enforced, c.BytesOut, c.BytesIn = "tracker.example", policy.Deny, "no-rule", true, 66, 593
		p.Verdict, p.Reason, p.Enforced = policy.Deny, "host-mismatch", true
		for _, order := range [][]Event{{c, p}, {p, c}} {
			r := reportOf(order...)
			if d := dropOf(r, "tracker.example"); d != nil {
				t.Errorf("order %s first: tracker.example:80 listed (%d flows); the proxy's report names no host", order[0].Source, d.Flows)
			}
			d := dropOf(r, "203.0.113.11")
			if d == nil || d.Flows != 1 || d.EnforcedFlows != 1 || d.Reason != "host-mismatch" || d.BytesOut != 66 || d.BytesIn != 593 {
				t.Errorf("order %s first: drop of 203.0.113.11:80 = %+v, want 1 enforced flow, host-mismatch, capture's bytes", order[0].Source, d)
			}
			if r.Totals.Flows != 1 || r.Totals.Dropped != 1 || r.Totals.Allowed != 0 || r.Totals.Duplicates != 1 {
				t.Errorf("order %s first: totals %+v", order[0].Source, r.Totals)
			}
		}
	})
	t.Run("capture-allow-then-proxy-deny", func(t *testing.T) {
		c, p := flowPair()
		c.Name, c.Verdict, c.Rule, c.BytesOut = "api.nirovision.com", policy.Allow, "e2e-http", 66
		p.Verdict, p.Reason, p.Enforced = policy.Deny, "host-mismatch", true
		for _, order := range [][]Event{{c, p}, {p, c}} {
			r := reportOf(order...)
			if rr := ruleOf(r, "e2e-http"); rr != nil && (rr.Flows != 0 || rr.BytesOut != 0 || len(rr.TopDestinations) != 0) {
				t.Errorf("order %s first: rule e2e-http credited: %+v", order[0].Source, rr)
			}
			if d := dropOf(r, "203.0.113.11"); d == nil || d.Flows != 1 || d.BytesOut != 66 {
				t.Errorf("order %s first: drop %+v, want 1 flow with 66 bytes out", order[0].Source, d)
			}
			if r.Totals.Allowed != 0 || r.Totals.Dropped != 1 {
				t.Errorf("order %s first: totals %+v", order[0].Source, r.Totals)
			}
		}
	})
	t.Run("capture-deny-then-proxy-allow", func(t *testing.T) {
		c, p := flowPair()
		c.Name, c.Verdict, c.Reason, c.Rule, c.BytesIn = "tracker.example", policy.Deny, "expired", "old-rule", 500
		p.Name, p.Verdict, p.Rule, p.BytesIn = "tracker.example", policy.Allow, "e2e-http", 400
		r := reportOf(c, p)
		if d := dropOf(r, "tracker.example"); d != nil {
			t.Errorf("drop still listed: %+v", d)
		}
		rr := ruleOf(r, "e2e-http")
		if rr == nil || rr.Flows != 1 || rr.BytesIn != 500 || len(rr.TopDestinations) != 1 || rr.TopDestinations[0].Count != 1 {
			t.Errorf("rule e2e-http = %+v, want 1 flow, 500 bytes in, one destination counted once", rr)
		}
		if old := ruleOf(r, "old-rule"); old != nil && old.Flows != 0 {
			t.Errorf("old-rule = %+v", old)
		}
		if r.Totals.Allowed != 1 || r.Totals.Dropped != 0 || r.Totals.Flows != 1 {
			t.Errorf("totals %+v", r.Totals)
		}
	})
}

// TestRedecidedFlowCountsDropped: capture reported a forwarded flow while
// it was open, allowed; a policy reload then denies it (the firewall cut
// it in enforce mode, or capture re-judged it in audit mode) and capture's
// next report of the same flow says so. The flow counts once, as a drop,
// no longer under its rule: before, the later report only merged bytes
// into the allowed record and the report never showed the flow dropped.
func TestRedecidedFlowCountsDropped(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mode     policy.Mode
		enforced bool
		close    string
	}{
		{"enforce-cut", policy.ModeEnforce, true, "policy-revoked"},
		{"audit-would-deny", policy.ModeAudit, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			open, _ := flowPair()
			open.Proto, open.DestPort, open.Mode = "udp", 80, tc.mode
			open.Verdict, open.Rule, open.Reason, open.BytesOut = policy.Allow, "ntp", "allowed", 48
			later := open
			later.Verdict, later.Rule, later.Reason, later.Enforced, later.Close = policy.Deny, "", "no-rule", tc.enforced, tc.close
			later.BytesOut, later.Duration = 96, 90
			end := later
			end.Close, end.BytesOut, end.Duration = "idle", 144, 200
			r := reportOf(open, later, end)
			if rr := ruleOf(r, "ntp"); rr != nil && rr.Flows != 0 {
				t.Errorf("rule ntp still credited: %+v", rr)
			}
			d := dropOf(r, "203.0.113.11")
			if d == nil || d.Flows != 1 || d.Reason != "no-rule" || d.BytesOut != 144 || (d.EnforcedFlows == 1) != tc.enforced {
				t.Errorf("drop = %+v, want 1 flow (enforced %v), no-rule, 144 bytes out", d, tc.enforced)
			}
			if r.Totals.Flows != 1 || r.Totals.Dropped != 1 || r.Totals.Allowed != 0 {
				t.Errorf("totals %+v", r.Totals)
			}
		})
	}
	// The proxy's report still decides a TCP flow: capture denying it
	// later does not take it from the proxy's rule.
	c, p := flowPair()
	p.Verdict, p.Rule, p.Reason = policy.Allow, "web", "allowed"
	c.Verdict, c.Reason = policy.Deny, "no-rule"
	r := reportOf(p, c)
	if rr := ruleOf(r, "web"); rr == nil || rr.Flows != 1 || r.Totals.Dropped != 0 {
		t.Errorf("the proxy's allowed flow moved: rule %+v, totals %+v", rr, r.Totals)
	}
}

// TestRecreditedFlowCountsAllowed: capture reported a forwarded flow
// opened in audit mode as one enforce would drop (no rule for its name);
// the reload to enforce adds a rule the kernel lets the flow go on by (a
// CIDR rule, or the forwarder's answer the enforce ruleset's learned sets
// begin with), and capture's next report of the same flow credits the
// rule. The flow counts once, under the rule, not dropped: before, a flow
// denied first stayed a drop, the new rule unused, for the flow's life.
// Denies the firewall enforced stay where they are, and so does a
// would-deny another component allows (TestRecreditedInAuditMode: one an
// audit-mode reload allows moves too).
func TestRecreditedFlowCountsAllowed(t *testing.T) {
	wouldDeny, _ := flowPair()
	wouldDeny.Proto, wouldDeny.Mode = "udp", policy.ModeAudit
	wouldDeny.Verdict, wouldDeny.Reason, wouldDeny.BytesOut = policy.Deny, "no-rule", 48
	allowed := wouldDeny
	allowed.Verdict, allowed.Rule, allowed.Reason, allowed.Mode = policy.Allow, "ntp", "allowed", policy.ModeEnforce
	allowed.BytesOut, allowed.Duration = 96, 90
	end := allowed
	end.Close, end.BytesOut, end.Duration = "idle", 144, 200

	r := reportOf(wouldDeny, allowed, end)
	if rr := ruleOf(r, "ntp"); rr == nil || rr.Flows != 1 || rr.BytesOut != 144 {
		t.Errorf("rule ntp = %+v, want 1 flow, 144 bytes out", rr)
	}
	if d := dropOf(r, "203.0.113.11"); d != nil && d.Flows != 0 {
		t.Errorf("still dropped: %+v", d)
	}
	if r.Totals.Flows != 1 || r.Totals.Allowed != 1 || r.Totals.Dropped != 0 {
		t.Errorf("totals %+v, want 1 flow, allowed", r.Totals)
	}

	// The live report: the ledger holds the would-deny, capture's open
	// flow says allowed. It counts where the event will put it.
	l := NewLedger(nil, LedgerOptions{})
	l.Emit(wouldDeny)
	l.SetOpenFlows(func() []Event { return []Event{allowed} })
	r = l.Report(ReportOptions{})
	if rr := ruleOf(r, "ntp"); rr == nil || rr.Flows != 1 || r.Totals.Dropped != 0 || r.Totals.Flows != 1 || r.OpenFlows != 0 {
		t.Errorf("live: rule ntp %+v, totals %+v, %d open; want the flow under ntp, once, not open", rr, r.Totals, r.OpenFlows)
	}

	for _, tc := range []struct {
		name  string
		first func(*Event)
		later func(*Event)
	}{
		{"enforced-deny", func(ev *Event) {
			ev.Mode, ev.Enforced, ev.Close = policy.ModeEnforce, true, "policy-revoked"
		}, nil},
		{"other-source", nil, func(ev *Event) { ev.Source = SourceFirewall }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, later := wouldDeny, allowed
			if tc.first != nil {
				tc.first(&first)
			}
			if tc.later != nil {
				tc.later(&later)
			}
			r := reportOf(first, later)
			if d := dropOf(r, "203.0.113.11"); d == nil || d.Flows != 1 || r.Totals.Allowed != 0 || r.Totals.Flows != 1 {
				t.Errorf("drop %+v, totals %+v; want the drop kept, once", d, r.Totals)
			}
		})
	}
}

// TestRecreditedInAuditMode: an operator in audit mode adds the rule
// --suggest proposed and reloads, still in audit mode; capture's next
// report of a flow it had reported as a would-be deny (an NTP exchange,
// a ping: no ports, keyed by its start) allows it under the new rule. The
// report after the reload counts the flow once, under the rule, and no
// longer among what enforce would drop, as after the reload to enforce.
// Before, the flow stayed a would-be drop and the rule unused for as long
// as the flow lived.
func TestRecreditedInAuditMode(t *testing.T) {
	for _, proto := range []string{"udp", "icmp"} {
		t.Run(proto, func(t *testing.T) {
			wouldDeny, _ := flowPair()
			wouldDeny.Proto, wouldDeny.Mode = proto, policy.ModeAudit
			if proto == "icmp" {
				wouldDeny.ClientPort, wouldDeny.DestPort = 0, 0
			}
			wouldDeny.Verdict, wouldDeny.Reason, wouldDeny.BytesOut = policy.Deny, "no-rule", 48
			allowed := wouldDeny
			allowed.Verdict, allowed.Rule, allowed.Reason = policy.Allow, "added", "allowed"
			allowed.BytesOut, allowed.Duration = 96, 90
			r := reportOf(wouldDeny, allowed)
			if rr := ruleOf(r, "added"); rr == nil || rr.Flows != 1 || rr.BytesOut != 96 {
				t.Errorf("rule added = %+v, want 1 flow, 96 bytes out", rr)
			}
			if len(r.Dropped) != 0 || r.Totals.Flows != 1 || r.Totals.Allowed != 1 || r.Totals.Dropped != 0 {
				t.Errorf("dropped %+v, totals %+v; want the flow allowed, once", r.Dropped, r.Totals)
			}
			// The live report alike: capture's open flow says allowed.
			l := NewLedger(nil, LedgerOptions{})
			l.Emit(wouldDeny)
			l.SetOpenFlows(func() []Event { return []Event{allowed} })
			r = l.Report(ReportOptions{})
			if rr := ruleOf(r, "added"); rr == nil || rr.Flows != 1 || len(r.Dropped) != 0 || r.Totals.Flows != 1 {
				t.Errorf("live: rule added %+v, dropped %+v, totals %+v; want the flow under the rule, once", rr, r.Dropped, r.Totals)
			}
		})
	}
}

// TestRecreditedOnlyTheSameFlow: an allow from the same component moves
// a would-be deny only when it reports the same flow again (capture's
// report after a reload: the flow's start), not when it is another flow
// of the same 5-tuple the ledger's window takes for it (a client that
// binds its source port, reconnecting within 2 s with another name, a
// closed UDP exchange and the next): the first flow is still what enforce
// would drop. Before, the allow of the second flow took the would-be drop
// out of the report, and where the detail budget had held the first one
// back, the log read again counted it dropped while the live ledger
// counted it allowed.
func TestRecreditedOnlyTheSameFlow(t *testing.T) {
	first, _ := flowPair()
	first.Mode, first.Verdict, first.Reason, first.Close, first.Duration = policy.ModeAudit, policy.Deny, "no-rule", "rst", 0.5
	first.Name, first.NameSource = "tracker.example", NameSNI
	second := first
	second.Time = first.Time.Add(time.Second) // within the 2 s slack of the first one's end
	second.Verdict, second.Rule, second.Reason, second.Close = policy.Allow, "added", "allowed", "fin"
	second.Name = "docs.example"
	r := reportOf(first, second)
	if d := dropOf(r, "tracker.example"); d == nil || d.Flows != 1 || r.Totals.Dropped != 1 {
		t.Errorf("dropped %+v, totals %+v: want the first flow still a would-be drop", r.Dropped, r.Totals)
	}
	// The same flow reported again, allowed (a reload in audit mode):
	// moved, as TestRecreditedInAuditMode.
	again := second
	again.Time = first.Time
	r = reportOf(first, again)
	if rr := ruleOf(r, "added"); rr == nil || rr.Flows != 1 || len(r.Dropped) != 0 {
		t.Errorf("the same flow allowed again: rule %+v, dropped %+v; want it moved to the rule", rr, r.Dropped)
	}
}

// TestRecreditedHeldFlowReadBack: would-be denies the detail budget held
// back (summaries), then capture's allowed reports of later flows of the
// same 5-tuples, within the ledger's window: the log read back counts as
// the live ledger did.
func TestRecreditedHeldFlowReadBack(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	t0 := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: 2, DetailRate: 1, DetailInterval: time.Hour}, eng)
	j.now = func() time.Time { return t0 }
	udp := func(i int, at time.Time, d policy.Decision) Event {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: at.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i),
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 123, Proto: "udp", BytesOut: 100, Duration: 5, Close: "idle"}
		ev.Stamp(d)
		return ev
	}
	const n = 10
	for i := range n {
		j.Emit(udp(i, t0, policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}))
	}
	j.takeBatch()
	for i := range n {
		j.Emit(udp(i, t0.Add(20*time.Second), policy.Decision{Verdict: policy.Allow, Rule: "ntp", Mode: policy.ModeAudit, Reason: "allowed"}))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if j.summarized.Load() == 0 {
		t.Fatal("nothing was held back: the test does not reach the detail budget")
	}
	want := live.Report(ReportOptions{Now: reportNow})
	back, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, back.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
}
