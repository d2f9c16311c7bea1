package main

import (
	"fmt"
	"io"
	"log/slog"
	"testing"
)

// TestNotePendingNewestLast: policy.pending.json lists the policies
// going in oldest first and, past maxPending, drops the oldest. A policy
// noted again (kills in a row before the copy, the operator back at an
// earlier policy) is the newest: it goes last, and is not the one dropped
// when the next is noted. Before, it kept its first place and went first.
func TestNotePendingNewestLast(t *testing.T) {
	d := &daemon{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	d.cfg.stateDir = t.TempDir()
	src := func(i int) []byte {
		return fmt.Appendf(nil, "version: 1\nmode: enforce\nrules:\n  - {name: r%d, to: [192.0.2.%d/32], ports: [9000/udp]}\n", i, i)
	}
	for i := range maxPending {
		d.notePending(src(i))
	}
	d.notePending(src(0)) // again: the newest
	d.notePending(src(maxPending))
	got := d.readPending()
	if len(got) != maxPending {
		t.Fatalf("%d noted, want %d", len(got), maxPending)
	}
	if got[len(got)-1].Source != string(src(maxPending)) || got[len(got)-2].Source != string(src(0)) {
		t.Errorf("the last two noted are not r0 then r%d", maxPending)
	}
	for _, p := range got {
		if p.Source == string(src(1)) {
			t.Error("r1, the oldest, kept")
		}
	}
}
