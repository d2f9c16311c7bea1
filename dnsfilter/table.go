package dnsfilter

import (
	"hash/maphash"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"egressd/policy"
)

// Learned is one fact of the learned-address table: our DNS told Client that
// Name has address Addr, until Expires.
type Learned struct {
	Client netip.Addr
	// ClientMAC is the client's MAC the answer was decided with, when the
	// policy names clients by MAC (Deps.MACs); nil otherwise. It goes
	// with the addresses handed to Deps.Firewall; the Table does not keep
	// it (its readers look the MAC up again when they need it).
	ClientMAC net.HardwareAddr
	Name      string // normalised name the client asked (CNAME chains are credited to it)
	Addr      netip.Addr
	// Rule is the rule that allowed the name; empty when none did (audit
	// mode answers every name, and the table keeps those answers too).
	Rule    string
	Expires time.Time
	// Since is when the enforce firewall's hold of the address for this
	// client and name began (Table.Held): its first learn, or the first
	// after an earlier hold had ended; zero when it is not known (an
	// entry restored from the state directory, held since before this
	// process). A flow whose first packet came before it was not let out
	// by this answer. Learn ignores it.
	Since time.Time
}

// Table is the learned-address table: for every allowed answer, and in
// audit mode for every answer (a name no rule allows is learned with no
// rule), which client was given which address for which name, until when.
// It is bounded: when it is full, expired entries go first, then the
// soonest-expiring of those learned with no rule, and only then the
// soonest-expiring allowed ones; an entry with no rule never pushes out
// an allowed one (it is not kept instead). Expired entries are removed,
// and it is safe for concurrent use. Readers call NamesFor on every
// flow, so lookups take a read lock on one shard and allocate only the
// returned slice.
//
// An entry is what DNS said, not what a rule allows: a policy reload does
// not prune the table, and every reader decides the entry's name again
// under the policy in force (the proxy and capture by name, the firewall's
// seeding with Engine.NameRules), so an entry whose rule a reload removed
// or narrowed lets nothing out, and one a reload covers again counts at
// once, without the client asking DNS again: so does an answer given in
// audit mode for a name no rule allowed then, which the operator's new
// rule (egressd report --suggest) covers at the switch to enforce.
// Learned.Rule is the rule that allowed the answer when it was given, for
// the record and for which entries go first when the table is full; no
// reader lets anything out by it.
type Table struct {
	shards [tableShards]tableShard
	seed   maphash.Seed
	perCap int // max entries per shard
	now    func() time.Time

	subsMu sync.Mutex                    // guards writes to subs
	subs   atomic.Pointer[[]*subscriber] // copy-on-write list

	size    atomic.Int64
	changes atomic.Uint64 // Learn's changes to the table, for Changes
	evicted atomic.Uint64
	refused atomic.Uint64 // addresses not learned: Refused
	dropped atomic.Uint64 // feed entries lost by slow subscribers
}

const (
	tableShards = 64
	// maxPerAddr bounds the (client, name) pairs kept for one address (a
	// CDN address shared by many names and clients).
	maxPerAddr = 64
	// shareDiv: a client holding 1/shareDiv of a full shard's items (or of
	// an address's maxPerAddr pairs) or more gives up its own items before
	// anyone else's (Table's fairness).
	shareDiv = 4
)

type tableShard struct {
	mu sync.RWMutex // guards m
	m  map[netip.Addr][]tableItem
	n  int // items in m
	// norule is how many items of m have no rule (answers in audit mode
	// no rule allowed): they go first when room is needed.
	norule int
	// byClient counts the items of m per client, for the fair share.
	byClient map[netip.Addr]int
	// share is the fair share of a full shard: max(1, perCap/shareDiv).
	share int
	// big indexes the items of each client holding half its share or
	// more (at most 2*shareDiv clients), so that a full shard finds its
	// hog and the hog's item that goes first without a walk of m; a
	// client's index is built as it reaches its share and dropped below
	// half of it.
	big map[netip.Addr]*clientItems

	lastSweep int64 // unix nanoseconds of the last full sweep by makeRoomLocked
}

type tableItem struct {
	client  netip.Addr
	name    string
	rule    string
	expires int64 // unix nanoseconds
	// held is when the enforce firewall would let the address go
	// (policy.LearnedLifetime from each learn, never shortened); the item
	// is kept until both times are past.
	held int64
	// since is when the current hold began (Learned.Since): 0 when not
	// known (restored).
	since int64
}

// learned is the item as a Learned of addr: Expires is the answer's TTL,
// or with held the firewall's hold, which Since then begins.
func (it *tableItem) learned(addr netip.Addr, held bool) Learned {
	l := Learned{Client: it.client, Name: it.name, Addr: addr, Rule: it.rule, Expires: time.Unix(0, it.expires)}
	if held {
		l.Expires = time.Unix(0, it.held)
		if it.since != 0 {
			l.Since = time.Unix(0, it.since)
		}
	}
	return l
}

// keep is when the item may go: its answer expired and the firewall would
// have let the address go.
func (it *tableItem) keep() int64 { return max(it.expires, it.held) }

// evictRank orders items for eviction, lowest first: those the table
// keeps no longer (0), then those learned with no rule (1), then allowed
// ones (2).
func (it *tableItem) evictRank(now int64) int {
	switch {
	case it.keep() <= now:
		return 0
	case it.rule == "":
		return 1
	}
	return 2
}

// evictsBefore reports whether it goes before o when room is needed.
func (it *tableItem) evictsBefore(o *tableItem, now int64) bool {
	if r, ro := it.evictRank(now), o.evictRank(now); r != ro {
		return r < ro
	}
	return it.keep() < o.keep()
}

// noRule is 1 for an item learned with no rule, else 0 (tableShard.norule).
func noRule(rule string) int {
	if rule == "" {
		return 1
	}
	return 0
}

type subscriber struct {
	ch     chan Learned
	closed atomic.Bool
}

// NewTable returns a table holding at most size entries (65536 if size <= 0).
func NewTable(size int) *Table {
	if size <= 0 {
		size = defaultTableSize
	}
	t := &Table{seed: maphash.MakeSeed(), perCap: max(1, (size+tableShards-1)/tableShards), now: time.Now}
	for i := range t.shards {
		t.shards[i].m = map[netip.Addr][]tableItem{}
		t.shards[i].byClient = map[netip.Addr]int{}
		t.shards[i].share = max(1, t.perCap/shareDiv)
		t.shards[i].big = map[netip.Addr]*clientItems{}
	}
	empty := []*subscriber{}
	t.subs.Store(&empty)
	return t
}

func (t *Table) shard(a netip.Addr) *tableShard {
	b := a.As16()
	return &t.shards[maphash.Bytes(t.seed, b[:])%tableShards]
}

// NamesFor returns the normalised names our DNS gave addr out for to client,
// unexpired; when client is the zero Addr, for any client. It returns nil
// when there are none. IPv4-mapped addresses are looked up as IPv4.
func (t *Table) NamesFor(client, addr netip.Addr) []string {
	addr = addr.Unmap()
	client = client.Unmap()
	now := t.now().UnixNano()
	sh := t.shard(addr)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	var out []string
	for _, it := range sh.m[addr] {
		if it.expires <= now || (client.IsValid() && it.client != client) {
			continue
		}
		dup := false
		for _, n := range out {
			if n == it.name {
				dup = true
				break
			}
		}
		if !dup {
			out = append(out, it.name)
		}
	}
	return out
}

// Lookup returns the unexpired entries for addr (any client), for reports,
// debugging, capture (which judges forwarded flows by who was given
// addr, as the firewall's learned sets do) and egressd run (which finds
// there what another address of a client's device was given).
func (t *Table) Lookup(addr netip.Addr) []Learned {
	return t.live(addr, false)
}

// Held returns the entries for addr (any client) that the enforce
// firewall would still hold in its learned sets, each with Expires set to
// when it would let the address go: the answer's TTL from the time it was
// learned, at least policy.LearnedMinTTL and at most policy.LearnedMaxTTL,
// never shortened by a later answer (the second the gate adds for the
// rounding of TTLs on the wire is not counted). Capture judges forwarded
// flows by them in audit mode, as nftables would in enforce mode. (The
// firewall keeps one element per rule and address, learned when the
// forwarder fetches an answer; an item here is per client and name, so a
// client served the same cached answer later is held a little longer
// here than the element is.)
func (t *Table) Held(addr netip.Addr) []Learned {
	return t.live(addr, true)
}

// live returns the entries for addr whose expiry (the answer's TTL for
// Lookup; with held, the firewall's hold, for Held) is still ahead, with
// Expires set to it.
func (t *Table) live(addr netip.Addr, held bool) []Learned {
	addr = addr.Unmap()
	now := t.now().UnixNano()
	sh := t.shard(addr)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	var out []Learned
	for _, it := range sh.m[addr] {
		exp := it.expires
		if held {
			exp = it.held
		}
		if exp > now {
			out = append(out, it.learned(addr, held))
		}
	}
	return out
}

// HeldAll appends to dst every entry the enforce firewall would still
// hold (as Held, for every address) and returns it: what a firewall that
// goes into the kernel seeds its learned sets with, so that answers given
// before it (in audit mode) still let their clients out. It takes each
// shard's read lock in turn.
func (t *Table) HeldAll(dst []Learned) []Learned {
	now := t.now().UnixNano()
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.RLock()
		for addr, items := range sh.m {
			for _, it := range items {
				if it.held > now {
					dst = append(dst, it.learned(addr, true))
				}
			}
		}
		sh.mu.RUnlock()
	}
	return dst
}

// Len returns the number of entries, expired ones not yet removed included.
func (t *Table) Len() int { return int(t.size.Load()) }

// Changes returns a count that moves whenever Learn changes the table (a
// new entry, or one whose expiry moved): whoever saves the table (Save)
// need not write it again while the count stands still.
func (t *Table) Changes() uint64 { return t.changes.Load() }

// Dropped returns how many change-feed entries slow subscribers lost.
func (t *Table) Dropped() uint64 { return t.dropped.Load() }

// Evicted returns how many unexpired entries were evicted because the table
// was full.
func (t *Table) Evicted() uint64 { return t.evicted.Load() }

// Refused returns how many addresses of answers were not learned: past
// the maxAnswerAddrs one answer may add (the server counts those), or of a
// client holding its share of a full table with none of its own to give
// up.
func (t *Table) Refused() uint64 { return t.refused.Load() }

// countClient adds d to the items the shard holds for client c, and
// builds or drops c's index (big). An item added is indexed by noteItem.
func (sh *tableShard) countClient(c netip.Addr, d int) {
	n := sh.byClient[c] + d
	if n > 0 {
		sh.byClient[c] = n
	} else {
		delete(sh.byClient, c)
	}
	ci := sh.big[c]
	switch {
	case ci == nil && d > 0 && n >= sh.share:
		// A walk of the shard, once per share/2 items the client gains.
		ci = &clientItems{}
		for a, items := range sh.m {
			for i := range items {
				if items[i].client == c {
					ci.push(a, &items[i])
				}
			}
		}
		sh.big[c] = ci
	case ci != nil && n < max(1, sh.share/2):
		delete(sh.big, c)
	}
}

// noteItem indexes it, an item of addr just added or changed (its times
// or rule), when its client's items are indexed (big).
func (sh *tableShard) noteItem(addr netip.Addr, it *tableItem) {
	ci := sh.big[it.client]
	if ci == nil {
		return
	}
	ci.push(addr, it)
	if len(ci.all) > 2*sh.byClient[it.client]+16 {
		ci.all.compact(sh, false)
		ci.norule.compact(sh, true)
	}
}

// clientItems indexes one client's items of a shard, by when each may go
// (keep): every item, and those with no rule. The index is lazy: an
// item removed or changed leaves its old reference, skipped (and
// dropped) when it comes up, or by compact when the stale outnumber the
// live.
type clientItems struct {
	all, norule keepHeap
}

func (ci *clientItems) push(addr netip.Addr, it *tableItem) {
	r := itemRef{keep: it.keep(), addr: addr, name: it.name, client: it.client}
	ci.all.push(r)
	if it.rule == "" {
		ci.norule.push(r)
	}
}

// victim returns the client's item that goes first (evictsBefore): the
// one that may go soonest when it may go already, else the soonest of
// those with no rule, else the soonest. ok is false when the client has
// none indexed.
func (ci *clientItems) victim(sh *tableShard, now int64) (addr netip.Addr, i int, ok bool) {
	addr, i, ok = ci.all.first(sh, false)
	if !ok || sh.m[addr][i].keep() <= now {
		return addr, i, ok
	}
	if a, j, ok := ci.norule.first(sh, true); ok {
		return a, j, true
	}
	return addr, i, true
}

// itemRef names an item of a shard as it was when indexed.
type itemRef struct {
	keep         int64
	addr, client netip.Addr
	name         string
}

// find returns the index of the item r names in sh.m[r.addr], or -1 when
// it is gone or has changed (another keep; a rule, for norule).
func (r *itemRef) find(sh *tableShard, norule bool) int {
	items := sh.m[r.addr]
	for i := range items {
		if items[i].client == r.client && items[i].name == r.name {
			if items[i].keep() == r.keep && (!norule || items[i].rule == "") {
				return i
			}
			return -1
		}
	}
	return -1
}

// keepHeap is a min-heap of itemRefs by keep.
type keepHeap []itemRef

func (h *keepHeap) push(r itemRef) {
	*h = append(*h, r)
	a := *h
	for i := len(a) - 1; i > 0; {
		p := (i - 1) / 2
		if a[p].keep <= a[i].keep {
			break
		}
		a[p], a[i] = a[i], a[p]
		i = p
	}
}

func (h *keepHeap) pop() {
	a := *h
	n := len(a) - 1
	a[0] = a[n]
	a[n] = itemRef{}
	*h = a[:n]
	h.down(0)
}

func (h keepHeap) down(i int) {
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		if r := l + 1; r < len(h) && h[r].keep < h[l].keep {
			l = r
		}
		if h[i].keep <= h[l].keep {
			return
		}
		h[i], h[l] = h[l], h[i]
		i = l
	}
}

// first returns the live item with the least keep, dropping stale
// references above it.
func (h *keepHeap) first(sh *tableShard, norule bool) (netip.Addr, int, bool) {
	for len(*h) > 0 {
		r := &(*h)[0]
		if i := r.find(sh, norule); i >= 0 {
			return r.addr, i, true
		}
		h.pop()
	}
	return netip.Addr{}, -1, false
}

// compact drops the stale references, and all but one of those naming
// one item: a learn that changes an item but not its keep (a shorter
// answer under the firewall's hold, a rule that comes and goes) indexes it
// again with a reference equal to the last, and a keep that comes back
// makes an old reference live again.
func (h *keepHeap) compact(sh *tableShard, norule bool) {
	type key struct {
		addr, client netip.Addr
		name         string
	}
	a := *h
	kept := a[:0]
	seen := make(map[key]struct{}, len(a)/2)
	for i := range a {
		k := key{a[i].addr, a[i].client, a[i].name}
		if _, dup := seen[k]; dup || a[i].find(sh, norule) < 0 {
			continue
		}
		seen[k] = struct{}{}
		kept = append(kept, a[i])
	}
	clear(a[len(kept):])
	*h = kept
	for i := len(kept)/2 - 1; i >= 0; i-- {
		h.down(i)
	}
}

// Learn records that client was given addr for name until expires. A new
// entry, or one whose expiry moves, is published to subscribers; a refresh
// with the same expiry (a cache hit) costs one map lookup. A new entry
// with no rule that finds the table (or its address's share) full of
// unexpired allowed entries is not kept: it counts as evicted.
func (t *Table) Learn(l Learned) {
	l.Addr, l.Client = l.Addr.Unmap(), l.Client.Unmap()
	exp := l.Expires.UnixNano()
	now := t.now().UnixNano()
	if exp <= now || !l.Addr.IsValid() {
		return
	}
	sh := t.shard(l.Addr)
	sh.mu.RLock()
	for _, it := range sh.m[l.Addr] {
		if it.client == l.Client && it.name == l.Name && it.expires == exp && it.rule == l.Rule {
			sh.mu.RUnlock()
			return
		}
	}
	sh.mu.RUnlock()

	held := now + int64(policy.LearnedLifetime(time.Duration(exp-now), 0))
	sh.mu.Lock()
	items := sh.m[l.Addr]
	found := false
	for i := range items {
		if items[i].client == l.Client && items[i].name == l.Name {
			if items[i].expires == exp && items[i].rule == l.Rule {
				sh.mu.Unlock()
				return
			}
			sh.norule += noRule(l.Rule) - noRule(items[i].rule)
			keep, was := items[i].keep(), noRule(items[i].rule)
			if items[i].held <= now {
				// The firewall let the address go meanwhile: a new hold.
				items[i].since = now
			}
			items[i].expires, items[i].rule = exp, l.Rule
			items[i].held = max(items[i].held, held)
			if items[i].keep() != keep || noRule(l.Rule) > was {
				// Its index entry (by keep, and with no rule) moved.
				sh.noteItem(l.Addr, &items[i])
			}
			found = true
			break
		}
	}
	if !found {
		it := tableItem{client: l.Client, name: l.Name, rule: l.Rule, expires: exp, held: held, since: now}
		if len(items) >= maxPerAddr {
			// Replace the pair of this address that goes first: the
			// soonest-expiring pair of a client holding a quarter of
			// them or more (fair share), else of any client.
			j, hogged := addrVictim(items, l.Client, now)
			if j < 0 || l.Rule == "" && items[j].evictRank(now) == 2 {
				if hogged {
					// The client holds its share of the address and
					// has nothing of its own to give up.
					sh.mu.Unlock()
					t.refused.Add(1)
					return
				}
				// Only allowed pairs, live: an answer no rule allowed
				// does not push one out.
				sh.mu.Unlock()
				t.evicted.Add(1)
				return
			}
			if items[j].keep() > now {
				t.evicted.Add(1)
			}
			sh.norule += noRule(l.Rule) - noRule(items[j].rule)
			sh.countClient(items[j].client, -1)
			sh.countClient(l.Client, 1)
			items[j] = it
			sh.noteItem(l.Addr, &items[j])
		} else {
			if sh.n >= t.perCap {
				if ok, hogged := t.makeRoomLocked(sh, now, l.Rule == "", l.Client); !ok {
					sh.mu.Unlock()
					if hogged {
						t.refused.Add(1)
					} else {
						t.evicted.Add(1)
					}
					return
				}
				items = sh.m[l.Addr] // the victim may have been of this address
			}
			items = append(items, it)
			sh.m[l.Addr] = items
			sh.n++
			sh.norule += noRule(l.Rule)
			sh.countClient(l.Client, 1)
			sh.noteItem(l.Addr, &items[len(items)-1])
			t.size.Add(1)
		}
	}
	sh.mu.Unlock()
	t.changes.Add(1)
	t.publish(l)
}

// addrVictim returns which of an address's full set of pairs a new one
// of client replaces: the one that goes first (evictsBefore) among those
// of the client holding the most pairs, when that is a quarter of them
// (maxPerAddr/shareDiv) or more, else among all. self reports that client
// holds that share itself: another client's pair is not its to take.
func addrVictim(items []tableItem, client netip.Addr, now int64) (j int, self bool) {
	hog, most := client, 0
	for i := range items {
		n := 0
		for k := range items {
			if items[k].client == items[i].client {
				n++
			}
		}
		if n > most || n == most && items[i].client == client {
			hog, most = items[i].client, n
		}
	}
	fair := most >= maxPerAddr/shareDiv
	j = -1
	for i := range items {
		if (!fair || items[i].client == hog) && (j < 0 || items[i].evictsBefore(&items[j], now)) {
			j = i
		}
	}
	return j, fair && hog == client
}

// makeRoomLocked removes expired items of the shard, and when none were,
// one item: among a few addresses (map order is random), an expired one;
// else, when a client holds a quarter of the shard's room or more
// (perCap/shareDiv, the fair share) and others hold items too, the one of
// that client's items (the one holding the most) that goes first; else
// the soonest-expiring one learned with no rule, else the soonest-expiring
// allowed one. When the sample has only allowed items but the shard has
// some with no rule, the shard is searched for the soonest-expiring of
// those: they go first. For an item with no rule (norule), an allowed live
// item is not removed. It reports whether room was made, and, when not,
// whether client holds its share (hogged): a client at its share pushes
// out no other client's live item, so that one client's answers (a
// hostile authoritative server of a name under an allowed wildcard
// answering thousands of addresses with the longest TTL) cannot evict
// other clients' shorter-lived entries and fail their connections' SNI
// check (THREATS.md A2).
func (t *Table) makeRoomLocked(sh *tableShard, now int64, norule bool, client netip.Addr) (ok, hogged bool) {
	// A full sweep costs the whole shard; do it at most once a second and
	// otherwise evict from a sample.
	if now-sh.lastSweep > int64(time.Second) {
		sh.lastSweep = now
		if t.sweepLocked(sh, now) > 0 {
			return true, false
		}
	}
	var victim netip.Addr
	vi, seen := -1, 0
	var vit *tableItem
	for a, items := range sh.m {
		for i := range items {
			if vi < 0 || items[i].evictsBefore(vit, now) {
				victim, vi, vit = a, i, &items[i]
			}
		}
		if seen++; seen >= 8 {
			break
		}
	}
	if vi >= 0 && vit.evictRank(now) > 0 && len(sh.byClient) > 1 {
		// The client holding the most, among those indexed (every
		// client holding its share is).
		hog, most := client, sh.byClient[client]
		for c := range sh.big {
			if n := sh.byClient[c]; n > most {
				hog, most = c, n
			}
		}
		if most >= sh.share {
			vi = -1
			if ci := sh.big[hog]; ci != nil {
				if a, i, ok := ci.victim(sh, now); ok {
					victim, vi, vit = a, i, &sh.m[a][i]
				}
			}
			if vi >= 0 && !(norule && vit.evictRank(now) == 2) {
				return t.evictLocked(sh, victim, vi, now), false
			}
			if hog == client {
				return false, true
			}
			return false, false
		}
	}
	if vi >= 0 && vit.evictRank(now) == 2 && sh.norule > 0 {
		// The sample missed the items with no rule: look for them all.
		vi = -1
		for a, items := range sh.m {
			for i := range items {
				if items[i].rule == "" && (vi < 0 || items[i].evictsBefore(vit, now)) {
					victim, vi, vit = a, i, &items[i]
				}
			}
		}
	}
	if vi < 0 || norule && vit.evictRank(now) == 2 {
		return false, false
	}
	return t.evictLocked(sh, victim, vi, now), false
}

// evictLocked removes item i of addr's items from the shard; it returns
// true.
func (t *Table) evictLocked(sh *tableShard, addr netip.Addr, i int, now int64) bool {
	items := sh.m[addr]
	it := items[i]
	if it.keep() > now {
		t.evicted.Add(1)
	}
	sh.norule -= noRule(it.rule)
	sh.countClient(it.client, -1)
	items = append(items[:i], items[i+1:]...)
	if len(items) == 0 {
		delete(sh.m, addr)
	} else {
		sh.m[addr] = items
	}
	sh.n--
	t.size.Add(-1)
	return true
}

func (t *Table) sweepLocked(sh *tableShard, now int64) int {
	removed := 0
	for a, items := range sh.m {
		kept := items[:0]
		for _, it := range items {
			if it.keep() > now {
				kept = append(kept, it)
			} else {
				sh.norule -= noRule(it.rule)
				sh.countClient(it.client, -1)
			}
		}
		if d := len(items) - len(kept); d > 0 {
			removed += d
			clear(items[len(kept):])
			if len(kept) == 0 {
				delete(sh.m, a)
			} else {
				sh.m[a] = kept
			}
		}
	}
	sh.n -= removed
	t.size.Add(int64(-removed))
	return removed
}

// Sweep removes expired entries; the server calls it periodically.
func (t *Table) Sweep() int {
	now := t.now().UnixNano()
	n := 0
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		n += t.sweepLocked(sh, now)
		sh.mu.Unlock()
	}
	return n
}

// Subscribe returns a feed of new and refreshed entries, buffered by buf
// (at least 1), and a function that ends the subscription and closes the
// channel. A subscriber that does not keep up loses entries (counted in
// Dropped); DNS never waits for it.
func (t *Table) Subscribe(buf int) (<-chan Learned, func()) {
	s := &subscriber{ch: make(chan Learned, max(1, buf))}
	t.subsMu.Lock()
	old := *t.subs.Load()
	next := append(append(make([]*subscriber, 0, len(old)+1), old...), s)
	t.subs.Store(&next)
	t.subsMu.Unlock()
	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			t.subsMu.Lock()
			defer t.subsMu.Unlock()
			old := *t.subs.Load()
			next := make([]*subscriber, 0, len(old))
			for _, o := range old {
				if o != s {
					next = append(next, o)
				}
			}
			t.subs.Store(&next)
			// Under subsMu, and publish checks closed under it too, so no
			// send races the close.
			s.closed.Store(true)
			close(s.ch)
		})
	}
}

func (t *Table) publish(l Learned) {
	subs := *t.subs.Load()
	if len(subs) == 0 {
		return
	}
	// subsMu orders sends against close in the unsubscribe function; it is
	// only taken when someone subscribed and only for non-blocking sends.
	t.subsMu.Lock()
	defer t.subsMu.Unlock()
	for _, s := range subs {
		if s.closed.Load() {
			continue
		}
		select {
		case s.ch <- l:
		default:
			t.dropped.Add(1)
		}
	}
}
