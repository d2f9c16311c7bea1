package audit

import (
	"slices"
	"testing"
	"time"

	"egressd/policy"
)

// TestReportOpenFlowsProxyWinsAfterCapture: a transparent connection that
// capture reported already (any flow a minute after it began) without a
// name, denied by its address, and that the proxy still forwards (it
// read the name a rule allows) counts in the live report as the proxy's,
// as the event log will count it once the proxy's event comes
// (reattributeLocked): not as a drop with its rule unused for the
// tunnel's life. The ledger itself is left as the events made it.
func TestReportOpenFlowsProxyWinsAfterCapture(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	capt := fev{kind: KindFlow, src: SourceCapture, at: time.Hour, client: "192.168.10.5", cport: 41000,
		dest: "203.0.113.9", dport: 443, proto: "tcp", out: 10}.event(eng)
	px := fev{kind: KindFlow, src: SourceProxy, at: time.Hour, client: "192.168.10.5", cport: 41000,
		dest: "203.0.113.9", dport: 443, proto: "tcp", name: "api.nirovision.com", nsrc: NameSNI}.event(eng)
	if capt.Verdict != policy.Deny || px.Rule != "vendor-cloud" {
		t.Fatalf("fixture: capture %s, proxy %q", capt.Verdict, px.Rule)
	}
	now := t0.Add(2 * time.Hour)
	vendor := func(r *Report) RuleReport {
		for _, u := range r.Rules {
			if u.Name == "vendor-cloud" {
				return u
			}
		}
		return RuleReport{}
	}
	l := NewLedger(eng, LedgerOptions{})
	l.Emit(capt)
	l.SetOpenFlows(func() []Event { return slices.Clone([]Event{px}) })
	r := l.Report(ReportOptions{Now: now})
	if vc := vendor(r); vc.Flows != 1 || len(r.Dropped) != 0 || r.Totals.Flows != 1 || r.Totals.Allowed != 1 || r.Totals.Dropped != 0 ||
		r.Totals.Events != 1 || slices.Contains(r.UnusedRules, "vendor-cloud") {
		t.Errorf("live: vendor-cloud %d flows, %d dropped entries, totals %+v, unused %v; want the flow as the proxy's, once", vc.Flows, len(r.Dropped), r.Totals, r.UnusedRules)
	}
	// The ledger is unchanged: without the open flows, capture's drop.
	l.SetOpenFlows(nil)
	if r := l.Report(ReportOptions{Now: now}); len(r.Dropped) != 1 || r.Totals.Dropped != 1 || r.Totals.Allowed != 0 {
		t.Errorf("ledger after the live report: %d dropped entries, totals %+v; want capture's drop as it was", len(r.Dropped), r.Totals)
	}
	// And the proxy's event then counts it as the live report did.
	l.Emit(px)
	if r := l.Report(ReportOptions{Now: now}); vendor(r).Flows != 1 || len(r.Dropped) != 0 || r.Totals.Flows != 1 {
		t.Errorf("after the proxy's event: vendor-cloud %d flows, %d dropped, totals %+v", vendor(r).Flows, len(r.Dropped), r.Totals)
	}
}
