package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSuggestDuringBackgroundLoad: suggestions made while the event log is
// still being read at the start (or from a read that failed) say the
// counts they rest on are partial, as the report's other forms do, also
// when the report came from the daemon as JSON (`egressd report
// --suggest`): an operator must not build a policy from partial counts
// unknowingly.
func TestSuggestDuringBackgroundLoad(t *testing.T) {
	dir := t.TempDir()
	writeOldLog(t, dir, 300)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	defer close(release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true}, nil)
	runJournal(t, j)
	<-stalled
	r := l.Report(ReportOptions{})
	if r.Loading == nil {
		t.Fatal("report during the read: no Loading")
	}
	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	rj, err := ReadReportJSON(&js)
	if err != nil {
		t.Fatal(err)
	}
	for what, rep := range map[string]*Report{"live": r, "from JSON": rj} {
		var b bytes.Buffer
		if err := rep.WriteSuggestions(&b); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(b.String(), "COUNTS ARE PARTIAL") {
			t.Errorf("%s: suggestions during the read do not say the counts are partial:\n%s", what, b.String())
		}
	}
}

// TestJournalBackgroundLoadFails: a background read that fails (a file
// gone from under it) leaves the counts partial, said by every report
// (Loading.Error) and LoadErr, LoadDone once with the error; the events
// emitted meanwhile are still counted and written, each once, and a
// restart counts what the log holds once.
func TestJournalBackgroundLoadFails(t *testing.T) {
	dir := t.TempDir()
	const old, fresh = 800, 40
	writeOldLog(t, dir, old)
	files, _ := LogFiles(dir)
	if len(files) < 10 {
		t.Fatalf("the old log is %d files, want 10 or more", len(files))
	}
	// The last rotated file, removed under the read once it took the
	// first: the read runs at most a few files ahead (readDirAhead).
	gone := files[len(files)-2]
	lost, err := countEvents(gone)
	if err != nil {
		t.Fatal(err)
	}
	testHookLoadFile = func(n int, _ <-chan struct{}) {
		if n == 1 {
			os.Remove(gone)
		}
	}
	t.Cleanup(func() { testHookLoadFile = nil })
	var doneErr error
	dones := 0
	l := NewLedger(nil, LedgerOptions{})
	loaded := make(chan struct{})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1, Background: true,
		LoadDone: func(_ LoadStats, _ time.Duration, err error) {
			doneErr = err
			dones++
			close(loaded)
		}}, l)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	for i := 1; i <= fresh; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	runJournal(t, j)
	<-loaded
	j.waitLoaded(time.Minute) // LoadDone is called before the read counts as ended
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the failed read did not return")
	}
	if dones != 1 || doneErr == nil || errors.Is(doneErr, ErrLoadStopped) {
		t.Fatalf("LoadDone %d times with %v; want once with the read's error", dones, doneErr)
	}
	if j.LoadErr() == nil {
		t.Error("LoadErr after a failed read is nil")
	}
	r := l.Report(ReportOptions{})
	if r.Loading == nil || r.Loading.Error == "" || len(r.Notes) == 0 || !strings.Contains(r.Notes[0], "could not be read whole") {
		t.Errorf("report after the failed read: Loading %+v, notes %q; want the error, said first", r.Loading, r.Notes)
	}
	if r.Totals.Flows < fresh || r.Totals.Duplicates != 0 {
		t.Errorf("after the failed read: %d flows, %d duplicates; want the %d new ones at least, none twice", r.Totals.Flows, r.Totals.Duplicates, fresh)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	testHookLoadFile = nil
	_, l2, st := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1}, nil)
	want := uint64(old - lost + fresh)
	if st.Skipped != 0 {
		t.Errorf("restart read %d bad lines", st.Skipped)
	}
	// The summary's and the kept files' together.
	if got := l2.Report(ReportOptions{}).Totals; got.Flows != want || got.Duplicates != 0 {
		t.Errorf("restart counts %d flows, %d duplicates; want %d (old %d less %d removed, %d new), none twice", got.Flows, got.Duplicates, want, old, lost, fresh)
	}
}

// countEvents counts the events of one log file.
func countEvents(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n := 0
	_, _, err = ReadEvents(f, func(Event) { n++ })
	return n, err
}

// TestJournalBackgroundLoadShed: events emitted during a long background
// read faster than the writer takes them, beyond the queue, are shed: a
// report during the read says how many wait to be counted (queued, or in
// the log already) and how many were shed (the counts lack both), and
// after the read the shed ones are counted as shed, once, and the others
// as events.
func TestJournalBackgroundLoadShed(t *testing.T) {
	dir := t.TempDir()
	const old, queue, emitted = 300, 16, 40
	writeOldLog(t, dir, old)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true, QueueLen: queue}, nil)
	// The writer, which takes the queue during the read, stalls on the
	// first event it writes until the rest are emitted: the queue fills.
	writing, goOn := make(chan struct{}), make(chan struct{})
	var once sync.Once
	j.testHookPre = func() {
		once.Do(func() {
			close(writing)
			<-goOn
		})
	}
	runJournal(t, j)
	<-stalled
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	j.Emit(seqEvent(10000, at))
	<-writing
	for i := 1; i < emitted; i++ {
		j.Emit(seqEvent(10000+i, at.Add(time.Duration(i)*time.Millisecond)))
	}
	close(goOn)
	const shed = emitted - 1 - queue
	if !waitWritten(j, emitted-shed) {
		t.Fatal("the writer did not take the queue during the read")
	}
	if j.Shed() != shed {
		t.Fatalf("%d events shed, want %d", j.Shed(), shed)
	}
	r := l.Report(ReportOptions{})
	if r.Loading == nil || r.Loading.Queued != emitted-shed || r.Loading.Shed != shed {
		t.Errorf("report during the read: Loading %+v; want %d waiting, %d shed", r.Loading, emitted-shed, shed)
	}
	if len(r.Notes) == 0 || !strings.Contains(r.Notes[0], fmt.Sprintf("%d shed", shed)) {
		t.Errorf("report during the read: first note %q does not say %d events were shed", r.Notes, shed)
	}
	close(release)
	j.waitLoaded(time.Minute)
	if !j.Sync(time.Minute) {
		t.Fatal("Sync after the read did not return")
	}
	r = l.Report(ReportOptions{})
	if r.Loading != nil || r.ShedEvents != shed || r.Totals.Events != old+emitted-shed {
		t.Errorf("after the read: Loading %+v, %d shed, %d events; want none, %d shed, %d events", r.Loading, r.ShedEvents, r.Totals.Events, shed, old+emitted-shed)
	}
}

// TestJournalBackgroundStoppedReport: a report of the ledger after Close
// stopped the background read (a report in flight while the daemon
// stops) still says the counts are partial: the read did not end.
func TestJournalBackgroundStoppedReport(t *testing.T) {
	dir := t.TempDir()
	writeOldLog(t, dir, 300)
	stalled, _ := stallLoad(t, nil)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true}, nil)
	ran := make(chan error, 1)
	go func() { ran <- j.Run(context.Background()) }()
	<-stalled
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	<-ran
	r := l.Report(ReportOptions{})
	if r.Loading == nil || r.Loading.Error == "" || r.Totals.Events >= 300 {
		t.Errorf("report after a stopped read: Loading %+v, %d events; want it marked partial", r.Loading, r.Totals.Events)
	}
	if err := j.LoadErr(); err != nil {
		t.Errorf("LoadErr after a stopped read = %v, want nil (no failure)", err)
	}
}
