package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestRestartNAT64Recorded: what an IPv4 CIDR rule's accept rules open
// (its NAT64 forms) and what the guarded sets hold (the NAT64 forms of
// the guarded IPv4 ranges) depend on --nat64-prefix, so the next start
// reads the conntrack marks as the previous policy with the prefixes the
// enforce run that wrote them had (firewall.Deps.Previous; a rule that
// opens other destinations now has its flows decided again:
// TestRestartNAT64Changed in firewall/). They are recorded beside the
// copy (policy.firewall.json, nat64_prefix) and follow the enforce run
// through a start that installs no enforce ruleset, as --tcp-ports do;
// without them (no record, or one of an egressd before the field) the
// previous policy has this run's. Before, it was compiled with none,
// whatever the run before had.
func TestRestartNAT64Recorded(t *testing.T) {
	const (
		e = "version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.1/32], ports: [9000/udp]}\n"
		a = "version: 1\nmode: audit\nrules:\n  - {name: a, to: [192.0.2.2/32], ports: [9000/udp]}\n"
	)
	const p64, p65 = "2001:db8:64::/96", "2001:db8:65::/96"
	start := func(t *testing.T, state, src, nat64 string) *daemon {
		t.Helper()
		return startRecorded(t, state, src, "--nat64-prefix", nat64)
	}
	for _, tc := range []struct {
		name    string
		before  func(t *testing.T, state string) // the runs before
		nat64   string                           // the start's
		wantPol string                           // the previous policy's rule
		want    []string                         // its NAT64 prefixes
	}{
		{"removed", func(t *testing.T, state string) { start(t, state, e, p64).savePolicy(true) }, "", "e", []string{p64}},
		{"added", func(t *testing.T, state string) { start(t, state, e, "").savePolicy(true) }, p64, "e", nil},
		{"moved", func(t *testing.T, state string) { start(t, state, e, p64).savePolicy(true) }, p65, "e", []string{p64}},
		{"through an audit start", func(t *testing.T, state string) {
			start(t, state, e, p64).savePolicy(true)
			start(t, state, a, p65).savePolicy(false)
		}, "", "e", []string{p64}},
		{"record of an egressd before the field", func(t *testing.T, state string) {
			writeState(t, state, e, fmt.Sprintf(`{"version":1,"tcp_ports":"","policy_sha256":%q}`, sha256Hex(e)))
		}, p65, "e", []string{p65}},
		{"no record", func(t *testing.T, state string) { writeState(t, state, e, "") }, p65, "e", []string{p65}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			tc.before(t, state)
			d := start(t, state, e, tc.nat64)
			if d.prevPolicy == nil || d.prevPolicy.Rules()[0].Name != tc.wantPol {
				t.Fatalf("the previous policy: %v, want %s's", d.prevPolicy, tc.wantPol)
			}
			var want []netip.Prefix
			for _, p := range tc.want {
				want = append(want, netip.MustParsePrefix(p))
			}
			if got := d.prevPolicy.NAT64(); !slices.Equal(got, want) {
				t.Errorf("start with --nat64-prefix %q: the previous policy's NAT64 prefixes %v, want %v", tc.nat64, got, want)
			}
		})
	}
}

// startRecorded makes the daemon of egressd run with policy src (written
// beside state), --lan lan0 --wan wan0 --state-dir state and extra: what
// it reads of the run before from the state directory, as a start does.
func startRecorded(t *testing.T, state, src string, extra ...string) *daemon {
	t.Helper()
	pol := filepath.Join(filepath.Dir(state), "p.yaml")
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	var cfg runConfig
	fs := newFlags("run", io.Discard)
	cfg.flags(fs)
	if _, err := parseArgs(fs, append([]string{"--policy", pol, "--lan", "lan0", "--wan", "wan0", "--state-dir", state}, extra...)); err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// writeState writes the state directory's copy of the policy and, when
// rec is not empty, the record beside it.
func writeState(t *testing.T, state, copy, rec string) {
	t.Helper()
	if err := os.MkdirAll(state, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, runningPolicyFile), []byte(copy), 0o640); err != nil {
		t.Fatal(err)
	}
	if rec != "" {
		if err := os.WriteFile(filepath.Join(state, runningFirewallFile), []byte(rec), 0o640); err != nil {
			t.Fatal(err)
		}
	}
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}
