package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestRedecidedOnlyTheSameFlow: a deny from the same component moves an
// allowed flow to the dropped list only when it reports the same flow
// again (capture's report after a reload: the flow's start), not when it
// is another flow of the same 5-tuple the ledger's window takes for it (a
// client that binds its source port, reconnecting within 2 s to a name
// no rule allows): the first flow was allowed, and stays under its rule.
// The mirror image of TestRecreditedOnlyTheSameFlow. Before, the deny of
// the second flow moved the first one's allow to a deny.
func TestRedecidedOnlyTheSameFlow(t *testing.T) {
	first, _ := flowPair()
	first.Mode, first.Verdict, first.Rule, first.Reason, first.Close, first.Duration = policy.ModeAudit, policy.Allow, "web", "allowed", "rst", 0.5
	first.Name, first.NameSource = "docs.example", NameSNI
	second := first
	second.Time = first.Time.Add(time.Second) // within the 2 s slack of the first one's end
	second.Verdict, second.Rule, second.Reason, second.Close = policy.Deny, "", "no-rule", "fin"
	second.Name = "tracker.example"
	r := reportOf(first, second)
	if rr := ruleOf(r, "web"); rr == nil || rr.Flows != 1 || r.Totals.Allowed != 1 {
		t.Errorf("rule web %+v, totals %+v: want the first flow still allowed under web", rr, r.Totals)
	}
	// And the second flow is a would-be deny of its own: merged into the
	// first, it was in no count, so a client that binds its source port
	// reached any name after one allowed connection, unseen.
	if d := dropOf(r, "tracker.example"); d == nil || d.Flows != 1 || r.Totals.Flows != 2 {
		t.Errorf("the second flow: dropped %+v, totals %+v; want it a would-be deny of tracker.example, two flows", r.Dropped, r.Totals)
	}
	// Its later report (its start) is that flow's, and the first flow's
	// later report (the first start) the first one's.
	secondEnd, firstEnd := second, first
	secondEnd.BytesOut, firstEnd.BytesOut = 7000, 9000
	r = reportOf(first, second, secondEnd, firstEnd)
	if d, rr := dropOf(r, "tracker.example"), ruleOf(r, "web"); d == nil || d.Flows != 1 || d.BytesOut != 7000 || rr == nil || rr.Flows != 1 || rr.BytesOut != 9000 {
		t.Errorf("later reports: dropped %+v, rule web %+v; want each flow's bytes on its own", d, rr)
	}
	// The same flow reported again, denied (a reload in audit mode):
	// moved, as TestReloadFlipFlopReadBack.
	again := second
	again.Time = first.Time
	r = reportOf(first, again)
	if d := dropOf(r, "tracker.example"); d == nil || d.Flows != 1 || r.Totals.Allowed != 0 {
		t.Errorf("the same flow denied again: dropped %+v, totals %+v; want it moved to the dropped list", r.Dropped, r.Totals)
	}
}

// TestRedecidedHeldFlowReadBack: allowed flows, some of them held back
// by the detail budget (summaries), then capture's denied reports of
// later flows of the same 5-tuples, within the ledger's window, and of
// the same flows again after a reload: the log read back counts as the
// live ledger did.
func TestRedecidedHeldFlowReadBack(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	allow := policy.Decision{Verdict: policy.Allow, Rule: "ntp", Mode: policy.ModeAudit, Reason: "allowed"}
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	udp := func(i int, at time.Time, d policy.Decision) Event {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: at.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i),
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 123, Proto: "udp", BytesOut: 100, Duration: 5, Close: "idle"}
		ev.Stamp(d)
		return ev
	}
	for _, burst := range []int{0, 2} {
		want, j := readBackAgrees(t, eng, t0, burst, func(j *Journal) {
			const n = 10
			for i := range n {
				j.Emit(udp(i, t0, allow))
			}
			j.takeBatch()
			// Denied flows of another port spend the budget first.
			for i := range n {
				ev := udp(i, t0, deny)
				ev.DestPort = 124
				j.Emit(ev)
			}
			// Even ones: another flow of the 5-tuple; odd ones: the
			// same flow, denied by a reload. Without bytes: the
			// ledger's merge takes nothing from such a report, which
			// the budget may hold back as a duplicate.
			for i := range n {
				at := t0.Add(20 * time.Second)
				if i%2 == 1 {
					at = t0
				}
				ev := udp(i, at, deny)
				ev.BytesOut = 0
				j.Emit(ev)
			}
		})
		if burst > 0 && j.summarized.Load() == 0 {
			t.Fatal("nothing was held back: the test does not reach the detail budget")
		}
		if rr := ruleOf(want, "ntp"); rr == nil || rr.Flows != 5 {
			t.Errorf("burst %d: live: rule ntp %+v, want 5 flows (the flows no reload denied)", burst, rr)
		}
	}
}

// readBackAgrees runs emit on a journal with a detail budget of burst
// (none when 0), closes it, and fails t where the event log read back
// reports otherwise than the live ledger; it returns the live report.
func readBackAgrees(t *testing.T, eng *policy.Engine, t0 time.Time, burst int, emit func(j *Journal)) (*Report, *Journal) {
	t.Helper()
	dir := t.TempDir()
	cfg := JournalConfig{Dir: dir}
	if burst > 0 {
		cfg.DetailBurst, cfg.DetailRate, cfg.DetailInterval = burst, 1, time.Hour
	}
	j, live, _ := openJournal(t, cfg, eng)
	j.now = func() time.Time { return t0 }
	emit(j)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	want := live.Report(ReportOptions{Now: reportNow})
	back, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, back.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("burst %d: the report read back from the log differs (-live +read):\n%s", burst, d)
	}
	return want, j
}
