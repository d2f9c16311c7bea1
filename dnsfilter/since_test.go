package dnsfilter

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

// TestHeldSince pins Learned.Since, when the firewall's hold of an
// address began, which capture compares with a flow's packets: a
// renewal while the hold lasts (a later answer, a longer TTL) keeps it,
// for the flows between the two answers were let out; an answer after the
// hold ended begins a new one; another client's answer has its own; Lookup
// gives none; an entry restored from the file has none (held since before
// this process: no flow of it may be judged as before its answer).
func TestHeldSince(t *testing.T) {
	base := time.Unix(1_800_000_000, 0)
	now := base
	tb := NewTable(1024)
	tb.now = func() time.Time { return now }
	a := netip.MustParseAddr("2001:db8::7")
	c1, c2 := netip.MustParseAddr("198.18.1.10"), netip.MustParseAddr("198.18.1.11")
	since := func(c netip.Addr) time.Time {
		t.Helper()
		for _, l := range tb.Held(a) {
			if l.Client == c {
				return l.Since
			}
		}
		t.Fatalf("%s: no held entry for %s", c, a)
		return time.Time{}
	}
	learn := func(c netip.Addr, ttl time.Duration) {
		tb.Learn(Learned{Client: c, Name: "ntp.example", Addr: a, Rule: "ntp", Expires: now.Add(ttl)})
	}

	learn(c1, 30*time.Second)
	if got := since(c1); !got.Equal(base) {
		t.Fatalf("first learn: Since %v, want %v", got, base)
	}
	now = base.Add(40 * time.Second) // the answer expired, the hold (60 s) not
	learn(c1, 300*time.Second)
	if got := since(c1); !got.Equal(base) {
		t.Fatalf("renewed within the hold: Since %v, want %v (the first learn's)", got, base)
	}
	learn(c2, 300*time.Second)
	if got := since(c2); !got.Equal(now) {
		t.Fatalf("another client: Since %v, want %v", got, now)
	}
	for _, l := range tb.Lookup(a) {
		if !l.Since.IsZero() {
			t.Fatalf("Lookup gives Since %v; want none", l.Since)
		}
	}
	var all []Learned
	for _, l := range tb.HeldAll(all) {
		if l.Client == c1 && !l.Since.Equal(base) {
			t.Fatalf("HeldAll: Since %v, want %v", l.Since, base)
		}
	}

	var buf bytes.Buffer
	if _, err := tb.Save(&buf); err != nil {
		t.Fatal(err)
	}
	now = base.Add(400 * time.Second) // both holds over
	learn(c1, 30*time.Second)
	if got := since(c1); !got.Equal(now) {
		t.Fatalf("learned again after the hold ended: Since %v, want %v", got, now)
	}

	restored := NewTable(1024)
	restored.now = func() time.Time { return base.Add(50 * time.Second) }
	if n, err := restored.Load(bytes.NewReader(buf.Bytes()), nil); err != nil || n != 2 {
		t.Fatalf("Load: %d, %v; want 2", n, err)
	}
	for _, l := range restored.Held(a) {
		if !l.Since.IsZero() {
			t.Fatalf("restored %s: Since %v; want none (held since before the process)", l.Client, l.Since)
		}
	}
	restored.Learn(Learned{Client: c1, Name: "ntp.example", Addr: a, Rule: "ntp", Expires: base.Add(900 * time.Second)})
	for _, l := range restored.Held(a) {
		if l.Client == c1 && !l.Since.IsZero() {
			t.Fatalf("restored, renewed within its hold: Since %v; want none still", l.Since)
		}
	}
}
