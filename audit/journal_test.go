package audit

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"egressd/internal/testnet"
	"egressd/policy"
)

func openJournal(t *testing.T, cfg JournalConfig, eng *policy.Engine) (*Journal, *Ledger, LoadStats) {
	t.Helper()
	l := NewLedger(eng, LedgerOptions{})
	j, st, err := OpenJournal(cfg, l)
	if err != nil {
		t.Fatal(err)
	}
	return j, l, st
}

func runJournal(t *testing.T, j *Journal) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- j.Run(context.Background()) }()
	t.Cleanup(func() {
		j.Close()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// TestJournalRestart: the ledger rebuilt from the log equals the one that
// wrote it, and counts continue after a restart.
func TestJournalRestart(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	evs := fixtureEvents(t, eng)

	j, l, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	if st.Events != 0 {
		t.Fatalf("fresh dir loaded %d events", st.Events)
	}
	go j.Run(context.Background())
	for _, ev := range evs {
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	want := l.Report(ReportOptions{Now: reportNow})

	j2, l2, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	if st.Events != uint64(len(evs)) || st.Torn || st.Skipped != 0 {
		t.Errorf("load = %+v, want %d events, clean", st, len(evs))
	}
	if d := cmp.Diff(want, l2.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("rebuilt report differs (-before +after restart):\n%s", d)
	}
	// The golden report is what the restarted ledger says, too.
	var txt bytes.Buffer
	l2.Report(ReportOptions{Now: reportNow}).WriteText(&txt)
	golden(t, "report.txt", txt.Bytes())

	// Counts continue: the same stream again, an hour later, doubles them.
	go j2.Run(context.Background())
	for _, ev := range evs {
		ev.Time = ev.Time.Add(time.Hour)
		j2.Emit(ev)
	}
	j2.Close()
	_, l3, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
	r := l3.Report(ReportOptions{Now: reportNow})
	if r.Totals.Flows != 2*want.Totals.Flows || r.Rules[0].Flows != 2*want.Rules[0].Flows {
		t.Errorf("after two runs: %d flows, %s %d; want %d, %d", r.Totals.Flows, r.Rules[0].Name, r.Rules[0].Flows, 2*want.Totals.Flows, 2*want.Rules[0].Flows)
	}
}

func TestJournalSince(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000}, eng)
	runJournal(t, j)
	evs := fixtureEvents(t, eng)
	for _, ev := range evs {
		j.Emit(ev)
	}
	waitFor(t, func() bool { return j.Written() == uint64(len(evs)) })
	since := t0.Add(5 * time.Minute)
	r := l.Report(ReportOptions{Now: reportNow, Since: since})
	// Reference: a ledger fed only the events at or after since.
	ref := NewLedger(eng, LedgerOptions{})
	for _, ev := range evs {
		if !ev.Time.Before(since) {
			ref.Emit(ev)
		}
	}
	want := ref.snapshot(ReportOptions{Now: reportNow, Since: since})
	want.Coverage = &Coverage{DetailFrom: t0} // the log's, not the window's
	if d := cmp.Diff(want, r); d != "" {
		t.Errorf("windowed report (-want +got):\n%s", d)
	}
	if len(r.Notes) != 0 || r.Totals.Flows == 0 || r.Totals.Flows >= l.Report(ReportOptions{}).Totals.Flows {
		t.Errorf("windowed report: notes %q, %d flows", r.Notes, r.Totals.Flows)
	}
	// LoadDir (egressd report without a daemon) gives the same answers.
	l2, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, l2.Report(ReportOptions{Now: reportNow, Since: since})); d != "" {
		t.Errorf("LoadDir windowed report (-want +got):\n%s", d)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 1000; i++ { // bounded: 10 s
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not reached in 10 s")
}

// TestJournalTornLine: a partial last line (kill -9 mid-write) is skipped
// with a warning and cut off; the start does not fail and appends go on.
func TestJournalTornLine(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	evs := fixtureEvents(t, eng)
	var buf bytes.Buffer
	for _, ev := range evs[:3] {
		b, _ := jsonLine(ev)
		buf.Write(b)
	}
	buf.WriteString("this is not json\n") // a bad line in the middle
	b, _ := jsonLine(evs[3])
	buf.Write(b)
	full := buf.Len()
	b, _ = jsonLine(evs[4])
	buf.Write(b[:len(b)/2]) // torn
	path := filepath.Join(dir, CurrentLog)
	if err := os.WriteFile(path, buf.Bytes(), 0o640); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	lg := slog.New(slog.NewTextHandler(&logs, nil))
	j, l, st := openJournal(t, JournalConfig{Dir: dir, Logger: lg}, eng)
	if !st.Torn || st.Events != 4 || st.Skipped != 1 {
		t.Errorf("load = %+v, want torn, 4 events, 1 skipped", st)
	}
	if !strings.Contains(logs.String(), "torn line") || !strings.Contains(logs.String(), "not an event") {
		t.Errorf("warnings missing:\n%s", logs.String())
	}
	if fi, _ := os.Stat(path); fi.Size() != int64(full) {
		t.Errorf("file is %d bytes after repair, want %d (torn tail cut)", fi.Size(), full)
	}
	if got := l.Report(ReportOptions{}).Totals.Events; got != 4 {
		t.Errorf("ledger has %d events, want 4", got)
	}
	go j.Run(context.Background())
	j.Emit(evs[4])
	j.Close()
	_, l2, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	if st.Torn || st.Events != 5 {
		t.Errorf("after append: %+v, want 5 events, not torn", st)
	}
	if got := l2.Report(ReportOptions{}).Totals.Events; got != 5 {
		t.Errorf("ledger has %d events, want 5", got)
	}
}

func jsonLine(ev Event) ([]byte, error) {
	var b bytes.Buffer
	err := jsonEncode(&b, ev)
	return b.Bytes(), err
}

// TestJournalRotation: files rotate by size, old ones are deleted, and the
// ledger rebuilt from what is kept and the summary of the deleted ones
// counts every flow.
func TestJournalRotation(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, _, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 4000, MaxFiles: 3}, eng)
	go j.Run(context.Background())
	base := fixtureEvents(t, eng)[2]
	const n = 300
	for i := range n {
		ev := base
		ev.ClientPort = uint16(10000 + i)
		ev.Time = t0.Add(time.Duration(i) * time.Second)
		j.Emit(ev)
	}
	j.Close()
	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 4 {
		t.Errorf("%d files, want 3 rotated + current: %q", len(files), files)
	}
	lines := 0
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if len(b) > 4000+600 {
			t.Errorf("%s is %d bytes, rotation at 4000", f, len(b))
		}
		lines += bytes.Count(b, []byte("\n"))
	}
	_, l, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	got := l.Report(ReportOptions{}).Rules[0].Flows
	if int(got) != n || int(st.Events) != lines || int(st.Summarized) != n-lines || lines >= n || lines < 30 {
		t.Errorf("rebuilt %d flows, load %d events and %d summarized, %d lines kept of %d", got, st.Events, st.Summarized, lines, n)
	}
}

// emitFrom emits per copies of base from each of workers goroutines at
// once, each worker's from its own client (192.168.10.w) and client ports
// 0 to per-1; the channel closes when every Emit has returned.
func emitFrom(j *Journal, base Event, workers, per int) <-chan struct{} {
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				ev := base
				ev.ClientPort = uint16(i)
				ev.Client = netip.AddrFrom4([4]byte{192, 168, 10, byte(w)})
				j.Emit(ev)
			}
		}()
	}
	emitted := make(chan struct{})
	go func() { wg.Wait(); close(emitted) }()
	return emitted
}

// stallWriter makes j's writer stop before its first write (as a disk
// that stopped): entered is closed once it has, and it goes on once
// release is closed.
func stallWriter(j *Journal) (entered, release chan struct{}) {
	entered, release = make(chan struct{}), make(chan struct{})
	var once sync.Once
	j.testHookPre = func() {
		once.Do(func() { close(entered) })
		<-release
	}
	return entered, release
}

// TestJournalShedExact stalls the writer (as a disk that stopped) and
// emits far more events than the queue holds: Emit returns every time,
// and the shed count is exact, in memory, in the report and after a
// restart.
func TestJournalShedExact(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	const queue = 100
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, QueueLen: queue}, eng)
	reg := prometheus.NewRegistry()
	if err := j.RegisterMetrics(reg); err != nil {
		t.Fatal(err)
	}
	entered, release := stallWriter(j)
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	base := fixtureEvents(t, eng)[2]
	j.Emit(base) // the writer takes it and stalls
	<-entered

	const workers, per = 4, 50000
	emitted := emitFrom(j, base, workers, per)
	select {
	case <-emitted:
	case <-time.After(60 * time.Second):
		t.Fatal("Emit blocked while the writer was stalled")
	}
	if got, want := j.Shed(), uint64(workers*per-queue); got != want {
		t.Errorf("shed %d, want exactly %d", got, want)
	}
	if got := gathered(t, reg, "egress_audit_events_shed_total"); got != float64(workers*per-queue) {
		t.Errorf("egress_audit_events_shed_total = %v, want %d", got, workers*per-queue)
	}
	close(release)
	j.Close()
	if err := <-runDone; err != nil {
		t.Fatal(err)
	}
	r := l.Report(ReportOptions{})
	if r.ShedEvents != uint64(workers*per-queue) || r.Totals.Events != queue+1 {
		t.Errorf("report: shed %d, events %d; want %d, %d", r.ShedEvents, r.Totals.Events, workers*per-queue, queue+1)
	}
	_, l2, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	r2 := l2.Report(ReportOptions{})
	if r2.ShedEvents != r.ShedEvents || r2.Totals.Events != queue+1 || st.Shed != r.ShedEvents {
		t.Errorf("after restart: shed %d, events %d; want %d, %d", r2.ShedEvents, r2.Totals.Events, r.ShedEvents, queue+1)
	}
}

// TestJournalLoad pushes events from several goroutines as fast as they
// go into a small queue in front of the real disk writer: every event is
// either written or shed, exactly.
func TestJournalLoad(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, QueueLen: 256}, eng)
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	base := fixtureEvents(t, eng)[2]
	const workers, per = 4, 100000
	<-emitFrom(j, base, workers, per)
	j.Close()
	if err := <-runDone; err != nil {
		t.Fatal(err)
	}
	shed, written := j.Shed(), j.Written()
	t.Logf("%d events: %d written, %d shed", workers*per, written, shed)
	if shed+written != workers*per || j.WriteFailed() != 0 {
		t.Errorf("written %d + shed %d != %d emitted (failed %d)", written, shed, workers*per, j.WriteFailed())
	}
	if shed == 0 {
		t.Logf("nothing shed: the writer kept up on this machine")
	}
	r := l.Report(ReportOptions{})
	if r.ShedEvents != shed || r.Totals.Events != written {
		t.Errorf("report: shed %d events %d; want %d, %d", r.ShedEvents, r.Totals.Events, shed, written)
	}
	_, l2, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	if st.Events != written || l2.Report(ReportOptions{}).ShedEvents != shed {
		t.Errorf("after restart: %d events, shed %d", st.Events, l2.Report(ReportOptions{}).ShedEvents)
	}
}

// TestJournalDevFull: the log is /dev/full, every write fails. Errors are
// reported (Err, counts, report, a log line), Emit keeps returning, and
// the ledger still counts.
func TestJournalDevFull(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full")
	}
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	if err := os.Symlink("/dev/full", filepath.Join(dir, CurrentLog)); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))}, eng)
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	base := fixtureEvents(t, eng)[2]
	const n = 5000
	for i := range n {
		ev := base
		ev.ClientPort = uint16(i)
		j.Emit(ev)
	}
	waitFor(t, func() bool { return l.Report(ReportOptions{}).Totals.Events == n })
	j.Close()
	<-runDone
	if j.Err() == nil || !strings.Contains(j.Err().Error(), "no space") {
		t.Errorf("Err() = %v, want no space left", j.Err())
	}
	if j.WriteFailed() != n || j.Written() != 0 {
		t.Errorf("failed %d written %d, want %d, 0", j.WriteFailed(), j.Written(), n)
	}
	r := l.Report(ReportOptions{})
	if r.Rules[0].Flows != n || r.UnwrittenEvents != n {
		t.Errorf("report: %d flows, %d unwritten; want %d, %d", r.Rules[0].Flows, r.UnwrittenEvents, n, n)
	}
	if !strings.Contains(logs.String(), "event log write failed") {
		t.Errorf("no error logged:\n%s", logs.String())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// childEnv names the environment variables that make a test binary act as
// a child process of the kill -9 and full-disk tests.
const (
	envKillChild = "EGRESSD_AUDIT_KILL_CHILD_DIR"
	envFullChild = "EGRESSD_AUDIT_FULLDISK_CHILD"
)

// TestJournalKillChild is the child of TestJournalKill9: it writes events
// stamped with the wall clock and a sequence number until it is killed
// (bounded: 60 s, 60000 events).
func TestJournalKillChild(t *testing.T) {
	dir := os.Getenv(envKillChild)
	if dir == "" {
		t.Skip("child of TestJournalKill9")
	}
	l := NewLedger(nil, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: dir}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	for i := 1; i <= 60000; i++ {
		j.Emit(seqEvent(i, time.Now()))
		if i == 1 {
			fmt.Println("started")
		}
		time.Sleep(time.Millisecond)
	}
	j.Close()
}

func seqEvent(i int, at time.Time) Event {
	return Event{
		Kind: KindFlow, Source: SourceProxy, Time: at.UTC(),
		Client: netip.MustParseAddr("192.168.10.5"), ClientPort: uint16(i % 60000),
		Dest: netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), DestPort: 443, Proto: "tcp",
		Verdict: policy.Allow, Rule: "r", Mode: policy.ModeAudit, BytesOut: uint64(i),
	}
}

// TestJournalKill9 kills a process writing events with SIGKILL and checks
// that the log holds every event but at most the last second's, in order
// and without gaps, and that counts continue after the restart.
func TestJournalKill9(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestJournalKillChild$", "-test.v")
	cmd.Env = append(os.Environ(), envKillChild+"="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	for sc.Scan() && !strings.Contains(sc.Text(), "started") {
	}
	time.Sleep(2 * time.Second)
	killedAt := time.Now()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()

	var seqs []uint64
	var last time.Time
	l := NewLedger(nil, LedgerOptions{})
	j, st, err := OpenJournal(JournalConfig{Dir: dir}, l)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = readDirForTest(dir, func(ev Event) {
		seqs = append(seqs, ev.BytesOut)
		last = ev.Time
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("recovered %d events (torn tail: %v); last at %s, killed at %s (%s before)", len(seqs), st.Torn, last.Format(time.StampMilli), killedAt.Format(time.StampMilli), killedAt.Sub(last))
	if len(seqs) < 100 {
		t.Fatalf("only %d events recovered", len(seqs))
	}
	for i, s := range seqs {
		if s != uint64(i+1) {
			t.Fatalf("event %d has sequence %d: a gap", i+1, s)
		}
	}
	if lost := killedAt.Sub(last); lost > time.Second {
		t.Errorf("the last recovered event is %s older than the kill: more than 1 s lost", lost)
	}
	// Counts continue: the restarted journal adds to them.
	go j.Run(context.Background())
	for i := range 10 {
		j.Emit(seqEvent(len(seqs)+1+i, time.Now()))
	}
	j.Close()
	l2, _, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := l2.Report(ReportOptions{}).Totals.Flows; got != uint64(len(seqs)+10) {
		t.Errorf("after restart %d flows, want %d", got, len(seqs)+10)
	}
}

func readDirForTest(dir string, fn func(Event)) (LoadStats, bool, error) {
	st, err := readDir(dir, slog.New(slog.DiscardHandler), time.Time{}, false, "", fn)
	return st, st.Torn, err
}

// TestJournalFullDiskChild is the child of TestJournalFullDisk: it runs in
// its own mount namespace, mounts a 256 KiB tmpfs and fills it.
func TestJournalFullDiskChild(t *testing.T) {
	dir := os.Getenv(envFullChild)
	if dir == "" {
		t.Skip("child of TestJournalFullDisk")
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=256k"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	defer syscall.Unmount(dir, 0)
	l := NewLedger(nil, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, QueueLen: 1 << 17}, l)
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	const n = 20000 // about 5 MB of events into 256 KiB
	for i := 1; i <= n; i++ {
		j.Emit(seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
	}
	waitFor(t, func() bool { return l.Report(ReportOptions{}).Totals.Events+j.Shed() == n })
	if j.Err() == nil {
		t.Errorf("no write error reported on a full disk")
	}
	j.Close()
	<-runDone
	r := l.Report(ReportOptions{})
	if j.Written()+j.WriteFailed()+j.Shed() != n {
		t.Errorf("written %d + failed %d + shed %d != %d", j.Written(), j.WriteFailed(), j.Shed(), n)
	}
	if r.Totals.Flows+r.ShedEvents != n || r.UnwrittenEvents == 0 || r.UnwrittenEvents != j.WriteFailed() {
		t.Errorf("report: %d flows %d shed %d unwritten", r.Totals.Flows, r.ShedEvents, r.UnwrittenEvents)
	}
	// What did reach the disk reads back cleanly, gaps aside: every line
	// that parses is an event (a fragment cut by ENOSPC is skipped).
	st, err := readDir(dir, slog.New(slog.DiscardHandler), time.Time{}, false, "", func(Event) {})
	if err != nil {
		t.Fatal(err)
	}
	if st.Events == 0 || st.Events > j.Written() {
		t.Errorf("read back %d events, %d written", st.Events, j.Written())
	}
	fmt.Printf("fulldisk: emitted %d written %d failed %d shed %d readback %d skipped %d err %v\n",
		n, j.Written(), j.WriteFailed(), j.Shed(), st.Events, st.Skipped, j.Err())
}

// TestJournalFullDisk fills a real (tiny tmpfs) filesystem in a private
// mount namespace.
func TestJournalFullDisk(t *testing.T) {
	testnet.RequireRoot(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatal("unshare (util-linux) is needed")
	}
	dir := t.TempDir()
	cmd := exec.Command(unshare, "-m", "--propagation", "private", os.Args[0], "-test.run=^TestJournalFullDiskChild$", "-test.v")
	cmd.Env = append(os.Environ(), envFullChild+"="+dir)
	out, err := cmd.CombinedOutput()
	t.Logf("child:\n%s", out)
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	if !strings.Contains(string(out), "fulldisk: emitted") {
		t.Fatal("the child did not run")
	}
	// The mount was private to the child: nothing is left mounted here.
	if b, _ := os.ReadFile("/proc/self/mounts"); bytes.Contains(b, []byte(dir)) {
		t.Errorf("tmpfs leaked into the parent namespace")
	}
}

func gathered(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

// FuzzReadEvents feeds arbitrary bytes to the event log reader: it never
// panics, never returns more events than complete lines, and a torn tail
// is reported as torn.
func FuzzReadEvents(f *testing.F) {
	good, _ := jsonLine(seqEvent(1, t0))
	f.Add(good)                                           // one event
	f.Add(append(append([]byte{}, good...), good[:9]...)) // an event, then a torn line
	f.Add([]byte("not json\n{\"kind\":\"flow\"}\n"))      // garbage, then a minimal event
	f.Add([]byte("{\"kind\":\"shed\",\"count\":3}\n"))    // a shed record
	f.Add([]byte("\n\n\r\n"))                             // blank lines
	f.Fuzz(func(t *testing.T, b []byte) {
		n := 0
		skipped, torn, err := ReadEvents(bytes.NewReader(b), func(Event) { n++ })
		if err != nil {
			t.Fatal(err)
		}
		lines := bytes.Count(b, []byte("\n"))
		if n+skipped > lines {
			t.Errorf("%d events + %d skipped from %d complete lines", n, skipped, lines)
		}
		tail := b[bytes.LastIndexByte(b, '\n')+1:]
		if torn != (len(bytes.TrimSpace(tail)) > 0) {
			t.Errorf("torn = %v with tail %q", torn, tail)
		}
		l := NewLedger(nil, LedgerOptions{MaxDropped: 4, MaxFlows: 8})
		ReadEvents(bytes.NewReader(b), l.Emit)
		l.Report(ReportOptions{}).WriteHTML(io.Discard)
	})
}

// TestJournalReopensAfterRotateFailure: when the new file cannot be opened
// at a rotation (here no descriptor is free; a full disk or quota does the
// same), the events meanwhile are counted as unwritten, and once the file
// can be opened again writing resumes: the event log does not stay off
// until a restart.
func TestJournalReopensAfterRotateFailure(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, _, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 100, Logger: slog.New(slog.DiscardHandler)}, eng)
	runJournal(t, j)
	base := fixtureEvents(t, eng)[2]
	emit := func(from, n int) {
		for i := from; i < from+n; i++ {
			ev := base
			ev.ClientPort = uint16(10000 + i)
			j.Emit(ev)
		}
	}

	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	// Rotation closes the full file before it opens the new one: with the
	// limit at the full file's descriptor, and every one below it in use,
	// the open finds none free.
	// Descriptors free below it (closed by earlier tests) are taken with
	// /dev/null: open returns the lowest free one.
	fd := uint64(j.f.Fd())
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		if uint64(f.Fd()) > fd {
			f.Close()
			break
		}
		defer f.Close()
	}
	lim := old
	lim.Cur = fd
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
			t.Fatal(err)
		}
	}
	defer restore()
	emit(0, 40) // rotates past 2000 bytes; the new file does not open
	waitFor(t, func() bool { return j.Err() != nil && j.Written()+j.WriteFailed() == 40 })
	restore()
	if !strings.Contains(j.Err().Error(), "too many open files") {
		t.Errorf("Err() = %v, want the failed open", j.Err())
	}
	failed := j.WriteFailed()
	if failed == 0 {
		t.Fatalf("no event was lost while the log could not be opened")
	}

	emit(40, 5)
	deadline := time.Now().Add(5 * time.Second)
	for j.Written()+j.WriteFailed() < 45 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if j.WriteFailed() != failed || j.Written() != 45-failed || j.Err() != nil {
		t.Fatalf("after the open works again: written %d, failed %d (was %d), err %v; want the 5 new events written",
			j.Written(), j.WriteFailed(), failed, j.Err())
	}
	b, err := os.ReadFile(filepath.Join(dir, CurrentLog))
	if err != nil || bytes.Count(b, []byte("\n")) < 5 {
		t.Errorf("current log after the reopen: %d lines, %v", bytes.Count(b, []byte("\n")), err)
	}
}
