package dnsfilter

import (
	"hash/maphash"
	"math"
	"net"
	"net/netip"
	"sync"
	"time"
)

// rateLimiter is a token bucket per client (THREATS.md E1, G2): per
// client address, and per device where devs says several addresses are
// one LAN device's (one MAC in the neighbour table). A host can give
// itself any number of addresses of the LAN (IPv6 privacy addresses, free
// IPv4 ones): with a bucket per address it got the rate once per address.
// An address's bucket then points to its device's, which its queries
// spend. devs is asked only when an address is new to the limiter, and
// again at doubling counts of its queries while it has no device (its
// first datagram comes before the gateway has resolved it): not on the
// fast path. An address of a LAN link without a device (links: no
// usable neighbour entry) spends the one bucket all such addresses share
// (unresolved), and is asked about again at doubling counts too: a
// host that sends from forged sources of its subnet (nobody answers ARP
// or NDP for them) got a client's rate per forged address. When such an
// address's query is dropped at one of its doubling counts, the gateway
// is asked to resolve it (links.ResolveClient): a device's new address
// (a privacy address, whose first queries come before the gateway has
// an entry for it) then spends its device's bucket from its next query,
// not the one forged sources drain. It is bounded: idle buckets are swept, and when a shard (or
// the devices' map) is full a new client's bucket takes the place of an
// idle one, else of a random one.
type rateLimiter struct {
	rate   float64 // tokens per nanosecond
	burst  float64
	seed   maphash.Seed
	perCap int
	shards [rlShards]rlShard
	devs   ClientDevices // nil: each address is a client of its own
	links  ClientLinks   // nil: an address without a device is a client of its own

	// unresolved is the bucket of the addresses of a LAN link that have
	// no device (links): never swept.
	unresolved *devBucket
	// resolveErr is told an error of links.ResolveClient, once until
	// another one (resolveFailing, under devMu); nil: not told.
	resolveErr     func(error)
	resolveFailing string

	devMu  sync.Mutex // guards dev
	dev    map[string]*devBucket
	devCap int
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

	dev       *devBucket // the device's bucket this address spends (or rateLimiter.unresolved); nil: its own
	queries   uint32     // queries since the bucket was made (saturating)
	nextCheck uint32     // ask devs at this count, while dev is nil or unresolved
}

// devBucket is a device's bucket, shared by the buckets of its addresses
// (in any shard): it has a lock of its own.
type devBucket struct {
	mu  sync.Mutex
	mac string // the device's MAC as text, for the events of its queries
	bucket
}

func newRateLimiter(perSecond float64, burst int) *rateLimiter {
	r := &rateLimiter{rate: perSecond / float64(time.Second), burst: float64(burst), seed: maphash.MakeSeed(), perCap: rlClients / rlShards,
		dev: map[string]*devBucket{}, devCap: rlClients, unresolved: &devBucket{bucket: bucket{tokens: float64(burst)}}}
	for i := range r.shards {
		r.shards[i].m = map[netip.Addr]*bucket{}
	}
	return r
}

// allow takes a token for client. first is true for the first dropped query
// after an allowed one, so that a flood is logged once, not per packet.
func (r *rateLimiter) allow(client netip.Addr, now int64) (ok, first bool) {
	ok, first, _ = r.allowDevice(client, now)
	return ok, first
}

// allowDevice is allow, and returns the MAC of client's device as text
// when the limiter knows it (its bucket spends a device's): "" when it
// does not (and for an address that spends the unresolved bucket). It
// costs nothing more than allow: the MAC was looked up for the limit, and
// is kept formatted.
func (r *rateLimiter) allowDevice(client netip.Addr, now int64) (ok, first bool, dev string) {
	// One bucket per client whatever the socket: a wildcard TCP listener
	// is dual-stack and sees an IPv4 client as ::ffff:a.b.c.d, where the
	// UDP socket sees a.b.c.d.
	client = client.Unmap()
	b16 := client.As16()
	sh := &r.shards[maphash.Bytes(r.seed, b16[:])%rlShards]
	sh.mu.Lock()
	b := r.bucketLocked(sh, client, now)
	checked := false // the table was asked about client for this query
	if r.devs != nil && (b.dev == nil || b.dev == r.unresolved) && b.queries+1 >= b.nextCheck {
		checked = true
		// Ask outside the shard's lock: it may wait for the kernel.
		b.nextCheck = max(1, b.nextCheck) << 1
		sh.mu.Unlock()
		var db *devBucket
		if mac := r.devs.ClientDevice(client); mac != nil {
			db = r.device(string(mac), now)
		} else if r.links != nil && r.links.ClientOnLink(client) {
			db = r.unresolved
		}
		sh.mu.Lock()
		b = r.bucketLocked(sh, client, now) // it may have been swept meanwhile
		if b.dev == nil || b.dev == r.unresolved {
			b.dev = db
		}
	}
	if b.queries < math.MaxUint32 {
		b.queries++
	}
	if db := b.dev; db != nil {
		sh.mu.Unlock()
		db.mu.Lock()
		ok, first = db.take(r, now)
		db.mu.Unlock()
		if !ok && db == r.unresolved && checked {
			r.resolve(client)
		}
		return ok, first, db.mac
	}
	defer sh.mu.Unlock()
	ok, first = b.take(r, now)
	return ok, first, ""
}

// unresolvedSource reports whether client's queries spend the bucket
// the addresses of a LAN link without a device share (forged sources
// nobody answers ARP/NDP for, a device's new address until the gateway
// resolves it): one client for the limit, and for the tunnel alarm.
func (r *rateLimiter) unresolvedSource(client netip.Addr) bool {
	client = client.Unmap()
	b16 := client.As16()
	sh := &r.shards[maphash.Bytes(r.seed, b16[:])%rlShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	b := sh.m[client]
	return b != nil && b.dev == r.unresolved
}

// resolve asks the gateway to resolve client (links.ResolveClient),
// telling resolveErr of an error once until another one.
func (r *rateLimiter) resolve(client netip.Addr) {
	err := r.links.ResolveClient(client)
	r.devMu.Lock()
	defer r.devMu.Unlock()
	switch {
	case err == nil:
		r.resolveFailing = ""
	case err.Error() != r.resolveFailing:
		r.resolveFailing = err.Error()
		if r.resolveErr != nil {
			r.resolveErr(err)
		}
	}
}

// bucketLocked returns client's bucket in sh, making it if there is none.
func (r *rateLimiter) bucketLocked(sh *rlShard, client netip.Addr, now int64) *bucket {
	b := sh.m[client]
	if b == nil {
		if len(sh.m) >= r.perCap {
			r.sweepLocked(sh, now)
		}
		b = &bucket{tokens: r.burst, last: now, nextCheck: 1}
		sh.m[client] = b
	}
	return b
}

// device returns the bucket of the device mac, making it if there is
// none.
func (r *rateLimiter) device(mac string, now int64) *devBucket {
	r.devMu.Lock()
	defer r.devMu.Unlock()
	db := r.dev[mac]
	if db == nil {
		if len(r.dev) >= r.devCap {
			r.sweepDevicesLocked(now, true)
		}
		db = &devBucket{mac: net.HardwareAddr(mac).String(), bucket: bucket{tokens: r.burst, last: now}}
		r.dev[mac] = db
	}
	return db
}

// take refills b to now and takes a token from it.
func (b *bucket) take(r *rateLimiter, now int64) (ok, first bool) {
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

// sweepDevicesLocked removes the devices' buckets that are full again
// (idle devices: an address that still points to one spends it on, as
// its device's bucket until that address's own is swept); with full, it
// frees 1/rlRoom of the places as sweepLocked does.
func (r *rateLimiter) sweepDevicesLocked(now int64, full bool) {
	for k, db := range r.dev {
		db.mu.Lock()
		idle := db.tokens+float64(now-db.last)*r.rate >= r.burst
		db.mu.Unlock()
		if idle {
			delete(r.dev, k)
		}
	}
	if !full {
		return
	}
	keep := r.devCap - max(1, r.devCap/rlRoom)
	for k := range r.dev {
		if len(r.dev) <= keep {
			break
		}
		delete(r.dev, k)
	}
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
	r.devMu.Lock()
	r.sweepDevicesLocked(now, false)
	r.devMu.Unlock()
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
