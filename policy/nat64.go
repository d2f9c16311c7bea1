package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// NAT64 (RFC 6146) with DNS64 (RFC 6147) lets an IPv6-only LAN reach IPv4
// servers: the resolver synthesizes an AAAA record, a /96 prefix followed
// by the server's IPv4 address (RFC 6052 section 2.2), and the translator
// behind the gateway turns the connection into IPv4. Without a configured
// prefix egressd treats such a destination as any IPv6 address, and the
// well-known prefixes as guarded ranges (GuardedRanges). With one
// (Engine.WithNAT64, egressd run --nat64-prefix) a destination inside it is
// decided as the IPv4 address it embeds as well as itself: an IPv4 CIDR
// rule matches it, and the special-range guard judges the embedded IPv4
// address (Engine.SpecialRange), the private ranges included (NAT64Guarded).

// NAT64Guarded are the IPv4 ranges that stay guarded inside a NAT64 prefix
// beyond GuardedRanges: RFC 1918's private ranges, which a translator may
// reach inside the site or the provider (RFC 6052 section 3.1 forbids them
// under the well-known prefix). A CIDR rule inside one opens it, as for
// any guarded range. Callers must not modify it.
var NAT64Guarded = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
}

// nat64Homes are the guarded ranges a NAT64 prefix may sit in: the
// well-known prefix and the local-use one (RFC 8215).
var nat64Homes = []netip.Prefix{
	netip.MustParsePrefix("64:ff9b::/96"),
	netip.MustParsePrefix("64:ff9b:1::/48"),
}

// ParseNAT64 parses a comma-separated list of NAT64 prefixes: IPv6 /96
// prefixes (the only length egressd supports of RFC 6052's), with bits
// 64-71 zero as RFC 6052 requires, outside the guarded ranges but the
// NAT64 ones. An empty string is none.
func ParseNAT64(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("policy: nat64 prefix %q: %w", f, err))
			continue
		case !p.Addr().Is6() || p.Addr().Is4In6():
			errs = append(errs, fmt.Errorf("policy: nat64 prefix %s: not IPv6", p))
			continue
		case p.Bits() != 96:
			errs = append(errs, fmt.Errorf("policy: nat64 prefix %s: only /96 prefixes are supported", p))
			continue
		case p.Masked() != p:
			errs = append(errs, fmt.Errorf("policy: nat64 prefix %s: host bits set (%s)", p, p.Masked()))
			continue
		case p.Addr().As16()[8] != 0:
			errs = append(errs, fmt.Errorf("policy: nat64 prefix %s: bits 64-71 must be zero (RFC 6052)", p))
			continue
		case slices.Contains(out, p):
			errs = append(errs, fmt.Errorf("policy: nat64 prefix %s: given twice", p))
			continue
		}
		home := slices.ContainsFunc(nat64Homes, func(h netip.Prefix) bool { return h.Contains(p.Addr()) })
		for _, g := range GuardedRanges {
			if g.Overlaps(p) && !home {
				errs = append(errs, fmt.Errorf("policy: nat64 prefix %s: in the guarded range %s", p, g))
				break
			}
		}
		out = append(out, p)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// NAT64Embedded returns the IPv4 address a carries when it is inside one of
// the NAT64 prefixes ps, and that prefix.
func NAT64Embedded(ps []netip.Prefix, a netip.Addr) (netip.Addr, netip.Prefix, bool) {
	if !a.Is6() || a.Is4In6() {
		return netip.Addr{}, netip.Prefix{}, false
	}
	for _, p := range ps {
		if p.Contains(a) {
			b := a.As16()
			return netip.AddrFrom4([4]byte(b[12:])), p, true
		}
	}
	return netip.Addr{}, netip.Prefix{}, false
}

// NAT64Form returns the IPv4 prefix q in the NAT64 prefix p (a /96): the
// IPv6 prefix of the addresses that carry q's.
func NAT64Form(p, q netip.Prefix) netip.Prefix {
	b := p.Addr().As16()
	v4 := q.Masked().Addr().As4()
	copy(b[12:], v4[:])
	return netip.PrefixFrom(netip.AddrFrom16(b), 96+q.Bits())
}

// WithNAT64 returns an engine that shares this one's matcher and decides a
// destination inside one of the NAT64 prefixes ps (ParseNAT64) as the IPv4
// address it embeds too. nil or empty: none, as the policy alone.
func (e *Engine) WithNAT64(ps []netip.Prefix) *Engine {
	if len(ps) == 0 && len(e.nat64) == 0 {
		return e
	}
	c := *e
	c.nat64 = slices.Clone(ps)
	c.guards = GuardList(c.nat64)
	c.host = &hostLevel{}
	return &c
}

// guardList is GuardList of the engine's NAT64 prefixes.
func (e *Engine) guardList() []netip.Prefix {
	if e.guards == nil {
		return GuardedRanges
	}
	return e.guards
}

// NAT64 returns the engine's NAT64 prefixes (WithNAT64); nil for none.
// Callers must not modify it.
func (e *Engine) NAT64() []netip.Prefix { return e.nat64 }

// SpecialRange is the package's SpecialRange with the engine's NAT64
// prefixes: a destination inside one is guarded as the IPv4 address it
// embeds (that address's guarded range, or one of NAT64Guarded), and the
// prefix returned is that range's NAT64 form (64:ff9b::a9fe:0/112 for
// 64:ff9b::a9fe:a9fe), which CIDRNames opens by a CIDR rule inside it in
// either form.
func (e *Engine) SpecialRange(a netip.Addr, own []netip.Addr, allow []netip.Prefix) (netip.Prefix, bool) {
	v4, p, ok := NAT64Embedded(e.nat64, a)
	if !ok {
		return SpecialRange(a, own, allow)
	}
	for _, x := range allow {
		if x.Contains(a) {
			return netip.Prefix{}, false
		}
	}
	if g, ok := SpecialRange(v4, own, allow); ok {
		return NAT64Form(p, g), true
	}
	for _, x := range allow {
		if x.Contains(v4) {
			return netip.Prefix{}, false
		}
	}
	for _, g := range NAT64Guarded {
		if g.Contains(v4) {
			return NAT64Form(p, g), true
		}
	}
	return netip.Prefix{}, false
}
