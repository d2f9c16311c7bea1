package dnsfilter

import (
	"net/netip"
	"testing"
	"time"
)

// floodAddr is the i-th address of a flood from spoofed sources.
func floodAddr(i int) netip.Addr {
	b := netip.MustParseAddr("2001:db8::").As16()
	b[10], b[11], b[12], b[13], b[14], b[15] = 0xff, byte(i>>32), byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
	return netip.AddrFrom16(b)
}

// BenchmarkRateLimiterFull: a query from a new address when every shard is
// full of spent buckets (a flood from spoofed source addresses).
func BenchmarkRateLimiterFull(b *testing.B) {
	r := newRateLimiter(1, 1)
	now := time.Unix(1_800_000_000, 0).UnixNano()
	i := 0
	for ; i < 2*rlClients; i++ {
		r.allow(floodAddr(i), now)
	}
	for b.Loop() {
		r.allow(floodAddr(i), now)
		i++
	}
}

// BenchmarkCachePutFull: caching a new answer when every shard is full of
// unexpired ones (a client asking distinct names).
func BenchmarkCachePutFull(b *testing.B) {
	c := newCache(10000)
	now := time.Unix(1_800_000_000, 0).UnixNano()
	e := &entry{name: "x.example.", expires: now + int64(time.Hour), packed: 100}
	key := func(i int) []byte {
		return []byte{byte(i >> 32), byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)}
	}
	i := 0
	for ; i < 20000; i++ {
		c.put(key(i), e, now)
	}
	for b.Loop() {
		c.put(key(i), e, now)
		i++
	}
}
