package audit

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

// TestWindowReadStoppedThenFull: a window's read of the event log stopped
// by its caller leaving (mid a compressed rotated file, mid a plain one,
// mid the current one) gives no report, and leaves nothing behind: the
// next window's report over the same log (its files, the journal's
// archive mark, its rotation lock) is the one made before any stop, and
// the one a fresh process (LoadDir) makes.
func TestWindowReadStoppedThenFull(t *testing.T) {
	dir := t.TempDir()
	const per = 4000
	var evs []Event
	for i := range 3 * per {
		ev := seqEvent(i, t0.Add(time.Duration(i)*time.Second))
		if i%3 == 0 {
			ev.Verdict, ev.Rule, ev.Reason = policy.Deny, "", policy.ReasonNoRule
			ev.Name = "h" + string(rune('a'+i%7)) + ".tracker.example"
		}
		evs = append(evs, ev)
	}
	writeEventsFile(t, filepath.Join(dir, rotatedName(evs[per-1].Time)+gzSuffix), evs[:per])
	writeEventsFile(t, filepath.Join(dir, rotatedName(evs[2*per-1].Time)), evs[per:2*per])
	writeEventsFile(t, filepath.Join(dir, CurrentLog), evs[2*per:])

	l := NewLedger(nil, LedgerOptions{})
	j, st, err := OpenJournal(JournalConfig{Dir: dir, Logger: slog.New(slog.DiscardHandler)}, l)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if st.Events != 3*per {
		t.Fatalf("the journal read %d events, want %d", st.Events, 3*per)
	}
	opt := ReportOptions{Now: t0.Add(10 * time.Hour), Since: t0.Add(-time.Hour)}
	asJSON := func(r *Report) []byte {
		t.Helper()
		var b bytes.Buffer
		if err := r.WriteJSON(&b); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	want := asJSON(l.Report(opt))
	fresh, _, err := LoadDir(dir, nil, LedgerOptions{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	fr := fresh.Report(opt)
	if fr.Totals != l.Report(opt).Totals {
		t.Fatalf("a fresh process's window report totals %+v, the journal's %+v", fr.Totals, l.Report(opt).Totals)
	}

	for _, stopAt := range []uint64{per / 2, per + per/2, 2*per + per/2} {
		ctx, cancel := context.WithCancel(context.Background())
		var passed uint64
		windowEventHook = func(c context.Context, n uint64) {
			passed = n
			if n == stopAt {
				cancel()
			}
		}
		r, err := l.ReportContext(ctx, opt)
		windowEventHook = nil
		cancel()
		if r != nil || !errors.Is(err, context.Canceled) {
			t.Errorf("stopped at event %d: report %v, error %v; want none, context.Canceled", stopAt, r != nil, err)
		}
		if passed >= 3*per {
			t.Errorf("stopped at event %d: the read went on to the log's end (%d events)", stopAt, passed)
		}
		if got := asJSON(l.Report(opt)); !bytes.Equal(got, want) {
			t.Errorf("the window report after a read stopped at event %d differs from the one before:\n%s\nwant\n%s", stopAt, got, want)
		}
		if got := fresh.Report(opt); got.Totals != fr.Totals || len(got.Dropped) != len(fr.Dropped) {
			t.Errorf("a fresh process's window report changed: %+v", got.Totals)
		}
	}
}
