package dnsfilter

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/miekg/dns"

	"egressd/policy"
)

// nat64Zone is what a DNS64 upstream gives out: synthesized AAAA records
// under a network-specific prefix (2001:db8:64::/96) and under a
// local-use one (64:ff9b:1:2::/96), for public and special IPv4 addresses.
const nat64Zone = `
pub.allowed.test. 300 IN AAAA 2001:db8:64::c000:20a
meta.allowed.test. 300 IN AAAA 2001:db8:64::a9fe:a9fe
meta.allowed.test. 300 IN AAAA 2001:db8:64::c000:20b
lan.allowed.test. 300 IN AAAA 2001:db8:64::a01:101
lan.allowed.test. 300 IN AAAA 2001:db8:64::c000:20c
loop.allowed.test. 300 IN AAAA 2001:db8:64::7f00:1
loop.allowed.test. 300 IN AAAA 2001:db8:64::c000:20d
local.allowed.test. 300 IN AAAA 64:ff9b:1:2::c000:20e
hint.allowed.test. 300 IN HTTPS 1 . alpn=h2 ipv6hint=2001:db8:64::a9fe:a9fe,2001:db8:64::c000:20f
`

// TestAnswerFilterNAT64: with NAT64 prefixes (the engine's, egressd run
// --nat64-prefix), the rebinding filter judges a synthesized AAAA record
// by the IPv4 address it embeds, as the proxy and firewall do: the NAT64
// form of 169.254.169.254, of a private or loopback address is dropped
// (the firewall's learned sets are not guarded: what the forwarder gives
// out for a name rule is let out), a public one kept, in the local-use
// prefix 64:ff9b:1::/48 too. Without them, the network-specific prefix
// is an IPv6 prefix like any other and the local-use one is special.
func TestAnswerFilterNAT64(t *testing.T) {
	eng, err := policy.Compile("test-policy.yaml", []byte(enforcePolicy))
	if err != nil {
		t.Fatal(err)
	}
	nat := []netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96"), netip.MustParsePrefix("64:ff9b:1:2::/96")}
	for _, tc := range []struct {
		name          string
		without, with []string
	}{
		{"pub.allowed.test.", []string{"2001:db8:64::c000:20a"}, []string{"2001:db8:64::c000:20a"}},
		{"meta.allowed.test.", []string{"2001:db8:64::a9fe:a9fe", "2001:db8:64::c000:20b"}, []string{"2001:db8:64::c000:20b"}},
		{"lan.allowed.test.", []string{"2001:db8:64::a01:101", "2001:db8:64::c000:20c"}, []string{"2001:db8:64::c000:20c"}},
		{"loop.allowed.test.", []string{"2001:db8:64::7f00:1", "2001:db8:64::c000:20d"}, []string{"2001:db8:64::c000:20d"}},
		{"local.allowed.test.", nil, []string{"64:ff9b:1:2::c000:20e"}},
	} {
		for _, withNAT := range []bool{false, true} {
			up := newFakeUpstream(t, nat64Zone)
			e, want := eng, tc.without
			if withNAT {
				e, want = eng.WithNAT64(nat), tc.with
			}
			ts := startServer(t, "", Config{Upstreams: []string{up.Addr}}, Deps{Policy: policy.NewStore(e)})
			r := ask(t, "udp", ts.Addr, tc.name, dns.TypeAAAA, true)
			var got []string
			for _, a := range answerAddrs(r) {
				got = append(got, a.String())
			}
			if !slices.Equal(got, want) {
				t.Errorf("%s (nat64 %v): %v, want %v", tc.name, withNAT, got, want)
			}
		}
	}
	// HTTPS address hints are judged alike.
	up := newFakeUpstream(t, nat64Zone)
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}}, Deps{Policy: policy.NewStore(eng.WithNAT64(nat))})
	r := ask(t, "udp", ts.Addr, "hint.allowed.test.", dns.TypeHTTPS, true)
	var hints []string
	for _, rr := range r.Answer {
		if h, ok := rr.(*dns.HTTPS); ok {
			for _, kv := range h.Value {
				if v, ok := kv.(*dns.SVCBIPv6Hint); ok {
					for _, ip := range v.Hint {
						hints = append(hints, ip.String())
					}
				}
			}
		}
	}
	if !slices.Equal(hints, []string{"2001:db8:64::c000:20f"}) {
		t.Errorf("ipv6hint: %v, want only 2001:db8:64::c000:20f", hints)
	}
}
