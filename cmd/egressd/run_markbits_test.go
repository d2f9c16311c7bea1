package main

import (
	"fmt"
	"path/filepath"
	"testing"
)

// TestRestartCTMarkBitsRecorded: the conntrack marks the enforce run
// wrote are at its --ct-mark-bits, so they are recorded beside the copy
// (policy.firewall.json, ct_mark_bits) and the next start reads the marks
// there (firewall.Deps.PreviousCTMarkBits; TestRestartCTMarkBitsChanged
// in firewall/), through a start that installs no enforce ruleset too;
// without them (no record, or one of an egressd before the field) they
// are this run's. Before, a start with other bits read the old marks at
// the new bits.
func TestRestartCTMarkBitsRecorded(t *testing.T) {
	const (
		e = "version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.1/32], ports: [9000/udp]}\n"
		a = "version: 1\nmode: audit\nrules:\n  - {name: a, to: [192.0.2.2/32], ports: [9000/udp]}\n"
	)
	start := func(t *testing.T, state, src, bits string) *daemon {
		t.Helper()
		return startRecorded(t, state, src, "--ct-mark-bits", bits)
	}
	const moved, other = "0x07ff0000", "0x00000ffe"
	for _, tc := range []struct {
		name   string
		before func(t *testing.T, state string)
		bits   string // the start's
		want   uint32 // the bits the marks are read at
	}{
		{"moved", func(t *testing.T, state string) { start(t, state, e, moved).savePolicy(true) }, defaultCTMarkBits, 0x07ff0000},
		{"unchanged", func(t *testing.T, state string) { start(t, state, e, moved).savePolicy(true) }, moved, 0x07ff0000},
		{"through an audit start", func(t *testing.T, state string) {
			start(t, state, e, moved).savePolicy(true)
			start(t, state, a, other).savePolicy(false)
		}, defaultCTMarkBits, 0x07ff0000},
		{"record of an egressd before the field", func(t *testing.T, state string) {
			writeState(t, state, e, fmt.Sprintf(`{"version":1,"tcp_ports":"","policy_sha256":%q}`, sha256Hex(e)))
		}, other, 0x00000ffe},
		{"no record", func(t *testing.T, state string) { writeState(t, state, e, "") }, other, 0x00000ffe},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			tc.before(t, state)
			d := start(t, state, e, tc.bits)
			if d.prevPolicy == nil {
				t.Fatal("no previous policy")
			}
			got := d.prevCTMarkBits
			if got == nil || *got != tc.want {
				t.Errorf("the previous policy's marks are read at %v, want 0x%08x", got, tc.want)
			}
		})
	}
}
