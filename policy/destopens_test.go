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
