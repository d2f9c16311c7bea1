package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// flowLine is an event line of the proxy's for a client port.
func flowLine(port int) string {
	return fmt.Sprintf(`{"kind":"flow","source":"proxy","time":"2026-01-02T03:04:05Z","client":"198.18.1.10","client_port":%d,"verdict":"deny"}`+"\n", port)
}

func appendFile(t *testing.T, name, s string) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

// TestPollEventsReadsAfterWindow: a read that began before the event
// reached the log and ended after the window (a full decode of a loaded
// log under -race on a busy machine) is not the last one: the wait reads
// once more and finds the event (TestHardeningLoad/upstream-down-and-back
// failed so in CI).
func TestPollEventsReadsAfterWindow(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "events.ndjson")
	appendFile(t, log, flowLine(1000))
	const window = 200 * time.Millisecond
	reads := 0
	ev, _, ok := pollEvents(dir, window, func(e flowEvent) bool { return e.ClientPort == 2000 }, func() {
		reads++
		if reads == 1 {
			// The daemon writes the event while this read decodes, and
			// the decode outlasts the window.
			appendFile(t, log, flowLine(2000))
			time.Sleep(window + 50*time.Millisecond)
		}
	})
	if !ok || ev.ClientPort != 2000 {
		t.Errorf("the event written during the first read was not found (%d reads)", reads)
	}
}

// TestEventTailReadsNewLines: each read decodes only the whole lines added
// since the one before; a line being written waits for the next read, and
// a file shorter than what was read (a new current file after a rotation)
// is read from its start.
func TestEventTailReadsNewLines(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "events.ndjson")
	appendFile(t, log, flowLine(1)+flowLine(2))
	tail := eventTail{}
	count := func(want int, what string) {
		t.Helper()
		if evs := tail.read(dir); len(evs) != want {
			t.Errorf("%s: %d events, want %d: %v", what, len(evs), want, evs)
		}
	}
	count(2, "first read")
	count(0, "nothing added")
	whole := flowLine(3)
	appendFile(t, log, whole[:20])
	count(0, "a line being written")
	appendFile(t, log, whole[20:]+flowLine(4))
	count(2, "the line completed and one more")
	if err := os.Rename(log, filepath.Join(dir, "events-20260102T030405Z.ndjson")); err != nil {
		t.Fatal(err)
	}
	appendFile(t, log, flowLine(5))
	count(5, "after a rotation (the renamed file read again under its name)")
}
