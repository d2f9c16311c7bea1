package audit

import (
	"bytes"
	"regexp"
	"testing"

	"egressd/policy"
)

// TestReportPlurals: a count of one reads "1 flow", not "1 flows", in
// the text and HTML reports, wherever they count something.
func TestReportPlurals(t *testing.T) {
	one := &Report{
		GeneratedAt: reportNow, Mode: policy.ModeAudit,
		Totals:     Totals{Flows: 1, Allowed: 1, Dropped: 1, Queries: 1, Requests: 1, DroppedRequests: 1},
		ShedEvents: 1, UnwrittenEvents: 1,
		Coverage:         &Coverage{DetailFrom: t0, RotatedOut: &RotatedOut{From: t0, Until: t0, Files: 1, Events: 1}},
		Rules:            []RuleReport{{Name: "web", Flows: 1, Queries: 1, Clients: []string{"192.168.10.5"}, ClientCount: 1, InPolicy: true}},
		UnusedRules:      []string{},
		UsedBeforeDetail: []RuleBeforeDetail{{Name: "old", LastSeen: t0, Uses: 1, InPolicy: true}},
		ExpiredRules:     []ExpiredRule{{Name: "gone", Expires: t0, Flows: 1}},
		Alarms:           []AlarmReport{{Reason: "dns-tunnel", Client: "192.168.10.5", Zone: "example", Rule: "web", Alarms: 1, DistinctNames: 1, FirstSeen: t0, LastSeen: t0}},
		AlarmsDropped:    1,
		ECH:              &ECHReport{Stripped: 1, WouldStrip: 1, Clients: []string{"192.168.10.5"}, ClientCount: 1},
		Dropped:          []DroppedReport{drop("tracker.example", 443, "tcp", policy.ReasonNoRule, "192.168.10.5")},
	}
	plural1 := regexp.MustCompile(`\b1 (\w+ ){0,2}(flows|queries|requests|events|files|alarms|names|answers|exchanges|entries|clients|devices|rules)\b`)
	var text, page bytes.Buffer
	if err := one.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if err := one.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	for form, out := range map[string]string{"text": text.String(), "HTML": page.String()} {
		if m := plural1.FindAllString(out, -1); len(m) > 0 {
			t.Errorf("the %s report counts one as many: %q", form, m)
		}
	}
}
