package audit

import (
	"bytes"
	"compress/gzip"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeEventsFile writes evs as an events file at path, gzipped when the
// name ends in .gz.
func writeEventsFile(t *testing.T, path string, evs []Event) {
	t.Helper()
	var b bytes.Buffer
	for _, ev := range evs {
		line, err := jsonLine(ev)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(line)
	}
	data := b.Bytes()
	if strings.HasSuffix(path, ".gz") {
		var z bytes.Buffer
		zw := gzip.NewWriter(&z)
		zw.Write(data)
		zw.Close()
		data = z.Bytes()
	}
	if err := os.WriteFile(path, data, 0o640); err != nil {
		t.Fatal(err)
	}
}

// countDir reads dir as each reader does and returns the events each saw.
func countDir(t *testing.T, dir string) (readDirN, loadN, replayN int, st LoadStats) {
	t.Helper()
	st, _, err := readDirForTest(dir, func(Event) { readDirN++ })
	if err != nil {
		t.Fatalf("readDir: %v", err)
	}
	l, lst, err := LoadDir(dir, nil, LedgerOptions{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("LoadDir: %v", err)
	}
	loadN = int(lst.Events)
	n := 0
	if err := l.history(context.Background(), time.Time{}, func(Event) { n++ }); err != nil || n != loadN {
		t.Errorf("LoadDir's history read %d events (%v), its load %d", n, err, loadN)
	}
	if _, _, err := readPath(dir, func(Event) { replayN++ }); err != nil {
		t.Fatalf("readPath: %v", err)
	}
	return readDirN, loadN, replayN, st
}

// TestReadsCompressedRotated: a gzipped rotated file is read as the plain
// one it was, by every reader, in its place in time.
func TestReadsCompressedRotated(t *testing.T) {
	dir := t.TempDir()
	var evs []Event
	for i := range 300 {
		evs = append(evs, seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
	}
	writeEventsFile(t, filepath.Join(dir, rotatedName(t0.Add(100*time.Second))+gzSuffix), evs[:100])
	writeEventsFile(t, filepath.Join(dir, rotatedName(t0.Add(200*time.Second))), evs[100:200])
	writeEventsFile(t, filepath.Join(dir, CurrentLog), evs[200:])
	a, b, c, st := countDir(t, dir)
	if a != 300 || b != 300 || c != 300 || st.Files != 3 {
		t.Errorf("readDir %d, LoadDir %d, replay %d events of %d files; want 300 of 3", a, b, c, st.Files)
	}
	// In order: the compressed file's events come first.
	var last time.Time
	readDirForTest(dir, func(ev Event) {
		if ev.Time.Before(last) {
			t.Fatalf("event at %s after %s", ev.Time, last)
		}
		last = ev.Time
	})
	// A window after the compressed file's end skips it by its name.
	n := 0
	if _, err := readDir(dir, slog.New(slog.DiscardHandler), t0.Add(150*time.Second), false, "", func(Event) { n++ }); err != nil || n != 200 {
		t.Errorf("since window read %d events (%v), want 200", n, err)
	}
}

// TestCompressedAndPlainPair: a rotated file with both forms (a crash
// between the compressed file's rename and the plain one's removal) counts
// once.
func TestCompressedAndPlainPair(t *testing.T) {
	dir := t.TempDir()
	var evs []Event
	for i := range 50 {
		evs = append(evs, seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
	}
	name := filepath.Join(dir, rotatedName(t0.Add(time.Minute)))
	writeEventsFile(t, name, evs)
	writeEventsFile(t, name+gzSuffix, evs)
	if a, b, c, _ := countDir(t, dir); a != 50 || b != 50 || c != 50 {
		t.Errorf("readDir %d, LoadDir %d, replay %d; want 50 each", a, b, c)
	}
}

// TestCompressedCorrupt: a truncated or garbled compressed file is an
// error line and a count; the events before the damage and every other
// file are still read.
func TestCompressedCorrupt(t *testing.T) {
	for _, damage := range []string{"truncated", "garbage", "empty"} {
		t.Run(damage, func(t *testing.T) {
			dir := t.TempDir()
			var evs []Event
			for i := range 3000 {
				evs = append(evs, seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
			}
			bad := filepath.Join(dir, rotatedName(t0.Add(1000*time.Second))+gzSuffix)
			writeEventsFile(t, bad, evs[:1000])
			writeEventsFile(t, filepath.Join(dir, rotatedName(t0.Add(2000*time.Second))+gzSuffix), evs[1000:2000])
			writeEventsFile(t, filepath.Join(dir, CurrentLog), evs[2000:])
			b, _ := os.ReadFile(bad)
			switch damage {
			case "truncated":
				b = b[:len(b)/2]
			case "garbage":
				b = append(b[:20:20], bytes.Repeat([]byte{0xa5}, len(b)-20)...)
			case "empty":
				b = nil
			}
			os.WriteFile(bad, b, 0o640)
			var logBuf syncBuffer
			lg := slog.New(slog.NewTextHandler(&logBuf, nil))
			n := 0
			st, err := readDir(dir, lg, time.Time{}, false, "", func(Event) { n++ })
			if err != nil {
				t.Fatalf("readDir: %v", err)
			}
			if st.Damaged != 1 || n < 2000 || n >= 3000 || int(st.Events) != n {
				t.Errorf("%d events read (%d counted), %d damaged files; want 2000 to 2999 and 1", n, st.Events, st.Damaged)
			}
			if !strings.Contains(logBuf.String(), "level=ERROR") || !strings.Contains(logBuf.String(), filepath.Base(bad)) {
				t.Errorf("no error line naming the file: %s", logBuf.String())
			}
			if _, _, err := LoadDir(dir, nil, LedgerOptions{}, lg); err != nil {
				t.Errorf("LoadDir: %v", err)
			}
			j, l, ost := openJournal(t, JournalConfig{Dir: dir, Compress: true}, nil)
			j.Close()
			if ost.Damaged != 1 || l.Report(ReportOptions{}).Totals.Flows != uint64(n) {
				t.Errorf("restart: %d damaged, %d flows; want 1 and %d", ost.Damaged, l.Report(ReportOptions{}).Totals.Flows, n)
			}
		})
	}
}

// TestJournalCompressesRotated: with Compress, rotated files end up
// gzipped (no plain or temporary file left), MaxFiles of them are kept,
// and a restart counts every event, from the kept files and the summary
// of the folded ones.
func TestJournalCompressesRotated(t *testing.T) {
	dir := t.TempDir()
	j, _, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 4000, MaxFiles: 3, Compress: true, DetailBurst: -1, Logger: slog.New(slog.DiscardHandler)}, nil)
	go j.Run(context.Background())
	const n = 3000
	for i := range n {
		j.Emit(seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
		if i%500 == 499 {
			waitFor(t, func() bool { return j.Written() == uint64(i+1) })
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	var gz, plain int
	var gzBytes int64
	for _, e := range ents {
		switch n := e.Name(); {
		case strings.HasSuffix(n, rotatedSuffix+gzSuffix):
			gz++
			fi, _ := e.Info()
			gzBytes += fi.Size()
		case n == CurrentLog, n == ArchiveFile:
		case strings.HasPrefix(n, rotatedPrefix):
			plain++
			t.Errorf("left %s", n)
		default:
			t.Errorf("left %s", n)
		}
	}
	// MaxFiles, each smaller than its plain form (4000 bytes).
	if gz != 3 || gzBytes > 3*2000 || plain != 0 {
		t.Errorf("%d compressed files (%d bytes), %d plain; want 3 within 6000 bytes", gz, gzBytes, plain)
	}
	_, l, st := openJournal(t, JournalConfig{Dir: dir, Compress: true}, nil)
	if st.Events+st.Summarized != n || st.Summarized == 0 || l.Report(ReportOptions{}).Totals.Flows != n {
		t.Errorf("restart: %d events + %d summarized, %d flows; want %d with some summarized", st.Events, st.Summarized, l.Report(ReportOptions{}).Totals.Flows, n)
	}
}

// TestCompressCrashLeftovers: a start after a crash in the middle of a
// compression (a plain rotated file with a partial temporary file, or
// with its finished compressed file) counts each event once and ends with
// every rotated file compressed and no temporary file.
func TestCompressCrashLeftovers(t *testing.T) {
	dir := t.TempDir()
	var evs []Event
	for i := range 300 {
		evs = append(evs, seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
	}
	a := filepath.Join(dir, rotatedName(t0.Add(100*time.Second)))
	writeEventsFile(t, a, evs[:100])
	os.WriteFile(a+gzSuffix+".tmp123456", []byte("\x1f\x8b\x08\x00partial"), 0o640)
	b := filepath.Join(dir, rotatedName(t0.Add(200*time.Second)))
	writeEventsFile(t, b, evs[100:200])
	writeEventsFile(t, b+gzSuffix, evs[100:200])
	writeEventsFile(t, filepath.Join(dir, CurrentLog), evs[200:])
	j, l, st := openJournal(t, JournalConfig{Dir: dir, Compress: true}, nil)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if st.Events != 300 || l.Report(ReportOptions{}).Totals.Flows != 300 {
		t.Errorf("start counted %d events, %d flows; want 300", st.Events, l.Report(ReportOptions{}).Totals.Flows)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	want := []string{filepath.Base(a) + gzSuffix, filepath.Base(b) + gzSuffix, CurrentLog}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("files %q, want %q", names, want)
	}
	if a, b, c, _ := countDir(t, dir); a != 300 || b != 300 || c != 300 {
		t.Errorf("after: readDir %d, LoadDir %d, replay %d; want 300", a, b, c)
	}
}
