package dnsfilter

import (
	"hash/maphash"
	"net/netip"
	"testing"
	"time"
)

// TestRateLimiterBounded: a client sending from 70,000 addresses (IPv6
// privacy addresses, a spoofed UDP flood) keeps at most rlClients buckets,
// all of them still limiting (none idle yet: the flood's buckets are spent),
// and a client the flood did not evict still gets its own bucket.
func TestRateLimiterBounded(t *testing.T) {
	r := newRateLimiter(1, 1)
	now := time.Unix(1_800_000_000, 0).UnixNano()
	base := netip.MustParseAddr("2001:db8::").As16()
	for i := range 70000 {
		b := base
		b[12], b[13], b[14], b[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		a := netip.AddrFrom16(b)
		r.allow(a, now) // spends the burst of 1
		r.allow(a, now) // limited
	}
	n := 0
	for i := range r.shards {
		n += len(r.shards[i].m)
	}
	if n > rlClients {
		t.Errorf("%d buckets after 70,000 addresses, bound %d", n, rlClients)
	}
	c := netip.MustParseAddr("192.0.2.7")
	if ok, _ := r.allow(c, now); !ok {
		t.Error("a new client's first query limited")
	}
	if ok, _ := r.allow(c, now); ok {
		t.Error("a new client's second query within the same instant allowed at burst 1")
	}
}

// examined is the number of buckets the limiter looked at to make room.
func (r *rateLimiter) examined() uint64 {
	var n uint64
	for i := range r.shards {
		sh := &r.shards[i]
		sh.mu.Lock()
		n += sh.examined
		sh.mu.Unlock()
	}
	return n
}

// TestRateLimiterFullWork: once every shard is full of spent buckets (a
// flood from spoofed addresses), each new address looked at its whole shard
// (2,048 buckets) under the shard's lock: 4.5 s for 200,000 addresses while
// every client's DNS waited on those locks. Making room now looks at a
// bounded number of buckets per new address, on average.
func TestRateLimiterFullWork(t *testing.T) {
	r := newRateLimiter(1, 1)
	now := time.Unix(1_800_000_000, 0).UnixNano()
	i := 0
	for ; i < 2*rlClients; i++ {
		r.allow(floodAddr(i), now)
	}
	before := r.examined()
	const n = 20000
	for range n {
		r.allow(floodAddr(i), now)
		i++
	}
	per := float64(r.examined()-before) / n
	t.Logf("%.1f buckets examined per new address", per)
	if per > 16 {
		t.Errorf("%.1f buckets examined per new address into a full limiter, want at most 16 (a shard holds %d)", per, r.perCap)
	}
}

// TestRateLimiterEvictsIdleFirst: making room in a full shard removes idle
// buckets (full again: nothing to remember) before any that still limits a
// client, and a bucket that limits survives as long as idle ones are left.
func TestRateLimiterEvictsIdleFirst(t *testing.T) {
	r := newRateLimiter(1, 1) // a spent bucket is full again after 1 s
	t0 := time.Unix(1_800_000_000, 0).UnixNano()
	sh := &r.shards[0]
	var idle, spent []netip.Addr
	shardOf := func(a netip.Addr) *rlShard {
		b16 := a.As16()
		return &r.shards[maphash.Bytes(r.seed, b16[:])%rlShards]
	}
	// Fill shard 0: half with buckets that will be idle, then half with
	// buckets spent later, which still limit.
	for i := 0; len(idle)+len(spent) < r.perCap; i++ {
		a := floodAddr(i)
		if shardOf(a) != sh {
			continue
		}
		if len(idle) < r.perCap/2 {
			r.allow(a, t0)
			idle = append(idle, a)
		} else {
			r.allow(a, t0+int64(2*time.Second))
			spent = append(spent, a)
		}
	}
	now := t0 + int64(2*time.Second) + 1 // the first half are full again
	added := 0
	for i := 1 << 30; added < r.perCap/4; i++ {
		a := floodAddr(i)
		if shardOf(a) != sh {
			continue
		}
		r.allow(a, now)
		added++
	}
	for _, a := range spent {
		if _, ok := sh.m[a]; !ok {
			t.Fatalf("a bucket still limiting %s was evicted while %d idle ones were there", a, len(idle))
		}
	}
	if len(sh.m) > r.perCap {
		t.Errorf("shard holds %d buckets, bound %d", len(sh.m), r.perCap)
	}
	// The spent buckets still limit: a query from one is refused.
	if ok, _ := r.allow(spent[0], now); ok {
		t.Error("a spent bucket allowed a query after idle ones were evicted")
	}
}
