package firewall

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestSeedFromGiven: the learned sets of a ruleset that goes into the
// kernel start with the addresses the DNS forwarder gave out already
// (Deps.Given), for the rules that cover the name for the client that
// asked, so that a client that keeps an answer from before (audit mode;
// chrony resolves once) is not dropped by the switch; an answer no rule
// of the new policy covers is not learned (audit mode answered it), nor
// one past the time the firewall would have kept it. A Replace that
// gives a rule a name seeds its set; one that changes no rule's names or
// clients does not look at the answers again. Before, the sets began
// empty and the first datagram was dropped.
func TestSeedFromGiven(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.3:9000", "198.18.2.4:9000", "[2001:db8:2::3]:9000")
	var logs bytes.Buffer
	calls := atomic.Int32{}
	cli := netip.MustParseAddr("198.18.1.2")
	given := []Given{
		{Client: cli, Name: "ntp.test", Addr: netip.MustParseAddr("198.18.2.4"), Until: time.Now().Add(time.Hour)},
		{Client: cli, Name: "ntp.test", Addr: netip.MustParseAddr("::ffff:198.18.2.4"), Until: time.Now().Add(time.Hour)}, // the same, mapped
		{Client: cli, Name: "other.test", Addr: netip.MustParseAddr("198.18.2.3"), Until: time.Now().Add(time.Hour)},      // no rule's name
		{Client: cli, Name: "ntp.test", Addr: netip.MustParseAddr("2001:db8:2::3"), Until: time.Now().Add(-time.Second)},  // let go already
	}
	fw := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewJSONHandler(&logs, nil)),
		Given: func() []Given { calls.Add(1); return given }})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from 198.18.1.2:") {
		t.Errorf("datagram to the address given out for ntp.test before the install: %q, %v; want the echo", got, err)
	}
	for _, dst := range []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000"} {
		if got, err := udpAsk(tp.client, dst, 700*time.Millisecond); !isTimeout(err) {
			t.Errorf("datagram to %s: %q, %v; want it dropped", dst, got, err)
		}
	}
	if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns6_udp-name"); strings.Contains(out, "2001:db8:2::3") {
		t.Errorf("an answer past its time was seeded:\n%s", out)
	}
	if !strings.Contains(logs.String(), `"msg":"firewall install"`) || !strings.Contains(logs.String(), `"learned_seeded":1`) {
		t.Errorf("no install line with learned_seeded 1:\n%s", logs.String())
	}

	// Nothing about names or clients changes: the answers are not asked.
	n := calls.Load()
	if err := fw.Replace(compile(t, strings.Replace(testPolicy, "9000/udp]\n  - name: quic-ok", "9000/udp, 9001/udp]\n  - name: quic-ok", 1))); err != nil {
		t.Fatal(err)
	}
	if calls.Load() != n {
		t.Error("a Replace that gives no rule a name or client looked at the forwarder's answers")
	}
	// udp-name now covers other.test too: its address goes in.
	if err := fw.Replace(compile(t, strings.Replace(testPolicy, "to: [ntp.test]", "to: [ntp.test, other.test]", 1))); err != nil {
		t.Fatal(err)
	}
	if calls.Load() == n {
		t.Error("a Replace that gives a rule a name did not look at the forwarder's answers")
	}
	if got, err := udpAsk(tp.client, "198.18.2.3:9000", 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from 198.18.1.2:") {
		t.Errorf("datagram to the address given out for other.test, now udp-name's: %q, %v; want the echo", got, err)
	}
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 3*time.Second); err != nil {
		t.Errorf("datagram to ntp.test's address after the Replace: %q, %v; want the echo", got, err)
	}
}

// TestSeedBounds: seeding fills a set up to Config.MaxLearned, counting
// what it holds already, and reports what it left out.
func TestSeedBounds(t *testing.T) {
	eng := compile(t, testPolicy)
	rs, err := render(Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: proxyPort, DNSPort: dnsPort}, eng, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	want := rs.seedRules(nil)
	if !want["udp-name"] || len(want) != 1 {
		t.Fatalf("seedRules(nil) = %v, want udp-name", want)
	}
	have := map[string]map[netip.Addr]learnedAddr{"dns4_udp-name": {netip.MustParseAddr("203.0.113.1"): {exp: now.Add(time.Hour)}}}
	var given []Given
	for i := range 5 {
		given = append(given, Given{Name: "ntp.test", Addr: netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + i)}), Until: now.Add(time.Minute)})
	}
	out, res := rs.seedsFrom(eng, want, given, nil, have, 3, now)
	if res.seeded != 2 || res.full != 2 || len(out["dns4_udp-name"]) != 2 {
		t.Errorf("seeded %d, full %d, set %v; want 2 seeded (203.0.113.1 is there already, longer), 2 left out", res.seeded, res.full, out)
	}
	if _, ok := out["dns4_udp-name"][netip.MustParseAddr("203.0.113.1")]; ok {
		t.Error("an address the set holds for longer was seeded again")
	}
}

// TestSeedAuditToEnforce: a ruleset installed in audit mode (--guard-wan,
// --masquerade) has no learned sets in the kernel; the Replace that
// switches it to enforce seeds them from the forwarder's answers.
func TestSeedAuditToEnforce(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.4:9000")
	given := []Given{{Client: netip.MustParseAddr("198.18.1.2"), Name: "ntp.test", Addr: netip.MustParseAddr("198.18.2.4"), Until: time.Now().Add(time.Hour)}}
	fw := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Given: func() []Given { return given }})
	eng := compile(t, testPolicy)
	if err := fw.Install(eng.WithMode("audit")); err != nil {
		t.Fatal(err)
	}
	if err := fw.Replace(eng); err != nil {
		t.Fatal(err)
	}
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from 198.18.1.2:") {
		t.Errorf("datagram to the address given out in audit mode, after the switch to enforce: %q, %v; want the echo", got, err)
	}
}

// TestSeedCatchUp: an answer the forwarder gives while the ruleset goes
// in (after the snapshot the transaction was seeded from, before its gate
// sees the ruleset) is seeded by the second look after the install.
func TestSeedCatchUp(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.4:9000")
	var calls atomic.Int32
	late := Given{Client: netip.MustParseAddr("198.18.1.2"), Name: "ntp.test", Addr: netip.MustParseAddr("198.18.2.4"), Until: time.Now().Add(time.Hour)}
	fw := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Given: func() []Given {
			if calls.Add(1) == 1 {
				return nil // the snapshot: not given yet
			}
			return []Given{late}
		}})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from 198.18.1.2:") {
		t.Errorf("datagram to the address given out while the ruleset went in: %q, %v; want the echo", got, err)
	}
}

// BenchmarkSeedsFrom: one seeding's look at a full forwarder table (65536
// answers, a third of them for a name a rule covers).
func BenchmarkSeedsFrom(b *testing.B) {
	eng := compile(b, testPolicy)
	rs, err := render(Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: proxyPort, DNSPort: dnsPort}, eng, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	names := []string{"ntp.test", "www.example.test", "other.test"}
	given := make([]Given, 65536)
	for i := range given {
		given[i] = Given{Client: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), Name: names[i%3],
			Addr: netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)}), Until: now.Add(time.Hour)}
	}
	want := rs.seedRules(nil)
	b.ResetTimer()
	for b.Loop() {
		rs.seedsFrom(eng, want, given, nil, nil, 65536, now)
	}
}

// TestNarrowedRuleDropsLearned: a reload that takes a name (or a client)
// from a rule does not carry over the addresses its sets learned for the
// names it no longer covers: they are named after the rule, not after the
// names. The addresses of the names it still covers are seeded again from
// the forwarder's answers.
func TestNarrowedRuleDropsLearned(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	cli := netip.MustParseAddr("198.18.1.2")
	ntp, evil := netip.MustParseAddr("198.18.2.4"), netip.MustParseAddr("198.18.2.5")
	given := []Given{
		{Client: cli, Name: "ntp.test", Addr: ntp, Until: time.Now().Add(time.Hour)},
		{Client: cli, Name: "evil.test", Addr: evil, Until: time.Now().Add(time.Hour)},
	}
	fw := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Given: func() []Given { return given }})
	wide := compile(t, strings.Replace(testPolicy, "to: [ntp.test]", "to: [ntp.test, evil.test]", 1))
	if err := fw.Install(wide); err != nil {
		t.Fatal(err)
	}
	for _, a := range []Address{{Rule: "udp-name", Addr: ntp, TTL: time.Hour}, {Rule: "udp-name", Addr: evil, TTL: time.Hour}} {
		if err := fw.LearnAll(context.Background(), []Address{a}); err != nil {
			t.Fatal(err)
		}
	}
	wideRS := fw.Ruleset()
	if err := fw.Replace(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
	if strings.Contains(out, evil.String()) {
		t.Errorf("the address of a name the rule no longer covers is still in its set:\n%s", out)
	}
	// An address learned under the wide ruleset whose transaction comes
	// after the Replace (it waited for the netlink lock) is not written.
	late := netip.MustParseAddr("198.18.2.6")
	if err := fw.writeLearned([]learnOp{{rs: wideRS, rule: "udp-name", set: "dns4_udp-name", addr: late, exp: time.Now().Add(time.Hour)}}); err != nil {
		t.Fatal(err)
	}
	out = tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
	if strings.Contains(out, late.String()) {
		t.Errorf("an address learned for the wide rule, written after the reload narrowed it:\n%s", out)
	}
	if !strings.Contains(out, ntp.String()) {
		t.Errorf("the address of a name the rule still covers left its set:\n%s", out)
	}
}

// TestUnchangedRuleKeepsLateLearned: a reload that leaves a rule's names
// and clients as they were (another rule added, or nothing changed) does
// not hold back what its sets learned: an address learned under the old
// ruleset whose transaction comes after the Replace (it waited for the
// netlink lock) is written, and one learned before is carried over. A
// query in flight across an ordinary reload must not lose its address.
func TestUnchangedRuleKeepsLateLearned(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	early := netip.MustParseAddr("198.18.2.7")
	if err := fw.Learn("udp-name", early, time.Hour); err != nil {
		t.Fatal(err)
	}
	for i, src := range []string{
		testPolicy + "  - {name: more, to: [more.test], ports: [9001/udp]}\n",
		testPolicy + "  - {name: more, to: [more.test], ports: [9001/udp]}\n",
	} {
		before := fw.Ruleset()
		if err := fw.Replace(compile(t, src)); err != nil {
			t.Fatal(err)
		}
		late := netip.AddrFrom4([4]byte{198, 18, 2, byte(8 + i)})
		if err := fw.writeLearned([]learnOp{{rs: before, rule: "udp-name", set: "dns4_udp-name", addr: late, exp: time.Now().Add(time.Hour)}}); err != nil {
			t.Fatal(err)
		}
		out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
		for _, a := range []netip.Addr{early, late} {
			if !strings.Contains(out, a.String()) {
				t.Errorf("reload %d: %s not in the unchanged rule's set:\n%s", i, a, out)
			}
		}
	}
}
