package proxy

import (
	"net/netip"
	"slices"

	"egressd/policy"
)

// The special-range guard (THREATS.md F1, F2) is policy's
// (Engine.GuardRefuses: Engine.SpecialRange, Engine.CIDRNames), shared
// with capture, which reports in audit mode what the guard would refuse,
// audit --replay, policy explain, and the firewall's guarded sets.

// guardRefuses reports whether the special-range guard refuses in's TCP
// flow to in.Dest under eng's NAT64 prefixes (a NAT64 destination is
// guarded as the IPv4 address it embeds), the gateway's own addresses and
// the configured exceptions: it is in a guarded range no CIDR rule for
// the flow names from inside ("0.0.0.0/0" or "*" do not open loopback;
// "127.0.0.1/32" does).
func (p *Proxy) guardRefuses(eng *policy.Engine, in policy.Input) bool {
	_, refused := specialGuard(eng, in, p.ownAddrs(), p.cfg.AllowSpecial)
	return refused
}

// specialGuard is guardRefuses with the gateway's own addresses own and
// the configured exceptions allow, returning the guarded range.
func specialGuard(eng *policy.Engine, in policy.Input, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	in.Proto = policy.TCP
	return eng.GuardRefuses(in, own, allow)
}

// The guards that refuse a destination (Refusal.Guard), each recorded as
// ReasonSpecialRange.
const (
	// GuardLANLoopback: loopback from the LAN, or "this host" (0.0.0.0,
	// ::), which the transparent proxy refuses whatever the rules
	// (lanLoopback; handleTransparent), in audit mode too.
	GuardLANLoopback = "lan-loopback"
	// GuardSelf: the gateway itself (a loopback or unspecified address,
	// or one of its own, in any form), refused before the rules, in
	// audit mode too, unless a CIDR rule inside its range names it
	// (selfDecision).
	GuardSelf = "gateway-itself"
	// GuardSpecialRange: after the rules allow it, a destination in a
	// guarded range that no CIDR rule inside the range names
	// (policy.Engine.GuardRefuses).
	GuardSpecialRange = "special-range"
)

// lanLoopback is the loopback range that holds a, the original
// destination of a redirected flow from the LAN, if any: the transparent
// proxy refuses it unread, whatever the rules (GuardLANLoopback). It is
// policy.LANLoopback, and "this host", 0.0.0.0 and :: (policy.LANThisHost
// over TCP, as capture and audit --replay judge it), which, dialled by
// the proxy, reach the gateway's own services as loopback does. The rest
// of 0.0.0.0/8 is not: Linux routes it like any address (since 5.3), and
// the rules and the special-range guard decide it.
func lanLoopback(a netip.Addr) (netip.Prefix, bool) {
	if g, ok := policy.LANThisHost(a, policy.TCP); ok {
		return g, true
	}
	return policy.LANLoopback(a)
}

// Refusal says which guard refused a destination, and by which guarded
// range (DecideLiteral).
type Refusal struct {
	Guard string // GuardLANLoopback, GuardSelf, GuardSpecialRange; empty: none refused
	Range netip.Prefix
}

// selfGuard reports whether in.Dest is the gateway itself — a loopback
// or unspecified address, or one of own, in any form — and the
// special-range guard refuses it (its unmapped form: a configured
// exception is an IPv4 prefix), returning the guarded range.
func selfGuard(eng *policy.Engine, in policy.Input, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	if !in.Dest.IsValid() {
		return netip.Prefix{}, false
	}
	a := in.Dest.Unmap()
	if !a.IsLoopback() && !a.IsUnspecified() && !slices.ContainsFunc(own, func(o netip.Addr) bool { return o.Unmap() == a }) {
		return netip.Prefix{}, false
	}
	in.Dest = a
	return specialGuard(eng, in, own, allow)
}

// DecideLiteral is the proxy's decision of a TCP connection to the
// address in.Dest by the address alone (no name decides it, and our DNS
// gave the address out for none), with the gateway's own addresses own
// and the configured exceptions allow (Config.AllowSpecial): the explicit
// proxy's (explicit) of a request for the literal as written
// (CONNECT [::ffff:127.0.0.1]:80, an absolute URL: an IPv4-mapped form is
// guarded as such), else the transparent proxy's of a redirected flow,
// whose destination it reads unmapped and refuses as loopback from the
// LAN first (GuardLANLoopback). Then, as decideAddr: the gateway itself
// (GuardSelf), the rules, the special-range guard (GuardSpecialRange).
// Refusal says which guard refused, if one did. policy explain predicts
// the proxy with it; the proxy decides with the same guards
// (handleTransparent, selfDecision, decideAddr, decideTarget).
func DecideLiteral(eng *policy.Engine, in policy.Input, own []netip.Addr, allow []netip.Prefix, explicit bool) (policy.Decision, Refusal) {
	in.Proto, in.Name = policy.TCP, ""
	if !explicit {
		in.Dest = in.Dest.Unmap()
		if g, ok := lanLoopback(in.Dest); ok {
			return selfRefusal, Refusal{GuardLANLoopback, g}
		}
	}
	if g, ok := selfGuard(eng, in, own, allow); ok {
		return selfRefusal, Refusal{GuardSelf, g}
	}
	d := eng.Decide(in)
	if !d.Allowed() {
		return d, Refusal{}
	}
	if g, ok := specialGuard(eng, in, own, allow); ok {
		if g.Bits() == 0 {
			// The guard's placeholder for the IPv4-mapped form of an
			// address no range guards (policy.SpecialRange).
			g = netip.MustParsePrefix("::ffff:0:0/96")
		}
		return denyDecision(eng, ReasonSpecialRange), Refusal{GuardSpecialRange, g}
	}
	return d, Refusal{}
}
