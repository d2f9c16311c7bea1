package main

import (
	"bytes"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/dnsfilter"
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
	if n, err := s.load(); n != 0 || err != nil {
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
	if n, err := newLearnedStore(dir, tb2, log).load(); n != 1 || err != nil {
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
		go func() { n, err = newLearnedStore(d, tb, log).load(); close(done) }()
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
	if n, err := newLearnedStore(dir, tb2, log).load(); n != 1 || err != nil {
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
