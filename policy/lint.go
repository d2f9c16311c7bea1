package policy

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/net/publicsuffix"
)

// expiringSoon is how close to its end a rule with expires: is warned of.
const expiringSoon = 7 * 24 * time.Hour

// lint returns the warnings that need the compiled engine: path rules that
// act at host level (HTTPS without inspection, UDP), "*" opening DNS, wildcards at a public suffix, expired
// rules and those ending within expiringSoon, rules that an earlier rule shadows (so they are never credited),
// and clients named by MAC (one warning for all such rules).
func lint(e *Engine, now time.Time) []Problem {
	p := e.pol
	var ws []Problem
	warn := func(line, col int, format string, args ...any) {
		ws = append(ws, Problem{File: p.File, Line: line, Col: col, Msg: fmt.Sprintf(format, args...)})
	}
	exactRelay := map[string]bool{}
	for _, r := range p.Rules {
		for _, t := range r.To {
			if (t.Kind == TargetName || t.Kind == TargetHostPath) && IsPrivateRelay(t.Pattern) {
				exactRelay[t.Pattern] = true
			}
		}
	}
	var macRules []*Rule // rules that name clients by MAC
	for j := range p.Rules {
		r := &p.Rules[j]
		if len(r.From.MACs) > 0 {
			macRules = append(macRules, r)
		}
		if !r.Expires.IsZero() && !now.Before(r.Expires) {
			warn(r.Line, r.Col, "rule %s expired on %s: it no longer matches and reports list it as expired", r.Name, r.Expires.Add(-time.Nanosecond).Format("2006-01-02"))
		} else if left := r.Expires.Sub(now); !r.Expires.IsZero() && left <= expiringSoon {
			days := int((left + 24*time.Hour - 1) / (24 * time.Hour))
			warn(r.Line, r.Col, "rule %s expires at the end of %s (UTC), in %d day(s): then it no longer matches; extend expires: if it is still needed", r.Name, r.Expires.Add(-time.Nanosecond).Format("2006-01-02"), days)
		}
		var udp []string
		icmp := false
		for _, pr := range r.Ports {
			switch pr.Proto {
			case UDP:
				udp = append(udp, pr.String())
			case ICMP:
				icmp = true
			}
		}
		for _, t := range r.To {
			if t.Kind == TargetHostPath && len(udp) > 0 {
				// No path shows on UDP (QUIC is encrypted, and the
				// firewall forwards by address): the name's addresses
				// are opened on those ports as a host rule's would be.
				warn(t.Line, t.Col, "rule %s: %q cannot be checked on UDP (%s): no path is seen there, and UDP to the whole host %s is forwarded on those ports", r.Name, t.Raw, strings.Join(udp, ", "), t.Pattern)
			}
			if t.Kind == TargetHostPath && icmp {
				warn(t.Line, t.Col, "rule %s: %q cannot be checked on ICMP echo (icmp): there is no path, and ping to the whole host %s is allowed", r.Name, t.Raw, t.Pattern)
			}
			switch t.Kind {
			case TargetAny:
				warn(t.Line, t.Col, "rule %s: \"*\" also lets its clients resolve every name through egressd's DNS, which is a tunnel; to allow any address without opening DNS, write 0.0.0.0/0 and ::/0", r.Name)
			case TargetHostPath:
				warn(t.Line, t.Col, "rule %s: %q can only be checked on plain HTTP or with inspection enabled; on HTTPS without inspection it allows the whole host %s", r.Name, t.Raw, t.Pattern)
				ws[len(ws)-1].Code = WarnPathNeedsInspection
			}
			if relay := relayMatches(t, exactRelay); relay != "" {
				warn(t.Line, t.Col, "rule %s: %q matches iCloud Private Relay's ingress (%s), which egressd refuses all the same (NXDOMAIN from its DNS, %s at the proxies): the relay would carry an Apple device's traffic past every rule; to allow Private Relay, name %s exactly in a rule", r.Name, t.Raw, relay, ReasonPrivateRelay, relay)
			}
			if t.Kind == TargetName && (t.Pattern == "any" || t.Pattern == "all") {
				// Read from "ports: any": a user who writes it in "to"
				// most likely means every destination.
				warn(t.Line, t.Col, "rule %s: %q in to is the host name %s, not every destination; for any address write 0.0.0.0/0 and ::/0 (or \"*\", which also opens DNS)", r.Name, t.Raw, t.Pattern)
			}
			if t.Kind == TargetName || t.Kind == TargetHostPath {
				if s, ok := strings.CutPrefix(t.Pattern, "*."); ok && !strings.Contains(s, "*") {
					if ps, icann := publicsuffix.PublicSuffix(s); ps == s && (icann || strings.Contains(s, ".")) {
						warn(t.Line, t.Col, "rule %s: %q matches every name under the public suffix %s, owned by many parties", r.Name, t.Raw, s)
					}
				}
			}
		}
		if by := shadowedBy(e, int32(j)); by != nil {
			names := make([]string, len(by))
			for i, b := range by {
				names[i] = p.Rules[b].Name
			}
			warn(r.Line, r.Col, "rule %s is shadowed by %s: everything it allows is allowed earlier, so it is never credited", r.Name, strings.Join(names, ", "))
		}
	}
	if len(macRules) > 0 {
		// The proxy and the DNS forwarder see a client's address, and
		// ask its MAC of the neighbour table; the forward chain matches
		// the frame's source: the same for a client on the link, not for
		// one behind a router.
		names := make([]string, len(macRules))
		for i, r := range macRules {
			names[i] = r.Name
		}
		what := "rule " + names[0] + " names"
		if len(names) > 1 {
			what = "rules " + strings.Join(names, ", ") + " name"
		}
		warn(macRules[0].Line, macRules[0].Col, "%s clients by MAC address, which egressd knows only for a client on a LAN link (the LAN interface's neighbour table): a client behind a router has none, so its DNS and proxied connections are refused, while what the firewall forwards by address (UDP, --tcp-ports) is matched by the frames' source, the router's MAC", what)
	}
	return ws
}

// relayMatches returns the Private Relay names that t matches without
// naming them exactly (a wildcard, a glob, "*"), and that no rule of the
// policy names exactly (exact), joined with "and"; "" for none.
func relayMatches(t Target, exact map[string]bool) string {
	var names []string
	for _, n := range []string{PrivateRelayQUIC, PrivateRelayH2} {
		if exact[n] {
			continue
		}
		switch t.Kind {
		case TargetAny:
			names = append(names, n)
		case TargetName, TargetHostPath:
			if t.Pattern == n || !strings.Contains(t.Pattern, "*") {
				continue
			}
			if g, err := compileNameGlob(t.Pattern); err == nil && g.Match(n) {
				names = append(names, n)
			}
		}
	}
	return strings.Join(names, " and ")
}

// shadowedBy returns the earlier rules that together cover every target of
// rule j for all its clients and ports, or nil when j is reachable.
func shadowedBy(e *Engine, j int32) []int32 {
	rules := e.pol.Rules
	rj := &rules[j]
	if len(rj.To) == 0 {
		return nil
	}
	var by []int32
	for _, t := range rj.To {
		found := int32(-1)
		try := func(r ref) {
			if r.rule >= j || (found >= 0 && r.rule >= found) {
				return
			}
			if covers(&rules[r.rule], rj) {
				found = r.rule
			}
		}
		relay := (t.Kind == TargetName || t.Kind == TargetHostPath) && IsPrivateRelay(t.Pattern)
		if relay {
			// Only a rule that names it exactly allows a relay name
			// (relay.go): "*" and wildcards do not cover it.
			walkExact(e.names, t.Pattern, func(r ref) {
				if r.path == nil || (t.Kind == TargetHostPath && r.path.String() == t.path.String()) {
					try(r)
				}
			})
		} else {
			for _, a := range e.anyRefs {
				try(ref{rule: a})
			}
		}
		switch {
		case relay:
		case t.Kind == TargetPrefix:
			bits := e.addrs.bits16
			if t.Prefix.Addr().Is4() {
				bits = e.addrs.bits4
			}
			for _, b := range bits {
				if b > t.Prefix.Bits() {
					continue
				}
				pf, _ := t.Prefix.Addr().Prefix(b)
				for _, r := range e.addrs.byPrefix[pf] {
					try(ref{rule: r})
				}
			}
		case t.Kind == TargetName || t.Kind == TargetHostPath:
			walkCovering(e.names, t, func(r ref) {
				if r.path == nil || (t.Kind == TargetHostPath && r.path.String() == t.path.String()) {
					try(r)
				}
			})
		}
		if found < 0 {
			return nil
		}
		if !slices.Contains(by, found) {
			by = append(by, found)
		}
	}
	slices.Sort(by)
	return by
}

// walkCovering calls fn for the name refs whose pattern matches every name
// that t's pattern matches.
func walkCovering(root *nameNode, t Target, fn func(ref)) {
	labels := strings.Split(t.Pattern, ".")
	lit := len(labels) // labels[lit:] is the literal suffix
	for lit > 0 && !strings.Contains(labels[lit-1], "*") {
		lit--
	}
	wildSub := lit == 1 && labels[0] == "*"
	n := root
	for i := len(labels) - 1; i >= lit; i-- {
		// Any "*." at an ancestor of the remaining labels covers them.
		for _, r := range n.sub {
			fn(r)
		}
		if lit == 0 {
			rest := strings.Join(labels[:i+1], ".")
			for _, g := range n.globs {
				if g.g.Match(rest) {
					fn(g.ref)
				}
			}
		}
		if n = n.children[labels[i]]; n == nil {
			return
		}
	}
	switch {
	case lit == 0:
		for _, r := range n.exact {
			fn(r)
		}
	case wildSub:
		for _, r := range n.sub {
			fn(r)
		}
	default:
		g := strings.Join(labels[:lit], ".")
		for _, gr := range n.globs {
			if gr.g.String() == strings.Replace(g, "*.", "**.", 1) || gr.g.String() == g {
				fn(gr.ref)
			}
		}
		for _, r := range n.sub {
			fn(r)
		}
	}
}

// walkExact calls fn for the name refs whose pattern is exactly name (no
// '*').
func walkExact(root *nameNode, name string, fn func(ref)) {
	labels := strings.Split(name, ".")
	n := root
	for i := len(labels) - 1; i >= 0; i-- {
		if n = n.children[labels[i]]; n == nil {
			return
		}
	}
	for _, r := range n.exact {
		fn(r)
	}
}

// covers reports whether rule a allows every client, port and time that b
// does.
func covers(a, b *Rule) bool {
	if !a.Expires.IsZero() && (b.Expires.IsZero() || a.Expires.Before(b.Expires)) {
		return false
	}
	if !a.From.Any() {
		if b.From.Any() {
			return false
		}
		for _, pb := range b.From.Prefixes {
			if !slices.ContainsFunc(a.From.Prefixes, func(pa netip.Prefix) bool {
				return pa.Bits() <= pb.Bits() && pa.Contains(pb.Addr())
			}) {
				return false
			}
		}
		for _, mb := range b.From.MACs {
			if !slices.ContainsFunc(a.From.MACs, func(ma net.HardwareAddr) bool { return string(ma) == string(mb) }) {
				return false
			}
		}
	}
	for _, pb := range b.Ports {
		if !slices.ContainsFunc(a.Ports, func(pa PortRange) bool {
			return pa.Proto == pb.Proto && pa.Lo <= pb.Lo && pa.Hi >= pb.Hi
		}) {
			return false
		}
	}
	return true
}
