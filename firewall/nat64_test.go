package firewall

import (
	"net/netip"
	"slices"
	"testing"

	"egressd/policy"
)

// nat64FwdPolicy has UDP rules of every shape that decides by address.
const nat64FwdPolicy = `version: 1
mode: enforce
rules:
  - name: v4net
    to: [198.18.7.0/24]
    ports: [9001/udp]
  - name: any
    to: ["0.0.0.0/0", "::/0"]
    ports: [9002/udp]
  - name: star
    to: ["*"]
    ports: [9003/udp]
  - name: any4only
    to: ["0.0.0.0/0"]
    ports: [9004/udp]
  - name: any6only
    to: ["::/0"]
    ports: [9005/udp]
  - name: broad
    to: ["0.0.0.0/1", "128.0.0.0/1"]
    ports: [9006/udp]
  - name: metadata
    to: [169.254.169.254/32]
    ports: [9007/udp]
  - name: private
    to: [10.1.0.0/16]
    ports: [9008/udp]
  - name: doc6
    to: ["2001:db8::/32"]
    ports: [9009/udp]
  - name: metadata6
    to: ["2001:db8:64::a9fe:a9fe/128"]
    ports: [9010/udp]
`

// TestRenderNAT64: the forward chain lets out the same NAT64 destinations
// as the proxy would (policy.Decide, then the guard: Engine.SpecialRange,
// Engine.CIDRNames): an IPv4 CIDR rule opens its NAT64 forms, ::/0 and
// 0.0.0.0/0 open the NAT64 forms of public addresses but not those of
// guarded or private ones, which only a rule inside them opens. Without
// NAT64 prefixes, the well-known prefix stays closed to all of them.
func TestRenderNAT64(t *testing.T) {
	eng, err := policy.Compile("nat64.yaml", []byte(nat64FwdPolicy))
	if err != nil {
		t.Fatal(err)
	}
	nat := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("2001:db8:64::/96")}
	var dests []netip.Addr
	for _, v4 := range []string{"198.18.7.1", "198.18.8.1", "169.254.169.254", "169.254.1.1", "127.0.0.1", "10.1.2.3", "10.2.2.3", "192.168.1.1", "17.0.0.1", "100.100.100.200", "224.0.0.1"} {
		a := netip.MustParseAddr(v4)
		dests = append(dests, a)
		for _, p := range nat {
			dests = append(dests, policy.NAT64Form(p, netip.PrefixFrom(a, 32)).Addr())
		}
	}
	dests = append(dests, netip.MustParseAddr("2001:db8:65::1"), netip.MustParseAddr("64:ff9b:1::a9fe:a9fe"))
	for _, withNAT := range []bool{false, true} {
		e := eng
		if withNAT {
			e = eng.WithNAT64(nat)
		}
		rs, err := Render(Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: 15001, DNSPort: 5353}, e)
		if err != nil {
			t.Fatal(err)
		}
		opened := 0
		for _, d := range dests {
			for port := uint16(9001); port <= 9010; port++ {
				in := policy.Input{Dest: d, Port: port, Proto: policy.UDP}
				want := e.Decide(in).Allowed()
				if g, ok := e.SpecialRange(d, nil, nil); ok && want {
					want = e.CIDRNames(in, g)
				}
				if got := forwardsUDP(rs, netip.Addr{}, d, port, nil); got != want {
					t.Errorf("nat64 %v: %s port %d: forwarded %v, policy says %v", withNAT, d, port, got, want)
				}
				if want && withNAT && isNAT64(d, nat) {
					opened++
				}
			}
		}
		if withNAT && opened == 0 {
			t.Error("no NAT64 destination opened")
		}
	}
	// The expectations themselves, in a few cases.
	rs, _ := Render(Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: 15001, DNSPort: 5353}, eng.WithNAT64(nat))
	for _, c := range []struct {
		dst  string
		port uint16
		want bool
	}{
		{"2001:db8:64::c612:701", 9001, true},
		{"64:ff9b::c612:701", 9001, true},
		{"2001:db8:64::c612:801", 9001, false},
		{"2001:db8:64::c612:801", 9002, true},
		{"2001:db8:64::a9fe:a9fe", 9002, false},
		{"2001:db8:64::a9fe:a9fe", 9003, false},
		{"2001:db8:64::a9fe:a9fe", 9007, true},
		{"2001:db8:64::a9fe:a9fe", 9010, true},
		{"2001:db8:64::a9fe:a9fe", 9009, false},
		{"2001:db8:64::c612:801", 9004, true},
		{"2001:db8:64::c612:801", 9005, true},
		{"2001:db8:64::a01:203", 9008, true},
		{"2001:db8:64::a02:203", 9008, false},
		{"2001:db8:64::a01:203", 9002, false},
		{"64:ff9b:1::a9fe:a9fe", 9002, false},
	} {
		if got := forwardsUDP(rs, netip.Addr{}, netip.MustParseAddr(c.dst), c.port, nil); got != c.want {
			t.Errorf("%s port %d: forwarded %v, want %v", c.dst, c.port, got, c.want)
		}
	}
	if s := rs.Set("guarded6"); s == nil || slices.Contains(s.Prefixes, netip.MustParsePrefix("64:ff9b::/96")) {
		t.Errorf("guarded6 %v still holds the configured well-known prefix whole", s)
	}
}

func isNAT64(a netip.Addr, nat []netip.Prefix) bool {
	_, _, ok := policy.NAT64Embedded(nat, a)
	return ok
}
