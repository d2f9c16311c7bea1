package dnsfilter

import (
	"context"
	"errors"
	"time"

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
	// Learn puts the addresses into the firewall and returns once they
	// are there (nil), or when ctx is done (its error), or with the
	// firewall's error. Expires is when the client may stop using an
	// address: its TTL, plus the second that TTLs on the wire round down
	// to. After a nil return for a cached answer, dnsfilter does not call
	// Learn again for it while the policy engine (the Store's) stays the
	// same: the firewall must keep each address until its Expires. Learn
	// must not keep ls.
	Learn(ctx context.Context, ls []Learned) error
}

// gateMark records that the firewall holds a cached answer's addresses for
// a rule, under a policy engine: later hits need not ask it again.
type gateMark struct {
	eng  *policy.Engine
	rule string
}

// needsGate reports whether an allowed answer must wait for the firewall:
// it has addresses, the firewall wants the rule's, and it has not taken
// them for this entry under this engine already. It does not allocate.
func (s *Server) needsGate(e *entry, eng *policy.Engine, rule string) bool {
	if s.fw == nil || len(e.addrs) == 0 {
		return false
	}
	if g := e.gate.Load(); g != nil && g.eng == eng && g.rule == rule {
		return false
	}
	return s.fw.Wants(rule)
}

// gate hands the addresses of an allowed answer to the firewall and waits,
// at most LearnTimeout, until it has them. It runs before the answer is
// written, on a goroutine of its own query (never a UDP reader).
func (s *Server) gate(q *query, e *entry, now int64) {
	if !s.needsGate(e, q.eng, q.dec.Rule) {
		return
	}
	client := q.client.Addr().Unmap()
	ls := make([]Learned, 0, len(e.addrs))
	for _, a := range e.addrs {
		if a.expires > now {
			ls = append(ls, Learned{Client: client, Name: e.name, Addr: a.addr, Rule: q.dec.Rule,
				Expires: time.Unix(0, a.expires).Add(time.Second)})
		}
	}
	if len(ls) == 0 {
		return
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(s.baseCtx, s.cfg.LearnTimeout)
	err := s.fw.Learn(ctx, ls)
	cancel()
	s.m.learnDuration.Observe(time.Since(start).Seconds())
	switch {
	case err == nil:
		s.m.learnOK.Inc()
		e.gate.Store(&gateMark{eng: q.eng, rule: q.dec.Rule})
	case errors.Is(err, context.DeadlineExceeded):
		s.m.learnTimeout.Inc()
		q.fwErr = "timeout"
	default:
		s.m.learnError.Inc()
		q.fwErr = err.Error()
	}
}
