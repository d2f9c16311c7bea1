package firewall

import (
	"net/netip"
	"testing"

	"egressd/internal/netutil"
	"egressd/policy"
)

// crossGuardPolicy mixes name rules and CIDR rules inside guarded ranges
// over overlapping client sets and ports: the proxy's guard
// (Engine.CIDRNames) opens a guarded address a name rule allows only where
// a CIDR rule for that client and port names it, which the forward chain
// does by that CIDR rule's own accept.
const crossGuardPolicy = `
version: 1
mode: enforce
rules:
  - name: n1
    from: [198.18.1.0/25, "2001:db8:1::/49"]
    to: [a.test]
    ports: [9000/udp]
  - name: s1
    from: [198.18.1.0/24, "2001:db8:1::/48"]
    to: [169.254.170.2/32, "fd00:ec2::254/128"]
    ports: [9000-9001/udp]
  - name: s2
    from: [198.18.1.128/25, "2001:db8:1:8000::/49"]
    to: [100.64.0.0/10]
    ports: [9000/udp]
  - name: s3
    to: [127.0.0.1/32, "64:ff9b::a9fe:a9fe/128"]
    ports: [9001/udp]
  - name: n2
    to: [b.test, 169.254.169.254/32, "10.1.0.0/16"]
    ports: [9002/udp]
  - name: w
    to: [0.0.0.0/1, "private"]
    ports: [9003/udp]
  - name: n3
    from: [198.18.1.0/24, "2001:db8:1::/48"]
    to: [c.test]
    ports: [9000-9003/udp]
`

// learnedAll is forwardsUDP's learned for every name learned to every
// address.
func learnedAll(string, netip.Addr) bool { return true }

// TestLearnedGuardAcrossRules: for every client, destination and port of
// crossGuardPolicy, every name learned to every address, the forward chain
// lets out what the proxy's guard would (some rule that applies allows it by
// address or name, and a guarded destination is named by a CIDR rule that
// applies), and a reload's sweep, deciding such a connection again,
// keeps exactly what the chain lets out; with and without a NAT64 prefix.
// IPv4-mapped destinations are left out: never forwarded (guarded6), and the
// sweep reads them unmapped.
func TestLearnedGuardAcrossRules(t *testing.T) {
	base := compile(t, crossGuardPolicy)
	nat := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96")}
	clients4 := []string{"198.18.1.2", "198.18.1.200", "198.18.9.9"}
	clients6 := []string{"2001:db8:1::2", "2001:db8:1:8000::2", "2001:db8:9::9"}
	var d4, d6 []netip.Addr
	for _, s := range []string{"198.18.2.3", "169.254.169.254", "169.254.170.2", "169.254.170.3", "100.100.100.200", "127.0.0.1", "127.0.0.2", "0.0.0.1",
		"168.63.129.16", "224.0.0.251", "10.1.2.3", "10.2.2.3", "192.168.1.1", "255.255.255.255"} {
		a := netip.MustParseAddr(s)
		d4 = append(d4, a)
		d6 = append(d6, policy.NAT64Form(nat[0], netip.PrefixFrom(a, 32)).Addr())
	}
	for _, s := range []string{"2001:db8:2::3", "::1", "fe80::1", "fd00:ec2::254", "fd12::1", "2002:a9fe:a9fe::1", "2001:0:a9fe:a9fe::1",
		"64:ff9b:1::a9fe:a9fe", "ff02::1"} {
		d6 = append(d6, netip.MustParseAddr(s))
	}
	n := 0
	for _, withNAT := range []bool{false, true} {
		eng := base
		if withNAT {
			eng = base.WithNAT64(nat)
		}
		rs, err := Render(siteConfig, eng)
		if err != nil {
			t.Fatal(err)
		}
		unused := uint32(1)
		for len(rs.byTag[unused]) > 0 {
			unused++
		}
		for fi, ds := range [][]netip.Addr{d4, d6} {
			cs := clients4
			if fi == 1 {
				cs = clients6
			}
			for _, cstr := range cs {
				c := netip.MustParseAddr(cstr)
				for _, d := range ds {
					for port := uint16(8999); port <= 9004; port++ {
						// The proxy's view: some rule applying allows by address
						// or by a learned name (every name learned d), and the
						// guard lets it through.
						in := policy.Input{Client: c, Dest: d, Port: port, Proto: policy.UDP}
						allowed := eng.Decide(in).Allowed()
						for _, name := range []string{"a.test", "b.test", "c.test"} {
							ni := in
							ni.Name = name
							allowed = allowed || eng.Decide(ni).Allowed()
						}
						want := allowed
						if g, ok := eng.SpecialRange(d, nil, nil); ok && allowed {
							want = eng.CIDRNames(in, g)
						}
						got := forwardsUDP(rs, c, d, port, learnedAll)
						n++
						if got != want {
							t.Errorf("nat64 %v: %s -> %s:%d: forward %v, proxy %v", withNAT, c, d, port, got, want)
						}
						k := keyOf(netutil.ConntrackEntry{Proto: uint8(policy.UDP),
							Orig:  netutil.ConntrackTuple{Src: netip.AddrPortFrom(c, 40000), Dst: netip.AddrPortFrom(d, port)},
							Reply: netutil.ConntrackTuple{Src: netip.AddrPortFrom(d, port), Dst: netip.AddrPortFrom(c, 40000)}})
						if keep, _ := rs.keeps([]*Ruleset{rs}, defaultMark(unused), k, func(string, netip.Addr) bool { return true }); keep != got {
							t.Errorf("nat64 %v: %s -> %s:%d: sweep keeps %v, forward %v", withNAT, c, d, port, keep, got)
						}
					}
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("no cases")
	}
}
