package audit

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestJournalReopenTornLine: the log opened again by its name after the
// directory was read-only (a filesystem mounted anew, whose last write
// reached the disk in part: its log ends in a partial line) gets the
// next event on a line of its own, not joined to the fragment. It failed
// before: the reopen saw the partial line only after the lines to write
// were put together, so the first event went onto the fragment's line,
// unreadable, though counted as written.
func TestJournalReopenTornLine(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	dir, _ := roMount(t, func(dir string) {
		b, _ := evs[0].appendJSON(nil)
		if err := os.WriteFile(filepath.Join(dir, CurrentLog), b, 0o640); err != nil {
			t.Fatal(err)
		}
	})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, Background: true, Logger: slog.New(slog.DiscardHandler)}, NewLedger(eng, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	waitFor(t, j.running.Load)
	waitFor(t, func() bool { return !j.loading.Load() })
	ev := evs[2]
	ev.ClientPort = 1000
	j.Emit(ev)
	j.Sync(5 * time.Second)
	if j.Err() == nil {
		t.Fatal("no error on the read-only directory")
	}
	// Mounted anew: the log ends in the first part of a line.
	if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v: %s", err, out)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v: %s", err, out)
	}
	first, _ := evs[0].appendJSON(nil)
	torn := append(bytes.Clone(first), first[:len(first)/2]...)
	if err := os.WriteFile(filepath.Join(dir, CurrentLog), torn, 0o640); err != nil {
		t.Fatal(err)
	}
	ev.ClientPort = 2000
	j.Emit(ev)
	j.Sync(5 * time.Second)
	if err := j.Err(); err != nil {
		t.Errorf("Err() = %v on the new mount", err)
	}
	j.Close()
	<-runDone
	f, err := os.Open(filepath.Join(dir, CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ports []uint16
	skipped, _, err := ReadEvents(f, func(e Event) { ports = append(ports, e.ClientPort) })
	if err != nil || skipped != 1 || len(ports) != 2 || ports[1] != 2000 {
		b, _ := os.ReadFile(filepath.Join(dir, CurrentLog))
		t.Errorf("the log after the reopen: ports %v, %d lines skipped (%v), want the earlier event, the fragment skipped and the new one:\n%s", ports, skipped, err, b)
	}
}
