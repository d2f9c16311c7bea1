package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudgetTwinAllowedByProxy: capture's reports of connections it
// judged denied (no name known) are held back; the proxy's reports of the
// same connections allow them (SNI matches a rule). Live the flows count
// as allowed; the log read back must count the same.
func TestDetailBudgetTwinAllowedByProxy(t *testing.T) {
	for _, rolls := range []int{0, 1, 2} {
		eng := loadPolicy(t, "policy.yaml")
		dir := t.TempDir()
		const burst, conns = 10, 60
		j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour}, eng)
		now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
		j.now = func() time.Time { return now }
		flow := func(i int, src Source) Event {
			ev := Event{Kind: KindFlow, Source: src, Time: now.Add(time.Duration(i) * time.Millisecond),
				Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i), ClientMAC: "aa:bb:cc:00:00:07",
				Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: "hub.docker.io", NameSource: NameSNI, BytesOut: 517, Duration: 30}
			if src == SourceCapture {
				ev.Name, ev.NameSource = "", NameNone
				ev.BytesOut, ev.BytesIn, ev.Close, ev.Duration = 600, 60, "rst", 0.5
			}
			ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Name: ev.Name, Dest: ev.Dest, Port: ev.DestPort, Proto: policy.TCP, Now: ev.Time}))
			return ev
		}
		if v := flow(0, SourceCapture); v.Verdict != policy.Deny {
			t.Fatalf("capture: %+v", v)
		}
		if v := flow(0, SourceProxy).Verdict; v != policy.Allow {
			t.Fatalf("proxy's report: %v, want allow", v)
		}
		emitTwins(t, j, conns, rolls, flow)
		want := live.Report(ReportOptions{Now: reportNow})
		reread, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if rolls == 0 && want.Totals.Allowed != conns {
			t.Errorf("the proxy's reports in the interval of capture's: live totals %+v, want %d allowed", want.Totals, conns)
		}
		if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
			t.Errorf("proxy's reports %d interval(s) late: the report read back from the log differs (-live +read):\n%s", rolls, d)
		}
	}
}
