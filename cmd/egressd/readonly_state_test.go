package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/dnsfilter"
	"egressd/policy"
)

// roStateDir mounts a tmpfs on a new directory, fills it with fill,
// and remounts it read-only (a card the kernel remounted read-only
// after I/O errors); writable remounts it read-write. The mount goes at
// cleanup.
func roStateDir(t *testing.T, fill func(dir string)) (dir string, writable func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("a tmpfs mount needs root")
	}
	dir = t.TempDir()
	mount := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
	mount("-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs", dir)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	fill(dir)
	mount("-o", "remount,ro", dir)
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); err == nil {
		t.Fatal("the tmpfs is writable after remount,ro")
	}
	return dir, func() { mount("-o", "remount,rw", dir) }
}

// TestLearnedReadOnlyStateDir: the learned-address table on a state
// directory read-only at the start. The start restores the table's file
// (reading works), says once that the table cannot be written (the
// start's probe), and the periodic saves that fail while it stays so say
// nothing more; nothing is written. Once the directory is writable the
// next save writes the table, with what was learned meanwhile, and says
// so once.
func TestLearnedReadOnlyStateDir(t *testing.T) {
	a := netip.MustParseAddr
	exp := time.Now().Add(time.Hour)
	first := dnsfilter.Learned{Client: a("192.0.2.10"), Name: "time.example.com", Addr: a("203.0.113.7"), Rule: "time", Expires: exp}
	later := dnsfilter.Learned{Client: a("192.0.2.10"), Name: "time.example.com", Addr: a("203.0.113.8"), Rule: "time", Expires: exp}
	var fileBefore []byte
	dir, writable := roStateDir(t, func(dir string) {
		old := dnsfilter.NewTable(0)
		old.Learn(first)
		if err := newLearnedStore(dir, old, slog.New(slog.DiscardHandler)).flush(learnedStopWait); err != nil {
			t.Fatal(err)
		}
		fileBefore, _ = os.ReadFile(filepath.Join(dir, learnedFileName))
	})
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n"+
		"  - {name: time, to: [time.example.com], ports: [123/udp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	var logs, out bytes.Buffer
	d := &daemon{cfg: runConfig{stateDir: dir}, log: slog.New(slog.NewTextHandler(&logs, nil)), out: &out,
		store: policy.NewStore(eng), degraded: map[string]string{}}
	tb := dnsfilter.NewTable(0)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	d.restoreLearned(ctx, &wg, tb, dnsfilter.Config{})
	cancel()
	wg.Wait()
	if tb.Len() != 1 {
		t.Errorf("restored %d items from the read-only directory, want 1\n%s", tb.Len(), out.String())
	}
	if !strings.Contains(out.String(), "warning: learned addresses:") || !strings.Contains(out.String(), "read-only file system") {
		t.Errorf("the start does not say the table cannot be written:\n%s", out.String())
	}
	s := d.learned
	// A clock past the write budget's spacing: each tick may write.
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); now = now.Add(time.Minute); return now }
	tb.Learn(later)
	for i := range 3 {
		if err := s.tick(); err == nil {
			t.Fatalf("save %d on the read-only directory worked", i)
		}
	}
	if n := strings.Count(logs.String(), "cannot write the table"); n != 1 {
		t.Errorf("%d lines say the table cannot be written (the start's and 3 saves), want 1:\n%s", n, logs.String())
	}
	if b, _ := os.ReadFile(filepath.Join(dir, learnedFileName)); !bytes.Equal(b, fileBefore) {
		t.Errorf("the table's file changed on the read-only directory")
	}

	writable()
	if err := s.tick(); err != nil {
		t.Fatalf("save once the directory is writable: %v", err)
	}
	if n := strings.Count(logs.String(), "writing the table to the state directory again"); n != 1 {
		t.Errorf("%d lines say the table is written again, want 1:\n%s", n, logs.String())
	}
	tb2 := dnsfilter.NewTable(0)
	if n, _, err := newLearnedStore(dir, tb2, slog.New(slog.DiscardHandler)).load(); n != 2 || err != nil {
		t.Errorf("the file once writable: %d items, %v; want the restored one and the one learned since", n, err)
	}
}

// TestPolicyCopyReadOnlyStateDir: the policy's copy (policy.yaml,
// policy.source) on a state directory read-only at the start: the start
// says once it cannot keep the copy and goes on; the directory is left
// as it was (the earlier run's copy, which `egressd report --state-dir`
// reads); the next save (a reload) once it is writable writes the
// running policy's copy.
func TestPolicyCopyReadOnlyStateDir(t *testing.T) {
	oldSrc := []byte("version: 1\nmode: audit\nrules:\n  - {name: old, to: [old.example.com], ports: [443/tcp]}\n")
	newSrc := []byte("version: 1\nmode: audit\nrules:\n  - {name: new, to: [new.example.com], ports: [443/tcp]}\n")
	dir, writable := roStateDir(t, func(dir string) {
		if err := os.WriteFile(filepath.Join(dir, runningPolicyFile), oldSrc, 0o640); err != nil {
			t.Fatal(err)
		}
	})
	var logs bytes.Buffer
	d := &daemon{cfg: runConfig{stateDir: dir}, log: slog.New(slog.NewTextHandler(&logs, nil)), out: io.Discard,
		src: newSrc, source: "/etc/egressd/policy.yaml", degraded: map[string]string{}}
	d.savePolicy(false)
	if n := strings.Count(logs.String(), "cannot keep a copy of the policy"); n != 1 || !strings.Contains(logs.String(), "read-only file system") {
		t.Errorf("%d lines say the copy cannot be kept (want 1, with the errno):\n%s", n, logs.String())
	}
	if b, _ := os.ReadFile(filepath.Join(dir, runningPolicyFile)); !bytes.Equal(b, oldSrc) {
		t.Errorf("the copy on the read-only directory: %q, want the earlier run's", b)
	}
	writable()
	logs.Reset()
	d.savePolicy(false)
	if strings.Contains(logs.String(), "cannot keep") {
		t.Errorf("the save once writable failed:\n%s", logs.String())
	}
	if b, _ := os.ReadFile(filepath.Join(dir, runningPolicyFile)); !bytes.Equal(b, newSrc) {
		t.Errorf("the copy once writable: %q, want the running policy", b)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, runningSourceFile)); string(b) != "/etc/egressd/policy.yaml\n" {
		t.Errorf("%s once writable: %q", runningSourceFile, b)
	}
}
