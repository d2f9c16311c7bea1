package audit

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestArchiveNewerLostCounted: while a newer egressd's summary is left
// in place (a rollback), rotation deletes files without adding them to
// any summary; egress_audit_summary_lost_files_total counts them, as it
// counts every file deleted without its counts in the summary, so an
// alert on it sees a rollback that is left in place.
func TestArchiveNewerLostCounted(t *testing.T) {
	dir := t.TempDir()
	for i := range 3 {
		writeLogFile(t, dir, rotatedName(t0.Add(time.Duration(i+1)*time.Minute)), []Event{seqEvent(i+1, t0.Add(time.Duration(i)*time.Minute))})
	}
	writeLogFile(t, dir, CurrentLog, nil)
	body := fmt.Sprintf(`{"version":%d,"files":9,"events":900}`, archiveVersion+1)
	if err := os.WriteFile(filepath.Join(dir, ArchiveFile), []byte(body), 0o640); err != nil {
		t.Fatal(err)
	}
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFiles: 1, Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	reg := prometheus.NewRegistry()
	if err := j.RegisterMetrics(reg); err != nil {
		t.Fatal(err)
	}
	j.folds.Add(1)
	j.fold()
	if files, _ := LogFiles(dir); len(files) != 2 {
		t.Fatalf("%d files left, want 1 rotated + current (the test proves nothing)", len(files))
	}
	if v := metricValue(t, reg, "egress_audit_summary_lost_files_total"); v != 2 {
		t.Errorf("lost files %v, want 2 (deleted without their counts in a summary)", v)
	}
}
