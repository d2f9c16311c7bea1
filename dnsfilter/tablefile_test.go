package dnsfilter

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// items returns every item of the table, live or not, as one sortable
// line each: address, client, name, rule, and both times after start.
func tableItems(tb *Table, start time.Time) []string {
	var out []string
	for i := range tb.shards {
		sh := &tb.shards[i]
		sh.mu.RLock()
		for a, items := range sh.m {
			for _, it := range items {
				out = append(out, fmt.Sprintf("%v %v %s %s expires=%s held=%s", a, it.client, it.name, it.rule,
					time.Unix(0, it.expires).Sub(start), time.Unix(0, it.held).Sub(start)))
			}
		}
		sh.mu.RUnlock()
	}
	slices.Sort(out)
	return out
}

// TestTableSaveLoad: what Save writes, Load puts back with the same
// times (never extended), less what is past its keep time by then; a
// table restored so answers and vouches as the saved one did.
func TestTableSaveLoad(t *testing.T) {
	start := time.Unix(1_800_000_000, 0)
	now := start
	tb := NewTable(1000)
	tb.now = func() time.Time { return now }
	c1, c2 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")
	ntp, vpn, short := netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("2001:db8:1::443"), netip.MustParseAddr("203.0.113.8")
	tb.Learn(Learned{Client: c1, Name: "time.example.com", Addr: ntp, Rule: "ntp", Expires: now.Add(5 * time.Minute)})
	tb.Learn(Learned{Client: c2, Name: "time.example.com", Addr: ntp, Rule: "ntp", Expires: now.Add(5 * time.Minute)})
	tb.Learn(Learned{Client: c1, Name: "vpn.example.com", Addr: vpn, Rule: "vpn", Expires: now.Add(2 * time.Hour)})
	tb.Learn(Learned{Client: c1, Name: "short.example.com", Addr: short, Rule: "", Expires: now.Add(5 * time.Second)})
	now = start.Add(10 * time.Second)
	// The answer with a TTL of 5s is over, but the firewall holds its
	// address 60s: it is saved.
	want := tableItems(tb, start)
	if len(want) != 4 {
		t.Fatalf("table before saving: %v", want)
	}

	var buf bytes.Buffer
	n, err := tb.Save(&buf)
	if err != nil || n != 4 {
		t.Fatalf("Save: %d items, %v; want 4", n, err)
	}
	if !strings.HasPrefix(buf.String(), tableFileHeader+"\n") {
		t.Errorf("file does not start with the header:\n%s", buf.String())
	}
	saved := buf.Bytes()

	// Restored at once: the same items, the same times.
	tb2 := NewTable(1000)
	tb2.now = func() time.Time { return now }
	if n, err := tb2.Load(bytes.NewReader(saved), nil); err != nil || n != 4 {
		t.Fatalf("Load: %d items, %v; want 4", n, err)
	}
	if got := tableItems(tb2, start); !slices.Equal(got, want) {
		t.Errorf("restored:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if got := tb2.NamesFor(c1, ntp); !slices.Equal(got, []string{"time.example.com"}) {
		t.Errorf("restored NamesFor(c1, ntp): %v", got)
	}
	if got := tb2.NamesFor(c1, short); got != nil {
		t.Errorf("restored NamesFor(c1, short): %v, want nothing (its TTL is over)", got)
	}
	if got := tb2.Held(short); len(got) != 1 || !got[0].Expires.Equal(start.Add(time.Minute)) {
		t.Errorf("restored Held(short): %v, want held until 1m", got)
	}
	if got := tb2.HeldAll(nil); len(got) != 4 {
		t.Errorf("restored HeldAll: %v, want 4", got)
	}

	// Restored later: what is past its keep time is dropped, the rest
	// keeps its times (a restart never lengthens an answer).
	now = start.Add(6 * time.Minute)
	tb3 := NewTable(1000)
	tb3.now = func() time.Time { return now }
	if n, err := tb3.Load(bytes.NewReader(saved), nil); err != nil || n != 1 {
		t.Fatalf("Load at 6m: %d items, %v; want 1", n, err)
	}
	if got, want := tableItems(tb3, start), []string{"2001:db8:1::443 192.0.2.10 vpn.example.com vpn expires=2h0m0s held=2h0m0s"}; !slices.Equal(got, want) {
		t.Errorf("restored at 6m: %v, want %v", got, want)
	}
	// A learn after the restore moves the hold as it would have.
	tb3.Learn(Learned{Client: c1, Name: "vpn.example.com", Addr: vpn, Rule: "vpn", Expires: now.Add(time.Minute)})
	if got := tb3.Held(vpn); len(got) != 1 || !got[0].Expires.Equal(start.Add(2*time.Hour)) {
		t.Errorf("Held(vpn) after a shorter answer: %v, want 2h still", got)
	}

	// An item already in the table stays as it is.
	now = start.Add(10 * time.Second)
	tb4 := NewTable(1000)
	tb4.now = func() time.Time { return now }
	tb4.Learn(Learned{Client: c1, Name: "time.example.com", Addr: ntp, Rule: "ntp", Expires: now.Add(30 * time.Second)})
	if n, err := tb4.Load(bytes.NewReader(saved), nil); err != nil || n != 3 {
		t.Fatalf("Load into a table with one of the items: %d, %v; want 3", n, err)
	}
	if got := tb4.Lookup(ntp); len(got) != 2 {
		t.Errorf("Lookup(ntp): %v", got)
	} else {
		for _, l := range got {
			if l.Client == c1 && !l.Expires.Equal(start.Add(40*time.Second)) {
				t.Errorf("the item already there changed: %v", l)
			}
		}
	}

	// An answer with a TTL longer than the firewall's hold is saved with
	// its expiry cut to that (never longer), so that Load takes it.
	tb5 := NewTable(10)
	tb5.now = func() time.Time { return now }
	tb5.Learn(Learned{Client: c1, Name: "long.example.com", Addr: ntp, Rule: "r", Expires: now.Add(48 * time.Hour)})
	buf.Reset()
	if _, err := tb5.Save(&buf); err != nil {
		t.Fatal(err)
	}
	tb6 := NewTable(10)
	tb6.now = func() time.Time { return now }
	if n, err := tb6.Load(&buf, nil); err != nil || n != 1 {
		t.Fatalf("Load of a 48h answer: %d, %v", n, err)
	}
	if got := tb6.Lookup(ntp); len(got) != 1 || !got[0].Expires.Equal(now.Add(24*time.Hour)) {
		t.Errorf("a 48h answer restored as %v, want its expiry at 24h", got)
	}

	// An empty table saves a file that loads as nothing.
	buf.Reset()
	if n, err := NewTable(10).Save(&buf); err != nil || n != 0 {
		t.Fatalf("Save of an empty table: %d, %v", n, err)
	}
	if n, err := NewTable(10).Load(&buf, nil); err != nil || n != 0 {
		t.Errorf("Load of an empty table's file: %d, %v", n, err)
	}
}

// TestTableChanges: the change count moves when Learn changes the table,
// not on a cache hit's refresh nor on a load.
func TestTableChanges(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tb := NewTable(100)
	tb.now = func() time.Time { return now }
	l := Learned{Client: netip.MustParseAddr("192.0.2.1"), Name: "a.example.com", Addr: netip.MustParseAddr("203.0.113.1"), Rule: "r", Expires: now.Add(time.Minute)}
	c0 := tb.Changes()
	tb.Learn(l)
	c1 := tb.Changes()
	if c1 == c0 {
		t.Error("a new item did not move the change count")
	}
	tb.Learn(l)
	if tb.Changes() != c1 {
		t.Error("the same answer again moved the change count")
	}
	l.Expires = l.Expires.Add(time.Second)
	tb.Learn(l)
	if tb.Changes() == c1 {
		t.Error("a refresh with a later expiry did not move the change count")
	}
}

// TestTableLoadRefuses: a file that is not what Save writes is refused
// whole (nothing added), with an error that says why; never a panic.
func TestTableLoadRefuses(t *testing.T) {
	start := time.Unix(1_800_000_000, 0)
	item := func(client, name, addr, rule string, expires, held time.Duration) string {
		return fmt.Sprintf(`{"client":%q,"name":%q,"addr":%q,"rule":%q,"expires":%d,"held":%d}`,
			client, name, addr, rule, start.Add(expires).UnixNano(), start.Add(held).UnixNano())
	}
	good := item("192.0.2.10", "time.example.com", "203.0.113.7", "ntp", time.Minute, time.Minute)
	file := func(lines ...string) string { return strings.Join(lines, "\n") + "\n" }
	end := func(n int) string { return fmt.Sprintf(`{"end":%d,"saved":%d}`, n, start.UnixNano()) }
	long := strings.Repeat("a.", 130) + "com" // 263 bytes
	cases := []struct {
		name, in, err string
	}{
		{"empty", "", "no header"},
		{"older version", file(`{"egressd":"learned-addresses","version":1}`, `{"end":0}`), "header"},
		{"newer version", file(`{"egressd":"learned-addresses","version":3}`, end(0)), "header"},
		{"no save time", file(tableFileHeader, good, `{"end":1}`), "no save time"},
		{"item with a save time", file(tableFileHeader, good[:len(good)-1]+`,"saved":1}`, end(1)), "save time"},
		{"binary", "\x00\x01\x02\xff", "header"},
		{"truncated", file(tableFileHeader, good), "truncated"},
		{"truncated mid-line", tableFileHeader + "\n" + good[:40], "truncated"},
		{"count mismatch", file(tableFileHeader, good, end(2)), "says 2"},
		{"after the end", file(tableFileHeader, good, end(1), good), "after the end"},
		{"not json", file(tableFileHeader, "client=1", end(1)), "line 2"},
		{"unknown field", file(tableFileHeader, strings.Replace(good, `"rule"`, `"evil":1,"rule"`, 1), end(1)), "line 2"},
		{"bad client", file(tableFileHeader, item("192.0.2.300", "a.example.com", "203.0.113.7", "r", time.Minute, time.Minute), end(1)), "client"},
		{"no client", file(tableFileHeader, item("", "a.example.com", "203.0.113.7", "r", time.Minute, time.Minute), end(1)), "client"},
		{"zoned addr", file(tableFileHeader, item("192.0.2.1", "a.example.com", "fe80::1%eth0", "r", time.Minute, time.Minute), end(1)), "address"},
		{"bad name", file(tableFileHeader, item("192.0.2.1", "a b.example.com", "203.0.113.7", "r", time.Minute, time.Minute), end(1)), "name"},
		{"upper-case name", file(tableFileHeader, item("192.0.2.1", "A.example.com", "203.0.113.7", "r", time.Minute, time.Minute), end(1)), "name"},
		{"long name", file(tableFileHeader, item("192.0.2.1", long, "203.0.113.7", "r", time.Minute, time.Minute), end(1)), "name"},
		{"bad rule", file(tableFileHeader, item("192.0.2.1", "a.example.com", "203.0.113.7", "r\nx", time.Minute, time.Minute), end(1)), "rule"},
		{"held too far ahead", file(tableFileHeader, item("192.0.2.1", "a.example.com", "203.0.113.7", "r", time.Minute, 48*time.Hour), end(1)), "ahead"},
		{"expires too far ahead", file(tableFileHeader, item("192.0.2.1", "a.example.com", "203.0.113.7", "r", 30*24*time.Hour, time.Minute), end(1)), "ahead"},
		{"line too long", file(tableFileHeader, good[:len(good)-1]+strings.Repeat(" ", 2000)+"}", end(1)), "long"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tb := NewTable(1000)
			tb.now = func() time.Time { return start }
			n, err := tb.Load(strings.NewReader(c.in), nil)
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.HasPrefix(err.Error(), "dnsfilter: ") {
				t.Errorf("Load: %d, %v; want an error with %q", n, err, c.err)
			}
			if n != 0 || tb.Len() != 0 {
				t.Errorf("Load of a refused file added %d items (table %d)", n, tb.Len())
			}
		})
	}

	// More items than the table holds: refused, read no further.
	t.Run("oversized", func(t *testing.T) {
		tb := NewTable(64) // one item per shard
		tb.now = func() time.Time { return start }
		var b strings.Builder
		b.WriteString(tableFileHeader + "\n")
		for i := range 65 {
			b.WriteString(item("192.0.2.1", fmt.Sprintf("n%d.example.com", i), "203.0.113.7", "r", time.Minute, time.Minute) + "\n")
		}
		b.WriteString(end(65) + "\n")
		n, err := tb.Load(strings.NewReader(b.String()), nil)
		if err == nil || !strings.Contains(err.Error(), "more than") || n != 0 || tb.Len() != 0 {
			t.Errorf("Load of 65 items into a table of 64: %d, %v, table %d", n, err, tb.Len())
		}
	})
}

// FuzzTableLoad: Load never panics; a file it refuses adds nothing; one
// it takes holds no more than the table's bound, no time further ahead
// than the firewall would hold an address, and saves and loads back to
// the same items.
func FuzzTableLoad(f *testing.F) {
	start := time.Unix(1_800_000_000, 0)
	tb := NewTable(64)
	tb.now = func() time.Time { return start }
	tb.Learn(Learned{Client: netip.MustParseAddr("192.0.2.10"), Name: "time.example.com", Addr: netip.MustParseAddr("203.0.113.7"), Rule: "ntp", Expires: start.Add(5 * time.Minute)})
	tb.Learn(Learned{Client: netip.MustParseAddr("2001:db8::1"), Name: "vpn.example.com", Addr: netip.MustParseAddr("2001:db8:1::443"), Rule: "vpn", Expires: start.Add(time.Second)})
	tb.Learn(Learned{Client: netip.MustParseAddr("fe80::2%lan0"), Name: "vpn.example.com", Addr: netip.MustParseAddr("2001:db8:1::443"), Rule: "vpn", Expires: start.Add(time.Second)})
	var buf bytes.Buffer
	if _, err := tb.Save(&buf); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())                                                                                   // three items, as Save writes them
	f.Add([]byte(tableFileHeader + "\n" + fmt.Sprintf(`{"end":0,"saved":%d}`, start.UnixNano()) + "\n")) // an empty table
	f.Add(buf.Bytes()[:buf.Len()-5])                                                                     // cut in the trailer
	f.Add([]byte(tableFileHeader + "\n"))                                                                // header only
	f.Fuzz(func(t *testing.T, in []byte) {
		tb := NewTable(64)
		tb.now = func() time.Time { return start }
		n, err := tb.Load(bytes.NewReader(in), nil)
		if err != nil {
			if n != 0 || tb.Len() != 0 {
				t.Fatalf("refused (%v) but added %d (table %d)", err, n, tb.Len())
			}
			if !strings.HasPrefix(err.Error(), "dnsfilter: ") {
				t.Fatalf("error without the package prefix: %v", err)
			}
			return
		}
		if n != tb.Len() || n > 64 {
			t.Fatalf("loaded %d, table %d, bound 64", n, tb.Len())
		}
		limit := start.Add(maxLoadAhead).UnixNano()
		for i := range tb.shards {
			for a, items := range tb.shards[i].m {
				if !a.IsValid() || a.Zone() != "" || a.Is4In6() {
					t.Fatalf("address %v", a)
				}
				for _, it := range items {
					if it.keep() <= start.UnixNano() || it.expires > limit || it.held > limit || len(it.name) > 255 {
						t.Fatalf("item %+v (limit %d)", it, limit)
					}
				}
			}
		}
		var out bytes.Buffer
		if m, err := tb.Save(&out); err != nil || m != n {
			t.Fatalf("Save of the loaded table: %d, %v; loaded %d", m, err, n)
		}
		// The same shards as tb's: a table of 64 holds one item a shard,
		// and a new seed would put two of tb's items in one shard (one in
		// 64 for two items), which a full table, restarted, loses too.
		tb2 := NewTable(64)
		tb2.now, tb2.seed = tb.now, tb.seed
		if m, err := tb2.Load(&out, nil); err != nil || m != n {
			t.Fatalf("Load of the saved table: %d, %v; want %d", m, err, n)
		}
		if a, b := tableItems(tb, start), tableItems(tb2, start); !slices.Equal(a, b) {
			t.Fatalf("saved and loaded again:\n%v\nwant\n%v", b, a)
		}
	})
}

// TestTableSaveConcurrent: Save while Learn, Sweep and NamesFor run (for
// the race detector): every file it writes loads whole, with items the
// table was given and no time further ahead than Learn set.
func TestTableSaveConcurrent(t *testing.T) {
	start := time.Unix(1_800_000_000, 0)
	var clock atomic.Int64
	clock.Store(start.UnixNano())
	tb := NewTable(512)
	tb.now = func() time.Time { return time.Unix(0, clock.Load()) }
	var wg sync.WaitGroup
	var stop atomic.Bool
	for g := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20_000 && !stop.Load(); i++ {
				now := tb.now()
				addr := netip.AddrFrom4([4]byte{203, 0, 113, byte(i % 97)})
				client := netip.AddrFrom4([4]byte{192, 0, 2, byte(g)})
				tb.Learn(Learned{Client: client, Name: fmt.Sprintf("n%d.example.com", i%300), Addr: addr, Rule: "web", Expires: now.Add(time.Duration(1+i%90) * time.Second)})
				tb.NamesFor(client, addr)
				if i%500 == 0 {
					clock.Add(int64(7 * time.Second))
					tb.Sweep()
				}
			}
		}()
	}
	for s := 0; s < 200; s++ {
		var buf bytes.Buffer
		n, err := tb.Save(&buf)
		if err != nil {
			t.Fatal(err)
		}
		at := tb.now() // not before the save
		tb2 := NewTable(512)
		tb2.now = func() time.Time { return at }
		m, err := tb2.Load(bytes.NewReader(buf.Bytes()), nil)
		if err != nil || m > n {
			t.Fatalf("save %d: loading %d saved items: %d, %v", s, n, m, err)
		}
		for _, line := range tableItems(tb2, start) {
			if !strings.Contains(line, ".example.com web ") {
				t.Fatalf("save %d: loaded item %q was never learned", s, line)
			}
		}
	}
	stop.Store(true)
	wg.Wait()
}

// TestTableLoadClockWentBack: a file loaded on a clock behind the one
// that saved it (a gateway without a real-time clock, started before NTP
// set it) is refused whole: its times, read on that clock, would hold
// every address as much longer as the clock is behind (a 10-minute answer
// for 2 h 10 min), though no item is further ahead than a day. A clock a
// few minutes behind (a step of NTP) still loads it.
func TestTableLoadClockWentBack(t *testing.T) {
	start := time.Unix(1_800_000_000, 0)
	tb := NewTable(100)
	tb.now = func() time.Time { return start }
	tb.Learn(Learned{Client: netip.MustParseAddr("192.0.2.10"), Name: "time.example.com", Addr: netip.MustParseAddr("203.0.113.7"), Rule: "ntp", Expires: start.Add(10 * time.Minute)})
	var buf bytes.Buffer
	if n, err := tb.Save(&buf); err != nil || n != 1 {
		t.Fatalf("Save: %d, %v", n, err)
	}
	for _, c := range []struct {
		back time.Duration
		want int
	}{{2 * time.Hour, 0}, {20 * time.Minute, 0}, {4 * time.Minute, 1}, {0, 1}} {
		tb2 := NewTable(100)
		tb2.now = func() time.Time { return start.Add(-c.back) }
		n, err := tb2.Load(bytes.NewReader(buf.Bytes()), nil)
		switch {
		case c.want == 0 && (err == nil || !strings.Contains(err.Error(), "clock went back") || n != 0 || tb2.Len() != 0):
			t.Errorf("Load on a clock %s behind the save: %d, %v (held %v); want it refused, the clock went back", c.back, n, err, tb2.Held(netip.MustParseAddr("203.0.113.7")))
		case c.want == 1 && (err != nil || n != 1):
			t.Errorf("Load on a clock %s behind the save: %d, %v; want 1", c.back, n, err)
		}
	}
}

// TestLoadWouldLearnAsForwarder: a table's file written under another
// policy and answer filter (here: every name allowed, nothing filtered,
// as an older version without a range, or a policy that has since lost a
// name or a client, would have it) loads with Config.WouldLearn into what
// a forwarder running with that Config and policy learns from the same
// upstream answers: the same client, name, address and rule, no more.
func TestLoadWouldLearnAsForwarder(t *testing.T) {
	const zone = `a.allowed.test. 300 IN A 203.0.113.1
a.allowed.test. 300 IN A 10.0.0.1
a.allowed.test. 300 IN A 168.63.129.16
a.allowed.test. 300 IN AAAA 2001:db8::1
a.allowed.test. 300 IN AAAA 64:ff9b::a00:1
printer.lan. 300 IN A 192.168.1.5
printer.lan. 300 IN A 203.0.113.5
denied.test. 300 IN A 203.0.113.2
other.test. 300 IN A 203.0.113.3
use-application-dns.net. 300 IN A 203.0.113.4`
	const pol = `version: 1
mode: %s
rules:
  - name: other
    from: [192.0.2.0/24]
    to: [other.test]
    ports: [443/tcp]
  - name: lab
    to: ["*.allowed.test", printer.lan, use-application-dns.net]
    ports: [443/tcp]
`
	up := newFakeUpstream(t, zone)
	client := netip.MustParseAddr("127.0.0.1")
	// What the file holds: every answer, unfiltered, for the client.
	old := NewTable(0)
	for _, rrs := range up.zone {
		for _, rr := range rrs {
			var a netip.Addr
			switch v := rr.(type) {
			case *dns.A:
				a, _ = netip.AddrFromSlice(v.A.To4())
			case *dns.AAAA:
				a, _ = netip.AddrFromSlice(v.AAAA)
			}
			old.Learn(Learned{Client: client, Name: strings.TrimSuffix(rr.Header().Name, "."), Addr: a, Rule: "before", Expires: time.Now().Add(time.Hour)})
		}
	}
	var file bytes.Buffer
	if n, err := old.Save(&file); err != nil || n != 10 {
		t.Fatalf("Save: %d, %v; want 10 items", n, err)
	}
	list := func(tb *Table) []string {
		var out []string
		for _, l := range tb.HeldAll(nil) {
			out = append(out, fmt.Sprintf("%s %s %s %s", l.Client, l.Name, l.Addr, l.Rule))
		}
		slices.Sort(out)
		return out
	}
	for _, c := range []struct {
		name string
		mode string
		cfg  Config
		want int // items learned
	}{
		{"enforce", "enforce", Config{}, 4},                                                    // 203.0.113.1, 2001:db8::1, printer.lan's two
		{"audit", "audit", Config{}, 6},                                                        // denied.test and other.test learned with no rule
		{"private-answers", "enforce", Config{AllowPrivateAnswers: true}, 7},                   // the filter off
		{"no-private-suffixes", "enforce", Config{PrivateSuffixes: []string{}}, 3},             // printer.lan's private address stripped
		{"own-suffix", "enforce", Config{PrivateSuffixes: []string{"allowed.test", "lan"}}, 7}, // a.allowed.test may be private
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := c.cfg
			cfg.Upstreams = []string{up.Addr}
			store := compile(t, fmt.Sprintf(pol, c.mode))
			ts := startServer(t, "", cfg, Deps{Policy: store})
			for name := range up.zone {
				for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
					ask(t, "udp", ts.Addr, name, qt, true)
				}
			}
			learned := list(ts.Table())
			if len(learned) != c.want {
				t.Errorf("the forwarder learned %d items, want %d:\n%s", len(learned), c.want, strings.Join(learned, "\n"))
			}
			tb := NewTable(0)
			if _, err := tb.Load(bytes.NewReader(file.Bytes()), c.cfg.WouldLearn(store.Load(), nil)); err != nil {
				t.Fatal(err)
			}
			if got := list(tb); !slices.Equal(got, learned) {
				t.Errorf("loaded with WouldLearn:\n%s\nthe forwarder learned:\n%s", strings.Join(got, "\n"), strings.Join(learned, "\n"))
			}
		})
	}
}

// TestTableSaveLoadLinkLocal: a LAN client asking over its link-local
// address is learned as the forwarder's socket names it, with its zone
// (fe80::2%lan0; the proxy and capture look it up so, and fe80::2 on
// another LAN is another device); Save writes it with the zone and Load
// takes it back, so a restart keeps it. Before, Save left such items
// out (Load refused a zoned client): the device's next connection
// without SNI was denied no-rule in enforce mode until it asked DNS
// again. A zone on any other client, or one that names no interface,
// is still refused.
func TestTableSaveLoadLinkLocal(t *testing.T) {
	start := time.Unix(1_800_000_000, 0)
	tb := NewTable(100)
	tb.now = func() time.Time { return start }
	lan0, lan1 := netip.MustParseAddr("fe80::2%lan0"), netip.MustParseAddr("fe80::2%lan1")
	addr := netip.MustParseAddr("203.0.113.7")
	tb.Learn(Learned{Client: lan0, Name: "a.example.com", Addr: addr, Rule: "r", Expires: start.Add(time.Hour)})
	tb.Learn(Learned{Client: lan1, Name: "b.example.com", Addr: addr, Rule: "r", Expires: start.Add(time.Hour)})
	var buf bytes.Buffer
	if n, err := tb.Save(&buf); err != nil || n != 2 {
		t.Fatalf("Save: %d items, %v; want 2:\n%s", n, err, buf.String())
	}
	tb2 := NewTable(100)
	tb2.now = func() time.Time { return start }
	if n, err := tb2.Load(bytes.NewReader(buf.Bytes()), nil); err != nil || n != 2 {
		t.Fatalf("Load: %d items, %v; want 2", n, err)
	}
	if got, want := tableItems(tb2, start), tableItems(tb, start); !slices.Equal(got, want) {
		t.Errorf("restored:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if got := tb2.NamesFor(lan0, addr); !slices.Equal(got, []string{"a.example.com"}) {
		t.Errorf("restored NamesFor(%v): %v, want a.example.com", lan0, got)
	}
	if got := tb2.NamesFor(lan1, addr); !slices.Equal(got, []string{"b.example.com"}) {
		t.Errorf("restored NamesFor(%v): %v, want b.example.com", lan1, got)
	}

	item := func(client string) string {
		return fmt.Sprintf("%s\n{\"client\":%q,\"name\":\"a.example.com\",\"addr\":\"203.0.113.7\",\"rule\":\"r\",\"expires\":%d,\"held\":%d}\n{\"end\":1,\"saved\":%d}\n",
			tableFileHeader, client, start.Add(time.Minute).UnixNano(), start.Add(time.Minute).UnixNano(), start.UnixNano())
	}
	for _, c := range []string{"2001:db8::1%eth0", "fd00::1%eth0", "::1%lo", "ff02::1%eth0", "fe80::1%", "fe80::1%eth0/1", "fe80::1%a:b",
		"fe80::1%eth 0", "fe80::1%a%b", "fe80::1%" + strings.Repeat("e", 16), "fe80::1%\u00e9", "fe80::1%.", "fe80::1%..", "::ffff:192.0.2.1%eth0"} {
		tb := NewTable(10)
		tb.now = func() time.Time { return start }
		if n, err := tb.Load(strings.NewReader(item(c)), nil); err == nil || !strings.Contains(err.Error(), "client") || n != 0 || tb.Len() != 0 {
			t.Errorf("Load of client %q: %d, %v; want refused for the client", c, n, err)
		}
	}
	for _, c := range []string{"fe80::1%eth0", "fe80::1%7", "fe80::1%br-lan.10", "fe80::1%" + strings.Repeat("e", 15)} {
		tb := NewTable(10)
		tb.now = func() time.Time { return start }
		if n, err := tb.Load(strings.NewReader(item(c)), nil); err != nil || n != 1 {
			t.Errorf("Load of client %q: %d, %v; want it taken", c, n, err)
		}
	}
}
