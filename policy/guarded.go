package policy

import "net/netip"

// GuardedRanges are the destinations that a rule opens only by a CIDR
// target inside them (THREATS.md F1, F2): addresses that reach the gateway
// itself, its link, cloud metadata services, or carry an IPv4 address
// inside IPv6. The proxy's special-range guard (proxy/guard.go) and the
// firewall's forwarded traffic (firewall/render.go) keep them closed
// alike, with OpensGuarded. Callers must not modify it.
var GuardedRanges = []netip.Prefix{
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

// OpensGuarded reports whether a CIDR target p opens the addresses it
// shares with the guarded range g: only a prefix of g's family at least as
// specific as g, inside it, does. "127.0.0.1/32" opens loopback's
// 127.0.0.1; "0.0.0.0/0", "0.0.0.0/1" or "96.0.0.0/3" open none of
// loopback or CGNAT, only the addresses around them.
func OpensGuarded(p, g netip.Prefix) bool {
	return p.Addr().Is4() == g.Addr().Is4() && p.Bits() >= g.Bits() && g.Contains(p.Addr())
}
