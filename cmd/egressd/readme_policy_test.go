package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// readmeText returns README.md, which an operator follows literally.
func readmeText(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestREADMEPolicyExamples: every YAML block of README.md is a policy that
// `egressd policy check` accepts (warnings allowed), so an operator who
// copies one gets a valid start.
func TestREADMEPolicyExamples(t *testing.T) {
	blocks := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(readmeText(t), -1)
	if len(blocks) == 0 {
		t.Fatal("README.md has no ```yaml block")
	}
	dir := t.TempDir()
	for i, b := range blocks {
		file := filepath.Join(dir, "example.yaml")
		if err := os.WriteFile(file, []byte(b[1]), 0o644); err != nil {
			t.Fatal(err)
		}
		if code, out, stderr := runCLI(t, "policy", "check", file); code != exitOK || !strings.Contains(out, ": valid") {
			t.Errorf("README yaml block %d: policy check exit %d: %s%s\n%s", i+1, code, out, stderr, b[1])
		}
	}
}

// TestREADMEToTable: the Policy reference's table of `to` entries says, per
// name pattern, which names it matches and which it does not; `egressd
// policy explain` must agree with every name the table shows.
func TestREADMEToTable(t *testing.T) {
	row := regexp.MustCompile("(?m)^\\| `([^`]+)` \\| (.*) \\| (.*) \\|$")
	tick := regexp.MustCompile("`([^`]+)`")
	name := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9.-]*$`)
	pattern := regexp.MustCompile(`^[a-z0-9*.-]+$`)
	dir := t.TempDir()
	checked := 0
	for _, m := range row.FindAllStringSubmatch(readmeText(t), -1) {
		pat := m[1]
		if !pattern.MatchString(pat) || pat == "*" || !strings.Contains(pat, ".") {
			continue // CIDRs, private, "*", host/path: prose, not names
		}
		file := filepath.Join(dir, "to.yaml")
		src := "version: 1\nrules:\n  - name: r\n    to: [\"" + pat + "\"]\n    ports: [443/tcp]\n"
		if err := os.WriteFile(file, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		for col, want := range map[int]string{2: "allow", 3: "deny"} {
			for _, n := range tick.FindAllStringSubmatch(m[col], -1) {
				if !name.MatchString(n[1]) {
					continue // `*` in the prose of a cell
				}
				code, out, stderr := runCLI(t, "policy", "explain", file, "--to", n[1], "--json")
				var got struct{ Verdict string }
				if code != exitOK || json.Unmarshal([]byte(out), &got) != nil || got.Verdict != want {
					t.Errorf("to: [%s], --to %s: exit %d, %s%s; README's table says %s", pat, n[1], code, out, stderr, want)
				}
				checked++
			}
		}
	}
	if checked < 10 {
		t.Errorf("checked %d names of README's `to` table; the table has more (did its form change?)", checked)
	}
}

// TestREADMEExplainPort: as README says under the usage block, policy
// explain's port is --port's, else the one DEST names, else 443/tcp, and
// the command exits 0 whatever the verdict. (README said "--port defaults
// to 443/tcp", and an operator's `--to http://notion.so/x` was asked on 80.)
func TestREADMEExplainPort(t *testing.T) {
	for _, c := range []struct {
		args []string
		port string
	}{
		{[]string{"--to", "a.nirovision.com:10516"}, "10516/tcp"},
		{[]string{"--to", "http://notion.so/nirovision/x"}, "80/tcp"},
		{[]string{"--to", "a.nirovision.com"}, "443/tcp"},
		{[]string{"--to", "a.nirovision.com:10516", "--port", "123/udp"}, "123/udp"},
		{[]string{"--to", "example.com"}, "443/tcp"}, // a deny
	} {
		_, text, _ := runCLI(t, append([]string{"policy", "explain", "profile:nirovision"}, c.args...)...)
		overridden := strings.Contains(c.args[1], ":10516") && c.port != "10516/tcp"
		if warned := strings.Contains(text, "not on port 10516 that --to names"); warned != overridden {
			t.Errorf("policy explain %q: the text says --port overrides the port of --to: %v, want %v:\n%s", c.args, warned, overridden, text)
		}
		code, out, stderr := runCLI(t, append([]string{"policy", "explain", "profile:nirovision", "--json"}, c.args...)...)
		var got struct{ Port string }
		if code != exitOK || json.Unmarshal([]byte(out), &got) != nil || got.Port != c.port {
			t.Errorf("policy explain %q: exit %d, %s%s; want exit 0 and port %s", c.args, code, out, stderr, c.port)
		}
	}
}
