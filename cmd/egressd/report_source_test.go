package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/audit"
)

// TestReportStateDirNamesSource: `egressd report --state-dir` names the
// policy as the live report does (profile:nirovision, or the file given
// to --policy), not the state directory's copy of it. Before session
// 32 it said policy: <state-dir>/policy.yaml.
func TestReportStateDirNamesSource(t *testing.T) {
	bin := buildEgressd(t)
	for _, c := range []struct {
		name string
		args func(dir string) []string
		want func(dir string) string
	}{
		{"profile", func(string) []string { return nil }, func(string) string { return "profile:nirovision" }},
		{"file", func(dir string) []string {
			p := filepath.Join(dir, "site.yaml")
			src, err := exec.Command(bin, "profiles", "show", "nirovision").Output()
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, src, 0o644); err != nil {
				t.Fatal(err)
			}
			return []string{"--policy", p}
		}, func(dir string) string { return filepath.Join(dir, "site.yaml") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			r := startRun(t, bin, dir, c.args(dir)...)
			state := filepath.Join(dir, "state")
			deadline := time.Now().Add(20 * time.Second)
			for !strings.Contains(r.out.String(), "admin: http://") || !fileExists(filepath.Join(state, runningPolicyFile)) {
				if time.Now().After(deadline) {
					t.Fatalf("egressd run did not start in 20s\nstdout:\n%s\nstderr:\n%s", r.out.String(), r.errb.String())
				}
				time.Sleep(50 * time.Millisecond)
			}
			out, err := exec.Command(bin, "report", "--json", "--state-dir", state).Output()
			if err != nil {
				t.Fatalf("egressd report --state-dir: %v\n%s", err, out)
			}
			var rep audit.Report
			if err := json.Unmarshal(out, &rep); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if want := c.want(dir); rep.Policy != want {
				t.Errorf("report --state-dir names the policy %q, want %q (as the live report does)", rep.Policy, want)
			}
		})
	}
}
