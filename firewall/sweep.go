package firewall

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/netutil"
	"egressd/policy"
)

// A reload that narrows the policy must reach the connections the enforce
// ruleset already let out: their conntrack entries carry the enforced bit
// (CTMarkEnforced, or the highest of Config.CTMarkBits), and
// "established" would carry them on for days. So every accept rule of
// forward also writes its policy rule's tag (CTMarkTag, or the other
// bits of Config.CTMarkBits) into the mark,
// and after a ruleset goes in (install, reload, a rule's expiry) the
// firewall dumps the marked entries and decides each:
//
//   - tag 0 (between other interfaces, or marked before tags): kept;
//   - a tag whose rule is in the new ruleset unchanged (same
//     fingerprint, and its accept rules open the same destinations:
//     opensHash, which a restart that changes the NAT64 prefixes
//     changes): kept, whatever the rule's learned addresses became
//     since (a DNS answer that expired long ago does not end a flow its
//     unchanged rule let out). What a tag can mean is the rules that have
//     it in Firewall.since: the ruleset of the last look that saw every
//     flow and every one installed after it (a look skipped because a
//     later ruleset went in first, or one that failed, leaves the tags of
//     those before it in play). Where they disagree (a rule removed, and
//     a new one drew its tag), the connection is decided again. At a
//     start, since holds the ruleset of the policy the earlier egressd
//     ran (Deps.Previous, with the NAT64 prefixes it ran with, rendered
//     with this run's Config but the TCPPorts it ran with,
//     Deps.PreviousTCPPorts), those of the policies it may have put in
//     after it unrecorded (Deps.Pending: a tag they give different rules
//     is decided again), then the new
//     one; without any, the new ruleset alone: a tag it uses is then taken
//     for its rule's (let out by an earlier egressd whose policy is
//     unknown);
//   - otherwise (the rule was removed or changed, or the tag is one none
//     of those rulesets used) the connection is decided again, as the new
//     forward chain would decide its first packet: client address,
//     destination and port after destination NAT, protocol, the rules'
//     CIDRs and their live learned addresses. Where its old rule is known
//     and the new policy has a rule of that name, that rule's unchanged
//     client set and unchanged (or widened) names still count for it, so
//     that adding a port to a rule does not cut the flows to its learned
//     addresses. A rule that names clients by MAC asks their MAC
//     (Deps.MACs: the LAN's neighbour table, as the proxy does), for
//     conntrack holds none; the chain matches the frame's source address,
//     so a connection of a client behind a router whose MAC a rule names
//     is cut (the router's MAC is not the client's): its next packet
//     meets the new ruleset as a new one and is let out again.
//     Denied, the entry is deleted: the connection's next packet from the
//     LAN meets the new ruleset as a new one (and is dropped), its
//     replies meet the WAN guard. Each cut is logged and reported as a
//     decision (cutDecision).
//
// A connection kept gets, in its mark, the tag its rule has in the new
// ruleset (that of the rule that admitted it, when decided again; an
// unchanged rule's, which another rule may have pushed to another tag), so
// that a tag always means a rule of a ruleset in Firewall.since: a later
// reload that removes the rule that kept it decides it again, even if a
// new rule drew the tag of the rule that first let it out.

// flowRule is what one policy rule's accept rules in forward let out.
type flowRule struct {
	name       string
	fp         uint64 // fingerprint of what the accept rules depend on
	opens      uint64 // hash of the destinations they open (opensHash)
	tag        uint32 // in the mark's tag bits, shifted down; never 0
	from       policy.ClientSet
	ports      []policy.PortRange
	any4, any6 bool
	nets, wide []netip.Prefix
	guards     []netip.Prefix // the ruleset's guarded destinations (guardList)
	names      []string       // the name patterns, sorted: the learned sets' feed
	learn      [2]string      // the learned sets, IPv4 then IPv6; "" without names
}

// tagCount is how many tags CTMarkTag (the default layout) holds, 0
// excluded; a Ruleset's mark.count is that of its layout.
const tagCount = CTMarkTag >> ctTagShift // 1023

// addFlowRule records what rule r's accept rules let out and gives it its
// tag: derived from the fingerprint, then the next free one in rule order
// (drawTag; an expired rule keeps its own, expiredTag), so that rules of one ruleset share no tag while there are no more of
// them than the layout's tags (a restart with the same policy gives the
// same tags); beyond, a rule shares the tag the fingerprint gives it
// (Config.CheckTags).
func (rs *Ruleset) addFlowRule(r policy.Rule, ports []policy.PortRange, any4, any6, names bool, nets, wide []netip.Prefix) *flowRule {
	fr := &flowRule{name: r.Name, from: r.From, ports: ports, any4: any4, any6: any6, nets: nets, wide: wide, guards: rs.guards}
	if names {
		fr.learn = rs.learn[r.Name]
		fr.names = policy.LearnedNames(r)
	}
	fr.fp = fingerprint(r, ports)
	fr.opens = fr.opensHash()
	if rs.byTag == nil {
		rs.byTag, rs.byFP = map[uint32][]*flowRule{}, map[uint64]*flowRule{}
	}
	fr.tag = rs.drawTag(fr.fp)
	rs.flows = append(rs.flows, fr)
	rs.byTag[fr.tag] = append(rs.byTag[fr.tag], fr)
	rs.byFP[fr.fp] = fr
	return fr
}

// drawTag is the tag of a rule with fingerprint fp (addFlowRule): the one
// the fingerprint gives, or the next one free, neither another rule's nor
// an expired rule's (Ruleset.expiredTags); the one the fingerprint gives
// when none is free.
func (rs *Ruleset) drawTag(fp uint64) uint32 {
	n := rs.ruleTags()
	tag := uint32(fp%uint64(n)) + 1
	for range n {
		if len(rs.byTag[tag]) == 0 && !rs.expiredTags[tag] {
			break
		}
		tag = tag%n + 1
	}
	return tag
}

// ruleTags is how many tags rules draw from: the layout's, but the fast
// tag (the last one) with the fast path.
func (rs *Ruleset) ruleTags() uint32 {
	if rs.fast {
		return rs.mark.count - 1
	}
	return rs.mark.count
}

// expiredTag takes, for an expired rule with fingerprint fp, the tag it
// had while it held, in rule order as addFlowRule draws them: the rules
// after it keep theirs once it expires.
func (rs *Ruleset) expiredTag(fp uint64) {
	if rs.expiredTags == nil {
		rs.expiredTags = map[uint32]bool{}
	}
	rs.expiredTags[rs.drawTag(fp)] = true
}

// fingerprint hashes what a rule's accept rules in forward depend on: its
// name, clients, targets (names, not paths: forward sees no path) and the
// ports forward handles for it (which depend on Config.TCPPorts). Its
// reason and expiry date do not change what it lets out while it holds.
func fingerprint(r policy.Rule, ports []policy.PortRange) uint64 {
	var b strings.Builder
	b.WriteString(r.Name)
	b.WriteString("\x00from")
	for _, p := range r.From.Prefixes {
		b.WriteString(" " + p.String())
	}
	for _, m := range r.From.MACs {
		b.WriteString(" " + m.String())
	}
	b.WriteString("\x00to")
	for _, t := range r.To {
		switch t.Kind {
		case policy.TargetAny:
			b.WriteString(" *")
		case policy.TargetName, policy.TargetHostPath:
			b.WriteString(" n:" + t.Pattern)
		case policy.TargetPrefix:
			b.WriteString(" p:" + t.Prefix.String())
		}
	}
	b.WriteString("\x00ports")
	for _, pr := range ports {
		b.WriteString(" " + pr.String())
	}
	h := fnv.New64a()
	h.Write([]byte(b.String()))
	return h.Sum64()
}

// opensHash hashes the destinations fr's accept rules open, which its
// fingerprint does not hold all of: what the NAT64 prefixes
// (policy.Engine.WithNAT64) add, the NAT64 forms of its IPv4 CIDRs and,
// where it uses them ("*", a wide CIDR, names), the guarded sets' NAT64
// forms of the guarded IPv4 ranges (renderAllows). They are the same
// through one process's rulesets, but a restart may change them
// (Deps.Previous).
func (fr *flowRule) opensHash() uint64 {
	var b strings.Builder
	fmt.Fprintf(&b, "%t %t\x00nets", fr.any4, fr.any6)
	for _, p := range fr.nets {
		b.WriteString(" " + p.String())
	}
	b.WriteString("\x00wide")
	for _, p := range fr.wide {
		b.WriteString(" " + p.String())
	}
	if fr.any4 || fr.any6 || len(fr.wide) > 0 || len(fr.names) > 0 {
		b.WriteString("\x00guards")
		for _, p := range fr.guards {
			b.WriteString(" " + p.String())
		}
	}
	h := fnv.New64a()
	h.Write([]byte(b.String()))
	return h.Sum64()
}

// flowKey is a connection as forward saw its first packet.
type flowKey struct {
	client, dst netip.Addr
	port        uint16
	proto       policy.Proto
	mac         net.HardwareAddr // the client's, when the policy names MACs (sweep); nil: none
}

// keyOf reads a conntrack entry: the client is the original source, the
// destination the reply's source (after any destination NAT, as forward
// sees it). An ICMP or ICMPv6 entry (an echo, the only kind forward lets
// out) is policy.ICMP, port 0.
func keyOf(e netutil.ConntrackEntry) flowKey {
	k := flowKey{client: e.Orig.Src.Addr().Unmap(), dst: e.Reply.Src.Addr().Unmap(),
		port: e.Reply.Src.Port(), proto: policy.Proto(e.Proto)}
	if e.Proto == unix.IPPROTO_ICMP || e.Proto == unix.IPPROTO_ICMPV6 {
		k.port, k.proto = 0, policy.ICMP
	}
	return k
}

// keeps decides a connection whose conntrack mark is mark, now that rs
// is installed; since is what its tag can mean: the rulesets whose tags
// the marks may carry (see Firewall.since), rs last, each read at its own
// bits (a restart may move them: Deps.PreviousCTMarkBits) where the mark
// has its enforced bit. live says whether an address is in a learned set
// now. A connection kept gets the tag it should carry from now on: that
// of the rule of rs that keeps it (0 for tag 0).
func (rs *Ruleset) keeps(since []*Ruleset, mark uint32, k flowKey, live func(set string, a netip.Addr) bool) (keep bool, newTag uint32) {
	if rs.fast && mark&rs.mark.owned() == rs.mark.fastAllowed() && k.proto == policy.TCP &&
		!slices.ContainsFunc(since, func(o *Ruleset) bool { return o.Mode == policy.ModeEnforce && !o.fast && o.mark == rs.mark }) {
		// Let out by the fast path: kept while what its decisions
		// depend on is what it was in every ruleset it can come from.
		// (Only TCP is, and only where every enforce ruleset it can come
		// from had the fast path: without it the mark is a rule's,
		// decided below.)
		for _, old := range since {
			if old.fast && old.mark == rs.mark && old.fastFP != rs.fastFP {
				return false, 0
			}
		}
		return true, rs.mark.fastTag()
	}
	var was []*flowRule // the rules the tag can stand for, one per fingerprint
	// fast: a ruleset it can come from reads it as fast-allowed, no
	// rule's (a restart that turned the fast path on or off, or one
	// not known to have: Deps.PreviousFastPath). Not kept by a rule's
	// tag then, nor decided with a rule as a hint.
	zero, other, fast := false, false, false
	for _, old := range since {
		if mark&old.mark.enforced == 0 {
			continue
		}
		tag := old.mark.tagOf(mark)
		if tag == 0 {
			zero = true
			continue
		}
		other = true
		if old.fast && tag == old.mark.fastTag() {
			fast = true
			continue
		}
		for _, fr := range old.byTag[tag] {
			if !slices.ContainsFunc(was, func(w *flowRule) bool { return w.fp == fr.fp }) {
				was = append(was, fr)
			}
		}
	}
	// Tag 0 at every layout that marked it: kept. Tag 0 at one layout and
	// another tag at another (bits moved across a restart): decided again.
	if zero && !other {
		return true, 0
	}
	// Its rule (whichever it is) is unchanged, and opens what it opened
	// (a restart may change the NAT64 prefixes): kept, under that rule's
	// tag in rs. A tag none of them used (from before an egressd start,
	// whose rulesets are unknown) is decided again, with no rule as a
	// hint.
	if len(was) > 0 && !zero && !fast {
		newTag = 0
		for _, fr := range was {
			now := rs.byFP[fr.fp]
			if now == nil || now.opens != fr.opens || (newTag != 0 && now.tag != newTag) {
				newTag = 0
				break
			}
			newTag = now.tag
		}
		if newTag != 0 {
			return true, newTag
		}
	}
	var hint *flowRule
	if len(was) == 1 && !zero && !fast {
		hint = was[0]
	}
	for _, fr := range rs.flows {
		if fr.admits(k, hint, live) {
			return true, fr.tag
		}
	}
	return false, 0
}

// admits reports whether fr's accept rules let the connection out, as
// they would its first packet now; was is the rule that let it out, when
// known.
func (fr *flowRule) admits(k flowKey, was *flowRule, live func(set string, a netip.Addr) bool) bool {
	if !slices.ContainsFunc(fr.ports, func(pr policy.PortRange) bool { return pr.Contains(k.port, k.proto) }) {
		return false
	}
	same := was != nil && was.name == fr.name
	if !fr.from.Any() && !fr.from.Contains(k.client, k.mac) && !(same && sameClients(fr.from, was.from)) {
		return false
	}
	if fr.byAddress(k.dst) {
		return true
	}
	if len(fr.names) == 0 || guarded(fr.guards, k.dst) {
		// A learned set opens no guarded address (render).
		return false
	}
	set := fr.learn[0]
	if k.dst.Is6() {
		set = fr.learn[1]
	}
	if live(set, k.dst) {
		return true
	}
	// Let out by the same rule's learned addresses (not by its CIDRs),
	// whose names the rule still has (capture predicts this in audit
	// mode with the same test).
	return same && !was.byAddress(k.dst) && policy.KeepsLearned(was.names, fr.names)
}

// byAddress reports whether the rule's CIDR targets open dst (special
// ranges only from inside, as render does).
func (fr *flowRule) byAddress(dst netip.Addr) bool {
	if (dst.Is4() && fr.any4) || (dst.Is6() && fr.any6) {
		return !guarded(fr.guards, dst)
	}
	for _, p := range fr.nets {
		if p.Contains(dst) {
			return true
		}
	}
	for _, p := range fr.wide {
		if p.Contains(dst) {
			return !guarded(fr.guards, dst)
		}
	}
	return false
}

// guarded reports whether a is in one of guards (guardList).
func guarded(guards []netip.Prefix, a netip.Addr) bool {
	for _, p := range guards {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func sameClients(a, b policy.ClientSet) bool {
	return slices.Equal(a.Prefixes, b.Prefixes) &&
		slices.EqualFunc(a.MACs, b.MACs, func(x, y net.HardwareAddr) bool { return string(x) == string(y) })
}

// maxSince bounds Firewall.since: after that many enforce rulesets in a
// row whose sweeps failed or were skipped, the oldest one's tags are
// forgotten, as at a start (a tag a later ruleset uses is taken for its
// rule's).
const maxSince = 16

// sweepResult is what a look at the connections already out found.
type sweepResult struct {
	ran       bool
	kept, cut int
	err       error
}

// sweep deletes the conntrack entries of connections that rs, just
// installed, does not allow, and gives those it keeps the tag of the rule
// of rs that keeps them (see the comment at the top of this file). It
// runs outside ioMu (a dump of a large table must not hold up learned
// addresses), one at a time, and only while rs is still the installed
// ruleset: a later one's sweep judges by it instead. Once it has looked
// at every entry and changed all it meant to, the marks carry tags of rs
// (or of rulesets installed after it) alone, and f.since drops the
// rulesets before rs. eng is the policy rs was rendered from (apply's):
// the cuts are logged with its reasons, not with those of a policy a
// Replace installed meanwhile.
func (f *Firewall) sweep(eng *policy.Engine, rs *Ruleset) sweepResult {
	if rs.Mode != policy.ModeEnforce {
		return sweepResult{}
	}
	f.sweepMu.Lock()
	defer f.sweepMu.Unlock()
	f.mu.Lock()
	current := f.rs == rs && !f.closed
	since := slices.Clone(f.since)
	f.mu.Unlock()
	if !current {
		return sweepResult{}
	}
	res := sweepResult{ran: true}
	defer func() {
		if res.err == nil {
			f.mu.Lock()
			if i := slices.Index(f.since, rs); i > 0 {
				f.since = slices.Delete(f.since, 0, i)
			}
			f.mu.Unlock()
		}
	}()
	defer func() {
		f.m.flows.WithLabelValues("kept").Add(float64(res.kept))
		f.m.flows.WithLabelValues("cut").Add(float64(res.cut))
		if res.err != nil {
			f.m.flowErrors.Inc()
		}
	}()
	ct, err := netutil.OpenConntrackTable(f.cfg.NetNS)
	if err != nil {
		res.err = err
		return res
	}
	defer ct.Close()
	// Each entry is decided as the dump is read: only those to cut or
	// re-mark are kept (a table can hold hundreds of thousands). f.mu is
	// taken per entry, so that learned addresses are not held up by the
	// dump.
	var cut []netutil.ConntrackEntry
	type retag struct {
		e   netutil.ConntrackEntry
		tag uint32
	}
	var retags []retag // kept, under another tag
	now := f.now()
	live := func(set string, a netip.Addr) bool {
		v, ok := f.learned[set][a]
		return ok && v.exp.After(now)
	}
	mark := rs.mark
	// The clients' MACs, when the policy names some: asked once per
	// client, outside f.mu (a lookup may wait for the kernel).
	var macs map[netip.Addr]net.HardwareAddr
	if f.macs != nil && eng != nil && eng.HasMACs() {
		macs = map[netip.Addr]net.HardwareAddr{}
	}
	decide := func(e netutil.ConntrackEntry) {
		k := keyOf(e)
		if macs != nil {
			mac, ok := macs[k.client]
			if !ok {
				mac = f.macs.ClientMAC(k.client)
				macs[k.client] = mac
			}
			k.mac = mac
		}
		f.mu.Lock()
		keep, newTag := rs.keeps(since, e.Mark, k, live)
		f.mu.Unlock()
		if keep {
			res.kept++
			if e.Mark&mark.owned() != mark.marked(newTag) {
				retags = append(retags, retag{e, newTag})
			}
		} else {
			cut = append(cut, e)
		}
	}
	// Those marked at rs's bits, then those marked at the bits of a
	// ruleset before it that had others (a restart that moved them:
	// Deps.PreviousCTMarkBits) and not at any looked at already.
	seen := mark.enforced
	err = ct.Marked(mark.enforced, mark.enforced, decide)
	for _, old := range since {
		if err != nil {
			break
		}
		if b := old.mark.enforced; seen&b == 0 {
			seen |= b
			err = ct.Marked(b, b, func(e netutil.ConntrackEntry) {
				if e.Mark&(seen&^b) == 0 {
					decide(e)
				}
			})
		}
	}
	if err != nil {
		res.err = err
		return res
	}
	deadline := time.Now().Add(10 * time.Second)
	for i, e := range cut {
		if time.Now().After(deadline) {
			// Bounded: a reload does not hang on a huge table.
			res.err = errors.Join(res.err, errors.New("firewall: flows: gave up deleting after 10s"))
			res.kept += len(cut) - i
			break
		}
		if err := ct.Delete(e); err != nil && !errors.Is(err, netutil.ErrNoConntrack) {
			if res.err == nil {
				res.err = err
			}
			res.kept++
			continue
		}
		res.cut++
		f.cutDecision(eng, since, e, macs[keyOf(e).client], now)
	}
	// The re-marks after the cuts: the cuts are what the policy asks for,
	// and the budget goes to them first. One not made leaves res.err set,
	// so f.since keeps the rulesets the old tags mean.
	for _, r := range retags {
		if time.Now().After(deadline) {
			res.err = errors.Join(res.err, errors.New("firewall: flows: gave up re-marking after 10s"))
			break
		}
		err := ct.SetMark(r.e, mark.marked(r.tag), mark.owned())
		if err != nil && !errors.Is(err, netutil.ErrNoConntrack) && res.err == nil {
			res.err = err
		}
	}
	return res
}

// closeRevoked is a cut flow's close reason, the proxy's for a connection
// a reload closes.
const closeRevoked = "policy-revoked"

// cutDecision records the cut of the connection e, which the ruleset of
// eng (the last of since) denied: one canonical line, as for every
// decision, and one event to Deps.Sink, a drop enforced, so that the
// report shows the flow blocked (the daemon hands it to capture, which
// records it with the flow's start and bytes when it follows the flow).
// The line names the rule the flow ran under (its tag's in the rulesets
// before; empty when unknown, at a start) and the new decision's reason:
// the policy's, by address (a removed rule: no-rule; a narrowed one:
// port-not-allowed or client-not-allowed; an expired one: expired), or
// special-range where only the guard refuses it.
func (f *Firewall) cutDecision(eng *policy.Engine, since []*Ruleset, e netutil.ConntrackEntry, mac net.HardwareAddr, now time.Time) {
	k := keyOf(e)
	in := policy.Input{Client: k.client, ClientMAC: mac, Dest: k.dst, Port: k.port, Proto: k.proto, Now: now}
	d := policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce}
	if eng != nil {
		d = eng.Decide(in)
		if d.Allowed() {
			// The forward chain refused what a rule names: the guarded
			// ranges (a "*" or wide CIDR rule), or a client matched by
			// MAC whose MAC the neighbour table does not know.
			reason := policy.ReasonClient
			if _, ok := eng.SpecialRange(k.dst, nil, nil); ok {
				reason = "special-range"
			}
			d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: d.Mode}
		}
	}
	ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceFirewall, Time: now,
		Client: k.client, ClientPort: e.Orig.Src.Port(), Dest: e.Orig.Dst.Addr().Unmap(), DestPort: e.Orig.Dst.Port(),
		Proto: k.proto.String(), Close: closeRevoked}
	if e.Proto == unix.IPPROTO_ICMPV6 {
		ev.Proto = "ipv6-icmp" // as capture names it
	}
	ev.Stamp(d)
	// The rule it ran under: its tag's in the newest ruleset before this
	// one that has the tag (since ends with this one).
	prev := ""
	for i := len(since) - 2; i >= 0; i-- {
		if e.Mark&since[i].mark.enforced == 0 {
			continue
		}
		if frs := since[i].byTag[since[i].mark.tagOf(e.Mark)]; len(frs) > 0 {
			prev = frs[0].name
			break
		}
	}
	var buf [audit.FlowAttrsMax + 2]slog.Attr
	attrs := append(ev.AppendFlowAttrs(buf[:0]), slog.Int(audit.LogClientPort, int(ev.ClientPort)), slog.String(audit.LogPrevRule, prev))
	f.log.LogAttrs(context.Background(), slog.LevelWarn, "firewall: flow cut, the policy no longer allows it", attrs...)
	f.sink.Emit(ev)
}
