package audit

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

// writeLogFile writes evs as an event log file named name in dir.
func writeLogFile(t *testing.T, dir, name string, evs []Event) {
	t.Helper()
	var buf bytes.Buffer
	for _, ev := range evs {
		b, err := jsonLine(ev)
		if err != nil {
			t.Fatal(err)
		}
		buf.Write(b)
	}
	if err := os.WriteFile(filepath.Join(dir, name), buf.Bytes(), 0o640); err != nil {
		t.Fatal(err)
	}
}

func rotatedName(at time.Time) string {
	return rotatedPrefix + at.UTC().Format(rotateStamp) + rotatedSuffix
}

// straddleDir writes three rotated files and a current one: the first
// ends with capture's report of an allowed flow and of a would-be
// dropped one, the second begins with the proxy's report of each (the
// same flows: same 5-tuples, started 5 ms apart) and ends with
// capture's report of a third flow, whose proxy report opens the third
// file. 3 distinct flows, plus one flow of filler in each file.
func straddleDir(t *testing.T) string {
	dir := t.TempDir()
	flow := func(i int, at time.Time, src Source) Event {
		ev := seqEvent(i, at)
		ev.Source = src
		return ev
	}
	allowed := func(src Source, d time.Duration) Event { return flow(1, t0.Add(d), src) }
	denied := func(src Source, d time.Duration) Event {
		ev := flow(2, t0.Add(d), src)
		ev.Verdict, ev.Rule, ev.Reason, ev.Name = policy.Deny, "", policy.ReasonNoRule, "x.example"
		return ev
	}
	third := func(src Source, d time.Duration) Event { return flow(3, t0.Add(time.Minute+d), src) }
	writeLogFile(t, dir, rotatedName(t0.Add(30*time.Second)), []Event{
		flow(10, t0.Add(-time.Second), SourceProxy),
		allowed(SourceCapture, 0), denied(SourceCapture, 0),
	})
	writeLogFile(t, dir, rotatedName(t0.Add(90*time.Second)), []Event{
		allowed(SourceProxy, 5*time.Millisecond), denied(SourceProxy, 5*time.Millisecond),
		flow(11, t0.Add(time.Minute-time.Second), SourceProxy),
		third(SourceCapture, 0),
	})
	writeLogFile(t, dir, rotatedName(t0.Add(150*time.Second)), []Event{
		third(SourceProxy, 5*time.Millisecond),
		flow(12, t0.Add(2*time.Minute), SourceProxy),
	})
	writeLogFile(t, dir, CurrentLog, []Event{flow(13, t0.Add(3*time.Minute), SourceProxy)})
	return dir
}

// foldFirst folds dir's n oldest rotated files into the summary, as the
// daemon's rotation does.
func foldFirst(t *testing.T, dir string, n int) {
	t.Helper()
	j, _, err := OpenJournal(JournalConfig{Dir: dir, Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	files, err := LogFiles(dir)
	if err != nil || len(files) < n+1 {
		t.Fatalf("%d files (%v), want %d rotated ones", len(files), err, n)
	}
	for _, f := range files[:n] {
		j.foldFile(f)
	}
	if files, _ := LogFiles(dir); len(files) != 4-n {
		t.Fatalf("%d files left after folding %d", len(files), n)
	}
}

// TestArchiveFoldBoundaryDedup: a flow whose reports straddle a folded
// file and the next one counts once after a restart, whether the next
// file is kept (read after the summary) or folded too (into the
// summary).
func TestArchiveFoldBoundaryDedup(t *testing.T) {
	for folded := 1; folded <= 3; folded++ {
		dir := straddleDir(t)
		foldFirst(t, dir, folded)
		l, st, err := LoadDir(dir, nil, LedgerOptions{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		r := l.Report(ReportOptions{})
		var dropped uint64
		for _, d := range r.Dropped {
			dropped += d.Flows
		}
		rr := ruleByName(r, "r")
		if r.Totals.Flows != 7 || r.Totals.Allowed != 6 || rr == nil || rr.Flows != 6 || dropped != 1 {
			t.Errorf("%d files folded (load %+v): %d flows, %d allowed, rule %+v, %d dropped; want 7, 6, 6 flows, 1",
				folded, st, r.Totals.Flows, r.Totals.Allowed, rr, dropped)
		}
	}
}
