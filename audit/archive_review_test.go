package audit

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestArchiveFoldWindowRace: a windowed report taken just after a fold
// deleted a file must find the file's events in the summary the ledger
// knows: the scan no longer reads the file, so a rule used only there
// would otherwise be called unused.
func TestArchiveFoldWindowRace(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	l := NewLedger(eng, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2}, l)
	if err != nil {
		t.Fatal(err)
	}
	folds := 0
	var bad []string
	j.testHookFolded = func() {
		folds++
		r := l.Report(ReportOptions{Now: reportNow, Since: t0.Add(-time.Hour)})
		if slices.Contains(r.UnusedRules, "ntp") {
			bad = append(bad, r.Coverage.DetailFrom.String())
		}
	}
	go j.Run(context.Background())
	weekly := weeklyEvents()
	for _, ev := range weekly {
		j.Emit(ev)
	}
	waitFor(t, func() bool { return j.Written() == uint64(len(weekly)) })
	for _, ev := range busyEvents(200, t0.Add(24*time.Hour)) {
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if folds == 0 {
		t.Fatal("no fold ran: the test rotated too little")
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d windowed reports taken right after a fold call ntp unused (coverage from %q)", len(bad), folds, bad)
	}
}
