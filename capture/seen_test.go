package capture

import (
	"net/netip"
	"testing"
	"time"
)

// TestLearnedSeenKeptWithinHold pins the wire answers' seen time, which
// given compares with a flow's last packet: a renewal while the firewall
// would still hold the address keeps the first answer's (a flow between
// the two was let out), an answer after the hold ended begins anew (a
// flow before it, after the hold, was dropped), and a flow with a packet
// after the answer is credited though its first came before.
func TestLearnedSeenKeptWithinHold(t *testing.T) {
	l := newLearned(16)
	cli, addr := netip.MustParseAddr("198.18.1.10"), netip.MustParseAddr("198.51.100.126")
	t0 := time.Unix(1_800_000_000, 0)
	given := func(first, last time.Time) int {
		return len(l.given(addr, first, last, true, nil))
	}

	l.add(cli, addr, "ntp.example", t0, 30*time.Second) // held 60 s
	if n := given(t0.Add(-time.Second), t0.Add(-time.Second)); n != 0 {
		t.Fatalf("a flow all before the answer: %d grants, want 0", n)
	}
	if n := given(t0.Add(-time.Second), t0.Add(time.Second)); n != 1 {
		t.Fatalf("a flow with a packet after the answer: %d grants, want 1", n)
	}
	l.add(cli, addr, "ntp.example", t0.Add(20*time.Second), 30*time.Second)
	if n := given(t0.Add(10*time.Second), t0.Add(10*time.Second)); n != 1 {
		t.Fatalf("a flow between an answer and its renewal within the hold: %d grants, want 1", n)
	}
	// The hold (60 s from the renewal) is over at t0+80s.
	l.add(cli, addr, "ntp.example", t0.Add(200*time.Second), 30*time.Second)
	if n := given(t0.Add(150*time.Second), t0.Add(150*time.Second)); n != 0 {
		t.Fatalf("a flow after the hold ended and before the next answer: %d grants, want 0", n)
	}
	if n := given(t0.Add(210*time.Second), t0.Add(210*time.Second)); n != 1 {
		t.Fatalf("a flow after the next answer: %d grants, want 1", n)
	}
}
