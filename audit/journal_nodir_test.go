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

// TestJournalMissingDirReadOnlyParent: a state directory that does not
// exist and cannot be made (its parent is read-only) opens as a
// read-only one does (TestJournalReadOnlyDir): Err names the directory
// and the errno, what is not written is counted and said in one log
// line, and once the parent is writable the next flush makes the
// directory and writes the log. It failed before: the open returned
// the mkdir's error (egressd ran with a ledger in memory only until a
// restart).
func TestJournalMissingDirReadOnlyParent(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	for _, bg := range []bool{true, false} {
		parent, writable := roMount(t, func(string) {})
		dir := filepath.Join(parent, "state")
		var logs syncBuffer
		l := NewLedger(eng, LedgerOptions{})
		j, _, err := OpenJournal(JournalConfig{Dir: dir, Background: bg, Logger: slog.New(slog.NewTextHandler(&logs, nil))}, l)
		if err != nil {
			t.Fatalf("background %v: open with a read-only parent: %v", bg, err)
		}
		if err := j.Err(); err == nil || !strings.Contains(err.Error(), "read-only file system") || !strings.Contains(err.Error(), dir) {
			t.Errorf("background %v: Err() = %v at the open, want the path %s and \"read-only file system\"", bg, err, dir)
		}
		runDone := make(chan error, 1)
		go func() { runDone <- j.Run(context.Background()) }()
		waitFor(t, j.running.Load)
		waitFor(t, func() bool { return !j.loading.Load() })
		if err := j.LoadErr(); err != nil {
			t.Errorf("background %v: LoadErr() = %v: no directory is an empty log", bg, err)
		}
		for i := 0; i < 3; i++ {
			ev := evs[2]
			ev.ClientPort = uint16(1000 + i)
			j.Emit(ev)
			j.Sync(5 * time.Second)
		}
		if got := l.Report(ReportOptions{}).Totals.Events; got != 3 {
			t.Errorf("background %v: the ledger counts %d events, want 3", bg, got)
		}
		if j.WriteFailed() != 3 {
			t.Errorf("background %v: WriteFailed() = %d, want 3", bg, j.WriteFailed())
		}
		if n := strings.Count(logs.String(), "read-only file system"); n != 1 {
			t.Errorf("background %v: %d log lines say the directory cannot be made, want 1:\n%s", bg, n, logs.String())
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("background %v: %s exists on a read-only parent", bg, dir)
		}
		writable()
		ev := evs[2]
		ev.ClientPort = 2000
		j.Emit(ev)
		j.Sync(5 * time.Second)
		if err := j.Err(); err != nil {
			t.Errorf("background %v: Err() = %v once the parent is writable", bg, err)
		}
		j.Close()
		if err := <-runDone; err != nil {
			t.Errorf("background %v: close: %v", bg, err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, CurrentLog))
		if bytes.Count(b, []byte("\n")) != 1 || !bytes.Contains(b, []byte(`"client_port":2000`)) {
			t.Errorf("background %v: the log once writable: %q, want the new event", bg, b)
		}
		if !strings.Contains(logs.String(), "event log written again") {
			t.Errorf("background %v: no line says the log is written again:\n%s", bg, logs.String())
		}
		if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o750 {
			t.Errorf("background %v: the directory made: %v %v, want mode 0750", bg, fi, err)
		}
	}
}
