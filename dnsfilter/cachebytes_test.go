package dnsfilter

import (
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// bigUpstream answers every TXT question with about 60 KiB of TXT records
// (whole over TCP, truncated over UDP): the zone of a name a LAN client
// controls.
func bigUpstream(t *testing.T) string {
	t.Helper()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Compress = true
		q := r.Question[0]
		for i := range 240 {
			m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 3600},
				Txt: []string{fmt.Sprintf("%03d%s", i, strings.Repeat("y", 240))}})
		}
		if opt := r.IsEdns0(); opt != nil {
			m.SetEdns0(opt.UDPSize(), false)
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			m.Truncate(dns.MinMsgSize)
		}
		_ = w.WriteMsg(m)
	})
	return listenDNS(t, h)
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestCacheBoundedInBytes: one LAN client asks for 600 distinct names (in
// audit mode a denied name is forwarded and cached too) whose answers are
// 60 KiB each. The cache was bounded in entries only (10,000), so it kept
// every answer, parsed and packed: 600 of them held over 70 MB of heap, and
// 10,000 would hold more than a gigabyte. Its bytes are bounded too: the
// packed answers it holds, and so the heap it takes.
func TestCacheBoundedInBytes(t *testing.T) {
	up := bigUpstream(t)
	ts := startServer(t, auditPolicy, Config{Upstreams: []string{up}}, Deps{})
	before := heapInUse()
	const names = 600
	for i := range names {
		r, err := tryAsk("tcp", ts.Addr, fmt.Sprintf("n%d.tunnel.example.", i), dns.TypeTXT, false)
		if err != nil || len(r.Answer) != 240 {
			t.Fatalf("query %d: %v %v", i, err, r)
		}
	}
	grown := int64(heapInUse()) - int64(before)
	t.Logf("heap grew %d KiB for %d answers of 60 KiB; cache holds %d entries", grown>>10, names, ts.cache.len())
	held := 0
	for i := range ts.cache.shards {
		sh := &ts.cache.shards[i]
		sh.mu.RLock()
		for _, e := range sh.m {
			held += e.msg.Len()
		}
		sh.mu.RUnlock()
	}
	if held > cacheBytes {
		t.Errorf("the cache holds %d KiB of answers (packed), over its %d KiB", held>>10, cacheBytes>>10)
	}
	if limit := int64(cacheBytes) * 4; grown > limit {
		t.Errorf("heap grew %d MiB for %d cached 60 KiB answers, over %d MiB (4 × the cache's byte budget)", grown>>20, names, limit>>20)
	}
}

// TestCacheBytesAccounting: every shard's byte count is the cost of the
// entries it holds, through puts of new keys, replacements of a key by an
// answer of another size, evictions by count and by bytes, expired entries
// made room for on put, and the sweep; once everything expired and was
// swept, it is 0 again. A path that adds or removes an entry without its
// cost would leave the count drifting, and the cache would then refuse
// answers it has room for (or hold more than its bound).
func TestCacheBytesAccounting(t *testing.T) {
	c := newCache(256) // 4 entries a shard: evictions by count too
	t0 := time.Unix(1_700_000_000, 0)
	answer := func(name string, txt int, ttl uint32) *entry {
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeTXT)
		m.Response = true
		for i := range txt {
			m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: ttl},
				Txt: []string{fmt.Sprintf("%03d%s", i, strings.Repeat("z", 200))}})
		}
		return newEntry(strings.TrimSuffix(name, "."), m, false, 1232, t0, time.Hour, time.Hour, "", "")
	}
	check := func(when string) {
		t.Helper()
		n := 0
		for i := range c.shards {
			sh := &c.shards[i]
			sh.mu.RLock()
			want := 0
			for _, e := range sh.m {
				want += e.cost()
			}
			n += len(sh.m)
			if sh.bytes != want {
				t.Errorf("%s: shard %d counts %d bytes, holds %d", when, i, sh.bytes, want)
			}
			if sh.bytes > cacheBytes/cacheShards {
				t.Errorf("%s: shard %d holds %d bytes, over its %d", when, i, sh.bytes, cacheBytes/cacheShards)
			}
			sh.mu.RUnlock()
		}
		if c.len() != n {
			t.Errorf("%s: len %d, holds %d entries", when, c.len(), n)
		}
	}
	key := func(name string) []byte { return appendKey(nil, name, dns.TypeTXT, dns.ClassINET, 0) }
	now := t0.UnixNano()
	// Small and large answers (up to 240 records of ~200 bytes: a few
	// fill a shard's byte share), TTLs of 10 to 60 s.
	for i := range 2000 {
		name := fmt.Sprintf("n%d.example.", i%700)
		txt := 1 + (i*37)%240
		if i%3 == 0 {
			txt = 1
		}
		c.put(key(name), answer(name, txt, uint32(10+i%51)), now)
		now += int64(10 * time.Millisecond)
		if i%250 == 0 {
			check(fmt.Sprintf("after put %d", i))
		}
	}
	check("after the puts")
	// Half the TTLs run out: a sweep, then puts that make room among
	// expired entries.
	now = t0.Add(35 * time.Second).UnixNano()
	c.sweep(now)
	check("after a sweep at 35s")
	for i := range 300 {
		name := fmt.Sprintf("late%d.example.", i)
		c.put(key(name), answer(name, 1+i%120, 20), now)
	}
	check("after puts at 35s")
	// Everything expired.
	now = t0.Add(time.Hour).UnixNano()
	c.sweep(now)
	check("after everything expired")
	for i := range c.shards {
		if b := c.shards[i].bytes; b != 0 {
			t.Errorf("shard %d counts %d bytes with no entry", i, b)
		}
	}
	if c.len() != 0 {
		t.Errorf("len %d after everything expired", c.len())
	}
}

// cacheKey is the i-th of distinct keys.
func cacheKey(i int) []byte {
	return []byte{byte(i >> 32), byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)}
}

func (c *cache) examined() uint64 {
	var n uint64
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.RLock()
		n += sh.examined
		sh.mu.RUnlock()
	}
	return n
}

// TestCacheFullWork: once every shard is full of unexpired answers (a
// client asking distinct names), each new answer looked at its whole shard
// for expired ones. Making room now looks at a bounded number of entries
// per new answer, on average, however large the cache.
func TestCacheFullWork(t *testing.T) {
	c := newCache(100_000)
	now := time.Unix(1_800_000_000, 0).UnixNano()
	e := &entry{name: "x.example.", expires: now + int64(time.Hour), packed: 100}
	i := 0
	for ; i < 200_000; i++ {
		c.put(cacheKey(i), e, now)
	}
	before := c.examined()
	const n = 20000
	for range n {
		c.put(cacheKey(i), e, now)
		i++
	}
	per := float64(c.examined()-before) / n
	t.Logf("%.1f entries examined per new answer", per)
	if per > 16 {
		t.Errorf("%.1f entries examined per new answer into a full cache, want at most 16 (a shard holds %d)", per, c.perCap)
	}
	if got := c.len(); got > 100_000 {
		t.Errorf("cache holds %d entries, bound 100,000", got)
	}
}

// TestCacheEvictsExpiredFirst: a full shard makes room from expired
// answers before any unexpired one, as long as there are expired ones.
func TestCacheEvictsExpiredFirst(t *testing.T) {
	c := newCache(64 * 64)
	now := time.Unix(1_800_000_000, 0).UnixNano()
	sh := &c.shards[0]
	var live [][]byte
	filled := 0
	for i := 0; filled < c.perCap; i++ {
		k := cacheKey(i)
		if c.shard(k) != sh {
			continue
		}
		exp := now + int64(time.Hour)
		if filled < c.perCap/2 {
			exp = now - 1 // expired
		} else {
			live = append(live, k)
		}
		c.put(k, &entry{name: "x.example.", expires: exp, packed: 100}, now-int64(time.Minute))
		filled++
	}
	for i, added := 1<<30, 0; added < c.perCap/4; i++ {
		k := cacheKey(i)
		if c.shard(k) != sh {
			continue
		}
		c.put(k, &entry{name: "x.example.", expires: now + int64(time.Hour), packed: 100}, now)
		added++
	}
	for _, k := range live {
		if c.get(k, now) == nil {
			t.Fatalf("an unexpired answer was evicted while %d expired ones were there", c.perCap/2)
		}
	}
	if c.evict.Load() != 0 {
		t.Errorf("%d unexpired answers evicted, want 0", c.evict.Load())
	}
}
