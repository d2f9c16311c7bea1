package main

import (
	"bytes"
	"context"
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
	if err := s.save(false); err != nil {
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
	if err := s.save(false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err == nil {
		t.Error("an unchanged table was written again")
	}
	if err := s.save(true); err != nil {
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
		_, refused := os.Lstat(filepath.Join(d, learnedFileName+learnedRefusedSuffix))
		if want := name == "garbage"; (refused == nil) != want {
			t.Errorf("%s: a %s copy kept: %v, want %v", name, learnedRefusedSuffix, refused == nil, want)
		}
	}

	// A state directory under a file: every write fails, logged once.
	notDir := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notDir, nil, 0o600)
	logs.Reset()
	bad := newLearnedStore(filepath.Join(notDir, "state"), tb, log)
	for range 3 {
		if err := bad.save(true); err == nil {
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
	if err := newLearnedStore(dir, tb, log).save(true); err != nil {
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
	if err := newLearnedStore(dir, old, log).save(true); err != nil {
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
