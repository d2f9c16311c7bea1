package main

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestStartRemovesPolicyTemps: a kill during a write of the policy's
// copy, its record or the note of the policies going in leaves the write's
// temporary file (atomicfile: NAME.tmp and digits, a new name each write,
// where it was once one fixed name the next write reused); a start removes
// them, as it does learned.ndjson's, and nothing else. Before, they were
// left to pile up, one a kill, each a copy of a policy.
func TestStartRemovesPolicyTemps(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o750); err != nil {
		t.Fatal(err)
	}
	temps := []string{runningPolicyFile + ".tmp123", runningFirewallFile + ".tmp45", pendingFile + ".tmp6"}
	others := []string{runningPolicyFile + ".tmp", "notes.tmp7"}
	for _, name := range append(slices.Clone(temps), others...) {
		if err := os.WriteFile(filepath.Join(state, name), []byte("x"), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte("version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.1/32], ports: [9000/udp]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var cfg runConfig
	fs := newFlags("run", io.Discard)
	cfg.flags(fs)
	if _, err := parseArgs(fs, []string{"--policy", pol, "--lan", "lan0", "--wan", "wan0", "--state-dir", state}); err != nil {
		t.Fatal(err)
	}
	if _, err := newDaemon(cfg, io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	for _, name := range temps {
		if _, err := os.Stat(filepath.Join(state, name)); err == nil {
			t.Errorf("%s left at a start", name)
		}
	}
	for _, name := range others {
		if _, err := os.Stat(filepath.Join(state, name)); err != nil {
			t.Errorf("%s: %v; want it left", name, err)
		}
	}
}
