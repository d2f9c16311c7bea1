package dnsfilter

import (
	"net/netip"
	"testing"
	"time"
)

// shardAddrs returns n addresses of 198.18.0.0/15 that fall in one shard
// of tb, and that shard.
func shardAddrs(tb *Table, n int) ([]netip.Addr, *tableShard) {
	var out []netip.Addr
	var sh *tableShard
	for i := 0; len(out) < n && i < 1<<16; i++ {
		a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		if sh == nil {
			sh = tb.shard(a)
		}
		if tb.shard(a) == sh {
			out = append(out, a)
		}
	}
	return out, sh
}

// TestTableIndexBounded: a client whose items are indexed (it holds its
// share of a full shard) re-learns the same pairs over and over with
// answers whose expiry changes but whose keep does not (the firewall's
// hold, never shortened, outlasts them: an authoritative server answering
// with TTLs 3600 and 100 in turn), or whose rule changes and changes
// back. Every such learn is a change and indexes the item again; the
// index's references must stay bounded by the client's items, not grow
// with the learns. Before, each learn left a reference identical to the
// last one, so every one looked live, compact kept them all, and the
// heaps grew by one per learn (and compact ran, over all of them, on
// every learn).
func TestTableIndexBounded(t *testing.T) {
	clock := time.Unix(1_800_000_000, 0)
	tb := NewTable(tableShards * 8)
	tb.now = func() time.Time { return clock }
	addrs, sh := shardAddrs(tb, 4)
	hog := netip.MustParseAddr("10.0.0.1")
	for _, a := range addrs {
		tb.Learn(Learned{Client: hog, Addr: a, Name: "a.tenant.test", Rule: "tenant", Expires: clock.Add(time.Hour)})
	}
	if sh.big[hog] == nil {
		t.Fatalf("client holding %d of a shard of %d (share %d) not indexed", sh.byClient[hog], tb.perCap, sh.share)
	}
	const learns = 20000
	for i := range learns {
		a := addrs[i%len(addrs)]
		l := Learned{Client: hog, Addr: a, Name: "a.tenant.test", Rule: "tenant", Expires: clock.Add(time.Hour)}
		switch i / len(addrs) % 4 {
		case 1:
			l.Expires = clock.Add(100 * time.Second) // keep stays at the hold
		case 3:
			l.Rule = "" // and back to "tenant"
		}
		tb.Learn(l)
	}
	ci := sh.big[hog]
	live := sh.byClient[hog]
	t.Logf("after %d learns: %d items, index all %d norule %d", learns, live, len(ci.all), len(ci.norule))
	if bound := 2*live + 16 + 1; len(ci.all) > bound || len(ci.norule) > bound {
		t.Errorf("index of %d items holds %d references (%d with no rule), want at most %d", live, len(ci.all), len(ci.norule), bound)
	}
	checkCounts(t, tb, -1)
}
