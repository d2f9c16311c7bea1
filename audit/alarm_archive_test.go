package audit

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestAlarmSurvivesRotation (THREATS.md E2): a dns-tunnel alarm whose
// event log file rotation deleted is still in the report after a restart
// (OpenJournal) and from the state directory (LoadDir), as the live
// ledger had it: the summary of rotated-out files keeps alarms. Before,
// it kept counts, drops and ECH but not alarms, so a restart a day after
// the alarm lost it. A zone-wide alarm keeps its top clients.
func TestAlarmSurvivesRotation(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	cfg := JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2}
	live := NewLedger(eng, LedgerOptions{})
	j, _, err := OpenJournal(cfg, live)
	if err != nil {
		t.Fatal(err)
	}
	alarm := Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Client: netip.MustParseAddr("192.168.10.7"), ClientMAC: "02:00:00:00:00:07",
		Proto: "udp", Name: "t.tenant.example", Count: 512, Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel"}
	second := alarm
	second.Time, second.Count = t0.Add(time.Minute), 530
	zone := Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Proto: "udp", Name: "t.tenant.example", Count: 1003, Verdict: policy.Allow,
		Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel-zone", TopClients: []string{"192.0.2.7", "a\"b\\c"}}
	rotateOut(t, j, []Event{alarm, second, zone})
	keptFiles(t, dir, "t.tenant.example")
	want := live.Report(ReportOptions{Now: reportNow}).Alarms
	if len(want) != 2 || want[1].Alarms != 2 || want[1].DistinctNames != 530 || len(want[0].TopClients) != 2 {
		t.Fatalf("live ledger: alarms %+v, want one entry of 2 alarms and a zone-wide one of 2 top clients", want)
	}
	_, restarted, _ := openJournal(t, cfg, eng)
	loaded, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, l := range map[string]*Ledger{"OpenJournal": restarted, "LoadDir": loaded} {
		r := l.Report(ReportOptions{Now: reportNow})
		if d := cmp.Diff(want, r.Alarms); d != "" {
			t.Errorf("%s: alarms after rotation and restart (-live +got):\n%s", name, d)
		}
		if sugs, _ := r.Suggest(); len(sugs) != 0 {
			t.Errorf("%s: suggestions from a report of alarms and allowed flows only: %+v", name, sugs)
		}
	}
}

// TestAlarmPastDetailBudget: a device past its detail budget (a flood of
// denied queries held back into summaries) still has its alarm written
// one by one, at once: the alarm is one event, never held back or
// merged, and the log read back lists it as the live ledger does.
func TestAlarmPastDetailBudget(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: 5, DetailRate: 1, DetailInterval: time.Hour}, eng)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now } // no refill
	go j.Run(context.Background())
	c := netip.MustParseAddr("192.168.10.7")
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	for i := range 200 {
		ev := Event{Kind: KindDNS, Source: SourceDNS, Time: now.Add(time.Duration(i) * time.Millisecond), Client: c, ClientPort: uint16(10000 + i),
			ClientMAC: "02:00:00:00:00:07", Proto: "udp", Name: "tracker.example", QType: "A", RCode: "NOERROR"}
		ev.Stamp(deny)
		j.Emit(ev)
	}
	j.Emit(Event{Kind: KindAlarm, Source: SourceDNS, Time: now.Add(time.Second), Client: c, ClientMAC: "02:00:00:00:00:07",
		Proto: "udp", Name: "t.tenant.example", Count: 512, Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel"})
	waitFor(t, func() bool { return len(live.Report(ReportOptions{Now: reportNow}).Alarms) == 1 })
	if !j.Sync(10 * time.Second) {
		t.Fatal("the journal did not flush in 10 s")
	}
	// Written before the interval's end (an hour away): the log read
	// now, while the journal runs, has it.
	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	var all strings.Builder
	for _, f := range files {
		b, _ := os.ReadFile(f)
		all.Write(b)
	}
	if n := strings.Count(all.String(), `"kind":"alarm"`); n != 1 {
		t.Fatalf("%d alarm lines in the log before the interval ended, want 1", n)
	}
	if n := strings.Count(all.String(), `"kind":"dns"`); n >= 200 {
		t.Fatalf("%d of 200 denied queries written one by one: the budget held none back, the test proves nothing", n)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	loaded, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := live.Report(ReportOptions{Now: reportNow})
	got := loaded.Report(ReportOptions{Now: reportNow})
	if d := cmp.Diff(want.Alarms, got.Alarms); d != "" || len(got.Alarms) != 1 {
		t.Errorf("alarms read back (-live +log):\n%s", d)
	}
	if got.Totals.Queries != want.Totals.Queries || got.Totals.Queries != 200 {
		t.Errorf("queries: log %d, live %d, want 200", got.Totals.Queries, want.Totals.Queries)
	}
}
