package firewall

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// fullSetFirewall is a firewall in audit mode (Learn only remembers, no
// kernel) whose set dns4_ntp holds max live addresses, expiring one
// millisecond apart from now+MinTTL on.
func fullSetFirewall(t testing.TB, max int, now *time.Time) *Firewall {
	t.Helper()
	fw, err := New(Config{MaxLearned: max, MinTTL: 10 * time.Second}, Deps{Now: func() time.Time { return *now }})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := render(Config{}, sitePolicy(t).WithMode(policy.ModeAudit), *now)
	if err != nil {
		t.Fatal(err)
	}
	fw.rs = rs
	start := *now
	for i := range max {
		*now = start.Add(time.Duration(i) * time.Millisecond)
		if err := fw.Learn("ntp", learnAddr(i), time.Second); err != nil {
			t.Fatal(err)
		}
	}
	*now = start
	return fw
}

// learnAddr is the i-th of distinct IPv4 addresses in 198.18.0.0/15.
func learnAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)})
}

// TestLearnFullSetWork: a learned set full of live addresses looked at every
// address of the set for each new one (65,536 by default), under the
// firewall's lock that every DNS answer's Learn takes. It now looks at a
// bounded number per new address, on average: refused while every address
// is live, and taking the place of each as it expires.
func TestLearnFullSetWork(t *testing.T) {
	const max = 1 << 14
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fw := fullSetFirewall(t, max, &now)
	start := now
	before := fw.examined
	// Refused: every address is live.
	const refused = 2000
	for i := range refused {
		if err := fw.Learn("ntp", learnAddr(max+i), time.Second); !errors.Is(err, ErrSetFull) {
			t.Fatalf("a new address into a set full of live ones: %v, want ErrSetFull", err)
		}
	}
	// The addresses expire one a millisecond: each new address takes the
	// place of the one that just expired, and no other.
	const taken = 2000
	for i := range taken {
		now = start.Add(10*time.Second + time.Duration(i)*time.Millisecond)
		if err := fw.Learn("ntp", learnAddr(max+refused+i), time.Second); err != nil {
			t.Fatalf("new address %d after the %dth expired: %v", i, i+1, err)
		}
		if err := fw.Learn("ntp", learnAddr(max+refused+taken+i), time.Second); !errors.Is(err, ErrSetFull) {
			t.Fatalf("a second new address after the %dth expired: %v, want ErrSetFull", i+1, err)
		}
	}
	if n := len(fw.learned["dns4_ntp"]); n != max {
		t.Errorf("set holds %d addresses, want %d", n, max)
	}
	for i := taken; i < max; i++ {
		if _, ok := fw.learned["dns4_ntp"][learnAddr(i)]; !ok {
			t.Fatalf("live address %d left the set", i)
		}
	}
	per := float64(fw.examined-before) / (refused + 2*taken)
	t.Logf("%.1f addresses examined per new address", per)
	if per > 64 {
		t.Errorf("%.1f addresses examined per new address into a full set, want at most 64 (the set holds %d)", per, max)
	}
}

// BenchmarkLearnFullSet: a new address into a learned set full of live
// ones (the default 65,536), refused.
func BenchmarkLearnFullSet(b *testing.B) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fw := fullSetFirewall(b, DefaultMaxLearned, &now)
	i := 0
	for b.Loop() {
		if err := fw.Learn("ntp", learnAddr(DefaultMaxLearned+i%1000), time.Second); !errors.Is(err, ErrSetFull) {
			b.Fatal(err)
		}
		i++
	}
}

// TestLearnFullSetRefreshed: an address refreshed in a full set stays until
// its new expiry, not its first; an expired one makes room, whenever it
// was learned.
func TestLearnFullSetRefreshed(t *testing.T) {
	const max = 64
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fw := fullSetFirewall(t, max, &now)
	start := now
	if err := fw.Learn("ntp", learnAddr(max), time.Second); !errors.Is(err, ErrSetFull) {
		t.Fatalf("a new address into a full set: %v, want ErrSetFull", err)
	}
	if err := fw.Learn("ntp", learnAddr(0), time.Minute); err != nil {
		t.Fatal(err)
	}
	now = start.Add(10 * time.Second) // address 0's first expiry
	if err := fw.Learn("ntp", learnAddr(max), time.Second); !errors.Is(err, ErrSetFull) {
		t.Errorf("a new address once a refreshed one's first expiry passed: %v, want ErrSetFull", err)
	}
	now = start.Add(10*time.Second + 2*time.Millisecond) // addresses 1 and 2 expired
	for i := range 2 {
		if err := fw.Learn("ntp", learnAddr(max+i), time.Second); err != nil {
			t.Errorf("new address %d once two expired: %v", i, err)
		}
	}
	if err := fw.Learn("ntp", learnAddr(max+2), time.Second); !errors.Is(err, ErrSetFull) {
		t.Errorf("a third new address once two expired: %v, want ErrSetFull", err)
	}
	if _, ok := fw.learned["dns4_ntp"][learnAddr(0)]; !ok {
		t.Error("the refreshed address left the set")
	}
	// Once every address expired, the refreshed one and those learned
	// while the set was full included, a whole set of new ones fits.
	now = start.Add(2 * time.Minute)
	for i := range max {
		if err := fw.Learn("ntp", learnAddr(2*max+i), time.Second); err != nil {
			t.Fatalf("new address %d once all expired: %v", i, err)
		}
	}
}

// TestLearnNoSetForAnyFamily: a rule with names and "*" has no learned set
// in the kernel (its accept opens every address but the guarded ones), and
// one with 0.0.0.0/0 none for IPv4: Learn keeps no addresses for those, so
// no set fills and no address is refused as full
// (egress_firewall_learned_set_full_total); the rule's other family still
// has its set, which fills.
func TestLearnNoSetForAnyFamily(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fw, err := New(Config{MaxLearned: 2, MinTTL: 10 * time.Second}, Deps{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	eng := compile(t, `version: 1
mode: enforce
rules:
  - {name: star, to: ["*", a.test], ports: [123/udp]}
  - {name: zero4, to: [0.0.0.0/0, b.test], ports: [123/udp]}
`)
	rs, err := render(siteConfig, eng, now)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range rs.Sets {
		if s.Kind == SetLearned && s.Name != "dns6_zero4" {
			t.Fatalf("learned set %s rendered", s.Name)
		}
	}
	rs.inKernel = false // remember only: no kernel here
	fw.rs = rs
	for i := range 5 {
		a4 := learnAddr(i)
		a6 := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)})
		for _, l := range []struct {
			rule string
			a    netip.Addr
		}{{"star", a4}, {"star", a6}, {"zero4", a4}} {
			if err := fw.Learn(l.rule, l.a, time.Minute); err != nil {
				t.Errorf("learn %s for %s: %v", l.a, l.rule, err)
			}
		}
		err := fw.Learn("zero4", a6, time.Minute)
		if full := errors.Is(err, ErrSetFull); full != (i >= 2) {
			t.Errorf("learn %s for zero4 into dns6_zero4 (2 at most) as address %d: %v", a6, i+1, err)
		}
	}
	for set, m := range fw.learned {
		if set != "dns6_zero4" && len(m) > 0 {
			t.Errorf("%d addresses kept for %s, a set the kernel does not have", len(m), set)
		}
	}
	if n := counterValue(fw.m.setFull); n != 3 {
		t.Errorf("learned_set_full_total %v, want 3 (dns6_zero4's)", n)
	}
	if v4, v6, ok := rs.LearnedSets("zero4"); !ok || v4 != "" || v6 != "dns6_zero4" {
		t.Errorf("LearnedSets(zero4) = %q, %q, %v; want \"\", dns6_zero4, true", v4, v6, ok)
	}
	if _, _, ok := rs.LearnedSets("star"); ok {
		t.Error("LearnedSets(star): ok, with no learned set")
	}
}

// TestSetFullOpenedByInstalled: a full set's refusal keeps the client
// from the address (SetFullError.Unreachable's ok) unless the installed
// rule opens it by a CIDR of its own; judged with the installed policy,
// not the one the answer was decided under (Address.Engine): after a
// reload that drops the rule's CIDR, an answer of the old policy's is
// refused as unreachable, and the forwarder withholds it.
func TestSetFullOpenedByInstalled(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	compileRule := func(to string) *policy.Engine {
		eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - {name: ntp, to: ["+to+"], ports: [123/udp]}\n"))
		if err != nil {
			t.Fatal(err)
		}
		return eng
	}
	withCIDR, without := compileRule("ntp.test, 198.18.0.0/24"), compileRule("ntp.test")
	fw, err := New(Config{MaxLearned: 1, MinTTL: 10 * time.Second}, Deps{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	install := func(eng *policy.Engine) {
		rs, err := render(Config{}, eng.WithMode(policy.ModeAudit), now)
		if err != nil {
			t.Fatal(err)
		}
		fw.mu.Lock()
		fw.rs, fw.eng = rs, eng
		fw.mu.Unlock()
	}
	install(withCIDR)
	if err := fw.Learn("ntp", netip.MustParseAddr("198.18.1.1"), time.Minute); err != nil {
		t.Fatal(err)
	}
	// Enforced as the kernel's set would be; the set is full, so nothing
	// is written.
	fw.rs.inKernel = true
	learn := func(eng *policy.Engine, a string) (ok bool) {
		t.Helper()
		err := fw.LearnAll(context.Background(), []Address{{Rule: "ntp", Addr: netip.MustParseAddr(a), TTL: time.Minute,
			Engine: eng, Client: netip.MustParseAddr("192.0.2.9"), Name: "ntp.test"}})
		var full *SetFullError
		if !errors.As(err, &full) {
			t.Fatalf("%s into a full set: %v, want a SetFullError", a, err)
		}
		_, _, _, ok = full.Unreachable()
		fw.mu.Lock()
		other := eng != fw.eng
		fw.mu.Unlock()
		if full.Provisional() != other {
			t.Errorf("%s: Provisional %v, want %v (the answer's policy the installed one: %v)", a, full.Provisional(), other, !other)
		}
		return ok
	}
	if learn(withCIDR, "198.18.0.5") {
		t.Error("198.18.0.5, in the installed rule's CIDR: unreachable, want reachable by the CIDR's accept")
	}
	if !learn(withCIDR, "198.18.2.5") {
		t.Error("198.18.2.5, outside the CIDR: reachable, want unreachable")
	}
	install(without)
	fw.rs.inKernel = true
	if !learn(withCIDR, "198.18.0.5") {
		t.Error("198.18.0.5 decided under the policy with the CIDR, the one without installed: reachable, want unreachable (no accept opens it)")
	}
}
