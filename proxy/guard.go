package proxy

import (
	"net/netip"
	"time"

	"egressd/policy"
)

// specialPrefixes are destinations denied unless a CIDR rule names them
// (THREATS.md F1, F2): addresses that reach the gateway itself, its link,
// cloud metadata services, or smuggle an IPv4 address inside IPv6. The
// firewall keeps the same ranges closed to forwarded traffic.
var specialPrefixes = policy.GuardedRanges

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
			if p.Contains(a) && policy.OpensGuarded(p, g) {
				return true
			}
		}
	}
	return false
}
