package policy

import (
	"net/netip"
	"slices"
	"time"
)

// Decide returns the verdict for a flow: allowed when any rule allows it,
// crediting the first such rule in file order. It does not allocate when
// in.Name is already normal (see NormalizeName).
func (e *Engine) Decide(in Input) Decision {
	m := matcher{e: e, in: &in, best: -1, expired: -1, flow: true}
	if e.hasExpiry && in.Now.IsZero() {
		in.Now = time.Now()
	}
	m.run()
	return m.decision()
}

// DecideName says whether a client may resolve a name through egressd's
// DNS: "DNS follows the names", so a rule allows the query when one of its
// name patterns (or "*") matches and it applies to the client, whatever its
// ports. CIDR entries open no names. Only Client, ClientMAC, Name and Now of
// in are used.
func (e *Engine) DecideName(in Input) Decision {
	in.Dest, in.Path = netip.Addr{}, ""
	m := matcher{e: e, in: &in, best: -1, expired: -1}
	if e.hasExpiry && in.Now.IsZero() {
		in.Now = time.Now()
	}
	m.run()
	return m.decision()
}

type matcher struct {
	e    *Engine
	in   *Input
	flow bool // check ports and paths (a flow), or not (a DNS name)
	wild bool // considering "*" rules: a miss there says nothing of the destination

	best       int32 // lowest allowing rule, -1 none
	expired    int32 // lowest expired rule that would allow, -1 none
	portMiss   bool
	pathMiss   bool
	clientMiss bool
	// wildClientMiss: a "*" rule would allow it, for other clients.
	wildClientMiss bool
	badName        bool
}

func (m *matcher) run() {
	m.wild = true
	for _, r := range m.e.anyRefs {
		m.consider(ref{rule: r})
	}
	m.wild = false
	if m.in.Name != "" {
		name, ok := NormalizeName(m.in.Name)
		if !ok {
			m.badName = true
		} else {
			m.names(name)
		}
	}
	if m.flow && m.in.Dest.IsValid() {
		m.addrs(m.in.Dest.Unmap())
	}
}

func (m *matcher) names(name string) {
	n := m.e.names
	end := len(name)
	for {
		// The label to the left of end.
		start := end - 1
		for start >= 0 && name[start] != '.' {
			start--
		}
		if len(n.sub) > 0 {
			for _, r := range n.sub {
				m.consider(r)
			}
		}
		if len(n.globs) > 0 {
			rest := name[:end]
			for _, g := range n.globs {
				if g.g.Match(rest) {
					m.consider(g.ref)
				}
			}
		}
		if end <= 0 {
			break
		}
		c := n.children[name[start+1:end]]
		if c == nil {
			return
		}
		n = c
		end = start
		if end < 0 {
			// The whole name is consumed: patterns that end here match
			// exactly; "*." patterns here need a deeper name.
			for _, r := range n.exact {
				m.consider(r)
			}
			return
		}
	}
}

func (m *matcher) addrs(a netip.Addr) {
	zero := m.e.zero6
	if a.Is4() {
		zero = m.e.zero4
	}
	for _, r := range m.e.addrs.lookup(a) {
		m.wild = len(zero) > 0 && slices.Contains(zero, r)
		m.consider(ref{rule: r})
	}
	m.wild = false
}

// consider checks one candidate rule against everything but the destination,
// which the caller has matched.
func (m *matcher) consider(r ref) {
	if m.best >= 0 && r.rule >= m.best {
		return
	}
	c := &m.e.checks[r.rule]
	if m.flow {
		if !c.allowsPort(m.in.Port, m.in.Proto) {
			m.portMiss = m.portMiss || !m.wild
			return
		}
		if r.path != nil && m.in.Path != "" && !r.path.Match(m.in.Path) {
			m.pathMiss = true
			return
		}
	}
	if c.from != nil && !c.from.Contains(m.in.Client, m.in.ClientMAC) {
		if m.wild {
			m.wildClientMiss = true
		} else {
			m.clientMiss = true
		}
		return
	}
	if c.expires != 0 && m.in.Now.UnixNano() >= c.expires {
		if m.expired < 0 || r.rule < m.expired {
			m.expired = r.rule
		}
		return
	}
	m.best = r.rule
}

func (m *matcher) decision() Decision {
	d := Decision{Verdict: Deny, RuleIndex: -1, Mode: m.e.pol.Mode}
	switch {
	case m.best >= 0:
		d.Verdict, d.RuleIndex, d.Reason = Allow, int(m.best), ReasonAllowed
	case m.expired >= 0:
		d.RuleIndex, d.Reason = int(m.expired), ReasonExpired
	case m.pathMiss:
		d.Reason = ReasonPath
	case m.portMiss:
		d.Reason = ReasonPort
	case m.clientMiss:
		d.Reason = ReasonClient
	case m.badName:
		d.Reason = ReasonInvalidName
	case m.in.Name == "" && !m.in.Dest.IsValid():
		d.Reason = ReasonNoDestination
	case m.wildClientMiss:
		d.Reason = ReasonClient
	default:
		d.Reason = ReasonNoRule
	}
	if d.RuleIndex >= 0 {
		d.Rule = m.e.pol.Rules[d.RuleIndex].Name
	}
	return d
}

// ruleCheck is what consider needs of a rule, packed so that checking a
// candidate rule touches one cache line: the first two port ranges inline
// (most rules have one or two), the rest, the client set and the expiry
// only when the rule has them.
type ruleCheck struct {
	port    [2]PortRange
	nports  uint8
	more    []PortRange // port ranges beyond the first two
	from    *ClientSet  // nil: any client
	expires int64       // UnixNano of Rule.Expires; 0: never
}

func newRuleCheck(r *Rule) ruleCheck {
	c := ruleCheck{nports: uint8(min(len(r.Ports), 2))}
	copy(c.port[:], r.Ports)
	if len(r.Ports) > 2 {
		c.more = r.Ports[2:]
	}
	if !r.From.Any() {
		c.from = &r.From
	}
	if !r.Expires.IsZero() {
		c.expires = r.Expires.UnixNano()
	}
	return c
}

func (c *ruleCheck) allowsPort(port uint16, proto Proto) bool {
	for i := uint8(0); i < c.nports; i++ {
		if c.port[i].Contains(port, proto) {
			return true
		}
	}
	for _, p := range c.more {
		if p.Contains(port, proto) {
			return true
		}
	}
	return false
}
