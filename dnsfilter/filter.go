package dnsfilter

import (
	"net/netip"
	"strings"

	"github.com/miekg/dns"

	"egressd/policy"
)

// specialPrefixes are never handed out for a public name (THREATS.md E3 and
// F1): the site's own ranges, loopback, link-local (cloud metadata),
// CGNAT (Alibaba metadata), multicast, reserved, unspecified, Azure
// WireServer, IPv6 site-local and discard. The documentation and
// benchmarking ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
// 198.18.0.0/15, 2001:db8::/32) are not listed: they are not routed on the
// internet, so they cannot reach anything inside, and tests use them as the
// fake internet.
var specialPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("168.63.129.16/32"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("::/127"), // unspecified and loopback
	netip.MustParsePrefix("100::/64"),
	netip.MustParsePrefix("2001::/32"), // Teredo: embeds an obfuscated client address
	netip.MustParsePrefix("64:ff9b:1::/48"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("fec0::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

var (
	nat64Prefix   = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour     = netip.MustParsePrefix("2002::/16")
	v4Compatible  = netip.MustParsePrefix("::/96")
	v4MappedRange = netip.MustParsePrefix("::ffff:0:0/96")
)

// IsSpecial reports whether a is an address no public name should resolve
// to: a private, loopback, link-local, CGNAT, multicast or reserved address,
// also when embedded in IPv6 (mapped, IPv4-compatible, NAT64, 6to4;
// THREATS.md F2).
func IsSpecial(a netip.Addr) bool {
	if !a.IsValid() {
		return true
	}
	if a.Is6() {
		b := a.As16()
		switch {
		case v4MappedRange.Contains(a):
			a = a.Unmap()
		case nat64Prefix.Contains(a), v4Compatible.Contains(a) && !a.IsUnspecified() && a != netip.IPv6Loopback():
			a = netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
		case sixToFour.Contains(a):
			a = netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]})
		}
	}
	for _, p := range specialPrefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// isSpecialNAT64 is IsSpecial under the NAT64 prefixes nat
// (policy.Engine.NAT64, egressd run --nat64-prefix): an address inside one
// is judged by the IPv4 address it embeds, as the proxy and the firewall
// judge it (policy.Engine.SpecialRange), in a network-specific prefix and
// in the local-use 64:ff9b:1::/48 alike.
func isSpecialNAT64(a netip.Addr, nat []netip.Prefix) bool {
	if v4, _, ok := policy.NAT64Embedded(nat, a); ok {
		return IsSpecial(v4)
	}
	return IsSpecial(a)
}

// privateName reports whether name (normalised) lies under one of the
// suffixes whose answers may hold private addresses.
func privateName(name string, suffixes []string) bool {
	for _, s := range suffixes {
		if name == s || strings.HasSuffix(name, s) && name[len(name)-len(s)-1] == '.' {
			return true
		}
	}
	return false
}

// rebinds reports whether the answer filter drops special addresses
// from the answers to name (normalised) under c, whose defaults are
// applied: the rebinding filter is on, and name is not under one of the
// PrivateSuffixes.
func (c Config) rebinds(name string) bool {
	return !c.AllowPrivateAnswers && !privateName(name, c.PrivateSuffixes)
}

// filterAnswer applies the answer hardening to an upstream answer for name:
// it drops special addresses (A, AAAA, and the address hints of HTTPS/SVCB)
// unless the name is private or the filter is off, and strips the "ech"
// parameter from HTTPS/SVCB records unless keepECH. It returns what it did
// ("rebinding", "ech", both joined by "+", or ""). nat are the NAT64
// prefixes (isSpecialNAT64).
func filterAnswer(name string, m *dns.Msg, rebind, keepECH bool, nat []netip.Prefix) string {
	var dropped, ech bool
	for _, sec := range []*[]dns.RR{&m.Answer, &m.Ns, &m.Extra} {
		kept := (*sec)[:0]
		for _, rr := range *sec {
			switch v := rr.(type) {
			case *dns.A:
				if a, ok := netip.AddrFromSlice(v.A); rebind && (!ok || IsSpecial(a.Unmap())) {
					dropped = true
					continue
				}
			case *dns.AAAA:
				if a, ok := netip.AddrFromSlice(v.AAAA); rebind && (!ok || isSpecialNAT64(a, nat)) {
					dropped = true
					continue
				}
			case *dns.HTTPS:
				e, d := filterSVCB(&v.SVCB, rebind, keepECH, nat)
				ech, dropped = ech || e, dropped || d
			case *dns.SVCB:
				e, d := filterSVCB(v, rebind, keepECH, nat)
				ech, dropped = ech || e, dropped || d
			}
			kept = append(kept, rr)
		}
		clear((*sec)[len(kept):])
		*sec = kept
	}
	switch {
	case dropped && ech:
		return "rebinding+ech"
	case dropped:
		return "rebinding"
	case ech:
		return "ech"
	}
	return ""
}

func filterSVCB(s *dns.SVCB, rebind, keepECH bool, nat []netip.Prefix) (ech, dropped bool) {
	kept := s.Value[:0]
	for _, kv := range s.Value {
		switch v := kv.(type) {
		case *dns.SVCBECHConfig:
			if !keepECH {
				ech = true
				continue
			}
		case *dns.SVCBIPv4Hint:
			if rebind {
				hints := v.Hint[:0]
				for _, ip := range v.Hint {
					if a, ok := netip.AddrFromSlice(ip); ok && !IsSpecial(a.Unmap()) {
						hints = append(hints, ip)
					} else {
						dropped = true
					}
				}
				v.Hint = hints
				if len(hints) == 0 {
					continue
				}
			}
		case *dns.SVCBIPv6Hint:
			if rebind {
				hints := v.Hint[:0]
				for _, ip := range v.Hint {
					if a, ok := netip.AddrFromSlice(ip); ok && !isSpecialNAT64(a, nat) {
						hints = append(hints, ip)
					} else {
						dropped = true
					}
				}
				v.Hint = hints
				if len(hints) == 0 {
					continue
				}
			}
		}
		kept = append(kept, kv)
	}
	s.Value = kept
	return ech, dropped
}
