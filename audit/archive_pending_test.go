package audit

import (
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestArchivePendingAfterRestart: rotated files a failed summary write
// left past MaxFiles are still pending after a restart, and the gauge
// says so from the start, not only after the next rotation's fold (an
// alert on it must not clear because the daemon restarted).
func TestArchivePendingAfterRestart(t *testing.T) {
	dir := t.TempDir()
	for i := range 3 {
		writeLogFile(t, dir, rotatedName(t0.Add(time.Duration(i+1)*time.Minute)), []Event{seqEvent(i+1, t0.Add(time.Duration(i)*time.Minute))})
	}
	writeLogFile(t, dir, CurrentLog, nil)
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFiles: 1, Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	reg := prometheus.NewRegistry()
	if err := j.RegisterMetrics(reg); err != nil {
		t.Fatal(err)
	}
	if g := metricValue(t, reg, "egress_audit_summary_pending_files"); g != 2 {
		t.Errorf("pending files gauge %v after a restart with 3 rotated files and MaxFiles 1, want 2", g)
	}
}
