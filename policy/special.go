package policy

import (
	"net/netip"
	"slices"
	"time"
)

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
// loopback; "127.0.0.1/32" does.
func (e *Engine) CIDRNames(in Input, g netip.Prefix) bool {
	a := in.Dest.Unmap()
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
			p := t.Prefix
			if p.Contains(a) && OpensGuarded(p, g) {
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
