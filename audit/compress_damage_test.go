package audit

import (
	"bytes"
	"compress/gzip"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestReplayDamagedCompressedFile: `audit --replay FILE` of one damaged
// compressed events file replays the events before the damage and counts
// the file as damaged, as a state directory's replay does; it is not a
// failure that replays nothing.
func TestReplayDamagedCompressedFile(t *testing.T) {
	dir := t.TempDir()
	var evs []Event
	for i := range 1000 {
		evs = append(evs, seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
	}
	bad := filepath.Join(dir, rotatedName(t0.Add(1000*time.Second))+gzSuffix)
	writeEventsFile(t, bad, evs)
	b, _ := os.ReadFile(bad)
	os.WriteFile(bad, b[:len(b)/2], 0o640)
	n := 0
	st, _, err := readPath(bad, func(Event) { n++ })
	if err != nil {
		t.Fatalf("readPath: %v", err)
	}
	if st.Damaged != 1 || n == 0 || n >= 1000 || int(st.Events) != n || st.Files != 1 {
		t.Errorf("%d events read (%d counted), %d damaged of %d files; want some of 1000, 1 damaged of 1", n, st.Events, st.Damaged, st.Files)
	}
}

// FuzzReadCompressed puts arbitrary bytes in a state directory as a
// compressed rotated file, before a current file of three events: the
// reader never fails or panics, always counts the current file's events,
// and either reads the compressed file as the gzip stream it is (its
// events as ReadEvents counts them in the decompressed bytes) or counts
// it damaged.
func FuzzReadCompressed(f *testing.F) {
	var plain bytes.Buffer
	for i := range 5 {
		line, _ := jsonLine(seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
		plain.Write(line)
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(plain.Bytes())
	zw.Close()
	good := z.Bytes()
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add(append(append([]byte{}, good...), good...)) // two members
	f.Add(append(append([]byte{}, good...), 0))       // trailing garbage
	f.Add([]byte{})
	f.Add(plain.Bytes()) // not gzip at all
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, rotatedName(t0.Add(time.Hour))+gzSuffix), b, 0o640); err != nil {
			t.Fatal(err)
		}
		var cur []Event
		for i := range 3 {
			cur = append(cur, seqEvent(100+i, t0.Add(2*time.Hour+time.Duration(i)*time.Second)))
		}
		writeEventsFile(t, filepath.Join(dir, CurrentLog), cur)
		n := 0
		st, err := readDir(dir, slog.New(slog.DiscardHandler), time.Time{}, false, "", func(Event) { n++ })
		if err != nil {
			t.Fatalf("readDir: %v", err)
		}
		if st.Files != 2 || int(st.Events) != n || n < 3 {
			t.Fatalf("%d files, %d events counted, %d read", st.Files, st.Events, n)
		}
		whole := -1
		if zr, err := gzip.NewReader(bytes.NewReader(b)); err == nil {
			if data, err := io.ReadAll(io.LimitReader(zr, 64<<20)); err == nil {
				whole = 0
				ReadEvents(bytes.NewReader(data), func(Event) { whole++ })
			}
		}
		switch {
		case whole < 0 && st.Damaged != 1:
			t.Errorf("a stream gzip cannot read whole: %d damaged, want 1", st.Damaged)
		case whole >= 0 && (st.Damaged != 0 || n-3 != whole):
			t.Errorf("a whole gzip stream of %d events: read %d, %d damaged", whole, n-3, st.Damaged)
		}
		l, lst, err := LoadDir(dir, nil, LedgerOptions{MaxFlows: 8, MaxDropped: 4}, slog.New(slog.DiscardHandler))
		if err != nil || lst.Events != st.Events || lst.Damaged != st.Damaged {
			t.Fatalf("LoadDir: %v, %d events %d damaged; readDir %d and %d", err, lst.Events, lst.Damaged, st.Events, st.Damaged)
		}
		l.Report(ReportOptions{}).WriteText(io.Discard)
	})
}

// TestLoadDirWhileCompressing: `egressd report --state-dir` beside a
// daemon that compresses a rotated file meanwhile (one each time the
// report reads the directory) reads every event once and says nothing of
// a log that kept changing: a compression changes no file's events (a
// reader that listed the plain file reads the compressed one), so it is no
// reason to read the directory again.
func TestLoadDirWhileCompressing(t *testing.T) {
	dir := t.TempDir()
	var evs []Event
	for i := range 600 {
		evs = append(evs, seqEvent(i, t0.Add(time.Duration(i)*time.Second)))
	}
	for f := range 5 {
		writeEventsFile(t, filepath.Join(dir, rotatedName(t0.Add(time.Duration(100*(f+1))*time.Second))), evs[100*f:100*(f+1)])
	}
	writeEventsFile(t, filepath.Join(dir, CurrentLog), evs[500:])
	defer func() { testHookArchiveRead = nil }()
	d := &Journal{cfg: JournalConfig{Dir: dir, Compress: true}, log: slog.New(slog.DiscardHandler)}
	reads := 0
	testHookArchiveRead = func() {
		reads++
		// The daemon, another process, compresses its oldest plain file.
		files, _ := LogFiles(dir)
		for _, f := range files {
			if filepath.Base(f) != CurrentLog && filepath.Ext(f) != gzSuffix {
				if err := d.compressFile(f); err != nil {
					t.Error(err)
				}
				return
			}
		}
	}
	var logBuf syncBuffer
	l, st, err := LoadDir(dir, nil, LedgerOptions{}, slog.New(slog.NewTextHandler(&logBuf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	r := l.Report(ReportOptions{})
	if st.Events != 600 || r.Totals.Flows != 600 {
		t.Errorf("%d events, %d flows; want 600", st.Events, r.Totals.Flows)
	}
	if reads != 1 || len(r.Notes) != 0 || logBuf.String() != "" {
		t.Errorf("read the directory %d times (want 1); notes %q; log %s", reads, r.Notes, logBuf.String())
	}
}
