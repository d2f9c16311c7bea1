package audit

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
)

// fullTmpfs mounts a small tmpfs (root only) and returns it and a
// function that fills it until a write gives ENOSPC, and one that frees
// it again.
func fullTmpfs(t *testing.T) (dir string, fill, free func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("needs root to mount a tmpfs; CI must run it as root")
		}
		t.Skip("needs root to mount a tmpfs")
	}
	dir = t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	path := filepath.Join(dir, "fill")
	fill = func() {
		t.Helper()
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for range 64 { // 64 KiB at most, in 1 KiB steps
			if _, err := f.Write(make([]byte, 1024)); errors.Is(err, syscall.ENOSPC) {
				return
			} else if err != nil {
				t.Fatal(err)
			}
		}
		t.Fatal("the tmpfs did not fill")
	}
	free = func() { os.Remove(path) }
	return dir, fill, free
}

// TestArchiveWriteFails: when the summary cannot be written (a full
// state directory), the rotated file is kept, not deleted with its
// counts: at most two past MaxFiles, /readyz's check (FoldErr) and the
// pending-files gauge say so, and the next rotation's fold adds it once
// there is room. Beyond two, the oldest is deleted, counted as lost.
func TestArchiveWriteFails(t *testing.T) {
	for _, rotated := range []int{3, 5} {
		dir, fill, free := fullTmpfs(t)
		var files []string
		for i := range rotated {
			name := rotatedName(t0.Add(time.Duration(i+1) * time.Minute))
			writeLogFile(t, dir, name, []Event{seqEvent(i+1, t0.Add(time.Duration(i)*time.Minute))})
			files = append(files, filepath.Join(dir, name))
		}
		writeLogFile(t, dir, CurrentLog, nil)
		var logs syncBuffer
		j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFiles: 1, Logger: slog.New(slog.NewTextHandler(&logs, nil))}, NewLedger(nil, LedgerOptions{}))
		if err != nil {
			t.Fatal(err)
		}
		defer j.Close()
		reg := prometheus.NewRegistry()
		if err := j.RegisterMetrics(reg); err != nil {
			t.Fatal(err)
		}
		left := func() (n int) {
			for _, f := range files {
				if _, err := os.Stat(f); err == nil {
					n++
				}
			}
			return n
		}
		fill()
		j.folds.Add(1)
		j.fold()
		lost := metricValue(t, reg, "egress_audit_summary_lost_files_total")
		if rotated == 3 {
			// 2 past the limit: both kept, no count lost.
			if n := left(); n != 3 || lost != 0 {
				t.Errorf("%d of 3 rotated files left, %v lost, with a summary that cannot be written; want 3 (1 + 2 pending), 0", n, lost)
			}
			if err := j.FoldErr(); err == nil || !strings.Contains(err.Error(), "no space") {
				t.Errorf("FoldErr = %v, want the write's ENOSPC", err)
			}
			if g := metricValue(t, reg, "egress_audit_summary_pending_files"); g != 2 {
				t.Errorf("pending files gauge %v, want 2", g)
			}
			if !strings.Contains(logs.String(), "kept it, the next rotation tries again") {
				t.Errorf("logs do not say the file was kept:\n%s", logs.String())
			}
		} else {
			// 4 past the limit: the oldest goes, lost (the room it frees
			// may let the next fold through).
			if n := left(); n > 3 || lost < 1 || lost > 2 {
				t.Errorf("%d of 5 rotated files left, %v lost; want at most 3, 1 or 2", n, lost)
			}
			if !strings.Contains(logs.String(), "its counts are lost") {
				t.Errorf("logs do not say a file's counts were lost:\n%s", logs.String())
			}
		}

		free()
		j.folds.Add(1)
		j.fold()
		if n := left(); n != 1 || j.FoldErr() != nil {
			t.Errorf("after freeing room: %d rotated files left, FoldErr %v; want 1, nil", n, j.FoldErr())
		}
		if g := metricValue(t, reg, "egress_audit_summary_pending_files"); g != 0 {
			t.Errorf("pending files gauge %v after the fold, want 0", g)
		}
		l, _, err := LoadDir(dir, nil, LedgerOptions{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		if r := l.Report(ReportOptions{}); r.Totals.Flows != uint64(rotated)-uint64(lost) {
			t.Errorf("%d flows after a restart, want %d (%d less the %v lost)", r.Totals.Flows, rotated-int(lost), rotated, lost)
		}
		j.Close()
	}
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() != name {
				continue
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
