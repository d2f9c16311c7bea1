package proxy

import (
	"net/netip"

	"egressd/policy"
)

// The special-range guard (THREATS.md F1, F2) is policy's
// (Engine.SpecialRange, Engine.CIDRNames), shared with capture, which
// reports in audit mode what the guard would refuse, and with the
// firewall's guarded sets.

// specialRange returns the guarded prefix that holds a, if any, under
// eng's NAT64 prefixes (a NAT64 destination is guarded as the IPv4
// address it embeds). own are the gateway's own addresses; allow are the
// configured exceptions.
func specialRange(eng *policy.Engine, a netip.Addr, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	return eng.SpecialRange(a, own, allow)
}

// cidrRuleNames reports whether a rule that applies to this TCP flow names
// the destination by a prefix inside the guarded range g: "0.0.0.0/0" or
// "*" do not open loopback; "127.0.0.1/32" does.
func cidrRuleNames(eng *policy.Engine, in policy.Input, g netip.Prefix) bool {
	in.Proto = policy.TCP
	return eng.CIDRNames(in, g)
}
