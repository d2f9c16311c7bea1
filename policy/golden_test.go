package policy

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

// TestBrokenPolicies checks the error messages of broken policies against
// golden files: each testdata/broken/*.txt is a policy, a line of dashes,
// and the exact errors Parse reports (all of them, with file:line:col).
func TestBrokenPolicies(t *testing.T) {
	files, err := filepath.Glob("testdata/broken/*.txt")
	if err != nil || len(files) < 10 {
		t.Fatalf("want at least 10 broken policies, have %d (%v)", len(files), err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			src, want, ok := strings.Cut(string(raw), "\n----------\n")
			if !ok {
				t.Fatalf("%s: no ---------- separator", f)
			}
			_, err = Compile(filepath.Base(f), []byte(src))
			if err == nil {
				t.Fatalf("policy compiled, want errors")
			}
			got := err.Error() + "\n"
			for _, line := range strings.Split(strings.TrimSpace(err.Error()), "\n") {
				if !strings.HasPrefix(line, filepath.Base(f)+":") {
					t.Errorf("error line without the file name: %q", line)
				}
			}
			if *update {
				os.WriteFile(f, []byte(src+"\n----------\n"+got), 0o644)
				return
			}
			if got != want {
				t.Errorf("errors differ\n--- got\n%s--- want\n%s", got, want)
			}
		})
	}
}

// TestEmptyDocuments checks that a leading "---" and empty documents after
// the policy are accepted: they hold nothing that could be lost.
func TestEmptyDocuments(t *testing.T) {
	for _, src := range []string{
		"---\nrules:\n  - {name: a, to: [a.test], ports: [443/tcp]}\n",
		"rules:\n  - {name: a, to: [a.test], ports: [443/tcp]}\n---\n",
		"rules:\n  - {name: a, to: [a.test], ports: [443/tcp]}\n...\n---\n# nothing more\n",
	} {
		if _, err := Compile("p.yaml", []byte(src)); err != nil {
			t.Errorf("%q: %v", src, err)
		}
	}
}
