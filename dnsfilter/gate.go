package dnsfilter

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/miekg/dns"

	"egressd/policy"
)

// Firewall is a packet filter that lets a client reach an address only
// once our DNS has given it out for a rule that allows the client there
// (in egressd, firewall/'s learned nftables sets: UDP, and TCP ports the
// proxy does not see). cmd/egressd wires it; dnsfilter does not import it.
//
// An allowed answer is not written to the client before Learn has
// returned for its addresses, so that the client's first packet, sent as
// soon as the answer arrives, finds them in the firewall. The wait is
// bounded by Config.LearnTimeout: a slow firewall delays answers by at
// most that much, never drops them.
type Firewall interface {
	// Wants reports whether the addresses of answers allowed by the rule
	// must reach the firewall first. It is asked on every allowed answer
	// (cache hits too), so it must be cheap and must not allocate; false
	// means Learn is not called for that answer.
	Wants(rule string) bool
	// WantsAny reports whether Wants may be true for some rule (false: no
	// firewall installed, or none of its rules needs learned addresses),
	// so that answers need not look for such rules. Cheap, as Wants.
	WantsAny() bool
	// Learn puts the addresses into the firewall and returns once they
	// are there (nil), or when ctx is done (its error), or with the
	// firewall's error. Expires is when the client may stop using an
	// address: its TTL, plus the second that TTLs on the wire round down
	// to. eng is the policy the answers were decided under: a reload may
	// have gone in (or been refused) since the query started, and the
	// firewall must not put an address into the set of a rule of the
	// same name that does not allow it (an error then). After a nil
	// return for a cached answer, dnsfilter does not call Learn again for
	// it while the policy engine (the Store's) stays the same: the
	// firewall must keep each address until its Expires. After an error
	// of Unreachable refusals only, the same holds for the addresses it
	// took, and the refused ones are asked again after a second (gate).
	// Learn must not keep ls.
	//
	// An error does not hold the answer back (it is given, and logged
	// with firewall_learn): the addresses are in the Table already, for
	// the firewall to seed a ruleset that covers them when one goes in,
	// and the next hit asks again (after a refusal, a second later). The exception is an address the error
	// says the client cannot reach (Unreachable): in enforce mode it is
	// left out of the answer (withhold).
	Learn(ctx context.Context, eng *policy.Engine, ls []Learned) error
}

// Unreachable is implemented by the errors of Firewall.Learn (anywhere in
// the tree errors.Join and %w make: refusals) that refuse one address to one rule
// for good, not for a moment: in egressd, firewall.SetFullError, a
// learned set full of live addresses. ok is false when the refusal does
// not keep the client from the address (audit mode: nothing is dropped;
// the firewall's installed rule opens it by a CIDR or "*" of its own):
// the firewall judges it with its ruleset, which after a reload may not
// be the policy the answer was decided under.
type Unreachable interface {
	error
	Unreachable() (rule, set string, addr netip.Addr, ok bool)
}

// Provisional is what an Unreachable refusal may also be: judged with a
// ruleset other than the policy the answer was decided under (in
// egressd, firewall.SetFullError during a reload, before its ruleset goes
// in or after). Its ok may change when the reload's ruleset goes in, so
// the forwarder does not remember it (fullRecheck): the next hit asks
// again.
type Provisional interface {
	Provisional() bool
}

// ClientDevices tells the device of a LAN client address, where a
// device's addresses share one client's limits (the rate limit). In
// egressd, cmd/egressd wires the LAN interfaces' neighbour tables
// (netutil.Devices.Device).
type ClientDevices interface {
	// ClientDevice returns the MAC address of client's device; nil when
	// it has none (a client behind a router, one the neighbour table
	// does not know yet): the address is then a client of its own. It
	// may wait briefly for the kernel: the forwarder asks only when an
	// address is new to its limiter, and again at doubling counts of its
	// queries while it has none. The caller does not modify the result.
	ClientDevice(client netip.Addr) net.HardwareAddr
}

// ClientLinks, when the ClientDevices the forwarder is given implements
// it too, tells which addresses without a device are on a LAN link. A
// device's address there has a usable neighbour entry at the gateway
// once the gateway has resolved it (ARP, NDP); one that has none is a
// source the gateway has not resolved: a device's new address before its
// first answer, or a source nobody holds (forged: UDP needs no answer).
// The rate limiter counts all such sources as one client (README, "Limits
// count a device"), asks again, as for a device, while they have none,
// and asks the gateway to resolve one whose query it drops. An address off the links (behind a router) stays a client of its
// own.
type ClientLinks interface {
	// ClientOnLink reports whether client is an address of a LAN link
	// (in egressd, netutil.Devices.OnLink). Asked with ClientDevice,
	// when it gave nil.
	ClientOnLink(client netip.Addr) bool
	// ResolveClient asks the gateway to resolve client, an address of a
	// LAN link without a device (ARP, NDP; in egressd,
	// netutil.Devices.Resolve), without waiting for the answer: the
	// forwarder asks when it drops such an address's query over the
	// shared limit at a doubling count, where its answer would have made
	// the gateway resolve it, so that a device's new address is not
	// held in the shared limit by forged sources. It may wait briefly
	// for the kernel; an error is the kernel's refusal.
	ResolveClient(client netip.Addr) error
}

// ClientMACs tells a LAN client's MAC address, for policies whose rules
// name clients by MAC (policy.Input.ClientMAC). In egressd, cmd/egressd
// wires the LAN interfaces' neighbour tables (netutil.Devices.MAC);
// dnsfilter does not import them.
type ClientMACs interface {
	// ClientMAC returns client's MAC address; nil when it has none (a
	// client behind a router, whose address is not on the LAN's link, or
	// one the neighbour table does not know). It may wait briefly for the
	// kernel: the forwarder asks only while the running policy names MAC
	// addresses, and never on a UDP reader (the fast path leaves such
	// queries to the general path). The caller does not modify the result.
	ClientMAC(client netip.Addr) net.HardwareAddr
}

// clientMAC returns the MAC to decide client's query with under eng: nil
// unless eng's rules name MAC addresses (nothing is looked up then).
func (s *Server) clientMAC(eng *policy.Engine, client netip.Addr) net.HardwareAddr {
	if s.macs == nil || !eng.HasMACs() {
		return nil
	}
	return s.macs.ClientMAC(client.Unmap())
}

// gateMark records that the firewall holds a cached answer's addresses for
// rules (indexes into the engine's rules), under a policy engine: later
// hits that need no other rule's set need not ask it again. refused are
// the addresses full sets refused (Unreachable), each remembered until its
// own until: hits before then withhold it without asking the firewall,
// the first hit after of a client of its rule asks again for it. A mark
// is not changed once stored.
type gateMark struct {
	eng     *policy.Engine
	rules   []int
	refused []refusal
}

// refusal is one address a rule's full learned set refused.
type refusal struct {
	rule, set string
	addr      netip.Addr
	ok        bool   // Unreachable's ok: the refusal keeps the client out
	prov      bool   // Provisional: not remembered past the query
	until     int64  // remembered until (unix nanoseconds)
	why       string // the firewall's error that refused it
}

// fullRecheck is how long a gateMark remembers a full set's refusal
// (Server.fullRecheck): see gate.
const fullRecheck = time.Second

// covers reports whether the mark holds every one of rules.
func (g *gateMark) covers(eng *policy.Engine, rules []int) bool {
	if g == nil || g.eng != eng {
		return false
	}
	for _, r := range rules {
		if !slices.Contains(g.rules, r) {
			return false
		}
	}
	return true
}

// refusal returns the mark's refusal of addr for rule.
func (g *gateMark) refusal(rule string, addr netip.Addr) (refusal, bool) {
	for _, f := range g.refused {
		if f.rule == rule && f.addr == addr {
			return f, true
		}
	}
	return refusal{}, false
}

// gateRules appends to dst the rules whose learned sets must take the
// addresses of an allowed answer for name to client: every rule that lets
// the client resolve the name and whose addresses the firewall wants. Not
// only the rule DecideName credits: with "web: *.example.com 443/tcp"
// before "ntp: time.example.com 123/udp", time.example.com is credited to
// web, whose TCP goes through the proxy, and ntp's set must still get the
// address, or enforce mode drops the UDP the policy allows.
// first is the rule DecideName credited (the lowest of them, known
// already: the name is matched once more, not twice); mac is the client's
// MAC the query was decided with (nil: none).
// other reports whether some rule that lets the client resolve the name is
// not among them: its traffic does not go through a learned set (the
// proxy's redirected TCP ports).
func (s *Server) gateRules(eng *policy.Engine, client netip.Addr, mac net.HardwareAddr, name string, now time.Time, first int, dst []int) (rules []int, other bool) {
	if !s.fw.WantsAny() {
		return dst, false
	}
	rules = eng.NameRules(policy.Input{Client: client, ClientMAC: mac, Name: name, Now: now}, first+1, append(dst, first))
	all := eng.Rules()
	out := rules[:0]
	for _, r := range rules {
		if s.fw.Wants(all[r].Name) {
			out = append(out, r)
		} else {
			other = true
		}
	}
	return out, other
}

// needsGate reports whether an allowed answer must wait for the firewall:
// it has addresses, the firewall wants those of a rule that lets the
// client resolve the name, and it has not taken them for this entry under
// this engine already. It does not allocate.
func (s *Server) needsGate(e *entry, eng *policy.Engine, dec policy.Decision, client netip.Addr, mac net.HardwareAddr, now time.Time) bool {
	if s.fw == nil || len(e.addrs) == 0 {
		return false
	}
	var buf [8]int
	rules, _ := s.gateRules(eng, client.Unmap(), mac, e.name, now, dec.RuleIndex, buf[:0])
	if len(rules) == 0 {
		return false
	}
	g := e.gate.Load()
	return !g.covers(eng, rules) || len(g.refused) > 0
}

// gate hands the addresses of an allowed answer to the firewall, for every
// rule that needs them (gateRules), and waits, at most LearnTimeout, until
// it has them. It runs before the answer is written, on a goroutine of its
// own query (never a UDP reader).
//
// A full set's refusal is remembered on the entry for fullRecheck: the
// hits meanwhile withhold the same addresses without asking the firewall
// (a client hammering the name took its lock and wrote a warning each
// time), and the first hit after asks again for the refused addresses
// only, as the firewall keeps the others until they expire. A set gains
// room only as its live addresses expire (or a reload, a new engine, asks
// everything again): a stale refusal withholds an address that fits now
// for at most fullRecheck. The line of a refusal is a warning once per
// set and fullRecheck (Server.fullWarned), the others at info level.
func (s *Server) gate(q *query, e *entry, now int64) {
	if !s.needsGate(e, q.eng, q.dec, q.client.Addr(), q.mac, q.start) {
		return
	}
	p := s.planGate(q, e, now)
	if len(p.ls) == 0 {
		return
	}
	err := s.learnAsked(q.eng, p.ask)
	why := p.why(err)
	asked, only := refusals(err)
	p.stamp(asked, why, s.fullRecheck)
	refused := append(p.refused, asked...)
	if s.markGate(q.eng, e, p, asked, err, only) {
		why = "timeout"
	}
	if len(refused) == 0 && err == nil {
		return
	}
	s.reportGate(q, p, refused, why, err, only, len(asked) > 0)
}

// gatePlan is what gate hands the firewall for one answer, and what it
// does not ask again (planGate).
type gatePlan struct {
	rules []int // the rules that need the addresses (gateRules)
	other bool  // some rule that lets the client resolve the name needs none
	// old is the entry's mark under the query's engine (nil: none, or
	// one under another engine).
	old   *gateMark
	clock int64 // the server's clock (unix ns): refusals' until
	// ls are the answer's live addresses for each of rules; ask those of
	// them the firewall is asked for: all of a rule old does not hold,
	// and the refusals of old whose interval is over.
	ls, ask []Learned
	// refused are the refusals remembered and not asked again: each for
	// its own interval, renewed only by asking (a hit of another rule's
	// client must not keep this rule's from an address that fits now).
	refused []refusal
}

// planGate works out, for an answer that needsGate, which addresses each
// rule needs and which of them the firewall must be asked for.
func (s *Server) planGate(q *query, e *entry, now int64) gatePlan {
	client := q.client.Addr().Unmap()
	var p gatePlan
	p.rules, p.other = s.gateRules(q.eng, client, q.mac, e.name, q.start, q.dec.RuleIndex, nil)
	all := q.eng.Rules()
	p.old = e.gate.Load()
	if p.old != nil && p.old.eng != q.eng {
		p.old = nil
	}
	p.clock = s.now().UnixNano()
	p.ls = make([]Learned, 0, len(e.addrs)*len(p.rules))
	p.ask = make([]Learned, 0, len(e.addrs)*len(p.rules))
	for _, r := range p.rules {
		held := p.old != nil && slices.Contains(p.old.rules, r)
		for _, a := range e.addrs {
			if a.expires <= now {
				continue
			}
			l := Learned{Client: client, ClientMAC: q.mac, Name: e.name, Addr: a.addr, Rule: all[r].Name,
				Expires: time.Unix(0, a.expires).Add(time.Second)}
			p.ls = append(p.ls, l)
			if !held {
				p.ask = append(p.ask, l)
			} else if f, ok := p.old.refusal(l.Rule, l.Addr.Unmap()); ok {
				if p.clock >= f.until {
					p.ask = append(p.ask, l)
				} else {
					p.refused = append(p.refused, f)
				}
			}
		}
	}
	return p
}

// learnAsked asks the firewall to learn ask (nothing when it is empty),
// waiting at most LearnTimeout, and observes how long it took.
func (s *Server) learnAsked(eng *policy.Engine, ask []Learned) error {
	if len(ask) == 0 {
		return nil
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(s.baseCtx, s.cfg.LearnTimeout)
	err := s.fw.Learn(ctx, eng, ask)
	cancel()
	s.m.learnDuration.Observe(time.Since(start).Seconds())
	return err
}

// why is the firewall's error the query's line gives: err's, or else the
// first remembered refusal's ("" when there is neither).
func (p *gatePlan) why(err error) string {
	if err != nil {
		return err.Error()
	}
	if len(p.refused) > 0 {
		return p.refused[0].why
	}
	return ""
}

// stamp gives the refusals the firewall just made their interval and
// error: remembered for recheck, a Provisional one not at all (judged
// with another ruleset than the query's, a reload: the next hit asks
// again).
func (p *gatePlan) stamp(asked []refusal, why string, recheck time.Duration) {
	for i := range asked {
		asked[i].until, asked[i].why = p.clock+int64(recheck), why
		if asked[i].prov {
			asked[i].until = p.clock
		}
	}
}

// markGate counts the firewall's answer to p.ask and, when it took them
// (err nil, or full sets' refusals only), stores the entry's new mark. It
// reports whether the firewall timed out.
func (s *Server) markGate(eng *policy.Engine, e *entry, p gatePlan, asked []refusal, err error, only bool) (timeout bool) {
	switch {
	case len(p.ask) == 0:
		// All remembered: nothing asked, the mark stays.
	case err == nil || only:
		if err == nil {
			s.m.learnOK.Inc()
		} else {
			s.m.learnError.Inc()
		}
		e.gate.Store(p.mark(eng, asked))
	case errors.Is(err, context.DeadlineExceeded):
		s.m.learnTimeout.Inc()
		return true
	default:
		s.m.learnError.Inc()
	}
	return false
}

// mark is the entry's mark once the firewall took p.ask, refusing asked:
// it keeps what an earlier mark under this engine held too, as clients of
// other groups may need other rules, and their refusals (as they were:
// not asked again, not renewed).
func (p *gatePlan) mark(eng *policy.Engine, asked []refusal) *gateMark {
	held, kept := slices.Clone(p.rules), slices.Clone(asked)
	if p.old != nil {
		for _, r := range p.old.rules {
			if !slices.Contains(held, r) {
				held = append(held, r)
			}
		}
		for _, f := range p.old.refused {
			if !slices.ContainsFunc(p.ask, func(l Learned) bool { return l.Rule == f.rule && l.Addr.Unmap() == f.addr }) {
				kept = append(kept, f)
			}
		}
	}
	return &gateMark{eng: eng, rules: held, refused: kept}
}

// reportGate puts on q what the firewall's answer means for the query's
// line and answer: why (fwErr), whether a full set's refusal is a
// warning (quietFull; fresh: the firewall made one just now) and, in
// enforce mode when no other rule's path covers the name, the addresses
// withheld (withhold).
func (s *Server) reportGate(q *query, p gatePlan, refused []refusal, why string, err error, only, fresh bool) {
	q.fwErr = why
	if len(refused) > 0 && (err == nil || only) {
		q.quietFull = !s.warnFull(q.eng, refused, p.clock, fresh)
	}
	// A timeout too: the firewall's error joins the refusals it made
	// before waiting on the addresses it was still writing.
	if !p.other && q.dec.Mode == policy.ModeEnforce {
		s.withhold(q, p.ls, p.rules, refused)
	}
}

// refusals returns the full sets' refusals in err's tree (eachUnreachable)
// and whether err is nothing else.
func refusals(err error) (out []refusal, only bool) {
	only = err != nil
	var walk func(error)
	walk = func(err error) {
		switch x := err.(type) {
		case nil:
		case Unreachable:
			rule, set, a, ok := x.Unreachable()
			p, _ := x.(Provisional)
			out = append(out, refusal{rule: rule, set: set, addr: a.Unmap(), ok: ok, prov: p != nil && p.Provisional()})
		case interface{ Unwrap() []error }:
			for _, e := range x.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			walk(x.Unwrap())
		default:
			only = false
		}
	}
	walk(err)
	return out, only
}

// warnFull reports whether the line of a query whose answer full sets
// refused is a warning: the first for one of the sets in fullRecheck,
// counted from a refusal the firewall made (fresh), not one remembered,
// and the first under a new running policy: a reload asks the firewall
// everything again (gate), and forgets the sets warned of, so that the
// map holds those of the running policy's rules, two sets a rule (and
// those of queries still decided under the last one), whatever the
// reloads before named (TestSetFullWarnedReload). eng is the policy the
// query was decided under.
func (s *Server) warnFull(eng *policy.Engine, refused []refusal, now int64, fresh bool) bool {
	s.fullMu.Lock()
	defer s.fullMu.Unlock()
	if s.fullWarned == nil {
		s.fullWarned = map[string]int64{}
	}
	if eng != s.fullEng && eng == s.pol.Load() {
		clear(s.fullWarned)
		s.fullEng = eng
	}
	warn := false
	for _, f := range refused {
		k := f.rule + "/" + f.set
		if last, ok := s.fullWarned[k]; !ok || now-last >= int64(s.fullRecheck) {
			if !fresh {
				continue
			}
			s.fullWarned[k] = now
			warn = true
		}
	}
	// Forget the sets not warned of in a while, once there are many: the
	// keys are the firewall's rule/set pairs (two sets a rule), so past a
	// reload's clear the map holds at most 64 or the sets that refused
	// in the last interval, whatever names clients ask.
	if len(s.fullWarned) > 64 {
		for k, last := range s.fullWarned {
			if now-last >= int64(s.fullRecheck) {
				delete(s.fullWarned, k)
			}
		}
	}
	return warn
}

// withhold finds the addresses of ls that the client cannot reach: every
// one of rules (the rules that need them, indexes into q.eng's) refused
// them for good (Unreachable with ok: the firewall's installed rule opens
// them by no CIDR or "*" of its own, whose accept lets the client out
// whatever the learned set took), and no other rule's path (the proxy)
// covers the name. It sets q.withheld, q.fullSets and
// q.servfail (no address of ls is left), and q.enforced when it leaves
// one out. The set keeps its live
// addresses: evicting one would cut a client answered with it, to serve
// this one.
func (s *Server) withhold(q *query, ls []Learned, rules []int, refused []refusal) {
	// Rules that refused each address, each once: an answer that repeats
	// an address is refused as often, and its count is not of rules.
	type ruleAddr struct {
		rule string
		addr netip.Addr
	}
	seen := map[ruleAddr]bool{}
	count := map[netip.Addr]int{}
	for _, f := range refused {
		// A refusal that keeps the client from nothing (ok false: audit
		// mode, or the installed rule's CIDR or "*" opens the address,
		// as the firewall judges it with its own ruleset) is not counted.
		if k := (ruleAddr{f.rule, f.addr}); f.ok && !seen[k] {
			seen[k] = true
			count[k.addr]++
		}
		if k := f.rule + "/" + f.set; !slices.Contains(q.fullSets, k) {
			q.fullSets = append(q.fullSets, k)
		}
	}
	left := false
	for _, l := range ls {
		a := l.Addr.Unmap()
		switch {
		case count[a] < len(rules):
			left = true
		case !slices.Contains(q.withheld, a):
			q.withheld = append(q.withheld, a)
		}
	}
	q.servfail = !left && len(q.withheld) > 0
	// Enforcement changed the answer (trimmed, or SERVFAIL): the event
	// and line say so, under the allow verdict the policy gave. The
	// report counts the query as its rule's all the same.
	q.enforced = q.enforced || len(q.withheld) > 0
}

// withholdAnswer leaves q.withheld out of the rendered answer wire, or
// answers SERVFAIL when none of the answer's learned addresses is left,
// or when wire does not unpack (or the trimmed answer does not pack):
// passed on whole it would give the client what it cannot reach, and
// nothing at all would leave it waiting out its timeout; q.err says why,
// on the canonical line. req may be nil: the answer's question and ID are
// then the query's (query.request).
func (s *Server) withholdAnswer(q *query, req *dns.Msg, wire []byte) []byte {
	if s.withheldWire != nil {
		wire = s.withheldWire(wire)
	}
	m := new(dns.Msg)
	if err := m.Unpack(wire); err != nil {
		q.err = fmt.Errorf("dnsfilter: answer for %s does not unpack to withhold %s: %w", q.name, joinAddrs(q.withheld), err)
		return s.withheldServfail(q, req)
	}
	if q.servfail {
		return s.withheldServfail(q, req)
	}
	kept := m.Answer[:0]
	for _, rr := range m.Answer {
		if a := rrAddr(rr); !a.IsValid() || !slices.Contains(q.withheld, a) {
			kept = append(kept, rr)
		}
	}
	m.Answer = kept
	// The RRset left is not the one the zone signed (an RRSIG over it
	// no longer verifies): AD would vouch for it (RFC 4035 §3.2.3).
	m.AuthenticatedData = false
	m.Compress = true
	out, err := m.Pack()
	if err != nil {
		q.err = fmt.Errorf("dnsfilter: answer for %s does not pack without %s: %w", q.name, joinAddrs(q.withheld), err)
		return s.withheldServfail(q, req)
	}
	s.m.setFullTrimmed.Inc()
	return out
}

// withheldServfail is the SERVFAIL of an answer whose addresses full
// learned sets refused (withholdAnswer), counted. It keeps the query's
// path (cache, upstream): the answer came that way, and its time in
// query_duration_seconds includes the exchange and the firewall's wait.
func (s *Server) withheldServfail(q *query, req *dns.Msg) []byte {
	s.m.setFullServfail.Inc()
	if req == nil {
		req = q.request()
	}
	path := q.path
	out := s.local(q, req, dns.RcodeServerFailure, dns.ExtendedErrorCodeOther, "egressd: firewall learned set full")
	q.path = path
	return out
}

// request is the query as local answers it when it was not unpacked (the
// UDP fast path's): its ID, RD and CD bits, and its question, the name as
// the client spelled it.
func (q *query) request() *dns.Msg {
	m := new(dns.Msg)
	m.Id, m.RecursionDesired, m.CheckingDisabled = q.id, q.rd, q.cd
	name, _, err := dns.UnpackDomainName(q.qnameW, 0)
	if err != nil {
		name = dns.Fqdn(q.name)
	}
	m.Question = []dns.Question{{Name: name, Qtype: q.qtype, Qclass: dns.ClassINET}}
	return m
}

// joinAddrs is addrs as text, comma-separated.
func joinAddrs(addrs []netip.Addr) string {
	b := make([]byte, 0, 16*len(addrs))
	for i, a := range addrs {
		if i > 0 {
			b = append(b, ',')
		}
		b = a.AppendTo(b)
	}
	return string(b)
}
