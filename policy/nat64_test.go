package policy

import (
	"net/netip"
	"strings"
	"testing"
)

const nat64Policy = `
version: 1
mode: enforce
rules:
  - name: apple
    to: [17.0.0.0/8]
    ports: [5223/tcp]
  - name: any6
    to: ["::/0"]
    ports: [7000/tcp]
  - name: metadata-v6form
    to: ["2001:db8:64::a9fe:a9fe/128"]
    ports: [7001/tcp]
  - name: lan10
    to: [10.1.0.0/16]
    ports: [7002/tcp]
`

func TestParseNAT64(t *testing.T) {
	for _, tc := range []struct {
		in, want, err string
	}{
		{in: "64:ff9b::/96", want: "64:ff9b::/96"},
		{in: "2001:db8:64::/96, 64:ff9b::/96", want: "2001:db8:64::/96 64:ff9b::/96"},
		{in: "64:ff9b:1:2::/96", want: "64:ff9b:1:2::/96"},
		{in: "2001:db8:64::/64", err: "only /96"},
		{in: "10.0.0.0/8", err: "not IPv6"},
		{in: "2001:db8:64::1/96", err: "host bits"},
		{in: "2001:db8:0:0:ff00::/96", err: "bits 64-71"},
		{in: "::ffff:0:0/96", err: "not IPv6"},
		{in: "fe80::/96", err: "guarded"},
		{in: "2001:db8:64::/96,2001:db8:64::/96", err: "twice"},
		{in: "nonsense", err: "nat64"},
		{in: "", want: ""},
	} {
		ps, err := ParseNAT64(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseNAT64(%q) = %v, %v; want error with %q", tc.in, ps, err, tc.err)
			}
			continue
		}
		var got []string
		for _, p := range ps {
			got = append(got, p.String())
		}
		if err != nil || strings.Join(got, " ") != tc.want {
			t.Errorf("ParseNAT64(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestNAT64Embedded(t *testing.T) {
	ps := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("2001:db8:64::/96")}
	for _, tc := range []struct{ a, v4, p string }{
		{"64:ff9b::1100:1", "17.0.0.1", "64:ff9b::/96"},
		{"2001:db8:64::c612:1", "198.18.0.1", "2001:db8:64::/96"},
		{"2001:db8:65::c612:1", "", ""},
		{"17.0.0.1", "", ""},
		{"::ffff:17.0.0.1", "", ""},
	} {
		v4, p, ok := NAT64Embedded(ps, netip.MustParseAddr(tc.a))
		if tc.v4 == "" {
			if ok {
				t.Errorf("NAT64Embedded(%s) = %v, %v; want none", tc.a, v4, p)
			}
			continue
		}
		if !ok || v4.String() != tc.v4 || p.String() != tc.p {
			t.Errorf("NAT64Embedded(%s) = %v, %v, %v; want %s in %s", tc.a, v4, p, ok, tc.v4, tc.p)
		}
	}
	if got := NAT64Form(netip.MustParsePrefix("2001:db8:64::/96"), netip.MustParsePrefix("198.18.7.0/24")); got.String() != "2001:db8:64::c612:700/120" {
		t.Errorf("NAT64Form = %s", got)
	}
}

// TestDecideNAT64: with --nat64-prefix, a destination in a NAT64 prefix is
// decided as the IPv4 address it embeds (and as itself); without, as
// itself only.
func TestDecideNAT64(t *testing.T) {
	eng, err := Compile("nat64.yaml", []byte(nat64Policy))
	if err != nil {
		t.Fatal(err)
	}
	nat := eng.WithNAT64([]netip.Prefix{netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("2001:db8:64::/96")})
	for _, tc := range []struct {
		dest          string
		port          uint16
		without, with string // rule credited, "" deny
	}{
		{"64:ff9b::1100:1", 5223, "", "apple"},
		{"64:ff9b::17.0.0.1", 5223, "", "apple"},
		{"2001:db8:64::1100:1", 5223, "", "apple"},
		{"2001:db8:65::1100:1", 5223, "", ""},
		{"64:ff9b::1200:1", 5223, "", ""},
		{"64:ff9b::1100:1", 443, "", ""},
		{"17.0.0.1", 5223, "apple", "apple"},
		{"64:ff9b::1100:1", 7000, "any6", "any6"},
		{"2001:db8:64::a01:101", 7002, "", "lan10"},
	} {
		in := Input{Dest: netip.MustParseAddr(tc.dest), Port: tc.port, Proto: TCP}
		if d := eng.Decide(in); d.Rule != tc.without {
			t.Errorf("without: Decide(%s:%d) = %+v; want rule %q", tc.dest, tc.port, d, tc.without)
		}
		if d := nat.Decide(in); d.Rule != tc.with {
			t.Errorf("with: Decide(%s:%d) = %+v; want rule %q", tc.dest, tc.port, d, tc.with)
		}
	}
	if eng.HostLevel().Decide(Input{Dest: netip.MustParseAddr("64:ff9b::1100:1"), Port: 5223, Proto: TCP}).Allowed() {
		t.Error("without: HostLevel allows the NAT64 form")
	}
	if d := nat.HostLevel().Decide(Input{Dest: netip.MustParseAddr("64:ff9b::1100:1"), Port: 5223, Proto: TCP}); !d.Allowed() {
		t.Errorf("with: HostLevel = %+v", d)
	}
	if nat.WithMode(ModeAudit).NAT64() == nil {
		t.Error("WithMode drops the NAT64 prefixes")
	}
}

// TestSpecialRangeNAT64: the guard judges the IPv4 address a NAT64
// destination embeds; a CIDR rule opens it from inside, in either form.
func TestSpecialRangeNAT64(t *testing.T) {
	eng, err := Compile("nat64.yaml", []byte(nat64Policy))
	if err != nil {
		t.Fatal(err)
	}
	nat := eng.WithNAT64([]netip.Prefix{netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("2001:db8:64::/96")})
	for _, tc := range []struct {
		dest    string
		port    uint16
		without string // the guard without the flag, "" none
		with    string // the guard with it
		opened  bool   // with the flag, a CIDR rule opens it
	}{
		{dest: "64:ff9b::1100:1", port: 5223, without: "64:ff9b::/96"},
		{dest: "2001:db8:64::1100:1", port: 5223},
		{dest: "64:ff9b::a9fe:a9fe", port: 7000, without: "64:ff9b::/96", with: "64:ff9b::a9fe:0/112"},
		{dest: "2001:db8:64::a9fe:a9fe", port: 7000, with: "2001:db8:64::a9fe:0/112"},
		{dest: "2001:db8:64::a9fe:a9fe", port: 7001, with: "2001:db8:64::a9fe:0/112", opened: true},
		{dest: "2001:db8:64::7f00:1", port: 7000, with: "2001:db8:64::7f00:0/104"},
		{dest: "2001:db8:64::a01:101", port: 7002, with: "2001:db8:64::a00:0/104", opened: true},
		{dest: "2001:db8:64::a02:101", port: 7002, with: "2001:db8:64::a00:0/104"},
		{dest: "2001:db8:64::c0a8:101", port: 7000, with: "2001:db8:64::c0a8:0/112"},
		{dest: "64:ff9b::a8fe:a8fe", port: 7000, without: "64:ff9b::/96"},
		{dest: "64:ff9b:1::1", port: 7000, without: "64:ff9b:1::/48", with: "64:ff9b:1::/48"},
	} {
		a := netip.MustParseAddr(tc.dest)
		g, ok := eng.SpecialRange(a, nil, nil)
		if got := map[bool]string{true: g.String()}[ok]; got != tc.without {
			t.Errorf("without: SpecialRange(%s) = %q; want %q", tc.dest, got, tc.without)
		}
		g, ok = nat.SpecialRange(a, nil, nil)
		if got := map[bool]string{true: g.String()}[ok]; got != tc.with {
			t.Errorf("with: SpecialRange(%s) = %q; want %q", tc.dest, got, tc.with)
		}
		if ok {
			in := Input{Dest: a, Port: tc.port, Proto: TCP}
			if got := nat.CIDRNames(in, g); got != tc.opened {
				t.Errorf("with: CIDRNames(%s:%d, %s) = %v; want %v", tc.dest, tc.port, g, got, tc.opened)
			}
		}
	}
	// The gateway's own IPv4 address, in NAT64 form, is guarded as the
	// gateway; an exception names the IPv4 address.
	own := []netip.Addr{netip.MustParseAddr("198.18.0.1")}
	if g, ok := nat.SpecialRange(netip.MustParseAddr("2001:db8:64::c612:1"), own, nil); !ok || g.String() != "2001:db8:64::c612:1/128" {
		t.Errorf("own NAT64 form: %v %v", g, ok)
	}
	allow := []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32")}
	if g, ok := nat.SpecialRange(netip.MustParseAddr("2001:db8:64::a9fe:a9fe"), nil, allow); ok {
		t.Errorf("allowed exception: %v", g)
	}
}
