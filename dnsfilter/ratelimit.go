package dnsfilter

import (
	"hash/maphash"
	"net/netip"
	"sync"
	"time"
)

// rateLimiter is a token bucket per client address (THREATS.md E1, G2). It
// is bounded: idle buckets are swept, and when a shard is full a new
// client's bucket takes the place of an idle one, else of a random one.
type rateLimiter struct {
	rate   float64 // tokens per nanosecond
	burst  float64
	seed   maphash.Seed
	perCap int
	shards [rlShards]rlShard
}

const (
	rlShards  = 32
	rlClients = 65536
)

type rlShard struct {
	mu       sync.Mutex // guards m, examined
	m        map[netip.Addr]*bucket
	examined uint64 // buckets looked at to make room, for tests
}

// clockStep is how far back a time may be, against one recorded earlier,
// before it counts as the wall clock set back rather than readers that
// took the time in another order.
const clockStep = int64(time.Second)

type bucket struct {
	tokens  float64
	last    int64 // unix nanoseconds
	dropped bool  // a query was dropped since the last allowed one
}

func newRateLimiter(perSecond float64, burst int) *rateLimiter {
	r := &rateLimiter{rate: perSecond / float64(time.Second), burst: float64(burst), seed: maphash.MakeSeed(), perCap: rlClients / rlShards}
	for i := range r.shards {
		r.shards[i].m = map[netip.Addr]*bucket{}
	}
	return r
}

// allow takes a token for client. first is true for the first dropped query
// after an allowed one, so that a flood is logged once, not per packet.
func (r *rateLimiter) allow(client netip.Addr, now int64) (ok, first bool) {
	// One bucket per client whatever the socket: a wildcard TCP listener
	// is dual-stack and sees an IPv4 client as ::ffff:a.b.c.d, where the
	// UDP socket sees a.b.c.d.
	client = client.Unmap()
	b16 := client.As16()
	sh := &r.shards[maphash.Bytes(r.seed, b16[:])%rlShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	b := sh.m[client]
	if b == nil {
		if len(sh.m) >= r.perCap {
			r.sweepLocked(sh, now)
		}
		b = &bucket{tokens: r.burst, last: now}
		sh.m[client] = b
	}
	switch el := now - b.last; {
	case el > 0:
		b.tokens = min(r.burst, b.tokens+float64(el)*r.rate)
		b.last = now
	case el < -clockStep:
		// The wall clock was set back: refill from here, instead of
		// once the clock has caught up with the bucket's time.
		b.last = now
	}
	if b.tokens >= 1 {
		b.tokens--
		b.dropped = false
		return true, false
	}
	first = !b.dropped
	b.dropped = true
	return false, first
}

// sweepLocked makes room in a full shard: it removes buckets that are full
// again (idle clients), and when fewer than rlRoom of the shard's places
// are free then, random others (map order) until they are. Freeing a batch
// keeps the scan to one per batch of new clients: under a flood from
// spoofed addresses, where every bucket still limits, a scan per new
// address cost the whole shard each. It evicts no more limiting buckets
// than the flood's new addresses, on average, as a scan per address did.
func (r *rateLimiter) sweepLocked(sh *rlShard, now int64) {
	for k, b := range sh.m {
		sh.examined++
		if b.tokens+float64(now-b.last)*r.rate >= r.burst {
			delete(sh.m, k)
		}
	}
	keep := r.perCap - max(1, r.perCap/rlRoom)
	for k := range sh.m {
		if len(sh.m) <= keep {
			break
		}
		sh.examined++
		delete(sh.m, k)
	}
}

// rlRoom: a full shard is swept until 1/rlRoom of its places are free.
const rlRoom = 8

func (r *rateLimiter) sweep(now int64) {
	for i := range r.shards {
		sh := &r.shards[i]
		sh.mu.Lock()
		for k, b := range sh.m {
			if b.tokens+float64(now-b.last)*r.rate >= r.burst {
				delete(sh.m, k)
			}
		}
		sh.mu.Unlock()
	}
}
