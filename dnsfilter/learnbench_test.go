package dnsfilter

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// BenchmarkLearnFullShardFlood: a new learned address into a full shard,
// where one client (a flood: a hostile authoritative server's answers
// under an allowed wildcard) holds about nine tenths of the items and 16
// quiet clients the rest, learned by the flooding client (it gives up
// its own soonest-expiring item) and by a quiet one (the flooder's item
// goes too); next to a new address into a table half full (no
// eviction). At the table's default size (65,536: 1,024 per shard) and
// at 1,048,576 (16,384 per shard; the table has no maximum).
func BenchmarkLearnFullShardFlood(b *testing.B) {
	base := time.Unix(1_800_000_000, 0)
	flooder := netip.MustParseAddr("192.0.2.66")
	quiet := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 0, 2, byte(i%16 + 1)}) }
	// fill learns n new addresses, the first tenth from quiet clients
	// (30 minutes), the rest from the flooder (an hour and on).
	fill := func(tb *Table, n int) int {
		for i := range n {
			l := Learned{Client: flooder, Name: "f.tenant.test", Addr: floodAddr(i), Rule: "r", Expires: base.Add(time.Hour + time.Duration(i)*time.Millisecond)}
			if i < n/10 {
				l.Client, l.Name, l.Expires = quiet(i), "cdn.vendor.test", base.Add(30*time.Minute)
			}
			tb.Learn(l)
		}
		return n
	}
	for _, size := range []int{defaultTableSize, 1 << 20} {
		b.Run(fmt.Sprintf("size=%d/not-full", size), func(b *testing.B) {
			newT := func() (*Table, int) {
				tb := NewTable(2 * size)
				tb.now = func() time.Time { return base }
				return tb, fill(tb, size)
			}
			tb, i := newT()
			for b.Loop() {
				if tb.Len() >= size*3/2 {
					b.StopTimer()
					tb, i = newT()
					b.StartTimer()
				}
				tb.Learn(Learned{Client: flooder, Name: "f.tenant.test", Addr: floodAddr(i), Rule: "r", Expires: base.Add(2 * time.Hour)})
				i++
			}
		})
		for _, who := range []string{"flooder", "quiet"} {
			b.Run(fmt.Sprintf("size=%d/full/%s", size, who), func(b *testing.B) {
				tb := NewTable(size)
				tb.now = func() time.Time { return base }
				i := fill(tb, size)
				for full := size / tableShards * tableShards; tb.Len() < full; i++ { // every shard full
					tb.Learn(Learned{Client: flooder, Name: "f.tenant.test", Addr: floodAddr(i), Rule: "r", Expires: base.Add(time.Hour + time.Duration(i)*time.Millisecond)})
				}
				c := flooder
				if who == "quiet" {
					c = quiet(3)
				}
				ev := tb.Evicted()
				for b.Loop() {
					tb.Learn(Learned{Client: c, Name: "g.tenant.test", Addr: floodAddr(i), Rule: "r", Expires: base.Add(2 * time.Hour)})
					i++
				}
				if tb.Evicted() == ev {
					b.Fatal("no add evicted an item: the shard was not full")
				}
			})
		}
	}
}
