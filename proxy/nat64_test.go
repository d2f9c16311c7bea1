package proxy

import (
	"context"
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestDecideNAT64: behind NAT64/DNS64 our DNS gives out synthesized AAAA
// records. Without NAT64 prefixes (egressd run --nat64-prefix) the
// well-known prefix is a guarded range: an allowed name's synthesized
// address is refused special-range. With them, the name vouches for the
// synthesized addresses it was given out as (and only those:
// sni-mismatch), an IPv4 CIDR rule matches the NAT64 form, and the guard
// judges the embedded IPv4 address, whatever rule allows the name.
func TestDecideNAT64(t *testing.T) {
	eng, err := policy.Compile("nat64.yaml", []byte(`version: 1
mode: enforce
rules:
  - name: named
    to: ["*.allowed.test"]
    ports: [443/tcp]
  - name: apple
    to: [17.0.0.0/8]
    ports: [5223/tcp]
  - name: everything
    to: ["*"]
    ports: [8443/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	wkp := netip.MustParsePrefix("64:ff9b::/96")
	client := netip.MustParseAddr("2001:db8:1::2")
	given := netip.MustParseAddr("64:ff9b::c612:202")   // 198.18.2.2
	other := netip.MustParseAddr("64:ff9b::c612:203")   // 198.18.2.3, never given out
	meta := netip.MustParseAddr("64:ff9b::a9fe:a9fe")   // 169.254.169.254
	private := netip.MustParseAddr("64:ff9b::c0a8:101") // 192.168.1.1
	apple := netip.MustParseAddr("64:ff9b::1100:1")     // 17.0.0.1
	f := &facts{}
	f.add(client, given, "www.allowed.test")
	f.add(client, meta, "www.allowed.test")
	f.add(client, private, "www.allowed.test")
	for _, tc := range []struct {
		what          string
		dest          netip.Addr
		port          uint16
		name          string
		without, with string // reasons
	}{
		{"allowed name, its synthesized address", given, 443, "www.allowed.test", ReasonSpecialRange, policy.ReasonAllowed},
		{"allowed name, an address never given out", other, 443, "www.allowed.test", ReasonSpecialRange, ReasonSNIMismatch},
		{"allowed name, metadata given out", meta, 443, "www.allowed.test", ReasonSpecialRange, ReasonSpecialRange},
		{"allowed name, private given out", private, 443, "www.allowed.test", ReasonSpecialRange, ReasonSpecialRange},
		{"denied name", given, 443, "evil.test", policy.ReasonNoRule, policy.ReasonNoRule},
		{"IPv4 CIDR rule, no name", apple, 5223, "", policy.ReasonNoRule, policy.ReasonAllowed},
		{"IPv4 CIDR rule, other port", apple, 443, "", policy.ReasonNoRule, policy.ReasonPort},
		{"*, metadata", meta, 8443, "", ReasonSpecialRange, ReasonSpecialRange},
		{"*, public", other, 8443, "", ReasonSpecialRange, policy.ReasonAllowed},
	} {
		for _, withNAT := range []bool{false, true} {
			e := eng
			want := tc.without
			if withNAT {
				e, want = eng.WithNAT64([]netip.Prefix{wkp}), tc.with
			}
			p, err := New(Config{OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(e), DNS: f})
			if err != nil {
				t.Fatal(err)
			}
			in := policy.Input{Client: client, Dest: tc.dest, Port: tc.port, Proto: policy.TCP, Name: tc.name}
			var v verdict
			if tc.name != "" {
				v = p.decideNameVouched(context.Background(), e, in, audit.NameSNI, vouchLocal)
			} else {
				v = p.decideAddr(e, in, audit.NameNone)
			}
			if v.d.Reason != want {
				t.Errorf("%s (nat64 %v): %+v, want %s", tc.what, withNAT, v.d, want)
			}
		}
	}
}
