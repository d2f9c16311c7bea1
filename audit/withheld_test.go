package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// withheldEvents are queries of updates.example.org (rule dns-only): five
// allowed, three of them answered with addresses withheld (the rule's
// learned set full: Enforced under the allow verdict), one of those
// retransmitted (its ID kept: one query), and one first reported plain
// then withheld (a retransmission the set refused meanwhile: one query,
// withheld).
func withheldEvents(t *testing.T) []Event {
	eng := loadPolicy(t, "policy.yaml")
	var evs []Event
	for i := range 5 {
		ev := dnsEvent(eng, t0.Add(time.Duration(i)*time.Second), 5353, uint16(100+i), "updates.example.org")
		ev.Enforced = i < 3
		evs = append(evs, ev)
	}
	if evs[0].Rule != "dns-only" || evs[0].Enforced != true {
		t.Fatalf("fixture: %+v, want allowed by dns-only", evs[0])
	}
	re := evs[1]
	re.Time = re.Time.Add(500 * time.Millisecond)
	evs = append(evs, re)
	plain := dnsEvent(eng, t0.Add(10*time.Second), 5354, 200, "updates.example.org")
	later := plain
	later.Time, later.Enforced = later.Time.Add(time.Second), true
	return append(evs, plain, later)
}

// checkWithheld checks that r counts n withheld answers under dns-only,
// in each of its forms.
func checkWithheld(t *testing.T, name string, r *Report, n uint64) {
	t.Helper()
	u := ruleByName(r, "dns-only")
	if u == nil || u.Queries != 6 || u.AnswersWithheld != n {
		t.Fatalf("%s: dns-only = %+v, want 6 queries, %d answers withheld", name, u, n)
	}
	txt, html, js := writeForms(t, r)
	note := fmt.Sprintf("%d answers withheld: learned set full", n)
	if !strings.Contains(txt.String(), "  dns-only: "+note) {
		t.Errorf("%s: the text report has no note on dns-only's withheld answers:\n%s", name, txt.String())
	}
	if !strings.Contains(html.String(), `<li data-rule="dns-only">dns-only: `+note) {
		t.Errorf("%s: the HTML report has no note on dns-only's withheld answers", name)
	}
	var back struct {
		Rules []map[string]any `json:"rules"`
	}
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	for _, ru := range back.Rules {
		if got, want := ru["answers_withheld"], ru["name"] == "dns-only"; (got != nil) != want || want && got != float64(n) {
			t.Errorf("%s: JSON rule %v answers_withheld = %v", name, ru["name"], got)
		}
	}
}

// TestReportAnswersWithheld: a query whose answer the DNS forwarder cut
// because the rule's learned set was full (enforce mode: an allowed DNS
// event with enforced true) counts under its rule as a withheld answer,
// and the report says so, live, over a window (since=), and after the
// ledger's summary is read back (a restart); a report without such
// queries has no field and no note (TestGoldenReports).
func TestReportAnswersWithheld(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := withheldEvents(t)
	l := NewLedger(eng, LedgerOptions{})
	for _, ev := range evs {
		l.Emit(ev)
	}
	checkWithheld(t, "live", l.Report(ReportOptions{Now: reportNow}), 4)

	l.mu.Lock()
	l.history = func(_ context.Context, _ time.Time, fn func(Event)) error {
		for _, ev := range evs {
			fn(ev)
		}
		return nil
	}
	l.mu.Unlock()
	checkWithheld(t, "window", l.Report(ReportOptions{Now: reportNow, Since: t0.Add(-time.Hour)}), 4)

	restarted := fromSummary(t, eng, l)
	checkWithheld(t, "summary", restarted.Report(ReportOptions{Now: reportNow}), 4)
	// Queries after the restart add to the summary's.
	more := dnsEvent(eng, t0.Add(time.Minute), 5355, 300, "updates.example.org")
	more.Enforced = true
	restarted.Emit(more)
	if u := ruleByName(restarted.Report(ReportOptions{Now: reportNow}), "dns-only"); u == nil || u.AnswersWithheld != 5 {
		t.Errorf("after the restart: dns-only = %+v, want 5 answers withheld", u)
	}
}

// writeForms writes r as text, HTML and JSON.
func writeForms(t *testing.T, r *Report) (txt, html, js *bytes.Buffer) {
	t.Helper()
	txt, html, js = new(bytes.Buffer), new(bytes.Buffer), new(bytes.Buffer)
	if err := r.WriteText(txt); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteHTML(html); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteJSON(js); err != nil {
		t.Fatal(err)
	}
	return txt, html, js
}

// fromSummary is a fresh ledger under eng started from l's summary (its
// export written and read back), as after a restart.
func fromSummary(t *testing.T, eng *policy.Engine, l *Ledger) *Ledger {
	t.Helper()
	return fromArchive(t, eng, l.export())
}

// fromArchive is a fresh ledger under eng started from the summary a,
// written and read back.
func fromArchive(t *testing.T, eng *policy.Engine, a *archive) *Ledger {
	t.Helper()
	b, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	back, err := parseArchive(b)
	if err != nil {
		t.Fatal(err)
	}
	next := NewLedger(eng, LedgerOptions{})
	next.importArchive(back)
	return next
}

// TestAnswersWithheldSummaryBound: a damaged or edited summary that
// counts a rule's query withheld (answers_withheld 1 of 1 query) while
// its remembered copy of that query says it was answered whole
// (enforced false) never makes the rule count more withheld answers
// than queries: a retransmission of the query the full set cut merges
// into the query (no new one), so it may not add a withheld answer past
// the query count the summary read capped it at.
func TestAnswersWithheldSummaryBound(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	ev := dnsEvent(eng, t0, 5353, 100, "updates.example.org")
	l.Emit(ev)
	a := l.export()
	found := false
	for i := range a.Rules {
		if a.Rules[i].Name == "dns-only" {
			a.Rules[i].Withheld, found = 1, true
		}
	}
	if !found || len(a.Open) != 1 || a.Open[0].Enforced {
		t.Fatalf("fixture: rules %+v, remembered %+v", a.Rules, a.Open)
	}
	next := fromArchive(t, eng, a)
	re := ev
	re.Time, re.Enforced = re.Time.Add(time.Second), true
	next.Emit(re)
	u := ruleByName(next.Report(ReportOptions{Now: reportNow}), "dns-only")
	if u == nil || u.Queries != 1 || u.AnswersWithheld > u.Queries {
		t.Errorf("dns-only = %+v, want 1 query, at most 1 answer withheld", u)
	}
}

// TestAnswersWithheldOnlyAllowedQueries: only allowed DNS queries with
// enforced set count as withheld answers: not a denied query the
// forwarder refused (enforced), not an allowed flow the firewall let
// through (enforced on a flow means something else), not a query in
// audit mode (enforced false).
func TestAnswersWithheldOnlyAllowedQueries(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	denied := dnsEvent(eng, t0, 5353, 1, "evil.example.net")
	denied.Enforced, denied.Rule = true, "dns-only" // an expired rule's name on a deny
	if denied.Verdict != policy.Deny {
		t.Fatalf("fixture: %+v, want denied", denied)
	}
	l.Emit(denied)
	plain := dnsEvent(eng, t0.Add(time.Second), 5354, 2, "updates.example.org")
	l.Emit(plain)
	flow := plain
	flow.Kind, flow.Name, flow.QType, flow.QueryID, flow.Enforced = KindFlow, "updates.example.org", "", 0, true
	flow.Dest, flow.DestPort, flow.Proto = netip.MustParseAddr("198.51.100.7"), 443, "tcp"
	l.Emit(flow)
	r := l.Report(ReportOptions{Now: reportNow})
	for _, u := range r.Rules {
		if u.AnswersWithheld != 0 {
			t.Errorf("rule %s counts %d answers withheld, want none", u.Name, u.AnswersWithheld)
		}
	}
	txt, html, js := writeForms(t, r)
	for name, b := range map[string]*bytes.Buffer{"text": txt, "html": html, "json": js} {
		if s := b.String(); strings.Contains(s, "withheld") {
			t.Errorf("%s report mentions withheld answers:\n%s", name, s)
		}
	}
}
