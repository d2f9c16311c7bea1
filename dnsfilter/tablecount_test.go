package dnsfilter

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"
)

// checkCounts recounts every shard's items per client, with no rule, and
// in all, against the shard's counters.
func checkCounts(t *testing.T, tb *Table, step int) {
	t.Helper()
	total := 0
	for i := range tb.shards {
		sh := &tb.shards[i]
		sh.mu.Lock()
		by := map[netip.Addr]int{}
		n, norule := 0, 0
		for _, items := range sh.m {
			if len(items) == 0 || len(items) > maxPerAddr {
				t.Errorf("step %d: shard %d holds %d items for an address", step, i, len(items))
			}
			for _, it := range items {
				by[it.client]++
				n++
				norule += noRule(it.rule)
			}
		}
		if n != sh.n || norule != sh.norule {
			t.Errorf("step %d: shard %d: n %d norule %d, recount %d %d", step, i, sh.n, sh.norule, n, norule)
		}
		if len(by) != len(sh.byClient) {
			t.Errorf("step %d: shard %d: byClient has %d clients, recount %d (%v vs %v)", step, i, len(sh.byClient), len(by), sh.byClient, by)
		}
		for c, k := range sh.byClient {
			if by[c] != k {
				t.Errorf("step %d: shard %d: byClient[%v] = %d, recount %d", step, i, c, k, by[c])
			}
		}
		// Every client holding its share has its items indexed, and the
		// index's victim is the one a walk of the shard finds.
		for c, k := range sh.byClient {
			ci := sh.big[c]
			if ci == nil {
				if k >= sh.share {
					t.Errorf("step %d: shard %d: client %v holds %d (share %d), not indexed", step, i, c, k, sh.share)
				}
				continue
			}
			now := tb.now().UnixNano()
			var want *tableItem
			for _, items := range sh.m {
				for j := range items {
					if items[j].client == c && (want == nil || items[j].evictsBefore(want, now)) {
						want = &items[j]
					}
				}
			}
			a, j, ok := ci.victim(sh, now)
			if !ok {
				t.Errorf("step %d: shard %d: client %v's index finds none of its %d items", step, i, c, k)
				continue
			}
			if got := &sh.m[a][j]; got.client != c || got.evictRank(now) != want.evictRank(now) || got.keep() != want.keep() {
				t.Errorf("step %d: shard %d: client %v's index gives %+v, a walk %+v", step, i, c, *got, *want)
			}
		}
		for c := range sh.big {
			if sh.byClient[c] == 0 {
				t.Errorf("step %d: shard %d: client %v indexed with no items", step, i, c)
			}
		}
		total += n
		sh.mu.Unlock()
	}
	if int64(total) != tb.size.Load() {
		t.Errorf("step %d: size %d, recount %d", step, tb.size.Load(), total)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// TestTableCountsChurn churns a small table with learns (new pairs, moved
// expiries, rule changes, a crowded address's replacements, full shards'
// evictions), sweeps, and save/load round trips, and recounts the shard
// counters (byClient, norule, n) after each step.
func TestTableCountsChurn(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 27))
	clock := time.Unix(1_800_000_000, 0)
	newT := func() *Table {
		tb := NewTable(tableShards * 6)
		tb.now = func() time.Time { return clock }
		return tb
	}
	tb := newT()
	clients := make([]netip.Addr, 12)
	for i := range clients {
		clients[i] = netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)})
	}
	addrs := make([]netip.Addr, 300)
	for i := range addrs {
		addrs[i] = netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
	}
	crowded := addrs[0] // many pairs: the per-address replacement
	for step := range 20000 {
		switch op := r.IntN(100); {
		case op < 80:
			a := addrs[r.IntN(len(addrs))]
			if r.IntN(4) == 0 {
				a = crowded
			}
			rule := ""
			if r.IntN(2) == 0 {
				rule = "tenant"
			}
			tb.Learn(Learned{
				Client:  clients[r.IntN(len(clients))],
				Addr:    a,
				Name:    fmt.Sprintf("n%d.tenant.test", r.IntN(40)),
				Rule:    rule,
				Expires: clock.Add(time.Duration(1+r.IntN(600)) * time.Second),
			})
		case op < 85:
			clock = clock.Add(time.Duration(r.IntN(20)) * time.Second)
		case op < 88:
			tb.Sweep()
		case op < 90:
			var buf bytes.Buffer
			if _, err := tb.Save(&buf); err != nil {
				t.Fatalf("save: %v", err)
			}
			tb = newT()
			if _, err := tb.Load(&buf, nil); err != nil {
				t.Fatalf("load: %v", err)
			}
		case op < 92:
			// Load into a table that already holds items.
			var buf bytes.Buffer
			if _, err := tb.Save(&buf); err != nil {
				t.Fatalf("save: %v", err)
			}
			if _, err := tb.Load(&buf, nil); err != nil {
				t.Fatalf("load again: %v", err)
			}
		default:
			if r.IntN(20) == 0 {
				clock = clock.Add(time.Duration(r.IntN(300)) * time.Second)
			}
		}
		checkCounts(t, tb, step)
	}
	t.Logf("evicted %d refused %d len %d", tb.Evicted(), tb.Refused(), tb.Len())
	clock = clock.Add(2 * time.Hour)
	tb.Sweep()
	checkCounts(t, tb, -1)
	for i := range tb.shards {
		if n := len(tb.shards[i].byClient); n != 0 {
			t.Fatalf("shard %d keeps %d clients' keys after all expired", i, n)
		}
	}
}
