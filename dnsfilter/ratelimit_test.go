package dnsfilter

import (
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
