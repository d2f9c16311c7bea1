package main

import (
	"strings"
	"testing"

	"egressd/policy"
	"egressd/profiles"
)

// TestRunWarningsInspect: the seed's notion.so/nirovision/* rule is
// checked on HTTPS only with --inspect, and egressd run says so without
// it; with it, saying that HTTPS "without inspection" allows the whole
// host would be a false alarm (found by the day-two walkthrough). Every
// other warning stays.
func TestRunWarningsInspect(t *testing.T) {
	eng := seedEngine(t)
	count := func(ws []policy.Problem) (path, other int) {
		for _, w := range ws {
			if strings.Contains(w.Msg, "without inspection") {
				path++
			} else {
				other++
			}
		}
		return
	}
	all := eng.Warnings()
	pathAll, otherAll := count(all)
	if pathAll == 0 {
		t.Fatalf("the seed gives no path-rule warning: %v", all)
	}
	if p, o := count(runWarnings(eng, false)); p != pathAll || o != otherAll {
		t.Errorf("without --inspect: %d path and %d other warnings, want %d and %d", p, o, pathAll, otherAll)
	}
	if p, o := count(runWarnings(eng, true)); p != 0 || o != otherAll {
		t.Errorf("with --inspect: %d path and %d other warnings, want 0 and %d", p, o, otherAll)
	}
}

// seedEngine is the embedded seed profile, compiled.
func seedEngine(t *testing.T) *policy.Engine {
	t.Helper()
	src, err := profiles.Get("nirovision")
	if err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile(profiles.File("nirovision"), src)
	if err != nil {
		t.Fatal(err)
	}
	return eng
}
