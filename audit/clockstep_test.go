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
	"unsafe"
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

// writeAt drives the writer's steps of j (Run is not running): write(at,
// port) writes base from client port port, at at by the event's time and
// by the journal's clock, at once.
func writeAt(j *Journal, base Event) func(at time.Time, port int) {
	var clock time.Time
	j.now = func() time.Time { return clock }
	return func(at time.Time, port int) {
		ev := base
		ev.ClientPort = uint16(port)
		ev.Time = at
		clock = at
		j.writeEvent(ev)
		j.flush()
	}
}

// TestJournalRotationClockSetBack: a clock that ran ahead and was set back
// (a bad NTP server, a fake-hwclock's wrong saved time) while egressd ran.
// Events stamped by time.Now carry a monotonic reading, and time.After
// compares those, not the wall clock, when both times have one: an event
// stamped after the step back is later on the monotonic clock, though its
// wall time is years earlier than the records before it. The newest
// record by the wall clock must still name the file: a name before a
// record it holds sorts the file before older ones (the first deleted
// beyond MaxFiles) and makes --since skip events in the window.
func TestJournalRotationClockSetBack(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, _, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 100}, eng)
	defer j.Close()
	ahead := time.Now() // the clock running ahead, with a monotonic reading
	const back = 5 * 365 * 24 * time.Hour
	write := writeAt(j, fixtureEvents(t, eng)[2])
	rotated := func() int {
		files, err := LogFiles(dir)
		if err != nil {
			t.Fatal(err)
		}
		return len(files) - 1
	}
	// Ahead: until a file is rotated, and a record after it.
	n := 0
	for ; rotated() == 0; n++ {
		if n == 100 {
			t.Fatal("no rotation in 100 events")
		}
		write(ahead.Add(time.Duration(n)*time.Second), 10000+n)
	}
	write(ahead.Add(time.Duration(n)*time.Second), 10000+n)
	n++
	// Set back: monotonic later, wall five years earlier; until a second
	// rotation.
	for i := 0; rotated() < 2; i++ {
		if i == 100 {
			t.Fatal("no second rotation in 100 events")
		}
		write(steppedBack(t, ahead, time.Duration(n+i)*time.Second, back), 20000+i)
	}

	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	// The files in their order hold the events in write order (ports
	// 10000 up, then 20000 up), and no name is before a record it holds.
	lastPort := 0
	for _, f := range files {
		end, ok := rotatedTime(f)
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := ReadEvents(fh, func(ev Event) {
			if int(ev.ClientPort) <= lastPort {
				t.Errorf("%s: event of port %d after one of port %d: files out of write order", filepath.Base(f), ev.ClientPort, lastPort)
			}
			lastPort = int(ev.ClientPort)
			if ok && ev.Time.After(end) {
				t.Errorf("%s holds an event of %v, after its name", filepath.Base(f), ev.Time)
			}
		}); err != nil {
			t.Fatal(err)
		}
		fh.Close()
	}
}

// steppedBack returns what time.Now returns d after ref when the wall
// clock was set back by back in between: a monotonic reading d after
// ref's, a wall time back before ref's plus d. The time package offers no
// way to make one, so it edits the wall seconds (bits 30 to 62 of the
// first word when the monotonic bit is set); the checks below fail if the
// representation ever changes.
func steppedBack(t *testing.T, ref time.Time, d, back time.Duration) time.Time {
	t.Helper()
	tm := ref.Add(d)
	rep := (*struct {
		wall uint64
		ext  int64
		loc  *time.Location
	})(unsafe.Pointer(&tm))
	if rep.wall&(1<<63) == 0 {
		t.Fatal("steppedBack: ref has no monotonic reading")
	}
	rep.wall -= uint64(back/time.Second) << 30
	if !tm.After(ref) || !tm.Round(0).Equal(ref.Round(0).Add(d-back)) {
		t.Fatalf("steppedBack: time representation changed: %v after %v", tm, ref)
	}
	return tm
}

// TestReportCountsWrongClockEventsInSkippedFiles: a gateway whose log began
// before NTP set its clock (a new install, started at 1970) rotated files
// named 1970. A windowed report skips rotated files whose name is before
// the window (their events are all before it), and with them the 1970
// events it says no window holds: the note must count every such event,
// not only those in files it read.
func TestReportCountsWrongClockEventsInSkippedFiles(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 100}, eng)
	defer j.Close()
	write := writeAt(j, fixtureEvents(t, eng)[2])
	n1970 := 0
	for files, _ := LogFiles(dir); len(files) < 2; files, _ = LogFiles(dir) {
		if n1970 == 100 {
			t.Fatal("no rotation in 100 events")
		}
		write(time.Unix(int64(1000+n1970), 0), 10000+n1970)
		n1970++
	}
	// NTP has set the clock: a real-time event.
	write(reportNow.Add(-time.Hour), 20000)

	want := fmt.Sprintf("%d event(s) stamped before", n1970)
	w := l.Report(ReportOptions{Now: reportNow, Since: reportNow.Add(-24 * time.Hour)})
	if !slices.ContainsFunc(w.Notes, func(n string) bool { return strings.HasPrefix(n, want) }) {
		t.Errorf("windowed report: no note %q...: %q", want, w.Notes)
	}
}
