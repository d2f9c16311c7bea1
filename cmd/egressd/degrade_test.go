package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestDegradeLogsChanges: a part asked about again with the same reason
// (the link watcher's every notice and recheck, a LAN port left empty)
// logs once; a new reason logs again, and so does running again.
func TestDegradeLogsChanges(t *testing.T) {
	var buf bytes.Buffer
	d := &daemon{log: slog.New(slog.NewTextHandler(&buf, nil)), degraded: map[string]string{}}
	for range 5 {
		d.degrade("capture", "capture: lan1 has no carrier")
	}
	d.degrade("capture", "capture: lan1 is down")
	d.undegrade("capture")
	d.undegrade("capture")
	d.degrade("capture", "capture: lan1 is down")
	if got := strings.Count(buf.String(), "part not running"); got != 3 {
		t.Errorf("%d \"part not running\" lines, want 3 (no carrier, down, down again after running):\n%s", got, buf.String())
	}
	if got := strings.Count(buf.String(), "part running again"); got != 1 {
		t.Errorf("%d \"part running again\" lines, want 1:\n%s", got, buf.String())
	}
	if why := d.degradedParts()["capture"]; why != "capture: lan1 is down" {
		t.Errorf("degraded reason %q", why)
	}
}
