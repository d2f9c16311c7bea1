package audit

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// writeOldLog writes n events (seqEvent 1..n) through a journal that
// rotates every few KiB: a log of rotated files and a current one.
func writeOldLog(t *testing.T, dir string, n int) {
	t.Helper()
	l := NewLedger(nil, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 8000, DetailBurst: -1}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for i := 1; i <= n; i++ {
		j.Emit(seqEvent(i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	files, _ := LogFiles(dir)
	if len(files) < 3 {
		t.Fatalf("the old log is %d files, want rotated ones and the current one", len(files))
	}
}

// stallLoad makes each journal's background read stop after its first
// file until release is closed (or the read is told to stop); stalled is
// closed when it got there. It returns how many stalls ended by a stop.
func stallLoad(t *testing.T, release <-chan struct{}) (stalled chan struct{}, stops *atomic.Int32) {
	t.Helper()
	stalled, stops = make(chan struct{}), new(atomic.Int32)
	testHookLoadFile = func(files int, stop <-chan struct{}) {
		if files != 1 {
			return
		}
		close(stalled)
		select {
		case <-release:
		case <-stop:
			stops.Add(1)
		}
	}
	wait := reportLoadWait
	reportLoadWait = 50 * time.Millisecond // a report waits that for the stalled read
	t.Cleanup(func() { testHookLoadFile, reportLoadWait = nil, wait })
	return stalled, stops
}

// TestJournalBackgroundLoad: with Background, OpenJournal reads nothing;
// Run reads the log while events are emitted onto the queue. While the
// read is stalled, a report says its counts are partial (and how far the
// read got) and Sync does not wait; after it, the ledger holds the old
// events, then the new ones, each once; the read reads the current file
// up to its size at open (a line added behind its back is not counted by
// it, but after it, with the events written since the start, as a
// restart counts it).
func TestJournalBackgroundLoad(t *testing.T) {
	dir := t.TempDir()
	const old, fresh = 300, 120
	writeOldLog(t, dir, old)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)

	l := NewLedger(nil, LedgerOptions{})
	var atDone Totals
	var doneStats LoadStats
	var doneErr error
	dones := 0
	j, st, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1, Background: true,
		LoadDone: func(st LoadStats, _ time.Duration, err error) {
			// Before the writer takes the queue: the old events alone.
			atDone, doneStats, doneErr = l.snapshot(ReportOptions{}).Totals, st, err
			dones++
		}}, l)
	if err != nil {
		t.Fatal(err)
	}
	if st.Events != 0 || st.Files != 0 {
		t.Fatalf("OpenJournal with Background read %+v, want nothing", st)
	}
	runJournal(t, j)
	<-stalled
	// A line appended behind the read's back must not be read by it:
	// the read stops at the current file's size at open (the writer
	// appends the events emitted meanwhile).
	extra, err := jsonLine(seqEvent(99999, time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, CurrentLog), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(extra); err != nil {
		t.Fatal(err)
	}
	f.Close()

	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	if j.Sync(time.Minute) {
		t.Error("Sync during the read said the queue is in the ledger")
	}
	r := l.Report(ReportOptions{})
	if r.Loading == nil || r.Loading.Files != 1 || r.Loading.FilesTotal < 3 || r.Loading.Events == 0 || r.Loading.Events >= old || r.Loading.Error != "" {
		t.Fatalf("report during the read: Loading = %+v, want 1 file of several read, some events", r.Loading)
	}
	if len(r.Notes) == 0 || !strings.Contains(r.Notes[0], "still being read") {
		t.Errorf("report during the read: notes %q do not say so first", r.Notes)
	}
	if r.Totals.Events != r.Loading.Events {
		t.Errorf("report during the read counts %d events, Loading says %d read and nothing new is in yet", r.Totals.Events, r.Loading.Events)
	}
	if err := j.LoadErr(); err != nil {
		t.Errorf("LoadErr during the read = %v", err)
	}

	close(release)
	if g := j.waitLoaded(time.Minute); g != nil {
		t.Fatalf("the read did not end whole: %+v", g)
	}
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	if dones != 1 || doneErr != nil || doneStats.Events != old {
		t.Errorf("LoadDone %d times, stats %+v, err %v; want once, %d events", dones, doneStats, doneErr, old)
	}
	if atDone.Events != old || atDone.Flows != old {
		t.Errorf("when the read ended the ledger held %d events, %d flows; want the %d old ones alone", atDone.Events, atDone.Flows, old)
	}
	r = l.Report(ReportOptions{})
	if r.Loading != nil {
		t.Errorf("report after the read: Loading = %+v", r.Loading)
	}
	if r.Totals.Events != old+fresh+1 || r.Totals.Flows != old+fresh+1 || r.Totals.Duplicates != 0 {
		t.Errorf("after the read: %d events, %d flows, %d duplicates; want %d each (the extra line too), none twice", r.Totals.Events, r.Totals.Flows, r.Totals.Duplicates, old+fresh+1)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// The log holds them too, each once (the extra line besides).
	testHookLoadFile = nil
	_, l2, st2 := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1}, nil)
	if st2.Events != old+fresh+1 {
		t.Errorf("a restart read %d events, want %d old, %d new and the extra line", st2.Events, old, fresh)
	}
	if got := l2.Report(ReportOptions{}).Totals.Flows; got != old+fresh+1 {
		t.Errorf("a restart counts %d flows, want %d", got, old+fresh+1)
	}
}

// TestJournalBackgroundClose: Close during a stalled background read
// stops it, and still writes the events emitted meanwhile to the log.
func TestJournalBackgroundClose(t *testing.T) {
	dir := t.TempDir()
	const old, fresh = 300, 50
	writeOldLog(t, dir, old)
	stalled, stops := stallLoad(t, nil) // never released: only a stop ends it
	l := NewLedger(nil, LedgerOptions{})
	var doneErr error
	j, _, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1, Background: true,
		LoadDone: func(_ LoadStats, _ time.Duration, err error) { doneErr = err }}, l)
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- j.Run(context.Background()) }()
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-ran; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if stops.Load() != 1 || !errors.Is(doneErr, ErrLoadStopped) {
		t.Errorf("the read saw %d stops and ended with %v; want 1 and ErrLoadStopped", stops.Load(), doneErr)
	}
	if err := j.LoadErr(); err != nil {
		t.Errorf("LoadErr after a stopped read = %v, want nil (not a failure)", err)
	}
	testHookLoadFile = nil
	_, l2, st := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1}, nil)
	if st.Events != old+fresh {
		t.Errorf("the log holds %d events, want %d old and %d emitted during the read", st.Events, old, fresh)
	}
	if r := l2.Report(ReportOptions{}); r.Totals.Flows != old+fresh || st.Skipped != 0 {
		t.Errorf("restart: %d flows, %d lines skipped; want %d, none", r.Totals.Flows, st.Skipped, old+fresh)
	}
}

// TestJournalBackgroundTornClose: a current file that ends in a torn line
// has it cut at the open (the writer appends during the read, which
// cannot cut it then), so the events of a Close during the read are on
// lines of their own and no fragment is left.
func TestJournalBackgroundTornClose(t *testing.T) {
	dir := t.TempDir()
	const old, fresh = 300, 20
	writeOldLog(t, dir, old)
	f, err := os.OpenFile(filepath.Join(dir, CurrentLog), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"kind":"flow","ti`)
	f.Close()
	stalled, _ := stallLoad(t, nil)
	j, _, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1, Background: true}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	<-stalled
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, time.Date(2026, 2, 1, 0, 0, 0, i, time.UTC)))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	testHookLoadFile = nil
	_, _, st := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1}, nil)
	if st.Events != old+fresh || st.Skipped != 0 || st.Torn {
		t.Errorf("the log holds %d events and %d bad lines (torn %v), want %d and no fragment", st.Events, st.Skipped, st.Torn, old+fresh)
	}
}
