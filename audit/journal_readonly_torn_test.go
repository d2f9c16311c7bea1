package audit

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestJournalReadOnlyDirTornLine: a read-only state directory whose event
// log ends in a torn line (a crash mid-write, then the card remounted
// read-only) opens without Background as with it (a bench tool, any
// caller that reads the log at the open): the whole events are read, the
// fragment is skipped, nothing on disk changes, what cannot be written is
// counted, and once the directory is writable the next event goes on a
// line of its own after the fragment. It failed before without
// Background: the read's cut of the fragment (a truncate) failed with
// EROFS and the open returned "audit: repair event log: ...".
func TestJournalReadOnlyDirTornLine(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	first, _ := evs[0].appendJSON(nil)
	second, _ := evs[1].appendJSON(nil)
	old := append(bytes.Clone(first), second[:len(second)/2]...)
	for _, bg := range []bool{false, true} {
		dir, writable := roMount(t, func(dir string) {
			if err := os.WriteFile(filepath.Join(dir, CurrentLog), old, 0o640); err != nil {
				t.Fatal(err)
			}
		})
		var logs syncBuffer
		l := NewLedger(eng, LedgerOptions{})
		loaded := make(chan LoadStats, 1)
		j, st, err := OpenJournal(JournalConfig{Dir: dir, Background: bg, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
			LoadDone: func(st LoadStats, _ time.Duration, _ error) { loaded <- st }}, l)
		if err != nil {
			t.Fatalf("background %v: open on a read-only directory whose log ends in a torn line: %v", bg, err)
		}
		runDone := make(chan error, 1)
		go func() { runDone <- j.Run(context.Background()) }()
		waitFor(t, j.running.Load)
		if bg {
			st = <-loaded
			// LoadDone is called before the read counts as ended, and
			// Sync does not wait while it has not (CI once: 1 event
			// counted, none write-failed).
			j.waitLoaded(time.Minute)
		}
		if st.Events != 1 || !st.Torn {
			t.Errorf("background %v: the read: %+v; want the 1 whole event, the torn line seen", bg, st)
		}
		if err := j.Err(); err == nil || !strings.Contains(err.Error(), "read-only file system") {
			t.Errorf("background %v: Err() = %v, want \"read-only file system\"", bg, err)
		}
		if j.LoadErr() != nil {
			t.Errorf("background %v: LoadErr() = %v, want none", bg, j.LoadErr())
		}
		ev := evs[2]
		ev.ClientPort = 1000
		j.Emit(ev)
		j.Sync(5 * time.Second)
		if got := l.Report(ReportOptions{}).Totals.Events; got != 2 {
			t.Errorf("background %v: the ledger counts %d events, want 2 (1 earlier, 1 now)", bg, got)
		}
		if j.WriteFailed() != 1 {
			t.Errorf("background %v: WriteFailed() = %d, want 1", bg, j.WriteFailed())
		}
		if b, _ := os.ReadFile(filepath.Join(dir, CurrentLog)); !bytes.Equal(b, old) {
			t.Errorf("background %v: the log changed on a read-only directory: %q", bg, b)
		}
		writable()
		ev.ClientPort = 2000
		j.Emit(ev)
		j.Sync(5 * time.Second)
		if err := j.Err(); err != nil {
			t.Errorf("background %v: Err() = %v once the directory is writable", bg, err)
		}
		j.Close()
		if err := <-runDone; err != nil {
			t.Errorf("background %v: close: %v", bg, err)
		}
		f, err := os.Open(filepath.Join(dir, CurrentLog))
		if err != nil {
			t.Fatal(err)
		}
		var ports []uint16
		skipped, _, err := ReadEvents(f, func(e Event) { ports = append(ports, e.ClientPort) })
		f.Close()
		if err != nil || skipped != 1 || len(ports) != 2 || ports[0] != evs[0].ClientPort || ports[1] != 2000 {
			b, _ := os.ReadFile(filepath.Join(dir, CurrentLog))
			t.Errorf("background %v: the log once writable: ports %v, %d lines skipped (%v); want the earlier event, the fragment skipped, the new one:\n%s", bg, ports, skipped, err, b)
		}
	}
}
