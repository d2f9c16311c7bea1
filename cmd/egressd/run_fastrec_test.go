package main

import (
	"fmt"
	"path/filepath"
	"testing"
)

// TestRestartFastPathRecorded: the fast path reserves a tag, so the
// rules' tags move with --fast-path, and the next start must read the
// marks with the setting the enforce run had: it is recorded beside the
// copy (policy.firewall.json, fast_path) and in the note of the
// policies going in (pending.json), and read back
// (firewall.Deps.PreviousFastPath, firewall.Prior.FastPath;
// TestRestartFastPathFlipped in firewall/), through a start that
// installs no enforce ruleset too; without a record (none, or one of an
// egressd before the field) it is not known (nil: the firewall reads the
// marks both ways). Before, the start read them with this run's.
func TestRestartFastPathRecorded(t *testing.T) {
	const (
		e = "version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.1/32], ports: [9000/udp]}\n"
		a = "version: 1\nmode: audit\nrules:\n  - {name: a, to: [192.0.2.2/32], ports: [9000/udp]}\n"
	)
	start := func(t *testing.T, state, src string, fast bool) *daemon {
		t.Helper()
		return startRecorded(t, state, src, fmt.Sprintf("--fast-path=%v", fast))
	}
	yes, no := true, false
	for _, tc := range []struct {
		name   string
		before func(t *testing.T, state string)
		fast   bool  // the start's
		want   *bool // what the previous run had, as read
	}{
		{"on then off", func(t *testing.T, state string) { start(t, state, e, true).savePolicy(true) }, false, &yes},
		{"off then on", func(t *testing.T, state string) { start(t, state, e, false).savePolicy(true) }, true, &no},
		{"on then on", func(t *testing.T, state string) { start(t, state, e, true).savePolicy(true) }, true, &yes},
		{"through an audit start", func(t *testing.T, state string) {
			start(t, state, e, true).savePolicy(true)
			start(t, state, a, false).savePolicy(false)
		}, false, &yes},
		{"record of an egressd before the field", func(t *testing.T, state string) {
			writeState(t, state, e, fmt.Sprintf(`{"version":1,"tcp_ports":"","policy_sha256":%q}`, sha256Hex(e)))
		}, true, nil},
		{"no record", func(t *testing.T, state string) { writeState(t, state, e, "") }, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			tc.before(t, state)
			d := start(t, state, e, tc.fast)
			if d.prevPolicy == nil {
				t.Fatal("no previous policy")
			}
			if got := d.prevFastPath; (got == nil) != (tc.want == nil) || got != nil && *got != *tc.want {
				t.Errorf("the previous run's fast path is read as %s, want %s", boolPtr(got), boolPtr(tc.want))
			}
		})
	}
	// A policy noted as going in carries the setting too.
	for _, fast := range []bool{false, true} {
		state := filepath.Join(t.TempDir(), "state")
		d := start(t, state, e, fast)
		d.notePending([]byte(e))
		prior := start(t, state, e, !fast).prevPending
		if len(prior) != 1 {
			t.Fatalf("%d pending policies, want 1", len(prior))
		}
		if got := prior[0].FastPath; got == nil || *got != fast {
			t.Errorf("a policy noted with --fast-path %v is read back with %s", fast, boolPtr(got))
		}
	}
}

func boolPtr(b *bool) string {
	if b == nil {
		return "not known"
	}
	return fmt.Sprint(*b)
}
