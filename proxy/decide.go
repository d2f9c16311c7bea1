package proxy

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"

	"egressd/audit"
	"egressd/policy"
)

// Reasons the proxy adds to policy's. They are constants (metric labels).
const (
	ReasonSNIMismatch   = "sni-mismatch"        // the name is allowed, the address was not given out for it
	ReasonSpecialRange  = "special-range"       // loopback, link-local, CGNAT, embeddings, the gateway itself
	ReasonDuplicateSNI  = "duplicate-sni"       // more than one server name in the ClientHello
	ReasonHelloBad      = "hello-malformed"     // starts as TLS, does not parse
	ReasonHelloTimeout  = "hello-timeout"       // the ClientHello or HTTP head did not complete in time
	ReasonHelloTooLarge = "hello-too-large"     // over the size cap
	ReasonHTTPBad       = "http-malformed"      // an HTTP head the proxy refuses
	ReasonHostMismatch  = "host-mismatch"       // Host and absolute-form target disagree
	ReasonHTTPFraming   = "http-framing"        // ambiguous or invalid body framing (request smuggling shapes)
	ReasonPathForm      = policy.ReasonPathForm // a path an origin may read as another, where a host/path rule decides
	ReasonIPLiteral     = "ip-literal-form"     // a CONNECT host in a numeric form that is not an address
	ReasonLimit         = "connection-limit"
	ReasonShutdown      = "shutdown" // accepted as the proxy shut down: reset unserved (Close)
	ReasonNoOrigDst     = "no-original-dst"
	ReasonResolve       = "resolve-failed"
	ReasonAuth          = "proxy-auth"
	// ReasonUndecidable: a reload found a connection whose decision does
	// not say what it was made on (a bug): it is denied.
	ReasonUndecidable = "reload-undecidable"
)

// verdict is a decision plus how the name was found and what to do.
type verdict struct {
	d       policy.Decision
	name    string
	src     audit.NameSource
	inspect bool // host/path rules decide this host: decrypt and decide per request

	// What the decision was made on, for deciding the connection again
	// after a reload (again): how, the input, and whether the destination
	// was vouched for the name (decideName).
	how     decidedBy
	in      policy.Input
	vouched bool
}

// decidedBy says which of the deciding functions made a verdict.
type decidedBy uint8

const (
	// byUnknown, the zero value: a verdict that does not say how it was
	// made. A reload denies it (closed in enforce mode): a verdict literal
	// that forgets its how fails closed.
	byUnknown decidedBy = iota
	// byBytes: a deny on the connection's bytes (a malformed hello, a
	// refused head, a host in no valid form), which no rule changes.
	byBytes
	byName // decideName: the name the client sent
	byAddr // decideAddr: the address and the names our DNS gave out
)

// enforced reports whether the connection must be refused.
func (v verdict) enforced() bool {
	return !v.d.Allowed() && v.d.Mode == policy.ModeEnforce
}

// denyDecision builds a proxy-made deny in the engine's mode.
func denyDecision(eng *policy.Engine, reason string) policy.Decision {
	return policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: eng.Mode()}
}

// engines caches the two derived engines the inspection decision needs for
// the current policy engine.
type engines struct {
	eng       *policy.Engine
	hostLevel *policy.Engine // every rule without its host/path targets (eng.HostLevel)
	pathOnly  *policy.Engine // only host/path targets, as host names
}

type engineCache struct{ p atomic.Pointer[engines] }

func (c *engineCache) get(eng *policy.Engine) *engines {
	if e := c.p.Load(); e != nil && e.eng == eng {
		return e
	}
	pol := eng.Policy()
	path := &policy.Policy{File: pol.File, Version: pol.Version, Mode: pol.Mode, Groups: pol.Groups}
	for _, r := range pol.Rules {
		pr := r
		pr.To = nil
		for _, t := range r.To {
			if t.Kind == policy.TargetHostPath {
				pr.To = append(pr.To, policy.Target{Kind: policy.TargetName, Raw: t.Raw, Pattern: t.Pattern, Line: t.Line, Col: t.Col})
			}
		}
		path.Rules = append(path.Rules, pr)
	}
	e := &engines{eng: eng, hostLevel: eng.HostLevel(), pathOnly: policy.New(path).WithNAT64(eng.NAT64())}
	c.p.Store(e)
	return e
}

// clientMAC returns the MAC to decide client's connection with under
// eng: nil unless eng's rules name MAC addresses (nothing is looked up
// then) and Deps.MACs knows one.
func (p *Proxy) clientMAC(eng *policy.Engine, client netip.Addr) net.HardwareAddr {
	if p.deps.MACs == nil || !eng.HasMACs() {
		return nil
	}
	return p.deps.MACs.ClientMAC(client.Unmap())
}

// withMAC returns in with its client's MAC when eng's rules name MAC
// addresses and in has none yet: a connection opened under a policy that
// named none is decided again (a reload), or its later requests are
// decided, under one that does.
func (p *Proxy) withMAC(eng *policy.Engine, in policy.Input) policy.Input {
	if in.ClientMAC == nil && in.Client.IsValid() {
		in.ClientMAC = p.clientMAC(eng, in.Client)
	}
	return in
}

// needsInspection reports whether a host/path rule, and no host-level rule,
// allows the flow: only then does the path change the verdict.
func (p *Proxy) needsInspection(eng *policy.Engine, in policy.Input) bool {
	if !p.cfg.Inspect || in.Name == "" {
		return false
	}
	e := p.engines.get(eng)
	in.Path = ""
	return e.pathOnly.Decide(in).Allowed() && !e.hostLevel.Decide(in).Allowed()
}

// decideName decides a flow whose name the client sent (SNI or Host).
// in.Name is normalised. When in.Dest is valid the destination must be
// vouched for (no spoofing); the special-range guard applies either way.
func (p *Proxy) decideName(ctx context.Context, eng *policy.Engine, in policy.Input, src audit.NameSource) verdict {
	return p.decideNameVouched(ctx, eng, in, src, vouchLookup)
}

// vouchBy says how far decideNameVouched goes to vouch for a destination.
type vouchBy uint8

const (
	vouchLookup vouchBy = iota // local facts, then a fresh lookup (a new connection)
	vouchLocal                 // local facts only: CIDR rules, what our DNS gave out (a reload)
	vouchDone                  // vouched for before: not checked again (a reload)
)

// decideNameVouched is decideName; how says how the destination is
// vouched for: a connection decided again after a reload was vouched
// for at its start (vouchDone), or is checked on local facts only
// (vouchLocal: see liveConn).
func (p *Proxy) decideNameVouched(ctx context.Context, eng *policy.Engine, in policy.Input, src audit.NameSource, how vouchBy) verdict {
	vouched := how == vouchDone
	v := verdict{name: in.Name, src: src, how: byName, in: in, vouched: vouched}
	if d, ok := p.selfDecision(eng, in); ok {
		v.d = d
		return v
	}
	v.d = eng.Decide(in)
	if !v.d.Allowed() {
		return v
	}
	if in.Dest.IsValid() {
		if p.guardRefuses(eng, in) {
			v.d = denyDecision(eng, ReasonSpecialRange)
			return v
		}
		if !vouched && !p.vouched(ctx, eng, in, v.d, how == vouchLookup) {
			v.d = denyDecision(eng, ReasonSNIMismatch)
			return v
		}
		v.vouched = true
	}
	v.inspect = p.needsInspection(eng, in)
	return v
}

// vouched reports whether the destination address belongs to the name: a
// CIDR rule allows the address by itself, our DNS gave it out to this
// client's device (DNSFacts) for a name the same rule allows, or a fresh
// lookup of the name returns it (THREATS.md A2); the lookup only when
// lookup is set.
func (p *Proxy) vouched(ctx context.Context, eng *policy.Engine, in policy.Input, d policy.Decision, lookup bool) bool {
	addrIn := in
	addrIn.Name, addrIn.Path = "", ""
	if eng.Decide(addrIn).Allowed() {
		return true
	}
	dest := in.Dest.Unmap()
	if p.deps.DNS != nil {
		for _, n := range p.deps.DNS.NamesFor(in.Client.Unmap(), dest) {
			if n == in.Name {
				return true
			}
			ni := addrIn
			ni.Name = n
			if dd := eng.Decide(ni); dd.Allowed() && dd.Rule == d.Rule {
				return true
			}
		}
	}
	if lookup && p.deps.Resolver != nil {
		lctx, cancel := context.WithTimeout(ctx, p.cfg.LookupTimeout)
		addrs, err := p.deps.Resolver.LookupNetIP(lctx, in.Name)
		cancel()
		if err == nil {
			for _, a := range addrs {
				if a.Unmap() == dest {
					return true
				}
			}
		}
	}
	return false
}

// decideAddr decides a flow without a usable name from the stream: by the
// destination address (CIDR rules), else by the names our DNS gave this
// address out for to this client's device (DNSFacts). src is how the lack of a name is
// recorded (no-sni for TLS, none otherwise).
func (p *Proxy) decideAddr(eng *policy.Engine, in policy.Input, src audit.NameSource) verdict {
	return p.decideAddrKnown(eng, in, src, "")
}

// decideAddrKnown is decideAddr with known, when not empty, among the
// names our DNS gave out: the name a connection was decided by before a
// reload (decided again, it still counts, though its DNS answer may have
// expired since).
func (p *Proxy) decideAddrKnown(eng *policy.Engine, in policy.Input, src audit.NameSource, known string) verdict {
	in.Name = ""
	v := verdict{src: src, how: byAddr, in: in}
	if d, ok := p.selfDecision(eng, in); ok {
		v.d = d
		return v
	}
	v.d = eng.Decide(in)
	if !v.d.Allowed() && (p.deps.DNS != nil || known != "") {
		// The address first, then the names (policy.DecideLearned, which
		// capture decides with too).
		var names []string
		if p.deps.DNS != nil {
			names = p.deps.DNS.NamesFor(in.Client.Unmap(), in.Dest.Unmap())
		}
		if known != "" && !slices.Contains(names, known) {
			names = append(slices.Clip(names), known)
		}
		if d, i := eng.DecideLearned(in, v.d, names); i >= 0 {
			// The name that allows it, else the best name known.
			v.d, v.name, v.src = d, names[i], audit.NameDNSLearned
			if d.Allowed() {
				in.Name = names[i]
			}
		}
	}
	if v.d.Allowed() {
		if p.guardRefuses(eng, in) {
			v.d = denyDecision(eng, ReasonSpecialRange)
		}
	}
	if v.d.Allowed() && v.name != "" {
		v.inspect = p.needsInspection(eng, in)
	}
	return v
}

// selfDecision refuses a destination that is the gateway itself — a
// loopback or unspecified address, or one of its own addresses, in any
// form — unless a CIDR rule names it or it is configured as an exception.
// The refusal holds in audit mode too (its decision is made in enforce
// mode): there, forwarding would have the proxy dial its own listener,
// which dials itself again until every connection slot is taken, or reach
// the gateway's local-only services (the admin API) from the LAN.
// Nothing a site relies on goes through the proxy to the gateway itself:
// the firewall leaves traffic to the gateway's addresses alone.
func (p *Proxy) selfDecision(eng *policy.Engine, in policy.Input) (policy.Decision, bool) {
	if _, ok := selfGuard(eng, in, p.ownAddrs(), p.cfg.AllowSpecial); ok {
		return selfRefusal, true
	}
	return policy.Decision{}, false
}

// selfRefusal is the refusal of a destination that is the gateway itself
// (selfDecision, and loopback from the LAN: handleTransparent): made in
// enforce mode whatever the policy's.
var selfRefusal = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonSpecialRange, Mode: policy.ModeEnforce}

// literalAddr returns the address a name-shaped string spells, if it is an
// IP literal (with or without brackets, IPv6 zone refused).
func literalAddr(s string) (netip.Addr, bool) {
	if len(s) > 1 && s[0] == '[' && s[len(s)-1] == ']' {
		s = s[1 : len(s)-1]
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, false
	}
	return a, true
}

// numericForm reports whether a host that is not an IP literal still looks
// like one of the numeric forms libc or other proxies accept as an address
// (2130706433, 0x7f.1, 127.1, 0177.0.0.1): they are refused, never resolved
// (THREATS.md F4).
func numericForm(s string) bool {
	last := s
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '.' {
			last = s[i+1:]
			if last == "" { // trailing dot
				return numericForm(s[:i])
			}
			break
		}
	}
	if last == "" {
		return false
	}
	if len(last) > 2 && (last[:2] == "0x" || last[:2] == "0X") {
		last = last[2:]
		for i := 0; i < len(last); i++ {
			c := last[i] | 0x20
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
		return true
	}
	for i := 0; i < len(last); i++ {
		if last[i] < '0' || last[i] > '9' {
			return false
		}
	}
	return true
}
