package audit

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestJournalReadOnlyDirNoLog: a read-only state directory that holds no
// event log yet (a new image, one with the CA alone) opens as one with a
// log does, read in the background as egressd reads it: the read ends
// whole (LoadErr nil: /readyz does not say "event log read failed"), no
// line says the events written during it could not be read back. It
// failed before: readTail's open of the missing file made the read's
// error.
func TestJournalReadOnlyDirNoLog(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	evs := fixtureEvents(t, eng)
	dir, _ := roMount(t, func(string) {})
	var logs syncBuffer
	l := NewLedger(eng, LedgerOptions{})
	var loadErr error
	loaded := make(chan struct{})
	j, _, err := OpenJournal(JournalConfig{Dir: dir, Background: true, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		LoadDone: func(_ LoadStats, _ time.Duration, err error) { loadErr = err; close(loaded) }}, l)
	if err != nil {
		t.Fatalf("open on a read-only directory: %v", err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- j.Run(context.Background()) }()
	select {
	case <-loaded:
	case <-time.After(10 * time.Second):
		t.Fatal("the background read did not end in 10 s")
	}
	// After the read (one emitted during it is held and counted after
	// it: TestJournalReadOnlyDirDuringRead).
	waitFor(t, func() bool { return !j.loading.Load() })
	j.Emit(evs[2])
	if loadErr != nil || j.LoadErr() != nil {
		t.Errorf("the read of an absent log: %v, LoadErr() = %v; want none", loadErr, j.LoadErr())
	}
	j.Sync(5 * time.Second)
	if got := l.Report(ReportOptions{}).Totals.Events; got != 1 {
		t.Errorf("the ledger counts %d events, want 1", got)
	}
	j.Close()
	<-runDone
	if strings.Contains(logs.String(), "could not be read") {
		t.Errorf("a line says the log could not be read:\n%s", logs.String())
	}
}
