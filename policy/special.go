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

// GuardRefuses is the special-range guard (THREATS.md F1, F2) the proxy
// puts after the rules, and capture, audit --replay and policy explain
// with it; the firewall's guarded sets keep forwarded traffic so alike
// (own nil): it returns the guarded range that holds in.Dest
// (Engine.SpecialRange, with the gateway's own addresses own and the
// configured exceptions allow) when no CIDR rule that applies to in names
// the destination from inside it (CIDRNames). False for no destination,
// one no range guards, or one such a rule names. The caller's decision
// stands then; else it is refused, special-range.
func (e *Engine) GuardRefuses(in Input, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	if !in.Dest.IsValid() {
		return netip.Prefix{}, false
	}
	g, ok := e.SpecialRange(in.Dest, own, allow)
	if !ok || e.CIDRNames(in, g) {
		return netip.Prefix{}, false
	}
	return g, true
}

// LANLoopback returns the loopback range that holds a, a destination a
// LAN host sends a packet to, if any: no rule opens it, whatever it
// names (127.0.0.1/32 too). Enforce mode's firewall drops every packet
// from the LAN to 127.0.0.0/8 (its antispoof chain, before the proxy, the
// DNS forwarder and the forward chain; firewall/render.go) and Linux drops
// ::1 from any other interface. An IPv4-mapped ::ffff:127.0.0.1 in an
// IPv6 header is no loopback destination to the kernel (capture/guard.go):
// it is GuardRefuses's. Redirected to the transparent proxy, which reads
// it unmapped (127.0.0.1), it is this one's: the proxy refuses it
// (proxy handleTransparent), as capture, which unmaps it too. The
// explicit proxy, asked for loopback itself, dials it from the gateway:
// GuardRefuses's too (proxy selfDecision).
func LANLoopback(a netip.Addr) (netip.Prefix, bool) {
	switch {
	case a.Is4() && a.IsLoopback():
		return netip.MustParsePrefix("127.0.0.0/8"), true
	case a == netip.IPv6Loopback():
		return netip.MustParsePrefix("::1/128"), true
	}
	return netip.Prefix{}, false
}

// LANThisHost returns the range of "this host", a, when a LAN host's
// flow of proto (TCP when unset) to it has no path out whatever the
// rules; DNS (port 53, the forwarder's whatever its destination) is the
// caller's to set aside. Over TCP, 0.0.0.0 and :: are redirected to the
// transparent proxy, which refuses them as loopback (dialled, each is the
// gateway itself: proxy GuardLANLoopback). Any other protocol to 0.0.0.0
// Linux drops as a martian destination before the forward chain
// (ip_route_input_slow's ipv4_is_zeronet), in either mode. That holds
// 0.0.0.0 alone since Linux 5.3 ("Allow 0.0.0.0/8 as a valid address
// range"): the rest of 0.0.0.0/8 (0.0.0.5, 0.255.255.255) is routed and
// forwarded like any address, and so is :: over IPv6 (both seen reaching
// the forward chain on 6.18), where the special-range guard decides them,
// as the firewall's forward chain does (GuardRefuses). The one answer for
// capture, audit --replay (LANRefuses), the transparent proxy and the fast
// path (proxy lanLoopback) and policy explain.
func LANThisHost(a netip.Addr, proto Proto) (netip.Prefix, bool) {
	if !a.IsUnspecified() || proto != 0 && proto != TCP && a.Is6() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, a.BitLen()), true
}

// LANRefuses is the guard on what a LAN host sends as capture and audit
// --replay judge it (policy explain with them): loopback (LANLoopback) on
// every port and protocol whatever the rules; else DNS (port 53), the
// forwarder's whatever its destination, is not refused; else "this host"
// with no path out (LANThisHost: 0.0.0.0, and :: over TCP) whatever the
// rules; else GuardRefuses.
func (e *Engine) LANRefuses(in Input, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	if g, ok := LANLoopback(in.Dest); ok {
		return g, true
	}
	if in.Port == 53 {
		return netip.Prefix{}, false
	}
	if g, ok := LANThisHost(in.Dest, in.Proto); ok {
		return g, true
	}
	return e.GuardRefuses(in, own, allow)
}

// CIDRNames reports whether a rule that applies to in (its client, port
// and protocol, TCP when unset; at in.Now) names the destination by a
// prefix inside the guarded range g: "0.0.0.0/0" or "*" do not open
// loopback; "127.0.0.1/32" does. A destination in one of the engine's
// NAT64 prefixes, whose g is then in NAT64 form (Engine.SpecialRange),
// is named by an IPv4 prefix in that form too: "169.254.169.254/32"
// opens 64:ff9b::a9fe:a9fe. A prefix that holds a guarded destination it
// does not open names none (OpensHeld), as in the firewall's forward chain
// and DestOpens: "64:ff9b:1::/48" opens no part of the local-use /48 around
// a NAT64 prefix inside it. The IPv4-mapped form of an address no range
// guards is named by any IPv4 CIDR rule that holds it ("0.0.0.0/0",
// "128.0.0.0/1"), not by "*" or "::/0".
func (e *Engine) CIDRNames(in Input, g netip.Prefix) bool {
	a := in.Dest.Unmap()
	_, nat, isNAT := NAT64Embedded(e.nat64, a)
	guards := e.guardList()
	// The mapped form of an address no range guards (g is then
	// 0.0.0.0/0, SpecialRange) is guarded as such only: any IPv4 CIDR
	// rule holding the address names it, "0.0.0.0/0" too, as the address
	// itself is opened. Forward never carries a mapped destination, so the
	// firewall's accept for a prefix holding guarded ranges (OpensHeld)
	// says nothing of it.
	mappedOnly := g.Bits() == 0
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
			if p := prefixFor(t.Prefix, nat, isNAT); p.Contains(a) && OpensGuarded(p, g) && (mappedOnly || OpensHeld(guards, p)) {
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

// loopback4 is what the firewall's antispoof chain drops as a destination
// from the LAN side before forward sees it (firewall/render.go).
var loopback4 = netip.MustParsePrefix("127.0.0.0/8")

// DestOpens reports whether rule i (an index into Rules) opens the
// destination a by what it names other than names, exactly as the
// firewall's accept rules for the rule's forwarded ports do apart from its
// learned sets (firewall/render.go), so that the firewall's refusal of
// such an address when the rule's learned set is full says it keeps the
// client out of nothing (firewall.SetFullError.Opened, judged with the
// installed policy), and the DNS forwarder does not withhold it: "*" and a
// /0 open their family but the guarded destinations (GuardList, under the
// engine's NAT64 prefixes); a CIDR target (an IPv4 one in its NAT64 forms
// too) opens what it holds, but the guarded destinations when it holds one
// it does not open (HoldsGuarded): "169.254.169.254/32" opens the metadata
// address, "0.0.0.0/1" does not. Loopback (127.0.0.0/8) opens by none: the
// firewall drops it from the LAN side before forward. An IPv4-mapped a is
// the IPv4 address it carries, as the forwarder and the firewall learn it
// (a dual-stack socket sends IPv4). Neither the rule's clients, ports nor
// expiry are looked at: those of its learned sets are the same. It does
// not allocate.
func (e *Engine) DestOpens(i int, a netip.Addr) bool {
	a = a.Unmap()
	if loopback4.Contains(a) {
		return false
	}
	guards := e.guardList()
	guarded := slices.ContainsFunc(guards, func(g netip.Prefix) bool { return g.Contains(a) })
	opens := func(p netip.Prefix) bool {
		if !p.Contains(a) {
			return false
		}
		return !guarded || OpensHeld(guards, p)
	}
	for _, t := range e.pol.Rules[i].To {
		switch t.Kind {
		case TargetAny:
			if !guarded {
				return true
			}
		case TargetPrefix:
			if opens(t.Prefix) {
				return true
			}
			if t.Prefix.Addr().Is4() && a.Is6() {
				for _, n := range e.nat64 {
					if opens(NAT64Form(n, t.Prefix)) {
						return true
					}
				}
			}
		}
	}
	return false
}

// OpensHeld reports whether the CIDR target p opens the guarded
// destinations (of guards, GuardList) it holds: it is no /0 and holds none
// it does not open (HoldsGuarded). The firewall renders such a prefix's
// accept without excluding the guarded sets (firewall/render.go); the
// proxy's guard (Engine.CIDRNames) and Engine.DestOpens judge by it alike.
func OpensHeld(guards []netip.Prefix, p netip.Prefix) bool {
	return p.Bits() > 0 && !HoldsGuarded(guards, p)
}

// HoldsGuarded reports whether the CIDR target p shares addresses with a
// guarded range of guards (GuardList) it does not open (OpensGuarded): a
// prefix broader than loopback, say. The firewall's accept for it
// excludes the guarded ranges (firewall/render.go), as for "*".
func HoldsGuarded(guards []netip.Prefix, p netip.Prefix) bool {
	for _, g := range guards {
		if p.Overlaps(g) && !OpensGuarded(p, g) {
			return true
		}
	}
	return false
}

// GuardList returns the guarded destinations of forwarded traffic under
// the NAT64 prefixes nat (Engine.WithNAT64), as the firewall renders them
// (firewall/render.go) and Engine.DestOpens reads them: GuardedRanges,
// with each NAT64 prefix carved out of the guarded ranges that hold it
// (the well-known prefix, the local-use /48) and holding instead the
// NAT64 forms of the IPv4 guarded ranges and of NAT64Guarded, as the
// proxy guards a NAT64 destination by the IPv4 address it embeds
// (Engine.SpecialRange). Callers must not modify it.
func GuardList(nat []netip.Prefix) []netip.Prefix {
	if len(nat) == 0 {
		return GuardedRanges
	}
	var out []netip.Prefix
	for _, g := range GuardedRanges {
		parts := []netip.Prefix{g}
		for _, p := range nat {
			parts = withoutPrefix(parts, p)
		}
		out = append(out, parts...)
	}
	for _, p := range nat {
		for _, g := range slices.Concat(GuardedRanges, NAT64Guarded) {
			if g.Addr().Is4() {
				out = append(out, NAT64Form(p, g))
			}
		}
	}
	return out
}

// withoutPrefix returns the addresses of ps but x's, as prefixes.
func withoutPrefix(ps []netip.Prefix, x netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		switch {
		case !p.Overlaps(x):
			out = append(out, p)
		case x.Bits() <= p.Bits():
			// x holds p: nothing is left.
		default:
			// p holds x: the siblings along the path from p down to x.
			for b := p.Bits(); b < x.Bits(); b++ {
				s := netip.PrefixFrom(x.Addr(), b+1).Masked().Addr().AsSlice()
				s[b/8] ^= 0x80 >> (b % 8)
				a, _ := netip.AddrFromSlice(s)
				out = append(out, netip.PrefixFrom(a, b+1))
			}
		}
	}
	return out
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
