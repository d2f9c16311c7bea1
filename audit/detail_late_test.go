package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudgetLateTwin: capture's reports of denied connections,
// past the device's budget, are held back into a summary; the proxy's
// reports of the same connections come two intervals later (a
// connection the proxy reports at its close, 20 s and more after
// capture's report). Live, the ledger merges each into its flow. The
// budget had forgotten the held flows by then (it remembered this
// interval's and the one before), so it wrote the proxy's reports one by
// one, and the ledger read back from the log (a restart) counted each
// connection twice: once in capture's summary, once alone. The log must
// read back as the live report.
func TestDetailBudgetLateTwin(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	const burst, conns = 10, 60
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour}, eng)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now } // no refill: the burst alone
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	flow := func(i int, src Source) Event {
		ev := Event{Kind: KindFlow, Source: src, Time: now.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i), ClientMAC: "aa:bb:cc:00:00:07",
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: "tracker.example", NameSource: NameSNI, BytesOut: 517, Duration: 30}
		if src == SourceCapture {
			ev.BytesOut, ev.BytesIn, ev.Close, ev.Duration = 600, 60, "rst", 0.5
		}
		ev.Stamp(deny)
		return ev
	}
	emitTwins(t, j, conns, 2, flow) // two intervals end
	want := live.Report(ReportOptions{Now: reportNow})
	if want.Totals.Flows != conns || want.Totals.Duplicates != conns {
		t.Fatalf("live totals %+v, want %d flows and as many duplicates", want.Totals, conns)
	}
	reread, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
}

// emitTwins emits capture's report of conns flows (flow(i, SourceCapture)),
// writes them, ends rolls intervals of the detail budget (their summaries
// written), checks that some were held back, then emits the proxy's
// report of each (flow(i, SourceProxy)) and closes the journal.
func emitTwins(t *testing.T, j *Journal, conns, rolls int, flow func(i int, src Source) Event) {
	t.Helper()
	for i := range conns {
		j.Emit(flow(i, SourceCapture))
	}
	j.takeBatch()
	for range rolls {
		j.takeBatch()
		j.writeSummaries()
	}
	if j.summarized.Load() == 0 {
		t.Fatalf("nothing was held back: the test does not reach the detail budget")
	}
	for i := range conns {
		j.Emit(flow(i, SourceProxy))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}
