package audit

import (
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
