package dnsfilter

import (
	"encoding/binary"
	"hash/maphash"
	"math"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// entry is an upstream answer, filtered (rebinding, ECH), ready to be given
// to any client that may resolve the name. It is immutable once built, so
// concurrent queries share it (the cache, singleflight waiters).
type entry struct {
	name   string   // normalised name asked
	msg    *dns.Msg // ID 0, lower-case question, no OPT; never modified
	rcode  int
	stored int64 // unix nanoseconds, the time TTLs in wire count from
	// expires is when the entry leaves the cache: the smallest TTL of the
	// answer (positive) or of the SOA (negative, RFC 2308), capped.
	expires int64
	// wire is msg packed for a client without EDNS ([0]) and with it ([1],
	// an OPT with our UDP size and the key's DO bit), each packed on first
	// use; ttls are the offsets of the TTL fields in each, rewritten on
	// every hit.
	once    [2]sync.Once
	wire    [2][]byte
	ttls    [2][]uint16
	do      bool
	udpSize uint16
	// addrs are the answer's addresses with their own expiry, for the
	// learned-address table.
	addrs []learnedAddr
	// gate is set once Deps.Firewall holds addrs for a rule (see
	// Firewall.Learn); nil before.
	gate     atomic.Pointer[gateMark]
	upstream string
	filtered string // what the answer filter removed ("rebinding", "ech"), for the log
	packed   int    // msg's packed size, for the cache's byte bound
	// capped is how many of the name's addresses were past
	// maxAnswerAddrs: dropped from the answer and not learned.
	capped int
}

// cost is what an entry counts against cacheBytes: its packed answer and
// a little for its key and the rest.
func (e *entry) cost() int { return e.packed + len(e.name) + 128 }

type learnedAddr struct {
	addr    netip.Addr
	expires int64
}

// cache is a bounded TTL cache of entries keyed by the question (lower-case
// wire name, type, class, DO and CD bits), bounded in entries and in
// bytes (cacheBytes). When a shard is full, expired entries go first, else
// random ones (map order): cheap, and good enough for a resolver cache. A
// full shard frees an eighth of itself at once, so that the scan for
// expired entries is paid once per batch of new answers.
type cache struct {
	shards [cacheShards]cacheShard
	seed   maphash.Seed
	perCap int
	size   atomic.Int64
	evict  atomic.Uint64
}

const cacheShards = 64

// cacheRoom: a full shard makes room until 1/cacheRoom of it is free.
const cacheRoom = 8

// cacheBytes bounds the packed size of the cached answers, all shards
// together (an entry holds about three times its packed size: the parsed
// message and its packed copies). Without it a client asking distinct
// names of a zone it controls, whose answers are 64 KiB each, made every
// cached entry one of those: over a gigabyte at the default 10,000
// entries. Ordinary answers (a few hundred bytes) never reach it.
const cacheBytes = 16 << 20

type cacheShard struct {
	mu       sync.RWMutex // guards m, bytes, examined
	m        map[string]*entry
	bytes    int    // cost of the entries in m
	examined uint64 // entries looked at to make room, for tests
}

func newCache(size int) *cache {
	c := &cache{seed: maphash.MakeSeed(), perCap: max(1, (size+cacheShards-1)/cacheShards)}
	for i := range c.shards {
		c.shards[i].m = make(map[string]*entry)
	}
	return c
}

func (c *cache) shard(key []byte) *cacheShard {
	return &c.shards[maphash.Bytes(c.seed, key)%cacheShards]
}

// get returns the unexpired entry for key. It does not allocate.
func (c *cache) get(key []byte, now int64) *entry {
	sh := c.shard(key)
	sh.mu.RLock()
	e := sh.m[string(key)]
	sh.mu.RUnlock()
	if e == nil || e.stale(now) {
		return nil
	}
	return e
}

// stale reports whether e should leave the cache at now: expired, or
// stored after now (the clock was set back).
func (e *entry) stale(now int64) bool { return e.expires <= now || e.stored > now+clockStep }

func (c *cache) put(key []byte, e *entry, now int64) {
	cost := e.cost()
	if cost > cacheBytes/cacheShards {
		return
	}
	sh := c.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if old, ok := sh.m[string(key)]; ok {
		delete(sh.m, string(key))
		sh.bytes -= old.cost()
		c.size.Add(-1)
	}
	limit := cacheBytes / cacheShards
	if len(sh.m) >= c.perCap || sh.bytes+cost > limit {
		// Make room for a batch: expired entries first, then random
		// ones (map order) until an eighth of the shard's entries and
		// bytes are free, so that the scan runs once per batch of new
		// answers, not once for each.
		keepN, keepBytes := c.perCap-max(1, c.perCap/cacheRoom), limit-limit/cacheRoom-cost
		removed := 0
		for k, v := range sh.m {
			sh.examined++
			if v.stale(now) {
				delete(sh.m, k)
				sh.bytes -= v.cost()
				removed++
			}
		}
		for k, v := range sh.m {
			if len(sh.m) <= keepN && sh.bytes <= keepBytes {
				break
			}
			sh.examined++
			delete(sh.m, k)
			sh.bytes -= v.cost()
			removed++
			c.evict.Add(1)
		}
		c.size.Add(int64(-removed))
	}
	sh.m[string(key)] = e
	sh.bytes += cost
	c.size.Add(1)
}

// sweep removes expired entries.
func (c *cache) sweep(now int64) {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		for k, v := range sh.m {
			if v.stale(now) {
				delete(sh.m, k)
				sh.bytes -= v.cost()
				c.size.Add(-1)
			}
		}
		sh.mu.Unlock()
	}
}

func (c *cache) len() int { return int(c.size.Load()) }

// Key flags.
const (
	keyDO = 1 << 0
	keyCD = 1 << 1
)

// appendKey appends the cache key of a question: the name in lower-case wire
// form, type, class and flags. name must be a valid domain name.
func appendKey(dst []byte, name string, qtype, qclass uint16, flags byte) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, 256)...)
	n, err := dns.PackDomainName(dns.Fqdn(name), dst[start:], 0, nil, false)
	if err != nil {
		return dst[:start]
	}
	dst = dst[:start+n]
	lowerASCII(dst[start:])
	dst = binary.BigEndian.AppendUint16(dst, qtype)
	dst = binary.BigEndian.AppendUint16(dst, qclass)
	return append(dst, flags)
}

func lowerASCII(b []byte) {
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
}

// ttlOffsets returns the offsets of the TTL fields of every RR but OPT in a
// packed message, or ok=false if the message does not parse.
func ttlOffsets(msg []byte) (offs []uint16, ok bool) {
	if len(msg) < 12 {
		return nil, false
	}
	qd := int(binary.BigEndian.Uint16(msg[4:]))
	rr := int(binary.BigEndian.Uint16(msg[6:])) + int(binary.BigEndian.Uint16(msg[8:])) + int(binary.BigEndian.Uint16(msg[10:]))
	off := 12
	for range qd {
		off = skipName(msg, off)
		if off < 0 || off+4 > len(msg) {
			return nil, false
		}
		off += 4
	}
	for range rr {
		off = skipName(msg, off)
		if off < 0 || off+10 > len(msg) {
			return nil, false
		}
		typ := binary.BigEndian.Uint16(msg[off:])
		if typ != dns.TypeOPT {
			offs = append(offs, uint16(off+4))
		}
		rdlen := int(binary.BigEndian.Uint16(msg[off+8:]))
		off += 10 + rdlen
		if off > len(msg) {
			return nil, false
		}
	}
	return offs, off == len(msg)
}

// skipName returns the offset after the (possibly compressed) name at off,
// or -1.
func skipName(msg []byte, off int) int {
	for n := 0; n < 128; n++ {
		if off >= len(msg) {
			return -1
		}
		c := int(msg[off])
		switch c & 0xC0 {
		case 0x00:
			if c == 0 {
				return off + 1
			}
			off += 1 + c
		case 0xC0:
			if off+2 > len(msg) {
				return -1
			}
			return off + 2
		default:
			return -1
		}
	}
	return -1
}

// wireTTL is a TTL from an upstream answer: one with the top bit set is
// taken as 0 (RFC 2181 §8), not as the 68 years it would spell, which the
// learned-address table would otherwise keep.
func wireTTL(v uint32) time.Duration {
	if v > math.MaxInt32 {
		return 0
	}
	return time.Duration(v) * time.Second
}

// newEntry builds an entry from a filtered upstream answer. m must be
// private to the caller; it becomes the entry's.
func newEntry(name string, m *dns.Msg, do bool, udpSize uint16, now time.Time, maxTTL, maxNeg time.Duration, upstream, filtered string) *entry {
	m.Id = 0
	m.Compress = true
	// We answer as a recursive resolver, not as the zone's authority.
	m.RecursionAvailable, m.Authoritative = true, false
	// Drop the upstream's OPT (and any TSIG/SIG0 in additional, which are
	// per-hop); each client gets an OPT of ours, or none.
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		switch rr.Header().Rrtype {
		case dns.TypeOPT, dns.TypeTSIG, dns.TypeSIG:
			continue
		}
		extra = append(extra, rr)
	}
	m.Extra = extra
	// No record is passed on with a TTL over maxTTL (and one with the top
	// bit set says 0, RFC 2181 §8): the client is told no longer than the
	// cache and the learned-address table keep the answer. A hostile
	// authoritative server of a name under an allowed wildcard otherwise
	// had its address vouched for by the table (the proxy's A2 check,
	// capture) for the 68 years a TTL of 2^31-1 spells.
	capTTL := uint32(maxTTL / time.Second)
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			if h := rr.Header(); wireTTL(h.Ttl) > maxTTL {
				h.Ttl = capTTL
			} else if wireTTL(h.Ttl) == 0 {
				h.Ttl = 0
			}
		}
	}
	var chain []string
	var qtype uint16
	capped := 0
	if m.Rcode == dns.RcodeSuccess && len(m.Answer) > 0 {
		chain, qtype = answerChain(name, m)
		capped = capAnswerAddrs(m, chain, qtype)
	}
	e := &entry{name: name, msg: m, rcode: m.Rcode, stored: now.UnixNano(), upstream: upstream, filtered: filtered, do: do, udpSize: udpSize, packed: m.Len(), capped: capped}

	ttl := time.Duration(-1)
	switch {
	case m.Rcode == dns.RcodeSuccess && len(m.Answer) > 0:
		for _, rr := range m.Answer {
			t := wireTTL(rr.Header().Ttl)
			if ttl < 0 || t < ttl {
				ttl = t
			}
			a := rrAddr(rr)
			if a.IsValid() && rr.Header().Rrtype == qtype && slices.Contains(chain, strings.ToLower(rr.Header().Name)) {
				// A TTL of 0 is for the transaction in progress (RFC
				// 1035 §3.2.1): the client uses the address at once, so
				// the firewall and the table must have it too, for the
				// second that TTLs on the wire round down to.
				e.addrs = append(e.addrs, learnedAddr{addr: a.Unmap(), expires: now.Add(max(t, time.Second)).UnixNano()})
			}
		}
		ttl = min(ttl, maxTTL)
	case m.Rcode == dns.RcodeSuccess || m.Rcode == dns.RcodeNameError:
		// Negative answer: cacheable only with an SOA (RFC 2308 §5).
		for _, rr := range m.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				ttl = min(wireTTL(soa.Hdr.Ttl), wireTTL(soa.Minttl))
				ttl = min(ttl, maxNeg)
			}
		}
	}
	if ttl > 0 {
		e.expires = now.Add(ttl).UnixNano()
	} // else 0: not cacheable, used once

	return e
}

// maxAnswerAddrs bounds the addresses one answer adds to the
// learned-address table (and hands the firewall): real answers hold 1 to
// 16 (CDNs give 2 to 8, round-robin pools up to 16), a classic 512-byte
// answer has room for about 28 and a 1232-byte one (the EDNS size of DNS
// Flag Day 2020) for about 75, so 64 leaves every answer a resolver
// ordinarily gets whole. A hostile authoritative server of a name under an
// allowed wildcard answering thousands over TCP adds 64.
const maxAnswerAddrs = 64

// capAnswerAddrs drops from m's answer section the address records of the
// type asked on the question's chain past the first maxAnswerAddrs, and
// returns how many it dropped: the client is given no address the table
// and the firewall do not hold (a connection to it would fail the proxy's
// SNI check).
func capAnswerAddrs(m *dns.Msg, chain []string, qtype uint16) int {
	n, dropped := 0, 0
	kept := m.Answer[:0]
	for _, rr := range m.Answer {
		if t := rr.Header().Rrtype; (t == dns.TypeA || t == dns.TypeAAAA) && t == qtype && slices.Contains(chain, strings.ToLower(rr.Header().Name)) {
			if n++; n > maxAnswerAddrs {
				dropped++
				continue
			}
		}
		kept = append(kept, rr)
	}
	clear(m.Answer[len(kept):])
	m.Answer = kept
	return dropped
}

// maxChain bounds the CNAME chain answerChain follows (resolvers give up
// after 8 to 16 links).
const maxChain = 16

// answerChain returns the names (lower case, fully qualified) of the
// question's own CNAME chain in the answer section of m, the question's
// name first, and the type asked. Only address records of the type asked
// whose owner is on the chain are learned: what the client's resolver
// takes from the answer. Address records of other names, which a hostile
// authoritative server of a name under an allowed wildcard may add (another
// rule's name, the end of a chain that is not this one's), are passed on
// but credit nothing to the name asked.
func answerChain(name string, m *dns.Msg) ([]string, uint16) {
	qtype := uint16(dns.TypeNone)
	chain := []string{strings.ToLower(dns.Fqdn(name))}
	if len(m.Question) == 1 {
		qtype = m.Question[0].Qtype
		chain[0] = strings.ToLower(m.Question[0].Name)
	}
	for len(chain) <= maxChain {
		cur, next := chain[len(chain)-1], ""
		for _, rr := range m.Answer {
			if c, ok := rr.(*dns.CNAME); ok && strings.EqualFold(c.Hdr.Name, cur) {
				next = strings.ToLower(c.Target)
				break
			}
		}
		if next == "" || slices.Contains(chain, next) {
			break
		}
		chain = append(chain, next)
	}
	return chain, qtype
}

// wireFor returns the packed answer without (0) or with (1) an OPT, packing
// it on first use; nil if it does not pack.
func (e *entry) wireFor(i int) ([]byte, []uint16) {
	e.once[i].Do(func() {
		m := e.msg
		if i == 1 {
			c := *e.msg // shallow: the records are shared and only read
			c.Extra = append(append([]dns.RR(nil), e.msg.Extra...), newOPT(e.udpSize, e.do))
			m = &c
		}
		w, err := m.Pack()
		if err != nil {
			return
		}
		offs, ok := ttlOffsets(w)
		if !ok {
			return
		}
		e.wire[i], e.ttls[i] = w, offs
	})
	return e.wire[i], e.ttls[i]
}

func newOPT(udpSize uint16, do bool) *dns.OPT {
	o := &dns.OPT{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeOPT}}
	o.SetUDPSize(udpSize)
	if do {
		o.SetDo()
	}
	return o
}

// render writes the entry's answer for a client into dst: the client's ID,
// RD bit and question spelling, TTLs aged since the entry was stored.
// qname is the client's question name in wire form (same length as the
// entry's, equal but for case). It returns nil if the entry could not be
// packed.
func (e *entry) render(dst []byte, id uint16, rd bool, qname []byte, edns bool, now int64) []byte {
	i := 0
	if edns {
		i = 1
	}
	w, ttls := e.wireFor(i)
	if w == nil {
		return nil
	}
	dst = append(dst[:0], w...)
	binary.BigEndian.PutUint16(dst, id)
	if rd {
		dst[2] |= 0x01
	} else {
		dst[2] &^= 0x01
	}
	if len(qname) > 0 && 12+len(qname) <= len(dst) {
		copy(dst[12:], qname)
	}
	age := uint32(0)
	if now > e.stored {
		age = uint32((now - e.stored) / int64(time.Second))
	}
	if age > 0 {
		for _, off := range ttls {
			t := binary.BigEndian.Uint32(dst[off:])
			if t > age {
				t -= age
			} else {
				t = 0
			}
			binary.BigEndian.PutUint32(dst[off:], t)
		}
	}
	return dst
}

// rrAddr is an A or AAAA record's address (unmapped); the zero Addr for
// other records.
func rrAddr(rr dns.RR) netip.Addr {
	var a netip.Addr
	switch v := rr.(type) {
	case *dns.A:
		a, _ = netip.AddrFromSlice(v.A.To4())
	case *dns.AAAA:
		a, _ = netip.AddrFromSlice(v.AAAA.To16())
	}
	return a.Unmap()
}
