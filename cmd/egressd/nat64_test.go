package main

import (
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"egressd/policy"
)

// TestLoadPolicyNAT64: every load of the policy, the first and each
// reload's (reloadPolicy), carries --nat64-prefix, and so does the
// --mode override's engine: a reload that dropped the prefixes would
// close the IPv4 CIDR rules' NAT64 forms and reopen a network-specific
// prefix's special ranges to ::/0.
func TestLoadPolicyNAT64(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "policy.yaml")
	src := "version: 1\nmode: enforce\nrules:\n  - name: apple\n    to: [17.0.0.0/8]\n    ports: [5223/tcp]\n"
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96")}
	d := &daemon{cfg: runConfig{stateDir: filepath.Join(dir, "state"), nat64: "2001:db8:64::/96"},
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), source: pol, mode: policy.ModeAudit}
	in := policy.Input{Dest: netip.MustParseAddr("2001:db8:64::1100:1"), Port: 5223, Proto: policy.TCP}
	for i := range 2 {
		if i == 1 {
			// The reload reads a changed file.
			if err := os.WriteFile(pol, []byte(src+"  - name: other\n    to: [198.51.100.0/24]\n    ports: [443/tcp]\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		eng, _, err := d.loadPolicy()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(eng.NAT64(), want) || eng.Mode() != policy.ModeAudit {
			t.Errorf("load %d: NAT64 %v, mode %s", i, eng.NAT64(), eng.Mode())
		}
		if d := eng.Decide(in); d.Rule != "apple" {
			t.Errorf("load %d: the NAT64 form of 17.0.0.1: %+v, want rule apple", i, d)
		}
	}
}
