package policy

import (
	"net/netip"
	"testing"
)

// TestDestOpens: what a rule opens by "*" and its CIDRs, not its names,
// guarded ranges and NAT64 forms as the firewall's accept rules have them.
func TestDestOpens(t *testing.T) {
	eng, err := Compile("p.yaml", []byte(`version: 1
mode: enforce
rules:
  - name: cidr
    to: [ntp.test, 192.0.2.16/30, "2001:db8::/64"]
    ports: [123/udp]
  - name: star
    to: ["*", ntp.test]
    ports: [123/udp]
  - name: zero
    to: [ntp.test, 0.0.0.0/0]
    ports: [123/udp]
  - name: meta
    to: [ntp.test, 169.254.169.254/32]
    ports: [123/udp]
  - name: names
    to: [ntp.test]
    ports: [123/udp]
`))
	if err != nil {
		t.Fatal(err)
	}
	nat := eng.WithNAT64([]netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96")})
	for _, c := range []struct {
		e    *Engine
		rule int
		addr string
		want bool
	}{
		{eng, 0, "192.0.2.17", true},
		{eng, 0, "::ffff:192.0.2.17", true}, // learned as the IPv4 address
		{eng, 0, "192.0.2.20", false},
		{eng, 0, "2001:db8::1", true},
		{eng, 0, "2001:db8:1::1", false},
		{nat, 0, "2001:db8:64::c000:211", true}, // 192.0.2.17 in NAT64 form
		{nat, 0, "2001:db8:64::c000:214", false},
		{eng, 0, "2001:db8:64::c000:211", false}, // no NAT64 prefix: not an IPv4 address
		{eng, 1, "198.51.100.1", true},
		{eng, 1, "2001:db8::1", true},
		{eng, 1, "169.254.169.254", false}, // guarded
		{eng, 1, "127.0.0.1", false},
		{nat, 1, "2001:db8:64::a9fe:a9fe", false}, // guarded in NAT64 form too
		{eng, 2, "198.51.100.1", true},
		{eng, 2, "2001:db8::1", false},
		{eng, 2, "169.254.169.254", false},
		{nat, 2, "2001:db8:64::c633:6401", true},
		{eng, 3, "169.254.169.254", true}, // a CIDR inside the range opens it
		{nat, 3, "2001:db8:64::a9fe:a9fe", true},
		{eng, 3, "169.254.169.253", false},
		{eng, 4, "192.0.2.17", false}, // names open nothing here
	} {
		if got := c.e.DestOpens(c.rule, netip.MustParseAddr(c.addr)); got != c.want {
			t.Errorf("rule %s (nat64 %v), %s: %v, want %v", c.e.Rules()[c.rule].Name, c.e.NAT64(), c.addr, got, c.want)
		}
	}
}

// TestCIDRNamesMapped: the IPv4-mapped form of an address that is not
// guarded (SpecialRange's 0.0.0.0/0; the explicit proxy may be asked for
// one, CONNECT [::ffff:198.51.100.2]) opens by any IPv4 CIDR rule that
// holds the address, "0.0.0.0/0" and "128.0.0.0/1" too, as the address
// itself does: forward never carries a mapped destination, so the
// firewall's accept for a prefix that holds guarded ranges (OpensHeld)
// says nothing of it. "*" and "::/0" name no IPv4 range; the mapped form
// of a guarded address opens only by a rule inside its range.
func TestCIDRNamesMapped(t *testing.T) {
	base, err := Compile("p.yaml", []byte(`version: 1
mode: enforce
rules:
  - {name: any4, to: ["0.0.0.0/0"], ports: [8001/tcp]}
  - {name: half, to: ["128.0.0.0/1"], ports: [8002/tcp]}
  - {name: doc, to: ["198.51.100.0/24"], ports: [8003/tcp]}
  - {name: star, to: ["*"], ports: [8004/tcp]}
  - {name: any6, to: ["::/0"], ports: [8005/tcp]}
  - {name: lan, to: ["10.0.0.0/8"], ports: [8006/tcp]}
  - {name: meta, to: ["169.254.169.254/32"], ports: [8007/tcp]}
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, nat := range []string{"", "64:ff9b::/96"} {
		ps, err := ParseNAT64(nat)
		if err != nil {
			t.Fatal(err)
		}
		eng := base.WithNAT64(ps)
		for _, c := range []struct {
			dest string
			port uint16
			want bool
		}{
			{"::ffff:198.51.100.2", 8001, true},
			{"::ffff:198.51.100.2", 8002, true},
			{"::ffff:198.51.100.2", 8003, true},
			{"::ffff:198.51.100.2", 8004, false},
			{"::ffff:198.51.100.2", 8005, false},
			{"::ffff:10.1.2.3", 8001, true},
			{"::ffff:10.1.2.3", 8006, true},
			{"::ffff:169.254.169.254", 8001, false},
			{"::ffff:169.254.169.254", 8002, false},
			{"::ffff:169.254.169.254", 8007, true},
			{"::ffff:127.0.0.1", 8001, false},
		} {
			a := netip.MustParseAddr(c.dest)
			g, ok := eng.SpecialRange(a, nil, nil)
			if !ok {
				t.Fatalf("%s is not guarded", a)
			}
			if got := eng.CIDRNames(Input{Dest: a, Port: c.port, Proto: TCP}, g); got != c.want {
				t.Errorf("nat64 %q: CIDRNames(%s:%d, %s) = %v, want %v", nat, a, c.port, g, got, c.want)
			}
		}
	}
}
