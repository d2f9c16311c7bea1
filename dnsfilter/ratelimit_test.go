package dnsfilter

import (
	"hash/maphash"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"egressd/internal/fakemac"
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

// TestRateLimiterPerDevice: the addresses of one LAN device (one MAC)
// share one client's bucket, however many there are; another device and
// an address without one (routed) keep their own. An address the table
// did not know at its first query joins its device once it does; the
// table is asked at doubling counts, not per query.
func TestRateLimiterPerDevice(t *testing.T) {
	const burst = 10
	r := newRateLimiter(1, burst)
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	r.devs = devs
	now := time.Unix(1_800_000_000, 0).UnixNano()
	flooder := net.HardwareAddr{2, 0, 0, 0, 0, 0xf}
	var addrs []netip.Addr
	for i := range 64 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 15: byte(i)})
		devs.Set(a, flooder)
		addrs = append(addrs, a)
	}
	v4 := netip.MustParseAddr("192.0.2.30")
	devs.Set(v4, flooder)
	addrs = append(addrs, v4)
	allowed := 0
	for range 5 {
		for _, a := range addrs {
			if ok, _ := r.allow(a, now); ok {
				allowed++
			}
		}
	}
	if allowed != burst {
		t.Errorf("one device's 65 addresses got %d queries allowed at once, want its one burst %d", allowed, burst)
	}
	other := netip.MustParseAddr("192.0.2.40")
	devs.Set(other, net.HardwareAddr{2, 0, 0, 0, 0, 0x40})
	routed := netip.MustParseAddr("198.51.100.9")
	for _, c := range []netip.Addr{other, routed} {
		n := 0
		for range burst + 5 {
			if ok, _ := r.allow(c, now); ok {
				n++
			}
		}
		if n != burst {
			t.Errorf("%s got %d of %d, want its own burst %d", c, n, burst+5, burst)
		}
	}

	// An address the table learns only after its first query.
	late := netip.MustParseAddr("2001:db8:1::99")
	if ok, _ := r.allow(late, now); !ok {
		t.Error("a new address's first query (its own bucket, full) limited")
	}
	devs.Set(late, flooder)
	n := 0
	for range 20 {
		if ok, _ := r.allow(late, now); ok {
			n++
		}
	}
	if n != 0 {
		t.Errorf("an address the table learned late got %d more queries from its spent device", n)
	}
	// Doubling: a routed address's 10,000 queries ask the table a few
	// times, not per query.
	asks0 := devs.Asked()
	for range 10000 {
		r.allow(routed, now)
	}
	if d := devs.Asked() - asks0; d > 16 {
		t.Errorf("10,000 queries of an address without a device asked the table %d times", d)
	}
	// The device refills at the client rate, once for all its addresses.
	now += 3 * int64(time.Second)
	allowed = 0
	for _, a := range addrs {
		if ok, _ := r.allow(a, now); ok {
			allowed++
		}
	}
	if allowed != 3 {
		t.Errorf("3 s later the device's addresses got %d, want 3 (1/s)", allowed)
	}
	// Idle devices are swept with idle addresses.
	r.sweep(now + 100*int64(time.Second))
	if len(r.dev) != 0 {
		t.Errorf("%d device buckets after an idle sweep", len(r.dev))
	}
}

// linkedTable is a fakemac.Table that also tells the addresses of a LAN
// link (ClientLinks), and counts the addresses it was asked to resolve.
type linkedTable struct {
	*fakemac.Table
	link     netip.Prefix
	mu       sync.Mutex
	resolved map[netip.Addr]int
}

func (l *linkedTable) ClientOnLink(a netip.Addr) bool { return l.link.Contains(a.Unmap()) }

func (l *linkedTable) ResolveClient(a netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.resolved[a]++
	return nil
}

func (l *linkedTable) resolves(a netip.Addr) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.resolved[a]
}

// TestRateLimiterUnresolvedShare: the addresses of a LAN link that have
// no device (no usable neighbour entry: forged sources nobody answers ARP
// for) share one client's bucket, however many there are; an address off
// the link (routed) keeps its own; and a device's new address, which
// spends the shared bucket until the gateway resolves it, spends its
// device's once the table knows it (asked again at its next doubling
// count).
func TestRateLimiterUnresolvedShare(t *testing.T) {
	const burst = 10
	r := newRateLimiter(1, burst)
	devs := &linkedTable{Table: fakemac.New(nil), link: netip.MustParsePrefix("198.18.1.0/24"), resolved: map[netip.Addr]int{}}
	r.devs, r.links = devs, devs
	now := time.Unix(1_800_000_000, 0).UnixNano()
	allowed := 0
	for range 5 {
		for i := range 64 {
			if ok, _ := r.allow(netip.AddrFrom4([4]byte{198, 18, 1, byte(150 + i)}), now); ok {
				allowed++
			}
		}
	}
	if allowed != burst {
		t.Errorf("64 unresolved addresses of the link got %d queries allowed at once, want one burst %d", allowed, burst)
	}
	routed := netip.MustParseAddr("198.51.100.9")
	n := 0
	for range burst + 5 {
		if ok, _ := r.allow(routed, now); ok {
			n++
		}
	}
	if n != burst {
		t.Errorf("a routed address got %d of %d, want its own burst %d", n, burst+5, burst)
	}

	// The gateway was asked to resolve the forged sources whose queries
	// it dropped, at their doubling counts (2 and 4: the first was
	// allowed or dropped at 1), not per query.
	for i := range 64 {
		if n := devs.resolves(netip.AddrFrom4([4]byte{198, 18, 1, byte(150 + i)})); n > 3 {
			t.Errorf("198.18.1.%d: resolve asked %d times for 5 queries", 150+i, n)
		}
	}
	if n := devs.resolves(routed); n != 0 {
		t.Errorf("resolve asked %d times for a routed address", n)
	}

	// A device's new address: its first query spends the shared bucket
	// (spent: dropped), and the gateway is asked to resolve it; resolved,
	// its next query is its device's.
	fresh := netip.MustParseAddr("198.18.1.20")
	if ok, _ := r.allow(fresh, now); ok {
		t.Error("an unresolved address's query allowed from the spent shared bucket")
	}
	if n := devs.resolves(fresh); n != 1 {
		t.Errorf("a new address's dropped first query asked to resolve it %d times, want 1", n)
	}
	devs.Set(fresh, net.HardwareAddr{2, 0, 0, 0, 0, 0x20})
	if ok, _ := r.allow(fresh, now); !ok {
		t.Error("a resolved device's query limited: it still spends the shared bucket")
	}
	// Doubling: an unresolved address's 10,000 queries ask the table a
	// few times, not per query.
	asks0 := devs.Asked()
	for range 10000 {
		r.allow(netip.MustParseAddr("198.18.1.99"), now)
	}
	if d := devs.Asked() - asks0; d > 16 {
		t.Errorf("10,000 queries of an unresolved address asked the table %d times", d)
	}
	// The shared bucket refills at the client rate, and is not swept.
	now += 3 * int64(time.Second)
	r.sweep(now + 100*int64(time.Second))
	allowed = 0
	for i := range 64 {
		if ok, _ := r.allow(netip.AddrFrom4([4]byte{198, 18, 1, byte(150 + i)}), now+100*int64(time.Second)); ok {
			allowed++
		}
	}
	if allowed != burst {
		t.Errorf("after 100 s idle the unresolved addresses got %d, want one burst %d", allowed, burst)
	}
}
