package policy

import (
	"math"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Decide returns the verdict for a flow: allowed when any rule allows it,
// crediting the first such rule in file order. A flow named for iCloud
// Private Relay's ingress is allowed only by a rule that names it exactly
// (relay.go). A host/path rule matches in.Path in its normal form
// (NormalPath). It does not allocate when in.Name is already normal (see
// NormalizeName) and in.Path has no escape.
func (e *Engine) Decide(in Input) Decision {
	if in.Path != "" {
		if in.PathCut && cutPathStart(in.Path) != "" {
			in.Path = cutPathStart(in.Path)
		}
		in.Path = NormalPath(in.Path)
	}
	m := matcher{e: e, in: &in, best: -1, expired: -1, flow: true, cut: -1}
	if e.hasExpiry && in.Now.IsZero() {
		in.Now = time.Now()
	}
	m.run()
	return m.decision()
}

// DecideName says whether a client may resolve a name through egressd's
// DNS: "DNS follows the names", so a rule allows the query when one of its
// name patterns (or "*") matches and it applies to the client, whatever its
// ports. CIDR entries open no names, and Private Relay's names open only
// by exact name (relay.go). Only Client, ClientMAC, Name and Now of in
// are used.
func (e *Engine) DecideName(in Input) Decision {
	in.Dest, in.Path = netip.Addr{}, ""
	m := matcher{e: e, in: &in, best: -1, expired: -1, cut: -1}
	if e.hasExpiry && in.Now.IsZero() {
		in.Now = time.Now()
	}
	m.run()
	return m.decision()
}

// NameRules appends to dst the index of every rule from index from on that
// lets in's client resolve in.Name (each once, in file order) and returns
// it; DecideName credits the lowest of them. The DNS forwarder's firewall gate
// needs them all: an answer's addresses must reach the learned set of
// every rule that allows the name (a UDP rule after a TCP rule for the
// same names, say), not only the credited rule's. It matches the name
// once per rule found, and once more; it allocates only when dst has no
// room.
func (e *Engine) NameRules(in Input, from int, dst []int) []int {
	in.Dest, in.Path = netip.Addr{}, ""
	if e.hasExpiry && in.Now.IsZero() {
		in.Now = time.Now()
	}
	for from := int32(max(from, 0)); ; {
		m := matcher{e: e, in: &in, best: -1, expired: -1, from: from, cut: -1}
		m.run()
		if m.best < 0 {
			return dst
		}
		dst = append(dst, int(m.best))
		from = m.best + 1
	}
}

type matcher struct {
	e    *Engine
	in   *Input
	flow bool // check ports and paths (a flow), or not (a DNS name)
	// from is the first rule considered (NameRules: the rules after one
	// found); 0 for all.
	from int32
	wild bool // considering "*" rules: a miss there says nothing of the destination
	// relay: the name is Private Relay's ingress (IsPrivateRelay): only
	// rules that name it exactly are considered (relay.go).
	relay bool

	best int32 // lowest allowing rule, -1 none
	// cut: lowest rule that would allow but for a host/path glob the
	// start of a cut path cannot decide (Input.PathCut), -1 none.
	cut        int32
	expired    int32 // lowest expired rule that would allow, -1 none
	portMiss   bool
	pathMiss   bool
	clientMiss bool
	// wildClientMiss: a "*" rule would allow it, for other clients.
	wildClientMiss bool
	badName        bool
}

func (m *matcher) run() {
	name, named := "", false
	if m.in.Name != "" {
		name, named = NormalizeName(m.in.Name)
		m.badName = !named
		if named && IsPrivateRelay(name) {
			// Neither "*" nor the destination address decides it, only
			// the names (and of them the exact ones: names).
			m.relay = true
			m.names(name)
			return
		}
	}
	m.wild = true
	for _, r := range m.e.anyRefs {
		m.consider(ref{rule: r})
	}
	m.wild = false
	if named {
		m.names(name)
	}
	if m.flow && m.in.Dest.IsValid() {
		a := m.in.Dest.Unmap()
		m.addrs(a)
		if v4, _, ok := NAT64Embedded(m.e.nat64, a); ok {
			// A NAT64 destination is the IPv4 address it embeds too
			// (nat64.go).
			m.addrs(v4)
		}
	}
}

func (m *matcher) names(name string) {
	t := m.e.nameTab
	id := uint32(0)
	end := len(name)
	for {
		n := &t.nodes[id]
		// The label to the left of end.
		start := end - 1
		for start >= 0 && name[start] != '.' {
			start--
		}
		if n.subN > 0 && !m.relay {
			m.refs(n.sub0, t.refs[n.subOff:n.subOff+n.subN])
		}
		if n.globN > 0 && !m.relay {
			rest := name[:end]
			for _, g := range t.globs[n.globOff : n.globOff+n.globN] {
				if g.g.Match(rest) {
					m.consider(g.ref)
				}
			}
		}
		if end <= 0 {
			break
		}
		if id = t.child(id, name[start+1:end]); id == 0 {
			return
		}
		end = start
		if end < 0 {
			// The whole name is consumed: patterns that end here match
			// exactly; "*." patterns here need a deeper name.
			if n = &t.nodes[id]; n.exactN > 0 {
				m.refs(n.exact0, t.refs[n.exactOff:n.exactOff+n.exactN])
			}
			return
		}
	}
}

// refs considers a node's refs, in file order; first is refs[0].rule when
// that ref has no path (else -1), known without reading refs, which then
// stay unread when first decides.
func (m *matcher) refs(first int32, refs []ref) {
	if first >= 0 {
		m.consider(ref{rule: first})
		if m.best >= 0 && m.best <= first {
			return
		}
		refs = refs[1:]
	}
	for _, r := range refs {
		if m.best >= 0 && r.rule >= m.best {
			return
		}
		m.consider(r)
	}
}

func (m *matcher) addrs(a netip.Addr) {
	zero := m.e.zero6
	if a.Is4() {
		zero = m.e.zero4
	}
	first, all := m.e.addrs.lookup(a)
	if first < 0 {
		return
	}
	m.wild = len(zero) > 0 && slices.Contains(zero, first)
	m.consider(ref{rule: first})
	// The rest come after first in file order: nothing to read once a
	// rule at or before first allows.
	if m.best < 0 || m.best > first {
		for _, r := range all[1:] {
			if m.best >= 0 && r >= m.best {
				break
			}
			m.wild = len(zero) > 0 && slices.Contains(zero, r)
			m.consider(ref{rule: r})
		}
	}
	m.wild = false
}

// consider checks one candidate rule against everything but the destination,
// which the caller has matched.
func (m *matcher) consider(r ref) {
	if m.best >= 0 && r.rule >= m.best || r.rule < m.from {
		return
	}
	cut := false
	c := &m.e.checks[r.rule]
	x := &noExtra
	if c.extra {
		x = &m.e.extras[r.rule]
	}
	if m.flow {
		if !c.allowsPort(x, m.in.Port, m.in.Proto) {
			m.portMiss = m.portMiss || !m.wild
			return
		}
		if r.path != nil && m.in.PathCut && !m.in.NoPath && m.in.Path != "" {
			match, sure := pathStartMatch(r.path.String(), m.in.Path)
			if sure && !match {
				m.pathMiss = true
				return
			}
			cut = !sure
		} else if r.path != nil && (m.in.NoPath || m.in.Path != "" && !r.path.Match(m.in.Path)) {
			m.pathMiss = true
			return
		}
	}
	if x.from != nil && !x.from.Contains(m.in.Client, m.in.ClientMAC) {
		if m.wild {
			m.wildClientMiss = true
		} else {
			m.clientMiss = true
		}
		return
	}
	if x.expires != 0 && m.in.Now.UnixNano() >= x.expires {
		if m.expired < 0 || r.rule < m.expired {
			m.expired = r.rule
		}
		return
	}
	if cut {
		if m.cut < 0 || r.rule < m.cut {
			m.cut = r.rule
		}
		return
	}
	m.best = r.rule
}

// pathStartMatch reports whether the path glob g matches every path that
// starts with start and is longer (Input.PathCut), or none of them; sure
// is false when that depends on the rest. The glob has no separators: a
// '*' matches anything. It is sure where g's literal lead (up to its
// first special character) is not compatible with start, where g is a
// literal path start takes in whole (the longer path is not it), and
// where g is its literal lead and a final '*' that start takes in whole.
func pathStartMatch(g, start string) (match, sure bool) {
	lead := g
	i := strings.IndexAny(g, `*?[{\`)
	if i >= 0 {
		lead = g[:i]
	}
	if !strings.HasPrefix(start, lead) {
		// The whole path starts with start: it starts with lead only
		// where lead goes on from start.
		return false, len(lead) <= len(start) || !strings.HasPrefix(lead, start)
	}
	switch {
	case i < 0:
		return false, true
	case g[i:] == "*":
		return true, true
	}
	return false, false
}

var noExtra ruleExtra

func (m *matcher) decision() Decision {
	d := Decision{Verdict: Deny, RuleIndex: -1, Mode: m.e.pol.Mode}
	switch {
	case m.cut >= 0 && (m.best < 0 || m.cut < m.best):
		d.Reason = ReasonPathCut
	case m.best >= 0:
		d.Verdict, d.RuleIndex, d.Reason = Allow, int(m.best), ReasonAllowed
	case m.expired >= 0:
		d.RuleIndex, d.Reason = int(m.expired), ReasonExpired
	case m.pathMiss && m.in.NoPath:
		d.Reason = ReasonPathUnseen
	case m.pathMiss:
		d.Reason = ReasonPath
	case m.portMiss:
		d.Reason = ReasonPort
	case m.clientMiss:
		d.Reason = ReasonClient
	case m.relay:
		d.Reason = ReasonPrivateRelay
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
		d.Rule = m.e.ruleNames[d.RuleIndex]
	}
	return d
}

// ruleCheck is what consider needs of a rule, packed into 16 bytes so that
// checking a candidate touches one cache line of a dense array: the first
// two port ranges inline (most rules have one or two); the rest, the client
// set and the expiry sit in a ruleExtra, read only when the rule has them.
type ruleCheck struct {
	port   [2]PortRange
	nports uint8
	extra  bool // e.extras[rule] holds more ports, a client set or an expiry
	_      [2]byte
}

type ruleExtra struct {
	more    []PortRange // port ranges beyond the first two
	from    *ClientSet  // nil: any client
	expires int64       // UnixNano of Rule.Expires; 0: never
}

// expiryNano is t as Unix nanoseconds, clamped to the years those can
// hold (1678 to 2262): UnixNano of "expires: 9999-12-31" is undefined (it
// came out negative, so the rule looked expired from the start), and 0
// would mean no expiry at all.
func expiryNano(t time.Time) int64 {
	switch {
	case t.After(time.Unix(0, math.MaxInt64)):
		return math.MaxInt64
	case t.Before(time.Unix(0, math.MinInt64)):
		return math.MinInt64
	case t.UnixNano() == 0:
		return 1
	}
	return t.UnixNano()
}

func newRuleCheck(r *Rule) (ruleCheck, ruleExtra) {
	c := ruleCheck{nports: uint8(min(len(r.Ports), 2))}
	copy(c.port[:], r.Ports)
	var x ruleExtra
	if len(r.Ports) > 2 {
		x.more = r.Ports[2:]
	}
	if !r.From.Any() {
		x.from = &r.From
	}
	if !r.Expires.IsZero() {
		x.expires = expiryNano(r.Expires)
	}
	c.extra = x.more != nil || x.from != nil || x.expires != 0
	return c, x
}

func (c *ruleCheck) allowsPort(x *ruleExtra, port uint16, proto Proto) bool {
	for i := uint8(0); i < c.nports; i++ {
		if c.port[i].Contains(port, proto) {
			return true
		}
	}
	if x != nil {
		for _, p := range x.more {
			if p.Contains(port, proto) {
				return true
			}
		}
	}
	return false
}
