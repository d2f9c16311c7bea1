package audit

import (
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

// TestReportEventModeWindow: a state directory whose events switched
// modes (audit, then enforce; and the other way) reports the latest
// event's mode (EventMode), whole and for any --since window: a window
// with none of the events in it (all older) still has the directory's
// latest mode, not the policy copy's.
func TestReportEventModeWindow(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml") // mode: audit
	for _, c := range []struct{ first, last policy.Mode }{
		{policy.ModeAudit, policy.ModeEnforce},
		{policy.ModeEnforce, policy.ModeAudit},
		{policy.ModeEnforce, policy.ModeEnforce},
	} {
		dir := t.TempDir()
		var older, newer []Event
		for i := range 10 {
			ev := seqEvent(i, t0.Add(time.Duration(i)*time.Second))
			ev.Mode = c.first
			older = append(older, ev)
			ev = seqEvent(100+i, t0.Add(time.Duration(100+i)*time.Second))
			ev.Mode = c.last
			newer = append(newer, ev)
		}
		writeEventsFile(t, filepath.Join(dir, rotatedName(t0.Add(50*time.Second))+gzSuffix), older)
		writeEventsFile(t, filepath.Join(dir, CurrentLog), newer)
		l, _, err := LoadDir(dir, eng, LedgerOptions{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		for _, since := range []time.Duration{0, 30 * time.Second, 105 * time.Second, time.Hour} {
			opt := ReportOptions{EventMode: true, Now: t0.Add(2 * time.Hour)}
			if since > 0 {
				opt.Since = t0.Add(since)
			}
			if m := l.Report(opt).Mode; m != c.last {
				t.Errorf("%s then %s, since %v: mode %q, want %q", c.first, c.last, since, m, c.last)
			}
		}
	}
}
