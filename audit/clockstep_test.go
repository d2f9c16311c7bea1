package audit

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestJournalRotationClockBehind: a gateway without a real-time clock
// restarts at 1970 (before NTP sets the clock) with a log of real times.
// A rotation then must not name the file 1970: by name it would sort
// before the older files, so that it is the one deleted beyond MaxFiles
// (the newest events lost, the oldest kept), and a report `--since 24h`
// once the clock is right would skip it, with the real-time events it
// holds from before the restart (names say when a file ended).
func TestJournalRotationClockBehind(t *testing.T) {
	for _, maxFiles := range []int{4, 100} {
		t.Run(fmt.Sprint("max-files-", maxFiles), func(t *testing.T) { testJournalRotationClockBehind(t, maxFiles) })
	}
}

func testJournalRotationClockBehind(t *testing.T, maxFiles int) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	base := fixtureEvents(t, eng)[2]
	real := time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC)
	// The clock reads the time of the last event emitted.
	var clock atomic.Int64
	emit := func(from time.Time, n, port int) {
		t.Helper()
		j, _, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: maxFiles}, eng)
		j.now = func() time.Time { return time.Unix(0, clock.Load()) }
		go j.Run(context.Background())
		for i := range n {
			ev := base
			ev.ClientPort = uint16(port + i)
			ev.Time = from.Add(time.Duration(i) * time.Second)
			clock.Store(ev.Time.UnixNano())
			j.Emit(ev)
			if i%4 == 3 {
				waitFor(t, func() bool { return j.Written() == uint64(i+1) })
			}
		}
		j.Close()
	}
	// Before the restart: real times, a file and a half.
	emit(real, 14, 10000)
	// After it, at 1970: enough to rotate twice.
	const n1970 = 20
	emit(time.Unix(1000, 0), n1970, 20000)

	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != min(maxFiles, 5)+1 {
		t.Fatalf("%d files, want MaxFiles rotated and the current: %q", len(files), files)
	}
	// Every 1970 event is kept: the newest files are not the ones deleted.
	kept1970, keptReal := 0, 0
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		var newest time.Time
		if _, _, err := ReadEvents(fh, func(ev Event) {
			if ev.Kind == KindShed {
				return
			}
			if ev.Time.Before(real) {
				kept1970++
			} else {
				keptReal++
			}
			if ev.Time.After(newest) {
				newest = ev.Time
			}
		}); err != nil {
			t.Fatal(err)
		}
		fh.Close()
		if end, ok := rotatedTime(f); ok && end.Before(newest) {
			t.Errorf("%s holds an event of %v, after its name", filepath.Base(f), newest)
		}
	}
	if kept1970 != n1970 {
		t.Errorf("%d of the %d events stamped 1970 (the newest) kept: %q", kept1970, n1970, files)
	}
	// A window from before the restart (after NTP: --since 24h) reads
	// every real-time event still kept.
	inWindow := 0
	if _, err := readDir(dir, slog.New(slog.DiscardHandler), real.Add(-time.Hour), false, "", func(ev Event) {
		if ev.Kind != KindShed && !ev.Time.Before(real) {
			inWindow++
		}
	}); err != nil {
		t.Fatal(err)
	}
	if inWindow != keptReal || keptReal == 0 {
		t.Errorf("--since read %d of the %d real-time events kept", inWindow, keptReal)
	}
}

// TestReportNotesEventsBeforeFloor: events recorded while the clock said
// 1970 (a gateway without a real-time clock, before NTP set it) stay in
// the report, but it does not claim a rule was first seen in 1970 without
// a note saying those times are not real; a windowed report (--since)
// says how many such events no window holds.
func TestReportNotesEventsBeforeFloor(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	dir := t.TempDir()
	j, l, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
	runJournal(t, j)
	for _, ev := range evs {
		j.Emit(ev)
	}
	waitFor(t, func() bool { return j.Written() == uint64(len(evs)) })
	for _, n := range l.Report(ReportOptions{Now: reportNow}).Notes {
		if strings.Contains(n, "clock") {
			t.Errorf("a note of a wrong clock with none: %q", n)
		}
	}
	early := evs[2]
	early.Time = time.Unix(100, 0)
	j.Emit(early)
	waitFor(t, func() bool { return j.Written() == uint64(len(evs)+1) })
	r := l.Report(ReportOptions{Now: reportNow})
	if !slices.ContainsFunc(r.Notes, func(n string) bool { return strings.Contains(n, "1970-01-01") && strings.Contains(n, "clock") }) {
		t.Errorf("no note of the events of 1970: %q", r.Notes)
	}
	w := l.Report(ReportOptions{Now: reportNow, Since: reportNow.Add(-24 * time.Hour)})
	if !slices.ContainsFunc(w.Notes, func(n string) bool { return strings.Contains(n, "1 event") && strings.Contains(n, "clock") }) {
		t.Errorf("windowed report: no note of the event of 1970: %q", w.Notes)
	}
}
