package dnsfilter

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestClockStepBackLimiter: the wall clock set back (NTP correcting a
// clock that ran ahead, an operator's date) must not starve a client
// whose bucket was filled at the later time: tokens come back at the
// configured rate from the step on, not once the clock has caught up.
func TestClockStepBackLimiter(t *testing.T) {
	r := newRateLimiter(10, 10)
	c := netip.MustParseAddr("192.0.2.7")
	now := time.Unix(1_800_000_000, 0).UnixNano()
	for range 10 {
		if ok, _ := r.allow(c, now); !ok {
			t.Fatal("burst refused")
		}
	}
	if ok, _ := r.allow(c, now); ok {
		t.Fatal("query past the burst allowed")
	}
	now -= int64(2 * time.Hour) // the step back
	if ok, _ := r.allow(c, now); ok {
		t.Error("the step back refilled the bucket")
	}
	now += int64(time.Second) // 10 tokens at 10/s
	allowed := 0
	for range 20 {
		if ok, _ := r.allow(c, now); ok {
			allowed++
		}
	}
	if allowed != 10 {
		t.Errorf("a second after a step back: %d queries allowed, want 10 (the bucket waits for the clock to catch up)", allowed)
	}
	// A few microseconds back (readers that took the time in another
	// order) is not a step: it neither refills nor re-bases the bucket.
	now += int64(time.Second)
	r2 := newRateLimiter(1, 1)
	r2.allow(c, now)
	r2.allow(c, now-int64(time.Microsecond))
	if ok, _ := r2.allow(c, now+int64(time.Second)-int64(time.Microsecond)); ok {
		t.Error("a microsecond's disorder credited a token early")
	}
}

// TestClockStepBackCache: after the clock is set back, a cached answer
// still leaves the cache when its TTL has run out in real time; it is not
// served until the clock has caught up with the time it was stored at.
func TestClockStepBackCache(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	set := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{Now: clock})
	for _, proto := range []string{"udp", "tcp"} {
		ask(t, proto, ts.Addr, "cdn.allowed.test.", dns.TypeA, false)
	}
	if n := up.count("cdn.allowed.test"); n != 1 {
		t.Fatalf("upstream asked %d times before the step", n)
	}
	set(-2 * time.Hour)
	set(61 * time.Second) // past the answer's smallest TTL (60 s)
	for _, proto := range []string{"udp", "tcp"} {
		ask(t, proto, ts.Addr, "cdn.allowed.test.", dns.TypeA, false)
	}
	// Asked again once; the TCP query is served the new answer.
	if n := up.count("cdn.allowed.test"); n != 2 {
		t.Errorf("upstream asked %d times in all, want 2 (1: an answer stored before a 2-hour step back was served past its TTL)", n)
	}
}
