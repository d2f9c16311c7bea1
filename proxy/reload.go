package proxy

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// A policy reload reaches the connections the proxy already forwards.
// Tunnels have no idle timeout and live for days, so a rule removed or
// narrowed, or a switch from audit to enforce, would otherwise leave every
// tunnel it no longer allows running under the decision it got at its
// start. Each forwarded connection is registered as a liveConn with what
// it was decided on (client, original destination, port, protocol, the
// name and how it was found, the path or its absence); after a reload the
// daemon calls Redecide, which decides each one again under the new
// engine:
//
//   - allowed: untouched (no byte lost, the record keeps its decision),
//     but for a would-be deny of audit mode (the record says enforce
//     would drop it: denied at its start in audit mode, or by a former
//     reload's re-decision): the record becomes the new allow, crediting
//     the rule (the rule egressd report --suggest proposed, added; or a
//     rule a former reload removed, put back), as capture credits its
//     flows (capture/reload.go), with an info line. The report after the
//     reload says what enforce would drop now: OpenFlows lists the
//     connection under the rule, its event at close says the allow. A
//     deny enforced is not taken back: that connection was closed;
//   - denied in enforce mode: both sides are closed, the record says the
//     new decision and close "policy-revoked", a warning line is logged
//     and egress_proxy_reload_revoked_total{mode="enforce"} counts it;
//   - denied in audit mode: nothing is closed; the record gets the new
//     decision (a deny, not enforced), so the report counts the flow as
//     one enforce would drop, an info line is logged and
//     egress_proxy_reload_revoked_total{mode="audit"} counts it (the line
//     and the count only when it was allowed before: a connection denied
//     all along is news at no reload). A later reload that allows it
//     again takes it back (above).
//
// The spoof check (THREATS.md A2) is not made again for a connection whose
// destination was vouched for its name at the start: that was a fact about
// the name and the address when the connection opened, and a reload changes
// rules, not DNS history. Looking it up again would cut a legitimate tunnel
// only because the answer that vouched for it has expired, or the name's
// addresses rotated since (a CDN: the false positive of THREATS.md A3,
// which remembering the client's own answers avoids at the start). A
// DNS-learned name counts likewise.
// A connection that was not vouched for (denied, or an audit-mode
// sni-mismatch) is checked on local facts only: a CIDR rule that allows
// its address, or our DNS having given the address out to this client
// for a name the same rule allows; never a fresh lookup. The walk runs
// on the daemon's main loop, which handles SIGTERM too, and such
// connections are the client's to make (thousands of random names under
// an allowed wildcard, each lookup waiting up to the lookup timeout on a
// resolver that does not answer): a lookup each would let one client hold
// reloads and the shutdown for hours. What it changes: one a fresh lookup
// would now vouch for stays denied sni-mismatch (audit: recorded as one
// enforce would drop; a switch to enforce closes it, where a new
// connection to the address would be looked up, and may be allowed).
//
// A verdict that does not say what it was made on (decidedBy's zero
// value) is denied, reason reload-undecidable: a bug fails closed.
//
// What each kind is decided on: a tunnel (spliced or CONNECT) on its
// start; an inspected connection at host level; a transparent plain-HTTP
// connection on its latest request (httpUpstream.latestAgain; inspected,
// at host level: inspectedRequest); a plain
// request of the explicit proxy on itself, from its forward until its
// response has been relayed (explicitRoundTrip: a WebSocket upgrade lives
// as long as a tunnel).
//
// Rules are decided at the time of the re-decision, so a rule that expired
// since the connection opened no longer allows it either. A TLS connection
// spliced at its start whose host the new policy allows only by host/path
// rules (--inspect) is denied path-unseen: a new one would be inspected,
// this one's paths are not seen.
//
// Race-free order: Redecide publishes the new engine (current), counts a
// generation, then walks the live set. A connection notes the generation
// before it loads the engine it is decided with (policyNow); registered
// after a Redecide began since, it is decided again by addLive itself
// (the walk may have missed it), else the walk finds it. One decided with
// a new engine the daemon has swapped in but not yet announced is not
// decided again under the old one. A reload refused before the swap
// never calls Redecide: nothing changes. One the firewall refuses after
// the swap swaps the running engine back and calls Redecide: connections
// decided under the refused engine meanwhile are decided again under the
// running one.
type liveConn struct {
	// decide decides the connection again under an engine; immutable.
	decide func(eng *policy.Engine) policy.Decision
	// close closes both sides; immutable.
	close func()
	// flow is the record as registered, for the log line and OpenFlows,
	// read under mu. A copy (addLive), or, for a tunnel (addLiveShared),
	// the record itself while the connection lives: an idle tunnel then
	// holds one record, not two (about 600 bytes each). The record's
	// owner writes it again only after endLive, which swaps a copy in
	// first (shared false from then on).
	flow   *audit.Event
	shared bool

	mu      sync.Mutex // guards following
	eng     *policy.Engine
	ended   bool
	allowed bool // the last decision (at the start, then each re-decision) allowed it
	revoked bool // closed by a re-decision
	// redecided is the decision the record takes from a re-decision, if
	// any: the last deny one made, or the allow that took back a
	// would-be deny of audit mode since.
	redecided *policy.Decision
}

// addLive registers a forwarded connection, f's, decided under eng;
// decide decides it again, close closes both its sides. The caller ends
// it with endLive once the connection is over, and finish takes it out of
// the live set once its event is emitted (unlist).
func (p *Proxy) addLive(at policyAt, f *flowRecord, decide func(*policy.Engine) policy.Decision, close func()) *liveConn {
	ev := f.ev
	return p.register(at, f, &ev, false, decide, close)
}

// addLiveShared is addLive for a connection whose record nobody writes
// from the registration until the caller's endLive (a tunnel: its
// record is written once both directions ended): the live set reads the
// record itself, not a copy of it, until then.
func (p *Proxy) addLiveShared(at policyAt, f *flowRecord, decide func(*policy.Engine) policy.Decision, close func()) *liveConn {
	return p.register(at, f, &f.ev, true, decide, close)
}

func (p *Proxy) register(at policyAt, f *flowRecord, flow *audit.Event, shared bool, decide func(*policy.Engine) policy.Decision, close func()) *liveConn {
	lc := &liveConn{decide: decide, close: close, flow: flow, shared: shared, eng: at.eng, allowed: flow.Verdict == policy.Allow}
	f.lc = lc
	p.live.Store(lc, struct{}{})
	if p.gen.Load() != at.gen {
		// A Redecide began between the decision and the Store above: its
		// walk may have missed lc.
		p.redecideOne(lc)
	}
	return lc
}

// policyAt is the engine a connection is decided with and the Redecide
// generation when it was loaded.
type policyAt struct {
	eng *policy.Engine
	gen uint64
}

// policyNow loads the engine to decide a new connection with.
func (p *Proxy) policyNow() policyAt {
	gen := p.gen.Load() // before the engine: see liveConn
	return policyAt{eng: p.deps.Policy.Load(), gen: gen}
}

// endLive ends lc: no re-decision reaches it after (it stays in the
// live set, listed open, until its event is emitted: unlist). It returns
// the decision the record takes from the re-decisions (nil if none:
// liveConn.redecided) and whether the proxy closed the connection for
// it. The caller stamps its record with them. A record shared with the
// live set (addLiveShared) is the caller's to write again once endLive
// returned (a copy stays listed open until unlist); a second call only
// reads the outcome.
func (p *Proxy) endLive(lc *liveConn) (*policy.Decision, bool) {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	lc.ended = true
	if lc.shared {
		ev := *lc.flow
		lc.flow, lc.shared = &ev, false
	}
	return lc.redecided, lc.revoked
}

// unlist takes f's connection out of the live set, once its event is
// emitted (finish): a report that lists the open connections (OpenFlows)
// and then takes in the events emitted before (the journal's Sync) finds
// each connection in one or the other.
func (p *Proxy) unlist(f *flowRecord) {
	if f.lc != nil {
		p.live.Delete(f.lc)
		f.lc = nil
	}
}

// OpenFlows returns an event (no close reason, no bytes) for each
// connection the proxy forwards whose event it has not emitted yet: the
// proxy emits a connection's event when it closes, and a tunnel lives for
// days. Each is the record as decided at its start (client, original or
// dialled destination, port, name and how it was found, rule, verdict),
// with the deny of the last re-decision after a reload if one denied it,
// or the allow of one that took back a would-be deny (liveConn), as its
// event will say. The live report counts them
// (audit.Ledger.SetOpenFlows); nothing is emitted.
func (p *Proxy) OpenFlows() []audit.Event {
	var evs []audit.Event
	p.live.Range(func(k, _ any) bool {
		lc := k.(*liveConn)
		lc.mu.Lock()
		ev := *lc.flow
		if lc.redecided != nil {
			ev.Stamp(*lc.redecided)
		}
		lc.mu.Unlock()
		ev.Close, ev.BytesOut, ev.BytesIn, ev.Duration = "", 0, 0, 0
		evs = append(evs, ev)
		return true
	})
	return evs
}

// stampLive applies endLive's outcome to a connection's record.
func (p *Proxy) stampLive(lc *liveConn, ev *audit.Event) {
	d, revoked := p.endLive(lc)
	if d == nil {
		return
	}
	ev.Stamp(*d)
	if revoked {
		ev.Enforced, ev.Close = true, closeRevoked
	}
}

// Redecide decides every connection the proxy forwards again under the
// policy the store now holds: call it after a policy reload succeeded
// (the daemon does). Connections the policy denies are closed in enforce
// mode and recorded as would-be-denied in audit mode; a would-be deny of
// audit mode the policy allows is credited to the rule (liveConn).
func (p *Proxy) Redecide() {
	p.current.Store(p.deps.Policy.Load())
	p.gen.Add(1)
	p.live.Range(func(k, _ any) bool {
		p.redecideOne(k.(*liveConn))
		return true
	})
}

// redecideAgain decides lc again under the current engine even if it was
// decided with it already: what it is decided on has changed since
// (httpUpstream.request).
func (p *Proxy) redecideAgain(lc *liveConn) {
	lc.mu.Lock()
	lc.eng = nil
	lc.mu.Unlock()
	p.redecideOne(lc)
}

// redecideOne decides lc again if the current engine is not the one it
// was last decided with.
func (p *Proxy) redecideOne(lc *liveConn) {
	lc.mu.Lock()
	// Loaded under the lock: one loaded before it could be older than the
	// engine a later Redecide's walk decided lc with meanwhile.
	eng := p.current.Load()
	if lc.ended || lc.revoked || eng == nil || lc.eng == eng {
		lc.mu.Unlock()
		return
	}
	lc.eng = eng
	ev := *lc.flow // the record is the owner's to write once ended (endLive)
	d := lc.decide(eng)
	wasAllowed := lc.allowed
	lc.allowed = d.Allowed()
	if d.Allowed() {
		// The record's decision now: the last re-decision's, else the
		// start's.
		rec := ev.Verdict == policy.Deny && !ev.Enforced
		if lc.redecided != nil {
			rec = lc.redecided.Verdict == policy.Deny && lc.redecided.Mode != policy.ModeEnforce
		}
		if !rec {
			// Allowed all along, or its record is a deny enforced
			// (never live: such a connection is closed).
			lc.mu.Unlock()
			return
		}
		// A would-be deny of audit mode: the rule's now.
		lc.redecided = &d
		lc.mu.Unlock()
		ev.Stamp(d)
		p.log.LogAttrs(context.Background(), slog.LevelInfo, "policy reload: the new policy allows this open connection (a would-be deny until now)", ev.AppendFlowAttrs(nil)...)
		return
	}
	lc.redecided = &d
	enforce := d.Mode == policy.ModeEnforce
	lc.revoked = enforce
	lc.mu.Unlock()
	if !enforce && !wasAllowed {
		// Audit mode, denied before too: recorded (the last deny), but no
		// news for the log or the counter at every reload.
		return
	}
	ev.Stamp(d)
	attrs := ev.AppendFlowAttrs(nil)
	if enforce {
		lc.close()
		p.met.revokedEnforce.Inc()
		p.log.LogAttrs(context.Background(), slog.LevelWarn, "policy reload: connection closed, the new policy denies it", attrs...)
		return
	}
	p.met.revokedAudit.Inc()
	p.log.LogAttrs(context.Background(), slog.LevelInfo, "policy reload: the new policy would deny this open connection (audit mode: kept)", attrs...)
}

// again decides the connection v was decided for again under eng (a
// reload), from the facts v kept: see liveConn for what is and is not
// looked up again.
func (p *Proxy) again(eng *policy.Engine, v verdict) policy.Decision {
	in := p.withMAC(eng, v.in)
	in.Now = time.Now()
	var nv verdict
	switch v.how {
	case byName:
		// Never a lookup: a reload decides on local facts only (liveConn).
		how := vouchLocal
		if v.vouched {
			how = vouchDone
		}
		nv = p.decideNameVouched(context.Background(), eng, in, v.src, how)
	case byAddr:
		known := ""
		if v.src == audit.NameDNSLearned {
			known = v.name
		}
		nv = p.decideAddrKnown(eng, in, v.src, known)
	case byBytes: // no rule changes it
		if v.d.Allowed() {
			d := v.d
			d.Mode = eng.Mode()
			return d
		}
		return denyDecision(eng, v.d.Reason)
	default: // byUnknown: fails closed
		return denyDecision(eng, ReasonUndecidable)
	}
	if nv.d.Allowed() && nv.inspect && !v.inspect && in.Path == "" && !in.NoPath {
		// Spliced at its start, now allowed only by a host/path rule
		// (--inspect): a new connection would be inspected, each request
		// decided on its path; this one's paths are not seen.
		return denyDecision(eng, policy.ReasonPathUnseen)
	}
	if nv.d.Allowed() && in.Path != "" {
		// Plain HTTP (decideHTTP): the path's form, as at the start.
		hin := in
		hin.Name = nv.name
		if d := eng.PathForm(hin, in.Path, nv.d); !d.Allowed() {
			return d
		}
	}
	return nv.d
}

// hostLevel is v without the path it was decided with: an inspected
// connection is decided again at host level (host/path rules allow its
// host); its requests are each decided on their paths.
func hostLevel(v verdict) verdict {
	v.in.Path = ""
	return v
}

// closeBoth closes a connection's two sides.
func closeBoth(a, b net.Conn) func() {
	return func() {
		a.Close()
		b.Close()
	}
}
