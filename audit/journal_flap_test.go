package audit

import (
	"context"
	"log/slog"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestJournalFlappingFailureLogsOnce: a failure that alternates with
// writes that work (here a rotation whose rename fails, the directory
// immutable, while appends to the open file go on) is said in one line
// per 10 s, not in a pair of lines ("write failed", "written again") at
// every flush. It failed before: each flush wrote (written again) and
// rotated (failed), two lines every half flush interval.
func TestJournalFlappingFailureLogsOnce(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	dir := tmpfsDir(t, "size=4m,mode=0700")
	t.Cleanup(func() { exec.Command("chattr", "-i", dir).Run() }) // before the unmount (cleanups run last first)
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
	if out, err := exec.Command("chattr", "+i", dir).CombinedOutput(); err != nil {
		t.Fatalf("chattr +i: %v: %s", err, out)
	}
	for i := 0; i < 15; i++ {
		ev := evs[2]
		ev.ClientPort = uint16(1000 + i)
		j.Emit(ev)
		j.Sync(5 * time.Second)
	}
	if j.Err() == nil || !strings.Contains(j.Err().Error(), "operation not permitted") {
		t.Fatalf("Err() = %v, want the rename's EPERM", j.Err())
	}
	failed, again := strings.Count(logs.String(), "event log write failed"), strings.Count(logs.String(), "event log written again")
	if failed != 1 || again > 1 {
		t.Errorf("%d lines say the write failed, %d that it is written again; want 1 and at most 1:\n%s", failed, again, logs.String())
	}
}
