package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// TestLearnedBounded: DNS answers seen on the wire for 5,000 distinct
// names, each with an address of its own (a client resolving names of a
// zone it controls), keep at most max addresses and max names in capture's
// learned tables, and the latest answer is still known.
func TestLearnedBounded(t *testing.T) {
	const max = 1000
	l := newLearned(max)
	now := time.Unix(1_800_000_000, 0)
	client := netip.MustParseAddr("192.0.2.7")
	var addr netip.Addr
	var name string
	for i := range 5000 {
		addr = netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		name = fmt.Sprintf("n%d.tunnel.example", i)
		l.add(client, addr, name, now, time.Hour)
	}
	l.mu.Lock()
	addrs, names, evicted := len(l.m), len(l.byName), l.evicted
	l.mu.Unlock()
	if addrs > max || names > max || evicted == 0 {
		t.Errorf("%d addresses, %d names (bound %d), %d evictions counted", addrs, names, max, evicted)
	}
	if got := l.namesFor(client, addr, now, nil); len(got) != 1 || got[0] != name {
		t.Errorf("latest answer: names for %s = %v, want [%s]", addr, got, name)
	}
	if resolved, gave := l.answered(name, addr, now); !resolved || !gave {
		t.Errorf("latest answer: answered(%s, %s) = %v, %v", name, addr, resolved, gave)
	}
}
