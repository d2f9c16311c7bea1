package firewall

import (
	"iter"
	"net"
	"net/netip"
	"time"

	"egressd/policy"
)

// A rule's learned sets are fed by the DNS forwarder as it answers
// (LearnAll). A ruleset that goes into the kernel with new learned sets
// would start them empty, though the forwarder has given out addresses
// their rules cover that clients keep using without asking again (chrony
// resolves its NTP servers once, at start): the README's rollout, audit
// mode then a reload to enforce, would drop every device's NTP until it
// happens to ask again; a restart of egressd in enforce mode would do the
// same, and egressd run restores the forwarder's table from its state
// directory before Install for it. So the sets are seeded, in the
// transaction that installs the ruleset, from the answers the forwarder
// has given out (Deps.Given), as the forwarder's gate would have learned
// them: an answer's address goes into the set of every rule that lets the client
// who asked resolve the name (Engine.NameRules, the gate's gateRules),
// until the time the firewall would have kept it (Given.Until), bounded
// by Config.MaxLearned per set. Answers given in audit mode, where every
// name is answered (and learned, those no rule allowed with no rule: the
// names an operator adds at the switch), count only for the rules of the
// new policy that cover them; the addresses the forwarder's answer filter stripped (rebinding)
// are not among them, as it gave them to nobody.
//
// Seeding runs only for the rules whose sets may lack what the forwarder
// gave out (seedRules): every rule when the ruleset goes into the kernel
// (Install, or a Replace of an audit-mode ruleset), and on a Replace of
// an enforce ruleset only the rules that are new, have learned sets now
// and had none, or cover a name or client they did not (what their sets
// hold was learned for the old names and clients); a reload that changes
// none of that does not look at the forwarder's answers. A rule that
// covers fewer names or other clients than before (narrowedFrom) does not
// carry its sets over, since they are named after the rule and not the
// names: they are seeded afresh.

// Given is an answer the DNS forwarder gave out: it told Client that Name
// has Addr, and the enforce firewall, had it learned the address then,
// would keep it until Until.
type Given struct {
	Client netip.Addr
	Name   string
	Addr   netip.Addr
	Until  time.Time
}

// seedRules returns the rules of rs whose learned sets are to be seeded
// when rs replaces old (nil: nothing installed), or nil when none is.
func (rs *Ruleset) seedRules(old *Ruleset) map[string]bool {
	if !rs.inKernel || len(rs.learn) == 0 {
		return nil
	}
	var out map[string]bool
	for _, fr := range rs.flows {
		if len(fr.names) == 0 {
			continue
		}
		if old != nil && old.inKernel && !fr.learnsMore(old) {
			continue
		}
		if out == nil {
			out = map[string]bool{}
		}
		out[fr.name] = true
	}
	return out
}

// learnsMore reports whether fr's learned sets take addresses that old's
// rule of the same name did not: it had no learned sets, or fr covers
// names or clients it did not.
func (fr *flowRule) learnsMore(old *Ruleset) bool {
	if _, ok := old.learn[fr.name]; !ok {
		return true
	}
	for _, o := range old.flows {
		if o.name == fr.name && len(o.names) > 0 {
			return !policy.NamesSubset(fr.names, o.names) || !sameClients(fr.from, o.from)
		}
	}
	return true
}

// narrowedFrom returns the rules of rs whose learned sets must not carry
// over what old's rule of the same name learned: rs's rule lacks some of
// its names, or has other clients. Sets are named after rules, so an
// address learned for a name the rule no longer covers would otherwise
// stay open until its timeout. Their sets are seeded from the forwarder's
// answers instead, as for a new rule. nil: none.
func (rs *Ruleset) narrowedFrom(old *Ruleset) map[string]bool {
	if old == nil {
		return nil
	}
	var out map[string]bool
	for _, fr := range rs.flows {
		if len(fr.names) == 0 {
			continue
		}
		for _, o := range old.flows {
			if o.name == fr.name && len(o.names) > 0 && (!policy.NamesSubset(o.names, fr.names) || !sameClients(fr.from, o.from)) {
				if out == nil {
					out = map[string]bool{}
				}
				out[fr.name] = true
			}
		}
	}
	return out
}

// seedResult is what seeding found: addresses put into learned sets
// (set, address pairs not there already for as long), and those left out
// because their set was full.
type seedResult struct {
	ran          bool
	seeded, full int
	rules        map[string]bool // the rules seeded
}

// seedsFrom computes, for the rules in want, the learned addresses the
// given answers feed under eng (see the top of this file): per set, each
// address with its expiry, at most max per set together with have (the
// addresses the set holds already, carried over), answers that expire
// before now+min out. macs holds the MACs of the answers' clients, for a
// policy that names clients by MAC (macsOf); nil: none.
func (rs *Ruleset) seedsFrom(eng *policy.Engine, want map[string]bool, given []Given, macs map[netip.Addr]net.HardwareAddr, have map[string]map[netip.Addr]learnedAddr, max int, now time.Time) (map[string]map[netip.Addr]time.Time, seedResult) {
	res := seedResult{ran: true, rules: want}
	out := map[string]map[netip.Addr]time.Time{}
	rules := eng.Rules()
	var buf [8]int
	for _, g := range given {
		addr := g.Addr.Unmap()
		if !addr.IsValid() || g.Until.Sub(now) < time.Millisecond {
			continue
		}
		client := g.Client.Unmap()
		for _, r := range eng.NameRules(policy.Input{Client: client, ClientMAC: macs[client], Name: g.Name, Now: now}, 0, buf[:0]) {
			name := rules[r].Name
			if !want[name] {
				continue
			}
			sets := rs.learn[name]
			set := sets[0]
			if addr.Is6() {
				set = sets[1]
			}
			if set == "" {
				continue // no set: "*" or a /0 opens the family
			}
			if v, ok := have[set][addr]; ok && !v.exp.Before(g.Until) {
				continue // there already, for as long
			}
			m := out[set]
			if m == nil {
				m = map[netip.Addr]time.Time{}
				out[set] = m
			}
			if exp, ok := m[addr]; ok {
				if g.Until.After(exp) {
					m[addr] = g.Until
				}
				continue
			}
			if _, ok := have[set][addr]; !ok && len(m)+len(have[set]) >= max {
				res.full++
				continue
			}
			m[addr] = g.Until
			res.seeded++
		}
	}
	return out, res
}

// macsOf returns the MACs of clients (Deps.MACs), each asked once, when
// eng names clients by MAC; nil otherwise, or without Deps.MACs. It is
// called without f.mu: a lookup may wait for the kernel.
func (f *Firewall) macsOf(eng *policy.Engine, clients iter.Seq[netip.Addr]) map[netip.Addr]net.HardwareAddr {
	if f.macs == nil || eng == nil || !eng.HasMACs() {
		return nil
	}
	out := map[netip.Addr]net.HardwareAddr{}
	for c := range clients {
		c = c.Unmap()
		if _, ok := out[c]; !ok {
			out[c] = f.macs.ClientMAC(c)
		}
	}
	return out
}

// catchUp seeds rs, installed now, with the answers the forwarder gave
// out while it went in: after the snapshot seedsFrom read and before the
// forwarder's gate saw rs (Wants), an answer reaches neither. The
// forwarder records an answer in its table before it asks the gate, so
// one the gate passed over under the old ruleset is in this second look.
// It runs only after a seeding, and writes only what the first one
// lacked; it returns how many addresses it wrote.
func (f *Firewall) catchUp(eng *policy.Engine, rs *Ruleset, want map[string]bool) (int, error) {
	given := f.given()
	macs := f.macsOf(eng, func(yield func(netip.Addr) bool) {
		for _, g := range given {
			if !yield(g.Client) {
				return
			}
		}
	})
	f.mu.Lock()
	if f.rs != rs || f.closed {
		f.mu.Unlock()
		return 0, nil
	}
	now := f.now()
	added, _ := rs.seedsFrom(eng, want, given, macs, f.learned, f.cfg.maxLearned(), now)
	// A batch of its own, which a concurrent LearnAll of these addresses
	// waits for, as for the group commit's.
	b := &learnBatch{done: make(chan struct{})}
	for set, m := range added {
		s := rs.Set(set)
		if s == nil {
			continue
		}
		if f.learned[set] == nil {
			f.learned[set] = map[netip.Addr]learnedAddr{}
		}
		for a, exp := range m {
			prev, had := f.learned[set][a]
			b.ops = append(b.ops, learnOp{rs: rs, rule: s.Rule, set: set, addr: a, exp: exp, refresh: had && prev.exp.After(now), prev: prev.exp})
			f.learned[set][a] = learnedAddr{exp: exp, b: b, op: len(b.ops) - 1}
			f.noted(set, a, exp)
		}
	}
	f.mu.Unlock()
	if len(b.ops) == 0 {
		return 0, nil
	}
	err := f.writeLearned(b.ops)
	f.mu.Lock()
	for _, op := range b.ops {
		if v, ok := f.learned[op.set][op.addr]; ok && v.b == b {
			v.b = nil
			f.learned[op.set][op.addr] = v
		}
	}
	b.err = err
	close(b.done)
	f.mu.Unlock()
	return len(b.ops), err
}
