package dnsfilter

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/policy"
)

func TestTable(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tb := NewTable(1000)
	tb.now = func() time.Time { return now }
	c1, c2 := netip.MustParseAddr("192.168.1.10"), netip.MustParseAddr("192.168.1.11")
	a := netip.MustParseAddr("203.0.113.7")
	feed, stop := tb.Subscribe(10)
	defer stop()

	tb.Learn(Learned{Client: c1, Name: "a.example.com", Addr: a, Rule: "r1", Expires: now.Add(time.Minute)})
	tb.Learn(Learned{Client: c1, Name: "b.example.com", Addr: netip.MustParseAddr("::ffff:203.0.113.7"), Rule: "r1", Expires: now.Add(time.Minute)})
	tb.Learn(Learned{Client: c2, Name: "a.example.com", Addr: a, Rule: "r1", Expires: now.Add(2 * time.Minute)})
	// Same entry, same expiry: no change, nothing published.
	tb.Learn(Learned{Client: c1, Name: "a.example.com", Addr: a, Rule: "r1", Expires: now.Add(time.Minute)})
	// Already expired: ignored.
	tb.Learn(Learned{Client: c1, Name: "old.example.com", Addr: a, Rule: "r1", Expires: now.Add(-time.Second)})

	if got := tb.NamesFor(c1, a); !slices.Equal(got, []string{"a.example.com", "b.example.com"}) {
		t.Errorf("c1: %v", got)
	}
	if got := tb.NamesFor(c2, netip.MustParseAddr("::ffff:203.0.113.7")); !slices.Equal(got, []string{"a.example.com"}) {
		t.Errorf("c2 (mapped lookup): %v", got)
	}
	if got := tb.NamesFor(netip.Addr{}, a); !slices.Equal(got, []string{"a.example.com", "b.example.com"}) {
		t.Errorf("any client: %v (deduplicated)", got)
	}
	if got := tb.NamesFor(netip.MustParseAddr("192.168.1.99"), a); got != nil {
		t.Errorf("unknown client: %v", got)
	}
	if got := tb.NamesFor(c1, netip.MustParseAddr("203.0.113.8")); got != nil {
		t.Errorf("unknown address: %v", got)
	}
	if n := len(feed); n != 3 {
		t.Errorf("feed has %d entries, want 3", n)
	}
	// A refresh that moves the expiry is published.
	tb.Learn(Learned{Client: c1, Name: "a.example.com", Addr: a, Rule: "r1", Expires: now.Add(3 * time.Minute)})
	if n := len(feed); n != 4 {
		t.Errorf("feed has %d entries after refresh, want 4", n)
	}

	now = now.Add(90 * time.Second)
	if got := tb.NamesFor(c1, a); !slices.Equal(got, []string{"a.example.com"}) {
		t.Errorf("after 90s: %v", got)
	}
	if n := tb.Sweep(); n != 1 || tb.Len() != 2 {
		t.Errorf("sweep removed %d, %d left", n, tb.Len())
	}
}

func TestTableBounded(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tb := NewTable(6400)
	tb.now = func() time.Time { return now }
	for i := 0; i < 20000; i++ {
		a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		tb.Learn(Learned{Client: netip.MustParseAddr("192.168.1.1"), Name: fmt.Sprintf("h%d.example.com", i), Addr: a, Expires: now.Add(time.Duration(i+1) * time.Second)})
	}
	if n := tb.Len(); n > 6400 {
		t.Errorf("%d entries in a table of 6400", n)
	}
	if tb.Evicted() == 0 {
		t.Errorf("no evictions counted")
	}
	// The latest entries are there.
	if got := tb.NamesFor(netip.Addr{}, netip.AddrFrom4([4]byte{198, 18, 19999 >> 8 & 0xff, 19999 & 0xff})); len(got) != 1 {
		t.Errorf("newest entry missing: %v", got)
	}
	// One address shared by many names stays bounded too.
	a := netip.MustParseAddr("203.0.113.1")
	for i := 0; i < 500; i++ {
		tb.Learn(Learned{Client: netip.MustParseAddr("192.168.1.1"), Name: fmt.Sprintf("n%d.example.com", i), Addr: a, Expires: now.Add(time.Hour)})
	}
	if got := tb.NamesFor(netip.Addr{}, a); len(got) != maxPerAddr {
		t.Errorf("%d names for one address, want the cap %d", len(got), maxPerAddr)
	}
}

func TestTableSlowSubscriber(t *testing.T) {
	tb := NewTable(0)
	feed, stop := tb.Subscribe(2)
	exp := time.Now().Add(time.Minute)
	done := make(chan struct{})
	go func() {
		for i := 0; i < 100; i++ {
			tb.Learn(Learned{Client: netip.MustParseAddr("192.168.1.1"), Name: "x.example.com", Addr: netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), Expires: exp})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Learn blocked on a subscriber that does not read")
	}
	if len(feed) != 2 || tb.Dropped() != 98 {
		t.Errorf("buffered %d, dropped %d", len(feed), tb.Dropped())
	}
	stop()
	stop() // idempotent
	if _, ok := <-feed; !ok {
		t.Errorf("buffered entries lost at unsubscribe")
	}
	// Learning after unsubscribe does not panic on the closed channel.
	tb.Learn(Learned{Client: netip.MustParseAddr("192.168.1.1"), Name: "y.example.com", Addr: netip.MustParseAddr("198.18.1.1"), Expires: exp})
}

func TestTableConcurrent(t *testing.T) {
	tb := NewTable(1000)
	exp := time.Now().Add(time.Minute)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			feed, stop := tb.Subscribe(8)
			defer stop()
			go func() {
				for range feed {
				}
			}()
			for i := 0; i < 2000; i++ {
				a := netip.AddrFrom4([4]byte{198, 18, byte(w), byte(i)})
				tb.Learn(Learned{Client: netip.MustParseAddr("192.168.1.1"), Name: "c.example.com", Addr: a, Expires: exp})
				tb.NamesFor(netip.Addr{}, a)
			}
		}()
	}
	wg.Wait()
}

func TestIsSpecial(t *testing.T) {
	for _, s := range []string{"10.1.2.3", "127.0.0.1", "169.254.169.254", "100.100.100.200", "172.31.0.1", "192.168.0.1",
		"0.0.0.0", "224.0.0.1", "255.255.255.255", "168.63.129.16", "::1", "::", "fe80::1", "fd00:ec2::254", "ff02::1",
		"::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2001::1", "::10.0.0.1", "fec0::1"} {
		if !IsSpecial(netip.MustParseAddr(s)) {
			t.Errorf("%s not special", s)
		}
	}
	for _, s := range []string{"192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1", "8.8.8.8", "17.1.2.3", "2001:db8::1",
		"2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"} {
		if IsSpecial(netip.MustParseAddr(s)) {
			t.Errorf("%s special", s)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("zero config: %v", err)
	}
	err := Config{Upstreams: []string{"dns.example"}, Deny: "DROP", UDPSize: 100, Listen: []string{"nohost"}, QueryTimeout: -1}.Validate()
	if err == nil {
		t.Fatal("bad config accepted")
	}
	for _, want := range []string{"dns.example", "DROP", "udp size", "nohost", "negative"} {
		if !contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	dir := t.TempDir()
	path := dir + "/resolv.conf"
	if err := writeFile(path, "# comment\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch lan\n"); err != nil {
		t.Fatal(err)
	}
	ups, err := readResolvConf(path)
	if err != nil || !slices.Equal(ups, []string{"192.0.2.53:53", "[2001:db8::53]:53"}) {
		t.Errorf("resolv.conf: %v %v", ups, err)
	}
	s, err := New(Config{ResolvConf: path}, Deps{Policy: compile(t, enforcePolicy)})
	if err != nil || len(s.ups.list) != 2 {
		t.Fatalf("New with resolv.conf: %v", err)
	}
	if err := s.Close(); err != nil || s.Close() != nil {
		t.Errorf("Close before Run: %v", err)
	}
	if _, err := New(Config{Upstreams: []string{"127.0.0.1"}}, Deps{Policy: compile(t, enforcePolicy)}); err == nil || !contains(err.Error(), "loop") {
		t.Errorf("upstream 127.0.0.1:53 while listening on :53: %v", err)
	}
	// A gateway whose resolv.conf names a local stub (systemd-resolved's
	// 127.0.0.53, a resolver egressd replaces): the error says where the
	// upstream came from, and that it is a loop.
	stub := dir + "/resolv-stub.conf"
	if err := writeFile(stub, "nameserver 127.0.0.53\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{ResolvConf: stub}, Deps{Policy: compile(t, enforcePolicy)}); err == nil || !contains(err.Error(), "loop") || !contains(err.Error(), "from "+stub) || !errors.Is(err, ErrUpstreamLoop) {
		t.Errorf("upstream 127.0.0.53:53 from %s while listening on :53: %v; want a loop error naming the file", stub, err)
	}
	if _, err := New(Config{ResolvConf: dir + "/missing"}, Deps{Policy: compile(t, enforcePolicy)}); err == nil {
		t.Errorf("missing resolv.conf accepted")
	}
}

func TestTTLOffsets(t *testing.T) {
	m := new(dns.Msg)
	m.SetQuestion("a.example.", dns.TypeA)
	rr1, _ := dns.NewRR("a.example. 100 IN CNAME b.example.")
	rr2, _ := dns.NewRR("b.example. 200 IN A 192.0.2.1")
	soa, _ := dns.NewRR("example. 300 IN SOA ns.example. h.example. 1 2 3 4 5")
	m.Answer = []dns.RR{rr1, rr2}
	m.Ns = []dns.RR{soa}
	m.SetEdns0(1232, true)
	m.Compress = true
	wire, _ := m.Pack()
	offs, ok := ttlOffsets(wire)
	if !ok || len(offs) != 3 {
		t.Fatalf("offsets %v %v", offs, ok)
	}
	var ttls []uint32
	for _, o := range offs {
		ttls = append(ttls, uint32(wire[o])<<24|uint32(wire[o+1])<<16|uint32(wire[o+2])<<8|uint32(wire[o+3]))
	}
	if !slices.Equal(ttls, []uint32{100, 200, 300}) {
		t.Errorf("ttls %v", ttls)
	}
	if _, ok := ttlOffsets(wire[:len(wire)-3]); ok {
		t.Errorf("truncated message parsed")
	}
}

// TestTableHeld: the enforce firewall keeps an address the forwarder gave
// out for the answer's TTL, at least policy.LearnedMinTTL and at most
// policy.LearnedMaxTTL, and never shortens it; Held reports what it would
// hold, so that capture judges forwarded flows in audit mode as the
// firewall does. Before, capture asked Lookup, which forgets an answer at
// its TTL: a flow 30 s after a 10 s answer was "would be blocked" in audit
// and allowed in enforce; and one 25 h after a two-day answer the other way.
func TestTableHeld(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tb := NewTable(1000)
	tb.now = func() time.Time { return now }
	c := netip.MustParseAddr("192.0.2.10")
	short, long := netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("203.0.113.8")
	start := now
	tb.Learn(Learned{Client: c, Name: "short.example.com", Addr: short, Rule: "r", Expires: now.Add(10 * time.Second)})
	tb.Learn(Learned{Client: c, Name: "long.example.com", Addr: long, Rule: "r", Expires: now.Add(48 * time.Hour)})
	held := func(a netip.Addr) []string {
		var out []string
		for _, l := range tb.Held(a) {
			out = append(out, fmt.Sprintf("%v %s %s", l.Client, l.Name, l.Expires.Sub(start)))
		}
		return out
	}

	now = start.Add(30 * time.Second)
	if got := tb.Lookup(short); got != nil {
		t.Errorf("Lookup at 30s: %v, want nothing (the TTL is over)", got)
	}
	if got, want := held(short), []string{"192.0.2.10 short.example.com 1m0s"}; !slices.Equal(got, want) {
		t.Errorf("Held at 30s: %v, want %v", got, want)
	}
	// A later answer with a later expiry moves it; one with an earlier
	// one does not shorten it.
	tb.Learn(Learned{Client: c, Name: "short.example.com", Addr: short, Rule: "r", Expires: now.Add(10 * time.Second)})
	if got, want := held(short), []string{"192.0.2.10 short.example.com 1m30s"}; !slices.Equal(got, want) {
		t.Errorf("Held after a second answer: %v, want %v", got, want)
	}
	now = start.Add(91 * time.Second)
	if got := held(short); got != nil {
		t.Errorf("Held at 91s: %v, want nothing", got)
	}
	if tb.Sweep(); tb.Len() != 1 {
		t.Errorf("after sweep at 91s: %d entries, want 1", tb.Len())
	}

	now = start.Add(23 * time.Hour)
	if got, want := held(long), []string{"192.0.2.10 long.example.com 24h0m0s"}; !slices.Equal(got, want) {
		t.Errorf("Held at 23h: %v, want %v", got, want)
	}
	now = start.Add(25 * time.Hour)
	if got := tb.Lookup(long); len(got) != 1 {
		t.Errorf("Lookup at 25h: %v, want the answer (its TTL is two days)", got)
	}
	if got := held(long); got != nil {
		t.Errorf("Held at 25h: %v, want nothing (the firewall keeps an address a day at most)", got)
	}
}

// TestTableHeldAll: HeldAll is Held of every address, for the firewall to
// seed its learned sets with when it goes into the kernel.
func TestTableHeldAll(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tb := NewTable(1000)
	tb.now = func() time.Time { return now }
	c := netip.MustParseAddr("192.0.2.10")
	for i, ttl := range []time.Duration{10 * time.Second, time.Hour, 48 * time.Hour} {
		tb.Learn(Learned{Client: c, Name: fmt.Sprintf("n%d.example.com", i), Addr: netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), Rule: "r", Expires: now.Add(ttl)})
	}
	now = now.Add(2 * time.Minute)
	var got []string
	for _, l := range tb.HeldAll(nil) {
		if want := tb.Held(l.Addr); len(want) != 1 || !reflect.DeepEqual(want[0], l) {
			t.Errorf("HeldAll %v, Held %v", l, want)
		}
		got = append(got, l.Name)
	}
	slices.Sort(got)
	if want := []string{"n1.example.com", "n2.example.com"}; !slices.Equal(got, want) {
		t.Errorf("HeldAll at 2m: %v, want %v", got, want)
	}
}

// shardNoRule counts the items of sh with no rule, and its items.
func shardNoRule(sh *tableShard) (norule, n int) {
	for _, items := range sh.m {
		for _, it := range items {
			n++
			if it.rule == "" {
				norule++
			}
		}
	}
	return norule, n
}

// TestTableNoRuleGoesFirst: entries learned with no rule (audit mode's
// answers for names no rule allows) go before allowed ones when room is
// needed, and never push one out: in every shard the allowed entries
// learned are all there while the shard has room for them, whatever the
// entries with no rule learned between them; an entry with no rule that
// finds a shard full of allowed ones is not kept, and counted.
func TestTableNoRuleGoesFirst(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	const perCap = 8
	tb := NewTable(perCap * tableShards)
	tb.now = func() time.Time { return now }
	client := netip.MustParseAddr("192.0.2.1")
	allowed := map[*tableShard]int{} // allowed entries learned per shard
	norules := map[*tableShard]int{} // no-rule entries learned per shard
	for i := range 6 * perCap * tableShards {
		a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		rule := ""
		if i%3 == 0 {
			rule = "lab"
		}
		sh := tb.shard(a)
		if rule != "" {
			allowed[sh]++
		} else {
			norules[sh]++
		}
		// Later entries expire later: the soonest-expiring goes first
		// within its kind.
		tb.Learn(Learned{Client: client, Name: fmt.Sprintf("h%d.example", i), Addr: a, Rule: rule, Expires: now.Add(time.Hour + time.Duration(i)*time.Second)})
	}
	pushedOut := 0
	for i := range tb.shards {
		sh := &tb.shards[i]
		nr, n := shardNoRule(sh)
		if nr != sh.norule || n != sh.n {
			t.Fatalf("shard %d: norule %d, n %d; counted %d, %d", i, sh.norule, sh.n, nr, n)
		}
		if got, want := n-nr, min(allowed[sh], perCap); got != want {
			t.Errorf("shard %d: %d allowed entries, want %d (%d learned, room for %d): pushed out by entries with no rule?", i, got, want, allowed[sh], perCap)
		}
		if n != min(perCap, allowed[sh]+norules[sh]) {
			t.Errorf("shard %d: %d entries, want it full (%d)", i, n, perCap)
		}
		pushedOut += max(0, allowed[sh]+norules[sh]-perCap)
	}
	if got := tb.Evicted(); got != uint64(pushedOut) {
		t.Errorf("Evicted %d, want %d (entries learned beyond the room)", got, pushedOut)
	}

	// One address's share: an entry with no rule does not replace one of
	// maxPerAddr allowed pairs; an allowed one replaces one with no rule.
	a := netip.MustParseAddr("203.0.113.1")
	tb = NewTable(0)
	tb.now = func() time.Time { return now }
	for i := range maxPerAddr - 1 {
		tb.Learn(Learned{Client: client, Name: fmt.Sprintf("a%d.example", i), Addr: a, Rule: "lab", Expires: now.Add(time.Hour)})
	}
	tb.Learn(Learned{Client: client, Name: "late.example", Addr: a, Expires: now.Add(2 * time.Hour)})
	tb.Learn(Learned{Client: client, Name: "more.example", Addr: a, Rule: "lab", Expires: now.Add(time.Hour)})
	tb.Learn(Learned{Client: client, Name: "denied.example", Addr: a, Expires: now.Add(2 * time.Hour)})
	names := tb.NamesFor(client, a)
	if len(names) != maxPerAddr || slices.Contains(names, "late.example") || slices.Contains(names, "denied.example") || !slices.Contains(names, "more.example") {
		t.Errorf("%d names for one address (late.example %v, denied.example %v, more.example %v), want the %d allowed ones",
			len(names), slices.Contains(names, "late.example"), slices.Contains(names, "denied.example"), slices.Contains(names, "more.example"), maxPerAddr)
	}
	if sh := tb.shard(a); sh.norule != 0 {
		t.Errorf("norule %d after the entry with no rule was replaced, want 0", sh.norule)
	}

	// A rule that changes (a reload between two answers) and a sweep keep
	// the count.
	tb = NewTable(0)
	tb.now = func() time.Time { return now }
	tb.Learn(Learned{Client: client, Name: "x.example", Addr: a, Expires: now.Add(time.Minute)})
	tb.Learn(Learned{Client: client, Name: "x.example", Addr: a, Rule: "lab", Expires: now.Add(2 * time.Minute)})
	tb.Learn(Learned{Client: client, Name: "y.example", Addr: a, Rule: "lab", Expires: now.Add(time.Minute)})
	tb.Learn(Learned{Client: client, Name: "y.example", Addr: a, Expires: now.Add(2 * time.Minute)})
	if sh := tb.shard(a); sh.norule != 1 {
		t.Errorf("norule %d after x.example got a rule and y.example lost its, want 1", sh.norule)
	}
	now = now.Add(policy.LearnedMaxTTL + time.Hour)
	if n := tb.Sweep(); n != 2 {
		t.Errorf("sweep removed %d, want 2", n)
	}
	if sh := tb.shard(a); sh.norule != 0 {
		t.Errorf("norule %d after the sweep, want 0", sh.norule)
	}
}
