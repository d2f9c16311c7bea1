package audit

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestJournalRotateOpenFailLogged: a rotation that renamed the current
// file and could not make the new one (no free inode: ENOSPC) is said
// in a log line, once, and writing again is said once it can. It failed
// before: the rotation set the error without a line, and every later
// open failed with the same errno, which the line-per-failure rule took
// for the failure already said: nothing in the log, ever.
func TestJournalRotateOpenFailLogged(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	dir := tmpfsDir(t, "size=4m,nr_inodes=16,mode=0700")
	var logs syncBuffer
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 100, DetailBurst: -1,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}, NewLedger(eng, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	defer func() {
		j.Close()
		<-runDone
	}()
	waitFor(t, j.running.Load)
	// Every free inode taken: a rename works, a new file does not.
	var fillers []string
	for i := 0; i < 32; i++ {
		p := filepath.Join(dir, fmt.Sprintf("filler%d", i))
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			break
		}
		fillers = append(fillers, p)
	}
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); err == nil {
		t.Fatal("the tmpfs has a free inode after the fill")
	}
	port := uint16(1000)
	emit := func() {
		ev := evs[2]
		ev.ClientPort = port
		port++
		j.Emit(ev)
		j.Sync(5 * time.Second)
	}
	for i := 0; i < 20 && j.Err() == nil; i++ {
		emit()
	}
	if err := j.Err(); err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("Err() = %v after a rotation without a free inode, want ENOSPC", err)
	}
	for i := 0; i < 5; i++ {
		emit()
	}
	if n := strings.Count(logs.String(), "no space left on device"); n != 1 {
		t.Errorf("%d log lines say the new file could not be made, want 1:\n%s", n, logs.String())
	}
	os.Remove(fillers[0])
	emit()
	if err := j.Err(); err != nil {
		t.Errorf("Err() = %v with an inode free", err)
	}
	if !strings.Contains(logs.String(), "event log written again") {
		t.Errorf("no line says the log is written again:\n%s", logs.String())
	}
}
