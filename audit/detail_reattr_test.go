package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudgetLateTwinReattributed: as TestDetailBudgetLateTwin, but
// capture knew no name for the connections (an address it saw no DNS
// answer for) and the proxy's reports name them (SNI). Live, the proxy's
// report decides where a flow counts (reattributeLocked): under the name.
// The log read back must count the same.
func TestDetailBudgetLateTwinReattributed(t *testing.T) {
	for _, rolls := range []int{0, 1, 2} {
		eng := loadPolicy(t, "policy.yaml")
		dir := t.TempDir()
		const burst, conns = 10, 60
		j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour}, eng)
		now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
		j.now = func() time.Time { return now }
		deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
		flow := func(i int, src Source) Event {
			ev := Event{Kind: KindFlow, Source: src, Time: now.Add(time.Duration(i) * time.Millisecond),
				Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i), ClientMAC: "aa:bb:cc:00:00:07",
				Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: "tracker.example", NameSource: NameSNI, BytesOut: 517, Duration: 30}
			if src == SourceCapture {
				ev.Name, ev.NameSource = "", NameNone
				ev.BytesOut, ev.BytesIn, ev.Close, ev.Duration = 600, 60, "rst", 0.5
			}
			ev.Stamp(deny)
			return ev
		}
		emitTwins(t, j, conns, rolls, flow)
		want := live.Report(ReportOptions{Now: reportNow})
		reread, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if want.Totals.Flows != conns || want.Totals.Duplicates != conns {
			t.Errorf("proxy's reports %d interval(s) late: live totals %+v, want %d flows and as many duplicates", rolls, want.Totals, conns)
		}
		if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
			t.Errorf("proxy's reports %d interval(s) late: the report read back from the log differs (-live +read):\n%s", rolls, d)
		}
	}
}
