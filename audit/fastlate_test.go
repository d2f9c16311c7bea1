package audit

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// fastEvents are a silent fast-path connection's first event (written at
// its decision, d1) and its second (Event.Revised: the same start, d2,
// its first segment's decision under the policy running then, as
// proxy fastQueue.redecided writes it).
func fastEvents(t0 time.Time, d1, d2 policy.Decision) (first, second Event) {
	first = Event{Kind: KindFlow, Source: SourceProxy, Time: t0, Client: netip.MustParseAddr("198.18.1.10"), ClientPort: 40100,
		Dest: netip.MustParseAddr("203.0.113.11"), DestPort: 443, Proto: "tcp", Name: "docs.example", NameSource: NameDNSLearned,
		Close: "fast-path", Duration: 0.02}
	first.Stamp(d1)
	second = first
	second.Stamp(d2)
	second.Revised, second.Duration = true, 590
	if second.Enforced {
		second.Close = closeRevoked
	}
	return first, second
}

// busyQueries are n DNS queries, each a record of the ledger's, spread
// over the span from t0: a busy LAN's (117 a second for 70,000 in 10
// minutes).
func busyQueries(t0 time.Time, n int, span time.Duration) []Event {
	evs := make([]Event, n)
	for i := range evs {
		q := Event{Kind: KindDNS, Source: SourceDNS, Time: t0.Add(span * time.Duration(i) / time.Duration(n)), Client: netip.MustParseAddr("198.18.1.20"),
			ClientPort: uint16(1024 + i%60000), Dest: netip.MustParseAddr("198.18.1.1"), DestPort: 53, Proto: "udp",
			Name: fmt.Sprintf("q%d.example", i), QType: "A", QueryID: uint16(i)}
		q.Stamp(policy.Decision{Verdict: policy.Allow, Rule: "dns-only", Reason: "allowed", Mode: policy.ModeEnforce})
		evs[i] = q
	}
	return evs
}

// TestFastLateSecondEventCountedOnce: the fast path's second event of a
// connection (a reload's deny of one allowed at its decision, or the allow
// of a would-be deny) comes up to 10 minutes after the first. The ledger
// moves the flow when it still holds the first report; when it no longer
// does (65,536 flows and queries since: LedgerOptions.MaxFlows, a busy
// LAN's DNS in those minutes), the first report's count stands and the
// second is a duplicate (Event.Revised), live and in the log read back:
// the connection counts once. Before, the second counted as a flow of its
// own: the connection was allowed under its rule and dropped too, two
// flows.
func TestFastLateSecondEventCountedOnce(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	allow := policy.Decision{Verdict: policy.Allow, Rule: "vendor-docs", Reason: "allowed", Mode: policy.ModeEnforce}
	cut := policy.Decision{Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce}
	wouldDeny := policy.Decision{Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	allowAudit := allow
	allowAudit.Mode = policy.ModeAudit
	for _, tc := range []struct {
		name        string
		d1, d2      policy.Decision
		busy        int
		wantRule    uint64 // the connection under vendor-docs
		wantDropped uint64 // among the drops
	}{
		{"cut", allow, cut, 0, 0, 1},
		{"cut-late", allow, cut, 70000, 1, 0},
		{"recredited", wouldDeny, allowAudit, 0, 1, 0},
		{"recredited-late", wouldDeny, allowAudit, 70000, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, second := fastEvents(t0, tc.d1, tc.d2)
			queries := busyQueries(t0, tc.busy, 9*time.Minute)
			check := func(how string, r *Report) {
				t.Helper()
				var inRule, dropped uint64
				if rr := ruleOf(r, "vendor-docs"); rr != nil {
					inRule = rr.Flows
				}
				for _, d := range r.Dropped {
					if d.Port == 443 {
						dropped += d.Flows
					}
				}
				if inRule != tc.wantRule || dropped != tc.wantDropped || r.Totals.Flows != 1 || r.Totals.Allowed+r.Totals.Dropped != 1 {
					t.Errorf("%s: the connection %d times under vendor-docs, %d among the drops, totals %+v; want %d and %d, one flow",
						how, inRule, dropped, r.Totals, tc.wantRule, tc.wantDropped)
				}
			}
			l := NewLedger(eng, LedgerOptions{})
			l.Emit(first)
			for _, q := range queries {
				l.Emit(q)
			}
			l.Emit(second)
			check("live", l.Report(ReportOptions{Now: reportNow}))

			// Written by the journal, read back (a restart).
			dir := t.TempDir()
			j, live, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
			j.Emit(first)
			for i, q := range queries {
				j.Emit(q)
				if i%4096 == 0 {
					j.takeBatch()
				}
			}
			j.Emit(second)
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			check("journal", live.Report(ReportOptions{Now: reportNow}))
			back, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
			if err != nil {
				t.Fatal(err)
			}
			check("read back", back.Report(ReportOptions{Now: reportNow}))
		})
	}
}
