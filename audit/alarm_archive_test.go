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
// the alarm lost it.
func TestAlarmSurvivesRotation(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	cfg := JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2}
	live := NewLedger(eng, LedgerOptions{})
	j, _, err := OpenJournal(cfg, live)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	alarm := Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Client: netip.MustParseAddr("192.168.10.7"), ClientMAC: "02:00:00:00:00:07",
		Proto: "udp", Name: "t.tenant.example", Count: 512, Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel"}
	j.Emit(alarm)
	second := alarm
	second.Time, second.Count = t0.Add(time.Minute), 530
	j.Emit(second)
	waitFor(t, func() bool { return j.Written() == 2 })
	for _, ev := range busyEvents(200, t0.Add(24*time.Hour)) {
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if b, _ := os.ReadFile(f); strings.Contains(string(b), "t.tenant.example") {
			t.Fatalf("%s still holds the alarm: the test rotated too little", f)
		}
	}
	want := live.Report(ReportOptions{Now: reportNow}).Alarms
	if len(want) != 1 || want[0].Alarms != 2 || want[0].DistinctNames != 530 {
		t.Fatalf("live ledger: alarms %+v, want one entry of 2 alarms", want)
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
