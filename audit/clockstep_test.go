package audit

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
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
	if _, err := readDir(dir, slog.New(slog.DiscardHandler), real.Add(-time.Hour), false, func(ev Event) {
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
