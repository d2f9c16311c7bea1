package audit

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tmpfsDir mounts a tmpfs with the mount options opts on a new directory
// and unmounts it at cleanup (lazily, and failing the test, when it is
// busy).
func tmpfsDir(t *testing.T, opts string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("a tmpfs mount needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", opts, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs -o %s: %v: %s", opts, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	return dir
}

// roMount mounts a tmpfs on a new directory (tmpfsDir), fills it with
// fill, and remounts it read-only; the returned function remounts it
// read-write. The mount goes at cleanup.
func roMount(t *testing.T, fill func(dir string)) (dir string, writable func()) {
	t.Helper()
	dir = tmpfsDir(t, "size=4m,mode=0700")
	remount := func(opts string) {
		t.Helper()
		if out, err := exec.Command("mount", "-o", opts, dir).CombinedOutput(); err != nil {
			t.Fatalf("mount -o %s: %v: %s", opts, err, out)
		}
	}
	fill(dir)
	remount("remount,ro")
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); err == nil {
		t.Fatal("the tmpfs is writable after remount,ro")
	}
	return dir, func() { remount("remount,rw") }
}

// TestJournalReadOnlyDir: a state directory read-only at the open. The
// journal opens (the earlier events are read into the ledger), counts
// what it cannot write (Err, WriteFailed), says so in one log line, not
// one per flush, changes nothing on disk, and writes again, after the
// earlier events, once the directory is writable. It failed before: the
// open returned the error, and egressd ran with a ledger in memory only
// until a restart.
func TestJournalReadOnlyDir(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	var old []byte
	dir, writable := roMount(t, func(dir string) {
		j, _, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
		done := make(chan error, 1)
		go func() { done <- j.Run(context.Background()) }()
		waitFor(t, j.running.Load)
		j.Emit(evs[0])
		j.Emit(evs[1])
		j.Sync(5 * time.Second)
		j.Close()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		var err error
		if old, err = os.ReadFile(filepath.Join(dir, CurrentLog)); err != nil || bytes.Count(old, []byte("\n")) != 2 {
			t.Fatalf("the first run's log: %v %q", err, old)
		}
	})
	for _, bg := range []bool{true, false} {
		var logs syncBuffer
		l := NewLedger(eng, LedgerOptions{})
		j, st, err := OpenJournal(JournalConfig{Dir: dir, Background: bg, Logger: slog.New(slog.NewTextHandler(&logs, nil))}, l)
		if err != nil {
			t.Fatalf("background %v: open on a read-only directory: %v", bg, err)
		}
		if !bg && st.Events != 2 {
			t.Errorf("read %d earlier events, want 2", st.Events)
		}
		if err := j.Err(); err == nil || !strings.Contains(err.Error(), "read-only file system") || !strings.Contains(err.Error(), dir) {
			t.Errorf("background %v: Err() = %v at the open, want the path and \"read-only file system\"", bg, err)
		}
		runDone := make(chan error, 1)
		go func() { runDone <- j.Run(context.Background()) }()
		waitFor(t, j.running.Load)
		if bg {
			waitFor(t, func() bool { return !j.loading.Load() })
		}
		// Events in several flushes: one line says so.
		for i := 0; i < 5; i++ {
			ev := evs[2]
			ev.ClientPort = uint16(1000 + i)
			j.Emit(ev)
			j.Sync(5 * time.Second)
		}
		if got := l.Report(ReportOptions{}).Totals.Events; got != 7 {
			t.Errorf("background %v: the ledger counts %d events, want 7 (2 earlier, 5 now)", bg, got)
		}
		if j.WriteFailed() != 5 {
			t.Errorf("background %v: WriteFailed() = %d, want 5", bg, j.WriteFailed())
		}
		if n := strings.Count(logs.String(), "read-only file system"); n != 1 {
			t.Errorf("background %v: %d log lines say the directory is read-only, want 1:\n%s", bg, n, logs.String())
		}
		if b, _ := os.ReadFile(filepath.Join(dir, CurrentLog)); !bytes.Equal(b, old) {
			t.Errorf("background %v: the log changed on a read-only directory: %q", bg, b)
		}
		if bg {
			j.Close()
			<-runDone
			continue
		}
		writable()
		ev := evs[2]
		ev.ClientPort = 2000
		j.Emit(ev)
		j.Sync(5 * time.Second)
		if err := j.Err(); err != nil {
			t.Errorf("Err() = %v once the directory is writable", err)
		}
		j.Close()
		if err := <-runDone; err != nil {
			t.Errorf("close: %v", err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, CurrentLog))
		if !bytes.HasPrefix(b, old) || bytes.Count(b, []byte("\n")) != 3 || !bytes.Contains(b, []byte(`"client_port":2000`)) {
			t.Errorf("the log once writable: %q, want the 2 earlier events and the new one", b)
		}
		if !strings.Contains(logs.String(), "event log written again") {
			t.Errorf("no line says the log is written again:\n%s", logs.String())
		}
	}
}
