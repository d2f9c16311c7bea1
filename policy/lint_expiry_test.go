package policy

import (
	"strings"
	"testing"
	"time"
)

// TestLintExpiry: a rule past its expires: day is warned of as expired, one
// ending within a week as ending soon (with the days left, a day begun
// counting whole), one further off not at all.
func TestLintExpiry(t *testing.T) {
	now := time.Date(2026, 12, 6, 9, 0, 0, 0, time.UTC)
	lintNow = func() time.Time { return now }
	t.Cleanup(func() { lintNow = time.Now })
	e, err := Compile("p.yaml", []byte(`rules:
  - {name: gone, to: [a.test], ports: [443/tcp], expires: 2026-12-01}
  - {name: today, to: [b.test], ports: [443/tcp], expires: 2026-12-06}
  - {name: week, to: [c.test], ports: [443/tcp], expires: 2026-12-12}
  - {name: later, to: [d.test], ports: [443/tcp], expires: 2026-12-31}
`))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, w := range e.Warnings() {
		name := strings.Fields(strings.TrimPrefix(w.Msg, "rule "))[0]
		got[name] += w.Msg
	}
	for name, want := range map[string]string{
		"gone":  "expired on 2026-12-01",
		"today": "expires at the end of 2026-12-06 (UTC), in 1 day(s)",
		"week":  "expires at the end of 2026-12-12 (UTC), in 7 day(s)",
		"later": "",
	} {
		if want == "" && got[name] != "" || !strings.Contains(got[name], want) {
			t.Errorf("rule %s: warnings %q, want %q", name, got[name], want)
		}
	}
}
