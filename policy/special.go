package policy

import (
	"net/netip"
	"slices"
	"time"
)

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

// SpecialRange returns the guarded prefix that holds a, if any. own are
// the gateway's own addresses (each a guarded range of its own); allow are
// configured exceptions.
func SpecialRange(a netip.Addr, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
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
		if p, ok := SpecialRange(a.Unmap(), nil, nil); ok {
			return p, true
		}
		return netip.MustParsePrefix("0.0.0.0/0"), true
	}
	for _, p := range GuardedRanges {
		if p.Contains(a) {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// CIDRNames reports whether a rule that applies to in (its client, port
// and protocol, TCP when unset; at in.Now) names the destination by a
// prefix inside the guarded range g: "0.0.0.0/0" or "*" do not open
// loopback; "127.0.0.1/32" does. A destination in one of the engine's
// NAT64 prefixes, whose g is then in NAT64 form (Engine.SpecialRange),
// is named by an IPv4 prefix in that form too: "169.254.169.254/32"
// opens 64:ff9b::a9fe:a9fe.
func (e *Engine) CIDRNames(in Input, g netip.Prefix) bool {
	a := in.Dest.Unmap()
	_, nat, isNAT := NAT64Embedded(e.nat64, a)
	now := in.Now
	if now.IsZero() {
		now = time.Now()
	}
	proto := in.Proto
	if proto == 0 {
		proto = TCP
	}
	for _, r := range e.Rules() {
		if !r.Expires.IsZero() && !now.Before(r.Expires) {
			continue
		}
		if !r.From.Contains(in.Client, in.ClientMAC) {
			continue
		}
		portOK := false
		for _, p := range r.Ports {
			if p.Contains(in.Port, proto) {
				portOK = true
				break
			}
		}
		if !portOK {
			continue
		}
		for _, t := range r.To {
			if t.Kind != TargetPrefix {
				continue
			}
			if p := prefixFor(t.Prefix, nat, isNAT); p.Contains(a) && OpensGuarded(p, g) {
				return true
			}
		}
	}
	return false
}

// prefixFor is the CIDR target p in the form that holds a destination
// inside the NAT64 prefix nat (isNAT): an IPv4 prefix's NAT64 form. Else
// p.
func prefixFor(p, nat netip.Prefix, isNAT bool) netip.Prefix {
	if isNAT && p.Addr().Is4() {
		return NAT64Form(nat, p)
	}
	return p
}

// DestOpens reports whether rule i (an index into Rules) opens the
// destination a by what it names other than names: "*", or a CIDR target
// that holds a (an IPv4 one in its NAT64 form too, as CIDRNames). A
// guarded address (SpecialRange) opens only by a CIDR inside its range
// (OpensGuarded): "*" and 0.0.0.0/0 do not open 169.254.169.254. This is
// what the firewall's accept rules open for the rule's forwarded ports
// apart from its learned sets (firewall/render.go), so the DNS forwarder
// does not withhold such an address when the rule's learned set is full.
// An IPv4-mapped a is the IPv4 address it carries, as the forwarder and
// the firewall learn it. Neither the rule's clients, ports nor expiry are
// looked at. It runs through the rule's targets; it does not allocate.
func (e *Engine) DestOpens(i int, a netip.Addr) bool {
	a = a.Unmap()
	g, guarded := e.SpecialRange(a, nil, nil)
	_, nat, isNAT := NAT64Embedded(e.nat64, a)
	for _, t := range e.pol.Rules[i].To {
		switch t.Kind {
		case TargetAny:
			if !guarded {
				return true
			}
		case TargetPrefix:
			if p := prefixFor(t.Prefix, nat, isNAT); p.Contains(a) && (!guarded || OpensGuarded(p, g)) {
				return true
			}
		}
	}
	return false
}

// HostPathPorts returns the TCP port ranges of the rules with a host/path
// target, each once, in file order. Only the proxy reads a request's path,
// so these ports go to it even where the firewall redirects only some TCP
// ports (egressd run --tcp-ports), and capture judges them so.
func (e *Engine) HostPathPorts() []PortRange {
	var out []PortRange
	for _, r := range e.Rules() {
		if !slices.ContainsFunc(r.To, func(t Target) bool { return t.Kind == TargetHostPath }) {
			continue
		}
		for _, pr := range r.Ports {
			if pr.Proto == TCP && !slices.Contains(out, pr) {
				out = append(out, pr)
			}
		}
	}
	return out
}
