package proxy

import (
	"net/netip"
	"time"

	"egressd/policy"
)

// specialPrefixes are destinations denied unless a CIDR rule names them
// (THREATS.md F1, F2): addresses that reach the gateway itself, its link,
// cloud metadata services, or smuggle an IPv4 address inside IPv6.
var specialPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),         // "this network", unspecified
	netip.MustParsePrefix("127.0.0.0/8"),       // loopback
	netip.MustParsePrefix("169.254.0.0/16"),    // link-local, 169.254.169.254 metadata
	netip.MustParsePrefix("100.64.0.0/10"),     // CGNAT, Alibaba metadata 100.100.100.200
	netip.MustParsePrefix("168.63.129.16/32"),  // Azure WireServer
	netip.MustParsePrefix("224.0.0.0/4"),       // multicast
	netip.MustParsePrefix("240.0.0.0/4"),       // reserved, broadcast
	netip.MustParsePrefix("::/128"),            // unspecified
	netip.MustParsePrefix("::1/128"),           // loopback
	netip.MustParsePrefix("fe80::/10"),         // link-local
	netip.MustParsePrefix("ff00::/8"),          // multicast
	netip.MustParsePrefix("::ffff:0:0/96"),     // IPv4-mapped
	netip.MustParsePrefix("64:ff9b::/96"),      // NAT64
	netip.MustParsePrefix("64:ff9b:1::/48"),    // local-use NAT64
	netip.MustParsePrefix("2002::/16"),         // 6to4
	netip.MustParsePrefix("2001::/32"),         // Teredo
	netip.MustParsePrefix("fd00:ec2::254/128"), // AWS IMDSv6
}

// specialRange returns the guarded prefix that holds a, if any. own are the
// gateway's own addresses; allow are the configured exceptions.
func specialRange(a netip.Addr, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	for _, p := range allow {
		if p.Contains(a) {
			return netip.Prefix{}, false
		}
	}
	for _, o := range own {
		if o == a || (a.Is4In6() && o == a.Unmap()) {
			return netip.PrefixFrom(o, o.BitLen()), true
		}
	}
	if a.Is4In6() {
		// A mapped address is guarded as such, and as the IPv4 address it
		// carries: a rule must name that IPv4 address's range.
		if p, ok := specialRange(a.Unmap(), nil, nil); ok {
			return p, true
		}
		return netip.MustParsePrefix("0.0.0.0/0"), true
	}
	for _, p := range specialPrefixes {
		if p.Contains(a) {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// cidrRuleNames reports whether a rule that applies to this flow names the
// destination by a prefix inside the guarded range g: "0.0.0.0/0" or "*"
// do not open loopback; "127.0.0.1/32" does.
func cidrRuleNames(eng *policy.Engine, in policy.Input, g netip.Prefix) bool {
	a := in.Dest.Unmap()
	now := in.Now
	if now.IsZero() {
		now = time.Now()
	}
	for _, r := range eng.Rules() {
		if !r.Expires.IsZero() && !now.Before(r.Expires) {
			continue
		}
		if !r.From.Contains(in.Client, in.ClientMAC) {
			continue
		}
		portOK := false
		for _, p := range r.Ports {
			if p.Contains(in.Port, policy.TCP) {
				portOK = true
				break
			}
		}
		if !portOK {
			continue
		}
		for _, t := range r.To {
			if t.Kind != policy.TargetPrefix {
				continue
			}
			p := t.Prefix
			if p.Contains(a) && p.Addr().Is4() == g.Addr().Is4() && p.Bits() >= g.Bits() {
				return true
			}
		}
	}
	return false
}
