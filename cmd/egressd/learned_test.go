package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"egressd/dnsfilter"
	"egressd/policy"
)

// TestLearnedStore: the table's file in the state directory. A save and a
// load bring the table back; no file is a first start; a file that is not
// one egressd writes (garbage, a FIFO, a link) is an error for the
// caller's warning, and the table stays empty; a state directory that
// cannot be written is an error logged once, not on every tick.
func TestLearnedStore(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	dir := t.TempDir()
	tb := dnsfilter.NewTable(0)
	tb.Learn(dnsfilter.Learned{Client: netip.MustParseAddr("192.0.2.10"), Name: "time.example.com",
		Addr: netip.MustParseAddr("203.0.113.7"), Rule: "ntp", Expires: time.Now().Add(5 * time.Minute)})

	s := newLearnedStore(dir, tb, log)
	if n, _, err := s.load(); n != 0 || err != nil {
		t.Fatalf("load without a file: %d, %v", n, err)
	}
	if err := s.tick(); err != nil {
		t.Fatalf("save: %v", err)
	}
	path := filepath.Join(dir, learnedFileName)
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the file: %v, %v; want mode 0600", fi, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("state directory after a save: %v, want the file alone (no temporary left)", ents)
	}
	// Unchanged: not written again.
	os.Remove(path)
	if err := s.tick(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err == nil {
		t.Error("an unchanged table was written again")
	}
	if err := s.flush(learnedStopWait); err != nil {
		t.Fatal(err)
	}

	tb2 := dnsfilter.NewTable(0)
	if n, _, err := newLearnedStore(dir, tb2, log).load(); n != 1 || err != nil {
		t.Fatalf("load: %d, %v; want 1", n, err)
	}
	if got := tb2.NamesFor(netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.7")); len(got) != 1 {
		t.Errorf("restored table: %v", got)
	}

	for name, mk := range map[string]func(string) error{
		"garbage": func(p string) error { return os.WriteFile(p, []byte("\x00garbage"), 0o600) },
		"fifo":    func(p string) error { return syscall.Mkfifo(p, 0o600) },
		"link":    func(p string) error { return os.Symlink("/etc/hostname", p) },
		"dir":     func(p string) error { return os.Mkdir(p, 0o700) },
	} {
		d := t.TempDir()
		if err := mk(filepath.Join(d, learnedFileName)); err != nil {
			t.Fatal(err)
		}
		tb := dnsfilter.NewTable(0)
		done := make(chan struct{})
		var n int
		go func() { n, _, err = newLearnedStore(d, tb, log).load(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: load blocked", name)
		}
		if err == nil || n != 0 || tb.Len() != 0 {
			t.Errorf("%s: load %d, %v (table %d); want an error and nothing", name, n, err, tb.Len())
		}
		// A regular file the table refused is kept aside, not left for
		// the next save to overwrite.
		_, refused := os.Lstat(filepath.Join(d, learnedFileName+".refused.1"))
		if want := name == "garbage"; (refused == nil) != want {
			t.Errorf("%s: a .refused.1 copy kept: %v, want %v", name, refused == nil, want)
		}
	}

	// A state directory under a file: every write fails, logged once.
	notDir := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notDir, nil, 0o600)
	logs.Reset()
	bad := newLearnedStore(filepath.Join(notDir, "state"), tb, log)
	for range 3 {
		if err := bad.flush(learnedStopWait); err == nil {
			t.Fatal("save under a file worked")
		}
	}
	if n := strings.Count(logs.String(), "cannot write the table"); n != 1 {
		t.Errorf("%d warnings for 3 failed writes, want 1:\n%s", n, logs.String())
	}
}

// TestLearnedStoreRemovesTemporaries: a save killed before its rename (kill
// -9, or systemd's SIGKILL at the stop timeout, during the write of a
// large table) leaves its temporary file, up to 10 MB for a full table;
// the next start removes it, and nothing else, so that they do not pile up
// in the state directory crash after crash.
func TestLearnedStoreRemovesTemporaries(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := t.TempDir()
	tb := dnsfilter.NewTable(0)
	tb.Learn(dnsfilter.Learned{Client: netip.MustParseAddr("192.0.2.10"), Name: "time.example.com",
		Addr: netip.MustParseAddr("203.0.113.7"), Rule: "ntp", Expires: time.Now().Add(5 * time.Minute)})
	if err := newLearnedStore(dir, tb, log).flush(learnedStopWait); err != nil {
		t.Fatal(err)
	}
	// What a killed save leaves: os.CreateTemp's name, cut short.
	for _, name := range []string{learnedFileName + ".tmp1234567890", learnedFileName + ".tmp42"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(`{"egressd":"learned-addresses"`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	keep := []string{"events.ndjson", "learned.ndjson.bak", "policy.yaml"}
	for _, name := range keep {
		os.WriteFile(filepath.Join(dir, name), nil, 0o600)
	}
	tb2 := dnsfilter.NewTable(0)
	if n, _, err := newLearnedStore(dir, tb2, log).load(); n != 1 || err != nil {
		t.Fatalf("load: %d, %v; want 1", n, err)
	}
	var names []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if want := append(keep, learnedFileName); !slices.Equal(names, slices.Sorted(slices.Values(want))) {
		t.Errorf("state directory after a start: %v, want %v", names, want)
	}
}

// TestRestoreLearnedRunningPolicy: the file was written under another
// policy (or by a version whose rebinding filter had a range fewer): at
// start the table takes only what the forwarder would learn now, under
// the running policy and answer filter. An answer for a name the policy
// no longer lets the client resolve, or with an address the filter strips
// from the name's answers, does not come back, so neither the firewall's
// learned sets (seeded from the table at install) nor the proxy vouch for
// it. What comes back is credited to the rule that allows it now.
func TestRestoreLearnedRunningPolicy(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	exp := time.Now().Add(time.Hour)
	a := netip.MustParseAddr
	in, out := a("192.0.2.10"), a("192.0.2.99") // out: not among the rules' clients now
	old := dnsfilter.NewTable(0)
	for _, l := range []dnsfilter.Learned{
		{Client: in, Name: "time.example.com", Addr: a("203.0.113.7"), Rule: "ntp"},         // allowed now, by "time"
		{Client: in, Name: "gone.example.com", Addr: a("203.0.113.8"), Rule: "ntp"},         // no rule has the name now
		{Client: out, Name: "time.example.com", Addr: a("203.0.113.9"), Rule: "ntp"},        // the rule's clients changed
		{Client: in, Name: "time.example.com", Addr: a("10.1.2.3"), Rule: "ntp"},            // the rebinding filter strips it
		{Client: in, Name: "time.example.com", Addr: a("168.63.129.16"), Rule: "ntp"},       // a range an upgrade added
		{Client: in, Name: "nas.lan", Addr: a("192.168.1.5"), Rule: "nas"},                  // a private name: kept
		{Client: in, Name: "use-application-dns.net", Addr: a("203.0.113.10"), Rule: "nas"}, // the canary: never learned
	} {
		l.Expires = exp
		old.Learn(l)
	}
	if err := newLearnedStore(dir, old, log).flush(learnedStopWait); err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n"+
		"  - {name: time, from: [192.0.2.0/28], to: [time.example.com], ports: [123/udp]}\n"+
		"  - {name: nas, to: [nas.lan, use-application-dns.net], ports: [445/tcp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{cfg: runConfig{stateDir: dir}, log: log, out: io.Discard, store: policy.NewStore(eng), degraded: map[string]string{}}
	tb := dnsfilter.NewTable(0)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	d.restoreLearned(ctx, &wg, tb, dnsfilter.Config{})
	cancel()
	wg.Wait()

	var got []string
	for _, l := range tb.HeldAll(nil) { // what the firewall seeds its sets with
		got = append(got, fmt.Sprintf("%s %s %s %s", l.Client, l.Name, l.Addr, l.Rule))
	}
	slices.Sort(got)
	want := []string{"192.0.2.10 nas.lan 192.168.1.5 nas", "192.0.2.10 time.example.com 203.0.113.7 time"}
	if !slices.Equal(got, want) {
		t.Errorf("restored under the running policy:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// fillTable learns n items for distinct addresses, live for two days, and
// returns the next index to learn from.
func fillTable(tb *dnsfilter.Table, from, n int) int {
	exp := time.Now().Add(48 * time.Hour)
	for i := from; i < from+n; i++ {
		tb.Learn(dnsfilter.Learned{Client: netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 200)}), Name: fmt.Sprintf("host-%d.cdn.example.com", i),
			Addr: netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)}), Rule: "web", Expires: exp})
	}
	return from + n
}

// TestLearnedWriteBudget: a full table that changes all the time (a busy
// site) is written, over a simulated day of 30 s ticks, within the budget
// plus one file: not every 30 s (2,880 files a day), but every
// file-size-over-budget. The store's clock is the test's, its writes are
// Save into a counter. The table is a sixteenth of the default (4,096
// items) and so is the budget (64 MiB), so that the day runs in seconds
// under -race: the writes' spacing, size over budget, is the one of a
// full table of 65,536 items against 1 GiB. A file read at start counts
// as written then: the first write after a restart waits for it too.
func TestLearnedWriteBudget(t *testing.T) {
	const scale = 16
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tb := dnsfilter.NewTable(65536 / scale)
	next := 0
	for i := 0; tb.Len() < 65536/scale; i++ {
		if i > 64 {
			t.Fatalf("table at %d items, want %d", tb.Len(), 65536/scale)
		}
		next = fillTable(tb, next, 65536/scale)
	}
	clock := time.Unix(1_800_000_000, 0)
	s := newLearnedStore(t.TempDir(), tb, log)
	s.now = func() time.Time { return clock }
	s.budget = learnedWriteBudget / scale
	type write struct {
		at   time.Time
		size int64
	}
	var bytes, largest int64
	var writes []write
	s.write = func() (int, int64, error) {
		cw := &countingWriter{w: io.Discard}
		n, err := tb.Save(cw)
		bytes += cw.n
		largest = max(largest, cw.n)
		writes = append(writes, write{clock, cw.n})
		return n, cw.n, err
	}
	day := 24 * time.Hour
	for range int(day / learnedSaveInterval) {
		clock = clock.Add(learnedSaveInterval)
		next = fillTable(tb, next, 50) // new answers in every 30 s
		if err := s.tick(); err != nil {
			t.Fatal(err)
		}
	}
	if tb.Len() != 65536/scale {
		t.Fatalf("table at %d items at the end of the day, want it full (%d)", tb.Len(), 65536/scale)
	}
	if bytes > s.budget+largest {
		t.Errorf("%d bytes written in a day (%d writes of up to %d bytes), over the budget %d plus one file", bytes, len(writes), largest, s.budget)
	}
	// Not held back more than the budget asks either: each write comes
	// at the first tick its predecessor's size lets it, and so at the
	// README's interval of a full table (14 minutes).
	var longest time.Duration
	for i := 1; i < len(writes); i++ {
		gap, least := writes[i].at.Sub(writes[i-1].at), s.spacing(writes[i-1].size)
		if gap < least || gap >= least+learnedSaveInterval {
			t.Errorf("write %d came %s after the one before, of %d bytes; want the first tick from %s on", i, gap, writes[i-1].size, least)
		}
		longest = max(longest, gap)
	}
	if longest > 14*time.Minute {
		t.Errorf("writes up to %s apart, want at most the README's 14 minutes", longest)
	}
	t.Logf("%d writes of up to %d bytes, %d bytes in all, up to %s apart", len(writes), largest, bytes, longest)

	// A restart: the file read counts as written at the start.
	if _, _, err := s.writeFile(); err != nil {
		t.Fatal(err)
	}
	s2 := newLearnedStore(filepath.Dir(s.path), tb, log)
	s2.now, s2.budget = s.now, s.budget
	n := 0
	s2.write = func() (int, int64, error) { n++; return s.write() }
	if _, _, err := s2.load(); err != nil {
		t.Fatal(err)
	}
	start := clock
	for clock.Sub(start) < 20*time.Minute && n == 0 {
		clock = clock.Add(learnedSaveInterval)
		next = fillTable(tb, next, 50)
		s2.tick()
	}
	if d := clock.Sub(start); n != 1 || d < 13*time.Minute {
		t.Errorf("after a start that read a full file: %d writes, the first %s after it; want one after about 14 minutes", n, d)
	}
}

// TestLearnedSmallTablePrompt: a small table (a home, an office) is
// written at every 30 s tick in which it changed, as before the budget,
// from the first tick after a start on; a tick without a change writes
// nothing.
func TestLearnedSmallTablePrompt(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := t.TempDir()
	tb := dnsfilter.NewTable(0)
	next := fillTable(tb, 0, 200)
	if err := newLearnedStore(dir, tb, log).flush(learnedStopWait); err != nil { // the file of the last run
		t.Fatal(err)
	}
	clock := time.Unix(1_800_000_000, 0)
	tb = dnsfilter.NewTable(0) // a restart
	s := newLearnedStore(dir, tb, log)
	s.now = func() time.Time { return clock }
	var writes []int
	s.write = func() (int, int64, error) {
		cw := &countingWriter{w: io.Discard}
		n, err := tb.Save(cw)
		writes = append(writes, n)
		return n, cw.n, err
	}
	if n, _, err := s.load(); n != 200 || err != nil {
		t.Fatalf("load: %d, %v", n, err)
	}
	for i := range 20 {
		clock = clock.Add(learnedSaveInterval)
		if i%2 == 0 {
			next = fillTable(tb, next, 5)
		}
		if err := s.tick(); err != nil {
			t.Fatal(err)
		}
		if want := (i + 2) / 2; len(writes) != want {
			t.Fatalf("after tick %d: %d writes, want %d (one per tick with a change)", i+1, len(writes), want)
		}
	}
	if last := writes[len(writes)-1]; last != 250 {
		t.Errorf("the last write had %d items, want 250", last)
	}
}

// TestLearnedFlushStuckSave: a periodic write stuck in the kernel (a disk
// hung in fsync) does not hold the save at a clean stop, and so the stop,
// until systemd's SIGKILL: after its wait, flush gives up, writes nothing
// and says so. Once the stuck write has finished, flush writes again.
func TestLearnedFlushStuckSave(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	tb := dnsfilter.NewTable(0)
	fillTable(tb, 0, 3)
	s := newLearnedStore(t.TempDir(), tb, log)
	entered, release := make(chan struct{}, 4), make(chan struct{})
	writes := 0
	s.write = func() (int, int64, error) {
		writes++
		entered <- struct{}{}
		<-release
		return 3, 500, nil
	}
	ticked := make(chan error, 1)
	go func() { ticked <- s.tick() }()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the periodic write did not start")
	}
	done := make(chan error, 1)
	go func() { done <- s.flush(20 * time.Millisecond) }()
	select {
	case err := <-done:
		if !errors.Is(err, errLearnedStuck) {
			t.Errorf("flush behind a stuck write: %v, want errLearnedStuck", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("flush waited on the stuck write")
	}
	if writes != 1 {
		t.Errorf("%d writes, want the stuck one alone", writes)
	}
	if !strings.Contains(logs.String(), "has not finished (a hung disk?)") {
		t.Errorf("no line on the stuck save:\n%s", logs.String())
	}
	close(release)
	if err := <-ticked; err != nil {
		t.Fatal(err)
	}
	if err := s.flush(learnedStopWait); err != nil || writes != 2 {
		t.Errorf("flush after the stuck write finished: %v, %d writes; want a second", err, writes)
	}
}

// TestLearnedRefusedKeptEach: each file load refused is kept, under a
// name of its own that the error names: a second refusal (the clock back
// again, a later bad save) does not overwrite the first's evidence.
// Before, both went to learned.ndjson.refused, the second over the first.
func TestLearnedRefusedKeptEach(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var names []string
	for i := range 2 {
		body := fmt.Sprintf("\x00garbage %d", i)
		if err := os.WriteFile(filepath.Join(dir, learnedFileName), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := newLearnedStore(dir, dnsfilter.NewTable(0), log).load()
		if err == nil {
			t.Fatalf("refusal %d: the garbage loaded", i)
		}
		var kept string
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if b, _ := os.ReadFile(filepath.Join(dir, e.Name())); string(b) == body && e.Name() != learnedFileName {
				kept = e.Name()
			}
		}
		if kept == "" || !strings.Contains(err.Error(), "kept as "+kept) {
			t.Errorf("refusal %d: kept as %q; error: %v", i, kept, err)
		}
		names = append(names, kept)
	}
	if names[0] == names[1] {
		t.Errorf("both refused files under one name %q", names[0])
	}
}
