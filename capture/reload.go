package capture

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"time"

	"egressd/audit"
	"egressd/internal/logjson"
	"egressd/policy"
)

// A policy reload reaches the flows capture follows, as it reaches the
// proxy's connections (proxy/reload.go), in two ways:
//
//   - Revoke: in enforce mode the firewall cuts the forwarded flows the
//     new policy no longer allows (firewall/sweep.go) and reports each as
//     an event, which egressd run hands to Revoke. Capture stamps the cut
//     on its own record of the flow: the flow's decision becomes the
//     firewall's (a deny, enforced, its reason), its events close
//     "policy-revoked", and an event goes out at once with the flow's
//     start, name and bytes (the ledger re-attributes a flow capture
//     reported allowed while open: audit.Ledger, redecided). The flow
//     stays in the table: the client's next packets, which the firewall
//     drops, are the same flow, not a new drop. The firewall's line is the
//     cut's canonical line; capture logs none. A flow capture does not
//     follow (it began before capture started, or it is the gateway's
//     own) gets the firewall's event as it came, so the cut is in the
//     report either way, and once.
//   - Redecide (after a reload succeeded): capture judges its live
//     forwarded flows (UDP but DNS, TCP to ports not redirected:
//     decideForwarded; flows of other protocols, other.go: an echo by
//     address with the protocol icmp, any other denied whatever the
//     rules) again where nothing else does.
//     In audit mode nothing is cut, but a flow the new policy would
//     deny (as the firewall's sweep decides it: the rule of its mark,
//     which must still allow the name its address was learned for and,
//     compared with the policy before the reload (Redecide's prev), be
//     unchanged or keep all its names, however long ago the answer
//     expired (keptByMark); else by address,
//     a CIDR rule or the answers live now) gets that would-be deny, as the proxy's
//     connections do in audit mode: one info line and an event at once, so the report
//     counts the flow as one enforce would now drop; its later events
//     carry the deny. A would-be deny the new policy allows (the rule
//     --suggest proposed, added in audit mode; or a rule a former reload
//     removed, put back) becomes the rule's, with an info line and an
//     event at once, as after the reload to enforce below (the ledger
//     moves it: audit.Ledger, recredited): the report after the reload
//     says what enforce would drop now. (The proxy credits its
//     connections likewise: proxy/reload.go.) A flow opened in audit mode and live after a
//     reload to enforce has no mark of the enforce ruleset
//     (firewall.CTMarkEnforced): its next packets meet the forward chain
//     as a new connection's, judged by address with the learned sets of
//     now, and are dropped unless a rule admits them. Those sets begin
//     with the addresses the forwarder gave out (in audit mode too) for
//     the names their enforce rules let the asker resolve, for as long as
//     the firewall would have kept them (firewall/seed.go): such a flow
//     goes on where a CIDR rule admits its address or the forwarder's
//     answer would have fed a rule's set (seeded), not where only an
//     answer of another resolver seen on the wire would. Capture decides
//     it so: denied, its record becomes a drop enforced (the rules'
//     reason where no rule would admit it at all, protocol-not-allowed
//     for another protocol but an echo; opened-before-enforce
//     where only a wire answer would, and for a TCP connection to a
//     redirected port, which the chain drops without --tcp-ports, as
//     beforeEnforce decides one still unnamed), close "policy-revoked",
//     with a warning line; allowed where capture had decided it a
//     would-be deny in audit mode (a name no rule allowed, for which the
//     enforce policy adds one), its record becomes the rule's, with an
//     info line and an event at once (the ledger moves the flow there:
//     audit.Ledger, recredited). Flows
//     opened in enforce mode are left to the firewall (its cut reports
//     them, above): the firewall keeps a flow whose rule is unchanged
//     whatever its learned addresses became, which capture cannot tell
//     from here. In audit mode capture also judges again the TCP
//     connections to redirected ports it decided by name (SNI, Host) or
//     by address and the names DNS gave it out for (no-sni), which pass
//     no proxy there: on the facts it kept of their decision (rejudge),
//     a would-be deny the new policy allows is credited to the rule, an
//     allow it denies becomes a would-be deny, as for a forwarded flow.
//     Those it denied for what the client sent (a malformed hello,
//     duplicate-sni, hello-timeout) stay denied, and one whose path was
//     clipped is judged on the start kept, or keeps its record where that
//     cannot tell (rejudge). A flow opened in audit mode that the reload
//     to enforce judged (enforceJudged) is judged again so by a later
//     reload back to audit mode. In enforce
//     mode such connections are the proxy's, which decides them again
//     itself.
//
// Both run in the packet goroutine (Run, or ReadFile's): Revoke and
// Redecide only queue, with the time of the call, and the pipeline applies
// what was queued once its packet time has reached that time, or ringLag
// after it when no packet comes. The kernel hands packets over a block
// at a time (live.go), so a flow's first packets may still be in the ring
// when the firewall cuts it: applied at once, the cut would find no flow.
// A cut that finds none still waits for it, up to revokeWait, before the
// firewall's event is passed on as it came.

// maxRevokes bounds the queued revocations; beyond, the firewall's event
// goes to the sink as it came.
const maxRevokes = 65536

// pendingOp is a queued Revoke (ev set) or Redecide (ev nil, prev its
// policy before the reload, next the one it put in), queued at at.
type pendingOp struct {
	ev         *audit.Event
	prev, next *policy.Engine
	at         time.Time
}

// Revoke records a forwarded flow the firewall cut (its event, source
// firewall): see above. It never blocks; it implements the firewall's
// sink (audit.SinkFunc(c.Revoke)).
func (c *Capture) Revoke(ev audit.Event) {
	c.pendMu.Lock()
	if c.stopped || len(c.pending) >= maxRevokes {
		c.pendMu.Unlock()
		c.deps.Sink.Emit(ev)
		return
	}
	c.pending = append(c.pending, pendingOp{ev: &ev, at: c.clock()})
	c.hasPending.Store(true)
	c.pendMu.Unlock()
}

// Redecide judges the live forwarded flows again under the policy the
// store now holds: call it after a policy reload succeeded (egressd run
// does), with prev the policy before it (the store's Swap returns it;
// nil: unknown), whose rules the firewall's sweep compares with the new
// ones (keptByMark). The new ones are the store's at the call: a later
// reload queued before this one is applied is judged against them, as
// the sweep judges each ruleset against the one it replaced. See above.
func (c *Capture) Redecide(prev *policy.Engine) {
	next := c.deps.Policy.Load()
	c.pendMu.Lock()
	if !c.stopped {
		c.pending = append(c.pending, pendingOp{prev: prev, next: next, at: c.clock()})
		c.hasPending.Store(true)
	}
	c.pendMu.Unlock()
}

// takePending returns the operations queued up to until (all of them
// when it is zero); stop makes later Revoke calls go to the sink at once
// (Run has returned).
func (c *Capture) takePending(until time.Time, stop bool) []pendingOp {
	c.pendMu.Lock()
	defer c.pendMu.Unlock()
	n := len(c.pending)
	if !until.IsZero() {
		n = 0
		for n < len(c.pending) && !c.pending[n].at.After(until) {
			n++
		}
	}
	ops := c.pending[:n:n]
	c.pending = c.pending[n:]
	if len(c.pending) == 0 {
		c.pending = nil
		c.hasPending.Store(false)
	}
	c.stopped = c.stopped || stop
	return ops
}

// ringLag is how long after a call the queue is applied when no packet
// comes: a look at the ring that finds none does not mean the kernel
// handed over every packet before the call (a block is handed over when
// full or 64 ms after its first packet, afpacket's default). For the same
// reason Run lets packet time go on, when no packet comes, only to ringLag
// before the clock (live.go).
const ringLag = 200 * time.Millisecond

// applyPending applies what Revoke and Redecide queued up to until (all
// of it when until is zero).
func (p *proc) applyPending(until time.Time) {
	if !p.c.hasPending.Load() || !until.IsZero() && p.now.Before(p.pendingRetry) {
		return
	}
	var again []pendingOp
	for _, op := range p.c.takePending(until, false) {
		switch {
		case op.ev == nil:
			p.redecide(op.prev, op.next)
		case p.revoke(op.ev, !until.IsZero() && p.now.Sub(op.at) < revokeWait):
		default:
			again = append(again, op)
		}
	}
	if len(again) > 0 {
		// Not at every packet: a start's cuts of flows from before
		// capture ran may be many.
		p.pendingRetry = p.now.Add(revokeRetry)
		p.c.requeue(again)
	}
}

// revokeWait is how long a cut that finds no flow waits for one: the
// flow's packets may still be on their way through the ring (a loaded
// box), or its next packet, which the firewall drops, may start it here.
const (
	revokeWait  = 2 * time.Second
	revokeRetry = 100 * time.Millisecond
)

// requeue puts ops back at the head of the queue.
func (c *Capture) requeue(ops []pendingOp) {
	c.pendMu.Lock()
	defer c.pendMu.Unlock()
	if c.stopped {
		for _, op := range ops {
			c.deps.Sink.Emit(*op.ev)
		}
		return
	}
	c.pending = append(ops, c.pending...)
	c.hasPending.Store(true)
}

// dropPending hands the queued revocations to the sink as they came
// (capture stops).
func (p *proc) dropPending() {
	for _, op := range p.c.takePending(time.Time{}, true) {
		if op.ev != nil {
			p.c.deps.Sink.Emit(*op.ev)
		}
	}
}

// revoke stamps the firewall's cut ev on the flow it names. Where capture
// has no such flow it passes ev on as it came, unless wait is set: then it
// reports false and does nothing (the caller tries again).
func (p *proc) revoke(ev *audit.Event, wait bool) bool {
	f := p.flows[makeKey(ev.Client.Unmap(), ev.ClientPort, ev.Dest.Unmap(), ev.DestPort, protoNum(ev.Proto))]
	if f != nil && f.own {
		p.c.deps.Sink.Emit(*ev)
		return true
	}
	if f == nil || f.closed || f.cli.Unmap() != ev.Client.Unmap() || f.cport != ev.ClientPort {
		if wait {
			return false
		}
		p.c.deps.Sink.Emit(*ev)
		return true
	}
	if !f.decided {
		f.decided = true
		f.evName, f.evSrc = f.name, f.nameSrc
		if f.evSrc == "" {
			f.evSrc = audit.NameNone
		}
		f.inspect = false
	}
	f.dec = policy.Decision{Verdict: ev.Verdict, Rule: ev.Rule, RuleIndex: -1, Reason: ev.Reason, Mode: ev.Mode}
	f.revoked = true
	p.emitNow(f, "", 0)
	return true
}

// redecide judges the live forwarded flows again (see above); prev is the
// policy before the reload (nil: unknown), next the one it put in (nil:
// the store's now, which a later reload may have replaced since).
func (p *proc) redecide(prev, next *policy.Engine) {
	eng := p.c.deps.Policy.Load()
	inAudit := eng.Mode() == policy.ModeAudit
	for _, f := range p.flows {
		if f.closed || f.own || f.inbound || f.guarded || !f.decided || f.revoked || f.sport == 53 || f.cport == 53 {
			// A guarded flow (guard.go) is denied whatever the rules:
			// the gateway hardening drops it before any.
			continue
		}
		// A flow of another protocol (other.go) is the forward chain's:
		// an echo decided by address, any other denied whatever the
		// rules (protocolDenied).
		oth := f.proto != 6 && f.proto != 17
		fwd := f.proto == 17 || f.forwarded || oth
		switch {
		case inAudit && fwd:
			if oth && !f.echo {
				continue // denied all along, whatever the policy
			}
			in := p.flowInput(f, "")
			// As the sweep (firewall/sweep.go, keeps): the rule of the
			// flow's mark first, however long ago its answer expired;
			// else the new chain's judgement of a first packet now: a
			// CIDR rule, or a learned set live now (not the answers
			// live when the flow began: an expired one is in no set).
			d, name, src, learned := p.keptByMark(eng, prev, next, in, f)
			if !d.Allowed() {
				d, name, src, learned = p.decideForwarded(eng, in, f.name, f.nameSrc, p.now, p.now)
				d = p.special(eng, f, in, d, true)
			}
			if name == "" {
				// The name denyOther found, or the answer's the flow
				// was decided with, expired since.
				name, src = f.evName, f.evSrc
			}
			if !d.Allowed() && f.dec.Allowed() && f.learned.name != "" {
				// Recorded under the name its address was learned for,
				// the one enforce would drop the flow for: the report
				// lists its drop there, the hellos' names in
				// other_names. The forward chain reads no hello, so a
				// QUIC flow's names (its hellos', first and other)
				// neither keep it nor cut it, whichever rules allow
				// them (TestRedecideQUICLearnedName; before session 31
				// the first hello's name was judged instead).
				name, src = f.learned.name, f.learned.src
				if f.named(name) {
					src = audit.NameQUIC
				}
			}
			if d.Allowed() && f.dec.Allowed() {
				// Kept: by the rule whose tag the sweep gives its mark
				// from now on (zero: by a CIDR rule), which a later
				// reload reads.
				f.learned = learned
			}
			if d.Allowed() {
				if !f.dec.Allowed() && f.dec.Mode == policy.ModeAudit {
					// A would-be deny the new policy allows (the rule
					// --suggest proposed, added in audit mode): the
					// rule's, as after the reload to enforce.
					f.dec, f.evName, f.evSrc, f.learned = d, name, src, learned
					p.emitNow(f, "policy reload: the new policy allows this open flow (audit mode)", slog.LevelInfo)
				}
				continue
			}
			was := f.dec.Allowed()
			f.dec, f.evName, f.evSrc = d, name, src
			if was {
				p.emitNow(f, "policy reload: the new policy would deny this open flow (audit mode: kept)", slog.LevelInfo)
			}
		case inAudit && f.proto == 6 && f.ruled && f.openedInAudit:
			p.rejudge(eng, f)
		case !inAudit && f.openedInAudit && !f.enforceJudged:
			// Once: the chain's accept marks the flow, which the
			// firewall's cuts then judge at later reloads in enforce
			// mode. openedInAudit stays: a reload back to audit mode
			// judges the flow again as one opened in audit mode
			// (rejudge), as it judges it before the switch.
			f.enforceJudged = true
			var d policy.Decision
			name, src := f.evName, f.evSrc
			in := p.flowInput(f, "")
			switch {
			case oth && !f.echo:
				d = protocolDenied(eng)
			case fwd:
				d, name, src, f.learned = p.decideForwarded(eng, in, f.name, f.nameSrc, p.now, p.now)
				d = p.special(eng, f, in, d, true)
				if oth && name == "" {
					name, src = f.evName, f.evSrc
				}
			default:
				// Redirected in enforce mode, but NAT applies to a
				// connection's first packet: the forward chain judges it.
				// Only the decision is taken: the flow stays the one
				// capture decided by name (a reload back to audit mode
				// judges it so: rejudge), not one forwarded by address.
				saved, savedName, savedSrc, savedFwd := f.dec, f.evName, f.evSrc, f.forwarded
				p.decideBeforeEnforce(eng, f, f.evName, f.evSrc)
				d, name, src = f.dec, f.evName, f.evSrc
				f.dec, f.evName, f.evSrc, f.forwarded = saved, savedName, savedSrc, savedFwd
			}
			in.NoPath = false
			if d.Allowed() && !eng.Decide(in).Allowed() && !p.seeded(eng, in) {
				// Only a learned address lets it out, and not one the
				// enforce ruleset's learned sets began with: those are
				// the forwarder's answers (seeded), not the answers of
				// another resolver capture saw on the wire.
				d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonOpenedBeforeEnforce, Mode: eng.Mode()}
			}
			if d.Allowed() {
				if !f.dec.Allowed() && f.dec.Mode == policy.ModeAudit {
					// A would-be deny of audit mode the kernel now lets
					// go on (the rule the operator added for it, say):
					// the rule's, as the ledger then counts it
					// (audit.Ledger, recredited). Not a deny enforced
					// (one decided after the reload: beforeEnforce),
					// which the ledger keeps.
					f.dec, f.evName, f.evSrc = d, name, src
					p.emitNow(f, "policy reload: the enforce ruleset allows this flow opened in audit mode", slog.LevelInfo)
				}
				continue
			}
			f.dec, f.evName, f.evSrc = d, name, src
			f.revoked = true
			p.emitNow(f, "policy reload: the enforce ruleset drops this flow opened in audit mode", slog.LevelWarn)
		}
	}
}

// keptByMark reports whether the firewall's sweep would keep f, a
// forwarded flow whose mark is the rule whose learned set let it out
// (flow.learned), at a reload from prev to eng by the rule of its mark
// alone, however long ago the answer expired (firewall/sweep.go, keeps):
// that rule unchanged, or the rule of its name that kept all its old
// names (a port added, a name added, its clients changed), the test the
// sweep makes (policy.KeepsLearned, on prev's rule and eng's). That rule
// must also still let f's client reach the name its address was learned
// for, on f's port. Without prev's rule (prev unknown) the rule of the
// name is taken as keeping its names. Before session 31 any rule that
// allowed the name kept the flow, where the sweep cuts it once the
// answer expired (R31: TestRedecideLearnedRuleRemoved), and a rule that
// dropped another of its names kept it, where the sweep cuts it too
// (Q5). Where a later reload replaced next (the policy this reload put
// in) before this one is applied, the mark must also have held from prev
// to next: the sweep judged that ruleset against prev's, and the later
// reload is judged against next's (before session 31 (R35) prev was
// compared with eng alone: a rule that dropped a name, or went, and came
// back in the later reload kept the flow the sweep cut). It returns a
// deny where it does not keep f.
func (p *proc) keptByMark(eng, prev, next *policy.Engine, in policy.Input, f *flow) (policy.Decision, string, audit.NameSource, admitName) {
	no := policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Mode: eng.Mode()}
	if f.learned.name == "" || !f.dec.Allowed() {
		return no, "", "", admitName{}
	}
	nin := in
	nin.Name, nin.Path, nin.NoPath = f.learned.name, "", false
	var buf [8]int
	if next != nil && next != eng {
		// The names kept from prev to next and from prev to eng: kept
		// from next to eng too, which that later reload judges.
		r, ok := markRule(next, nin, f.learned.rule, buf[:0])
		if !ok || !keepsNames(prev, next.Rules()[r]) {
			return no, "", "", admitName{}
		}
	}
	if r, ok := markRule(eng, nin, f.learned.rule, buf[:0]); ok && keepsNames(prev, eng.Rules()[r]) {
		d := p.special(eng, f, in, policy.Decision{Verdict: policy.Allow, Rule: eng.Rules()[r].Name, RuleIndex: r, Reason: policy.ReasonAllowed, Mode: eng.Mode()}, true)
		if d.Allowed() {
			return d, f.evName, f.evSrc, f.learned
		}
	}
	return no, "", "", admitName{}
}

// markRule returns the index of eng's rule named rule that lets in (its
// Name the name a flow's address was learned for) reach that name on
// in's port; false without one.
func markRule(eng *policy.Engine, in policy.Input, rule string, buf []int) (int, bool) {
	rules := eng.Rules()
	for _, r := range eng.NameRules(in, 0, buf) {
		if rules[r].Name == rule && slices.ContainsFunc(rules[r].Ports, func(pr policy.PortRange) bool { return pr.Contains(in.Port, in.Proto) }) {
			return r, true
		}
	}
	return 0, false
}

// keepsNames reports whether now, a rule of a policy after prev, kept all
// the names prev's rule of its name had (policy.KeepsLearned); true
// without prev or without such a rule in it (unknown).
func keepsNames(prev *policy.Engine, now policy.Rule) bool {
	old, ok := ruleNamed(prev, now.Name)
	return !ok || policy.KeepsLearned(policy.LearnedNames(old), policy.LearnedNames(now))
}

// ruleNamed returns eng's rule named name; false without one (or eng).
func ruleNamed(eng *policy.Engine, name string) (policy.Rule, bool) {
	if eng == nil {
		return policy.Rule{}, false
	}
	for _, r := range eng.Rules() {
		if r.Name == name {
			return r, true
		}
	}
	return policy.Rule{}, false
}

// rejudge judges again, in audit mode, a TCP connection to a port the
// proxy takes in enforce mode, which capture decided by its name (SNI,
// Host) or, without one, by address and the names DNS gave the address
// out for (see above): on the facts of its decision, the client's name
// and how it was found (f.name, f.nameSrc), its first request's path,
// whether it showed none (f.noPath), with the rules of now, as the proxy
// decides its connections again (proxy/reload.go):
//
//   - A connection allowed until now is not checked for spoofing again
//     (vouched): its address was vouched for its name when it opened, and
//     a reload changes rules, not DNS history. The name DNS gave its
//     address out for (dns-learned, dns-answer: a connection without a
//     name of its own) still counts where a rule allows it, however long
//     ago the answer expired.
//   - A would-be deny is checked as at its start, with the answers live
//     now: a CIDR rule, the forwarder's answers to this client's device,
//     those seen on the wire (vouched); never a fresh lookup.
//   - Capture's own denials of what the client sent (duplicate-sni,
//     hello-malformed, hello-timeout, http-malformed and the like) are no
//     rule's: the connection is not judged again (f.ruled unset).
//   - A path longer than the events carry was clipped once decided
//     (boundPath): the connection is judged on the start kept
//     (policy.Input.PathCut), which decides a host/path rule whose glob
//     is a literal lead and a final '*' ("/api/*": the whole path
//     matches it where the start does) or whose lead the start does not
//     begin with, as the whole path would. Where a host/path rule the
//     start cannot decide ranks before any rule that allows, the verdict
//     is taken at host level only when that allows whatever the path (a
//     would-be deny is credited to that rule, the first that allows any
//     path); else, and for a connection allowed until now, the record
//     stays as it was: which rule, or whether any, the whole path would
//     meet is no longer known. A connection the special-range guard
//     refuses whatever rule allows it is a would-be deny all the same.
//
// A would-be deny the new policy allows is the rule's, an allow it denies
// becomes a would-be deny, each with an info line and an event at once,
// as a forwarded flow's; a deny still a deny takes the new decision
// silently (its later events carry it).
func (p *proc) rejudge(eng *policy.Engine, f *flow) {
	was := f.dec.Allowed()
	path := f.path
	if f.pathLen > 0 {
		path = strings.TrimSuffix(path, audit.TruncMark) // the start boundPath kept
	}
	in := p.flowInput(f, path)
	in.NoPath, in.PathCut = f.noPath, f.pathLen > 0
	d, name, src, _ := p.decideIn(eng, f, in, f.name, f.nameSrc, !was)
	if !d.Allowed() && was && f.name == "" && f.evName != "" {
		nin := in
		nin.Name = f.evName
		// The path as when it opened: the name does not lift path-form.
		if dd := eng.PathForm(nin, path, p.special(eng, f, nin, eng.Decide(nin), false)); dd.Allowed() {
			d, name, src = dd, f.evName, f.evSrc
		}
	}
	if d.Reason == policy.ReasonPathCut {
		// The start of the path cannot tell a host/path rule ranked
		// before any that allows: allowed whatever the path where a
		// rule allows it at host level, else only the whole path
		// could tell.
		// Where the guard refuses any allow (a guarded range no CIDR
		// rule names, the gateway's own address), the whole path does
		// not matter: a would-be deny.
		in.Path, in.PathCut = "", false
		fwd, gin := in.Proto == policy.UDP || f.forwarded, in
		if !fwd {
			gin.ClientMAC = p.lanMAC(eng, f) // as decideIn matches it
		}
		if g := p.special(eng, f, gin, policy.Decision{Verdict: policy.Allow, Mode: eng.Mode()}, fwd); !g.Allowed() {
			d = g
		} else {
			hd, hname, hsrc, _ := p.decideIn(eng.HostLevel(), f, in, f.name, f.nameSrc, !was)
			if was || !hd.Allowed() {
				return // the record stays: allowed either way, or not known
			}
			d, name, src = hd, hname, hsrc
		}
	}
	if d.Allowed() {
		if !was && f.dec.Mode == policy.ModeAudit {
			f.dec, f.evName, f.evSrc = d, name, src
			p.emitNow(f, "policy reload: the new policy allows this open flow (audit mode)", slog.LevelInfo)
		}
		return
	}
	f.dec, f.evName, f.evSrc = d, name, src
	if was {
		p.emitNow(f, "policy reload: the new policy would deny this open flow (audit mode: kept)", slog.LevelInfo)
	}
}

// seeded reports whether a learned set of the enforce ruleset admits in
// by an answer of egressd's forwarder (DNSFacts.Given, as long as the
// firewall keeps it): when the enforce ruleset goes in, the firewall
// seeds its learned sets with the answers the forwarder gave out (in
// audit mode too), for the rules of the enforce policy that let the
// asker resolve the name (firewall/seed.go), and learns later ones as it
// gives them. Answers of another resolver, which capture saw on the wire
// in audit mode, are not in them.
func (p *proc) seeded(eng *policy.Engine, in policy.Input) bool {
	if p.c.deps.DNS == nil {
		return false
	}
	in.Name, in.Path, in.NoPath = "", "", false
	for _, g := range p.c.deps.DNS.Given(in.Dest) {
		if p.learnedRule(eng, in, g) >= 0 {
			return true
		}
	}
	return false
}

// emitNow sends an event of f, still open, after a reload changed its
// decision: its first, counted as emit counts one, or an update. msg,
// when set, is the line logged for it (the firewall logged a cut's).
func (p *proc) emitNow(f *flow, msg string, level slog.Level) {
	ev := p.event(f, "")
	if f.revoked {
		ev.Close = closeRevoked
	}
	if f.reported {
		ev.Revised = true // as emit's update
		p.stats.updates.Add(1)
	} else {
		f.reported = true
		p.stats.flows.Add(1)
		if f.dec.Verdict == policy.Deny {
			p.stats.denied.Add(1)
		}
		p.c.m.flow(f.dec)
	}
	p.c.deps.Sink.Emit(ev)
	if msg == "" {
		return
	}
	ctx := context.Background()
	if p.c.log.Enabled(ctx, level) {
		var buf [audit.FlowAttrsMax]slog.Attr
		logjson.Log(ctx, p.c.log, level, msg, ev.AppendFlowAttrs(buf[:0])...)
	}
}

// closeRevoked is the close reason of a flow a reload revoked, the
// proxy's and the firewall's.
const closeRevoked = "policy-revoked"
