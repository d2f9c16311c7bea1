package firewall

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// learnGuardPolicy has a name rule whose learned sets open UDP 9000, a
// CIDR rule that names one metadata address (ECS task metadata, say) on
// the same port, and an internal name's private range, which no guard
// holds for plain IPv4 (only in NAT64 form).
const learnGuardPolicy = `
version: 1
mode: enforce
rules:
  - name: udp-name
    to: [ntp.test, "*.internal"]
    ports: [9000/udp]
  - name: ecs-metadata
    to: [169.254.170.2/32]
    ports: [9000/udp]
`

// forwardsUDP evaluates the forward chain of rs for a new UDP datagram
// from client (the zero Addr: a client in no source set) on the LAN to
// dst:port, no MAC set matching: whether an accept rule lets it out.
// Prefix sets hold what egressd loads (their merged ranges); learned
// tells whether a learned set holds an address (nil: none does).
func forwardsUDP(rs *Ruleset, client, dst netip.Addr, port uint16, learned func(set string, a netip.Addr) bool) bool {
	inSet := func(name string, a netip.Addr) bool {
		s := rs.Set(name)
		if s == nil || !a.IsValid() {
			return false
		}
		switch s.Kind {
		case SetPrefixes:
			for _, r := range mergePrefixes(s.Prefixes) {
				if r.lo.Compare(a) <= 0 && a.Compare(r.hi) <= 0 {
					return true
				}
			}
		case SetLearned:
			return learned != nil && learned(name, a)
		}
		return false
	}
	fam := IPv4
	if dst.Is6() {
		fam = IPv6
	}
	for _, c := range rs.Chains {
		if c.Name != chainForward {
			continue
		}
		for _, r := range c.Rules {
			switch {
			case r.CTState != 0, r.IIf != "lan0", r.SrcMACSet != "":
				continue
			case r.Family != FamilyAny && r.Family != fam:
				continue
			case r.Proto != 0 && r.Proto != policy.UDP:
				continue
			case r.Ports.Lo != 0 && (port < r.Ports.Lo || port > r.Ports.Hi):
				continue
			case r.SrcSet != "" && !inSet(r.SrcSet, client):
				continue
			case r.DstSet != "" && !inSet(r.DstSet, dst):
				continue
			case r.DstNotSet != "" && inSet(r.DstNotSet, dst):
				continue
			}
			return r.Verdict.Kind == Accept
		}
	}
	return false
}

// learnedIn is forwardsUDP's learned for sets holding what m lists.
func learnedIn(m map[string][]netip.Addr) func(string, netip.Addr) bool {
	return func(set string, a netip.Addr) bool { return slices.Contains(m[set], a) }
}

// TestRenderLearnedSetsKeepGuardedRanges: the accept rules of a name
// rule's learned sets exclude the guarded ranges (ip daddr != @guarded4),
// so that an address in one that reached a learned set (an attacker's
// answer past a broken rebinding filter, a name under the private
// suffixes) opens no forwarded UDP to metadata or loopback, as the proxy
// refuses it for TCP (THREATS.md F1, F2). What the proxy lets through, the
// forward chain lets through too: an address of a guarded range that a
// CIDR rule for that client and port names (by the CIDR rule's own
// accept), an ordinary address, a private one outside NAT64 form. The
// oracle is the proxy's guard (Engine.SpecialRange, Engine.CIDRNames),
// with and without a NAT64 prefix.
func TestRenderLearnedSetsKeepGuardedRanges(t *testing.T) {
	base := compile(t, learnGuardPolicy)
	nat := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96")}
	var dests []netip.Addr
	for _, s := range []string{"198.18.2.3", "169.254.169.254", "169.254.170.2", "100.100.100.200", "127.0.0.1", "0.0.0.1",
		"168.63.129.16", "224.0.0.251", "10.1.2.3", "192.168.1.1"} {
		a := netip.MustParseAddr(s)
		dests = append(dests, a)
		for _, p := range nat {
			dests = append(dests, policy.NAT64Form(p, netip.PrefixFrom(a, 32)).Addr())
		}
	}
	for _, s := range []string{"2001:db8:2::3", "::1", "fe80::1", "fd00:ec2::254", "fd12::1", "2002:a9fe:a9fe::1", "2001:0:a9fe:a9fe::1",
		"64:ff9b:1::a9fe:a9fe", "ff02::1"} {
		dests = append(dests, netip.MustParseAddr(s))
	}
	for _, withNAT := range []bool{false, true} {
		eng := base
		if withNAT {
			eng = base.WithNAT64(nat)
		}
		rs, err := Render(siteConfig, eng)
		if err != nil {
			t.Fatal(err)
		}
		v4, v6, ok := rs.LearnedSets("udp-name")
		if !ok {
			t.Fatal("udp-name has no learned sets")
		}
		text := rs.String()
		for _, want := range []string{
			`iifname "lan0" ip daddr @` + v4 + ` ip daddr != @guarded4 udp dport 9000 `,
			`iifname "lan0" ip6 daddr @` + v6 + ` ip6 daddr != @guarded6 udp dport 9000 `,
		} {
			if !strings.Contains(text, want) {
				t.Errorf("nat64 %v: missing %q in\n%s", withNAT, want, text)
			}
		}
		// Every destination, learned into the rule's set of its family
		// (as a compromised DNS path would put it there).
		learned := map[string][]netip.Addr{}
		for _, d := range dests {
			if d.Is4() {
				learned[v4] = append(learned[v4], d)
			} else {
				learned[v6] = append(learned[v6], d)
			}
		}
		refused, passed := 0, 0
		for _, d := range dests {
			in := policy.Input{Dest: d, Port: 9000, Proto: policy.UDP}
			want := true
			if g, ok := eng.SpecialRange(d, nil, nil); ok {
				want = eng.CIDRNames(in, g)
			}
			if got := forwardsUDP(rs, netip.Addr{}, d, 9000, learnedIn(learned)); got != want {
				t.Errorf("nat64 %v: learned %s: forwarded %v, the proxy's guard says %v", withNAT, d, got, want)
			}
			if want {
				passed++
			} else {
				refused++
			}
		}
		if refused == 0 || passed == 0 {
			t.Errorf("nat64 %v: %d refused, %d passed: the test would prove nothing", withNAT, refused, passed)
		}
	}
	// The expectations themselves, in a few cases.
	rs, _ := Render(siteConfig, base.WithNAT64(nat))
	v4, v6, _ := rs.LearnedSets("udp-name")
	for _, c := range []struct {
		dst  string
		want bool
	}{
		{"198.18.2.3", true},
		{"169.254.169.254", false},
		{"169.254.170.2", true}, // named by ecs-metadata
		{"10.1.2.3", true},      // a private address: the proxy lets it through too
		{"127.0.0.1", false},
		{"2001:db8:2::3", true},
		{"64:ff9b::c612:203", true},
		{"64:ff9b::a9fe:a9fe", false},
		{"64:ff9b::a9fe:aa02", true}, // ecs-metadata's NAT64 form
		{"64:ff9b::a01:203", false},  // 10.1.2.3 behind the translator
		{"fd00:ec2::254", false},
	} {
		d := netip.MustParseAddr(c.dst)
		learned := map[string][]netip.Addr{v4: {d}, v6: {d}}
		if got := forwardsUDP(rs, netip.Addr{}, d, 9000, learnedIn(learned)); got != c.want {
			t.Errorf("learned %s: forwarded %v, want %v", c.dst, got, c.want)
		}
		if got := forwardsUDP(rs, netip.Addr{}, d, 9000, nil); got && !c.want {
			t.Errorf("%s forwarded without being learned", c.dst)
		}
	}
}

// TestEnforceLearnedSetsKeepGuardedRanges is TestRenderLearnedSetsKeepGuardedRanges
// in the kernel: addresses of guarded ranges put into a name rule's
// learned sets directly (Learn, as a compromised or buggy DNS path would)
// open no forwarded UDP to them, while a learned ordinary address, a
// learned private one, and a learned guarded address that a CIDR rule
// names for that port pass. Without NAT64 prefixes the well-known NAT64
// prefix is guarded whole; with 64:ff9b::/96 configured, the NAT64 forms
// of guarded and private IPv4 ranges are, and a public one passes.
//
// No host has most of those addresses: the gateway routes them toward the
// server's link, and a counter on the gateway's way out says whether a
// datagram was forwarded. Each is forwarded in audit mode first, so a
// zero in enforce mode is the firewall's doing.
func TestEnforceLearnedSetsKeepGuardedRanges(t *testing.T) {
	nat := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96")}
	cases := []struct {
		name   string
		nat    []netip.Prefix
		passed []string // learned, and forwarded
		kept   []string // learned, and dropped
	}{
		{"no-nat64", nil,
			[]string{"198.18.2.3", "2001:db8:2::3", "169.254.170.2", "10.1.2.3"},
			[]string{"169.254.169.254", "100.100.100.200", "fd00:ec2::254", "64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:aa02", "64:ff9b::c612:203", "64:ff9b::a01:203", "2002:a9fe:a9fe::1"}},
		{"nat64", nat,
			[]string{"198.18.2.3", "2001:db8:2::3", "169.254.170.2", "10.1.2.3", "64:ff9b::a9fe:aa02", "64:ff9b::c612:203"},
			[]string{"169.254.169.254", "100.100.100.200", "fd00:ec2::254", "64:ff9b::a9fe:a9fe", "64:ff9b::a01:203", "64:ff9b::6464:64c8", "2002:a9fe:a9fe::1"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			testLearnedGuarded(t, c.nat, c.passed, c.kept)
		})
	}
}

func testLearnedGuarded(t *testing.T, nat []netip.Prefix, passed, kept []string) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.3:9000", "[2001:db8:2::3]:9000")
	for _, r := range [][]string{
		{"ip", "route", "add", "169.254.0.0/16", "via", "198.18.2.2"},
		{"ip", "route", "add", "100.64.0.0/10", "via", "198.18.2.2"},
		{"ip", "route", "add", "10.0.0.0/8", "via", "198.18.2.2"},
		{"ip", "-6", "route", "add", "64:ff9b::/96", "via", "2001:db8:2::2"},
		{"ip", "-6", "route", "add", "2002::/16", "via", "2001:db8:2::2"},
		{"ip", "-6", "route", "add", "fd00:ec2::254/128", "via", "2001:db8:2::2"},
	} {
		tp.gw.MustRun(r...)
	}
	all := append(append([]string{}, passed...), kept...)
	v6 := func(a string) bool { return strings.Contains(a, ":") }
	var rules string
	for i, a := range all {
		fam := "ip"
		if v6(a) {
			fam = "ip6"
		}
		rules += fmt.Sprintf("\t\t%s daddr %s udp dport 9000 counter comment \"c%d\"\n", fam, a, i)
	}
	tp.gw.MustRun("nft", "-f", writeTemp(t, "table inet f1count {\n\tchain out {\n\t\ttype filter hook postrouting priority 0; policy accept;\n"+rules+"\t}\n}\n"))
	counts := func() []int {
		out := tp.gw.MustRun("nft", "list", "table", "inet", "f1count")
		n := make([]int, len(all))
		for _, m := range regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "c(\d+)"`).FindAllStringSubmatch(out, -1) {
			i, _ := strconv.Atoi(m[2])
			n[i], _ = strconv.Atoi(m[1])
		}
		return n
	}
	send := func() {
		for _, a := range all {
			host := a
			if v6(a) {
				host = "[" + a + "]"
			}
			// Most get no answer: the counters tell.
			udpAsk(tp.client, host+":9000", 50*time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
	}
	eng := compile(t, learnGuardPolicy).WithNAT64(nat)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(eng.WithMode(policy.ModeAudit)); err != nil {
		t.Fatal(err)
	}
	send()
	base := counts()
	for i, a := range all {
		if base[i] == 0 {
			t.Fatalf("audit mode: a datagram to %s was not forwarded: the test would prove nothing", a)
		}
	}
	if err := fw.Replace(eng); err != nil {
		t.Fatal(err)
	}
	// Not learned yet: nothing of the name rule's passes.
	if got, err := udpAsk(tp.client, "198.18.2.3:9000", 300*time.Millisecond); err == nil {
		t.Fatalf("enforce: 198.18.2.3 answered %q before it was learned", got)
	}
	for _, a := range all {
		if err := fw.Learn("udp-name", netip.MustParseAddr(a), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	for _, dst := range []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000"} {
		if got, err := udpAsk(tp.client, dst, 3*time.Second); err != nil {
			t.Errorf("enforce: learned %s: %q %v", dst, got, err)
		}
	}
	base = counts()
	send()
	now := counts()
	for i, a := range all {
		fwd := now[i] - base[i]
		switch {
		case i < len(passed) && fwd == 0:
			t.Errorf("enforce: learned %s not forwarded", a)
		case i >= len(passed) && fwd != 0:
			t.Errorf("enforce: learned %s, a guarded address: %d datagrams forwarded", a, fwd)
		}
	}
}

// TestKeepsLearnedGuarded: a reload's look at the connections already out
// (sweep.go) judges a learned address as the forward chain does: a flow to
// a guarded address that a changed name rule's learned set holds is not
// kept by that set, one a CIDR rule names is, and an ordinary one is.
func TestKeepsLearnedGuarded(t *testing.T) {
	const (
		named  = `  - {name: named, to: [ntp.test], ports: [123/udp]}` + "\n"
		ecs    = `  - {name: ecs, to: [169.254.170.2/32], ports: [123/udp]}` + "\n"
		named2 = `  - {name: named, to: [time.test], ports: [123/udp]}` + "\n"
	)
	old := renderEnforce(t, named)
	var tg uint32
	for _, fr := range old.flows {
		if fr.name == "named" {
			tg = fr.tag
		}
	}
	live := func(string, netip.Addr) bool { return true }
	client := netip.MustParseAddr("198.18.1.2")
	for _, c := range []struct {
		new  string
		dst  string
		want bool
	}{
		{named2, "203.0.113.1", true},
		{named2, "169.254.169.254", false},
		{named2, "169.254.170.2", false},
		{named2 + ecs, "169.254.170.2", true},
		{named2, "64:ff9b::a9fe:a9fe", false},
		{named2, "fd00:ec2::254", false},
		{named2, "2001:db8::1", true},
	} {
		rs := renderEnforce(t, c.new)
		k := flowKey{client: client, dst: netip.MustParseAddr(c.dst), port: 123, proto: policy.UDP}
		if got, _ := rs.keeps([]*Ruleset{old, rs}, defaultMark(tg), k, live); got != c.want {
			t.Errorf("%s under %q: keeps = %v, want %v", c.dst, strings.TrimSpace(c.new), got, c.want)
		}
	}
}
