package audit

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
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
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2, Logger: slog.New(slog.DiscardHandler)}, l)
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
	rotateOut(t, j, weeklyEvents())
	if folds == 0 {
		t.Fatal("no fold ran: the test rotated too little")
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d windowed reports taken right after a fold call ntp unused (coverage from %q)", len(bad), folds, bad)
	}
}

// TestArchiveWriteFitsReadCap: the summary written is never larger than
// the load accepts, however long and escaped the destination names LAN
// clients chose: one the load refuses is set aside by the next fold and
// the counts of every file folded before are lost. (With the default
// bounds one rule's 256 destinations of 255 control characters, each
// written as \u00XX, take some 400 KB: some 170 such rules, kept up to
// 1024 across renames, pass 64 MiB.)
func TestArchiveWriteFitsReadCap(t *testing.T) {
	defer func(n int) { maxArchiveBytes = n }(maxArchiveBytes)
	maxArchiveBytes = 256 << 10
	dir := t.TempDir()
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 64 << 10, MaxFiles: 1, Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	const rules, names = 4, 256
	n := 0
	for r := range rules {
		for i := range names {
			ev := seqEvent(n+1, t0.Add(time.Duration(n)*time.Second))
			ev.Rule = fmt.Sprintf("rule-%d", r)
			ev.Name = fmt.Sprintf("%03d", i) + strings.Repeat("\x01", MaxNameBytes-3)
			j.Emit(ev)
			n++
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, ArchiveFile)); err != nil || fi.Size() > int64(maxArchiveBytes) {
		t.Fatalf("summary: %v, %v (the load takes %d bytes)", fi, err, maxArchiveBytes)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ArchiveFile+".refused*")); len(m) > 0 {
		t.Errorf("a fold set the summary aside: it could not read what an earlier one wrote")
	}
	l, st, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := l.Report(ReportOptions{})
	if r.Totals.Flows != uint64(n) || st.Summarized == 0 || len(r.Notes) != 0 {
		t.Errorf("after a restart: %d flows (want %d), load %+v, notes %q", r.Totals.Flows, n, st, r.Notes)
	}
	for i := range rules {
		if u := ruleByName(r, fmt.Sprintf("rule-%d", i)); u == nil || u.Flows != names {
			t.Errorf("rule-%d: %+v, want %d flows", i, u, names)
		}
	}
}

// TestLoadDirWhileFolding: `egressd report --state-dir` reads the state
// directory while the daemon may fold a file: the fold coming between the
// read of the summary and the listing of the files must not lose the
// file's events (in neither the summary read nor the files listed).
func TestLoadDirWhileFolding(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	live := writeRotated(t, dir, eng, LedgerOptions{}, slog.New(slog.DiscardHandler))
	want := live.Report(ReportOptions{Now: reportNow}).Totals.Flows
	defer func() { testHookArchiveRead = nil }()
	folded := 0
	testHookArchiveRead = func() {
		if folded > 0 {
			return
		}
		// The daemon, another process, folds its oldest kept file.
		d := &Journal{cfg: JournalConfig{Dir: dir, MaxFiles: 1}, ledger: NewLedger(nil, LedgerOptions{}), log: slog.New(slog.DiscardHandler)}
		d.folds.Add(1)
		d.fold()
		files, _ := LogFiles(dir)
		folded = 3 - len(files)
	}
	l, _, err := LoadDir(dir, eng, LedgerOptions{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if folded != 1 {
		t.Fatalf("the simulated daemon folded %d files, want 1", folded)
	}
	if got := l.Report(ReportOptions{Now: reportNow}).Totals.Flows; got != want {
		t.Errorf("LoadDir while a file was folded: %d flows, want %d", got, want)
	}
}

// TestRotateNameTaken: when the name rotation would give a file is taken
// (a file put there after the start), the file still gets a name that
// sorts after every other: file order is write order, which the fold
// (the oldest first) and the summary's LastFile rely on. A "-1" suffix
// sorts before the name it extends ('-' < '.').
func TestRotateNameTaken(t *testing.T) {
	dir := t.TempDir()
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 1000, MaxFiles: 100, Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	end := t0.Add(time.Hour)
	j.now = func() time.Time { return end }
	taken := rotatedPrefix + end.Format(rotateStamp) + rotatedSuffix
	if err := os.WriteFile(filepath.Join(dir, taken), nil, 0o640); err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	for i := range 10 {
		j.Emit(seqEvent(i+1, t0.Add(time.Duration(i)*time.Second)))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	rotated := files[:len(files)-1]
	if len(rotated) < 2 || filepath.Base(rotated[0]) != taken {
		t.Errorf("rotated files %q: the one written first is not %s", rotated, taken)
	}
}
