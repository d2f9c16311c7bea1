package policy

import (
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gobwas/glob"
)

// Engine is a compiled policy. It is immutable and safe for concurrent use;
// a reload builds a new Engine and swaps it in a [Store].
//
// Names live in a label-wise suffix tree ("com" → "docker" → …), built
// with maps and then flattened into one hash table of edges (nameTable),
// and addresses in sorted range tables (see addrTable), so the cost of a
// decision depends on the length of the name, not on the number of rules.
type Engine struct {
	pol       *Policy
	checks    []ruleCheck // per rule, in file order
	extras    []ruleExtra // per rule with checks[i].extra, else zero
	ruleNames []string    // per rule: what a decision names, apart from the bulky Rule
	names     *nameNode   // the name suffix tree while compiling (lint walks it)
	nameTab   *nameTable  // its lookup form
	addrs     addrTable
	anyRefs   []int32 // rules with "*"
	zero4     []int32 // rules with 0.0.0.0/0
	zero6     []int32 // rules with ::/0
	hasExpiry bool
	hasMACs   bool // some rule's clients include a MAC address
	// nat64 are the NAT64 prefixes (WithNAT64): a destination inside one
	// is decided as the IPv4 address it embeds too. nil: none.
	nat64 []netip.Prefix
	// guards is GuardList(nat64), computed once (nil: GuardedRanges).
	guards []netip.Prefix

	// host holds HostLevel's engine, compiled on first use; shared with
	// the engines WithMode makes (the mode does not change what allows).
	host *hostLevel
}

// ref points from the matcher to a rule, with the path glob of a
// host/path target.
type ref struct {
	rule int32
	path *glob.Pattern // nil: not a path rule
}

type nameNode struct {
	children map[string]*nameNode
	exact    []ref // patterns that end at this node
	sub      []ref // "*.<this node>": any deeper name
	globs    []globRef
}

// globRef is a pattern with a '*' inside a label; lit is the literal suffix
// that leads to the node holding it, g matches what stands before it.
type globRef struct {
	ref
	g *glob.Pattern
}

// Compile parses and compiles a policy file in one step.
func Compile(file string, src []byte) (*Engine, error) {
	p, err := Parse(file, src)
	if err != nil {
		return nil, err
	}
	return New(p), nil
}

// New compiles a parsed policy and adds the warnings that need the compiled
// form (shadowed rules) to p.Warnings.
func New(p *Policy) *Engine {
	e := &Engine{pol: p, names: &nameNode{}, host: &hostLevel{}}
	e.checks = make([]ruleCheck, len(p.Rules))
	e.ruleNames = make([]string, len(p.Rules))
	for i := range p.Rules {
		r := &p.Rules[i]
		c, x := newRuleCheck(r)
		e.checks[i] = c
		if c.extra {
			if e.extras == nil {
				e.extras = make([]ruleExtra, len(p.Rules))
			}
			e.extras[i] = x
		}
		e.ruleNames[i] = r.Name
		if !r.Expires.IsZero() {
			e.hasExpiry = true
		}
		if len(r.From.MACs) > 0 {
			e.hasMACs = true
		}
		for _, t := range r.To {
			e.add(int32(i), t)
		}
	}
	e.addrs.build()
	e.nameTab = sealNames(e.names)
	p.Warnings = append(p.Warnings, lint(e, lintNow())...)
	e.names = nil
	return e
}

// lintNow is the time the warnings are judged at (expired rules, rules
// ending soon); tests set it.
var lintNow = time.Now

func (e *Engine) add(rule int32, t Target) {
	switch t.Kind {
	case TargetAny:
		if !slices.Contains(e.anyRefs, rule) {
			e.anyRefs = append(e.anyRefs, rule)
		}
	case TargetPrefix:
		if t.Prefix.Bits() == 0 {
			// 0.0.0.0/0 and ::/0 match every address of their family, like
			// "*": kept apart so that a port miss there is no reason.
			zero := &e.zero6
			if t.Prefix.Addr().Is4() {
				zero = &e.zero4
			}
			*zero = append(*zero, rule)
		}
		e.addrs.add(t.Prefix, rule)
	case TargetName, TargetHostPath:
		r := ref{rule: rule, path: t.path}
		labels := strings.Split(t.Pattern, ".")
		// Walk the literal suffix from the right.
		n := e.names
		i := len(labels) - 1
		for ; i >= 0 && !strings.Contains(labels[i], "*"); i-- {
			c := n.children[labels[i]]
			if c == nil {
				if n.children == nil {
					n.children = map[string]*nameNode{}
				}
				c = &nameNode{}
				n.children[labels[i]] = c
			}
			n = c
		}
		switch {
		case i < 0:
			n.exact = append(n.exact, r)
		case i == 0 && labels[0] == "*":
			n.sub = append(n.sub, r)
		default:
			g, _ := compileNameGlob(strings.Join(labels[:i+1], ".")) // validated by Parse
			n.globs = append(n.globs, globRef{ref: r, g: g})
		}
	}
}

// Policy returns the parsed policy the engine was compiled from. Callers must
// not modify it.
func (e *Engine) Policy() *Policy { return e.pol }

// Mode returns the policy's mode.
func (e *Engine) Mode() Mode { return e.pol.Mode }

// Rules returns the rules in file order. Callers must not modify them.
func (e *Engine) Rules() []Rule { return e.pol.Rules }

// HasMACs reports whether some rule's clients include a MAC address
// (Input.ClientMAC can change a decision). A component that must look a
// client's MAC up asks this first, so that a policy without MAC entries
// costs nothing on its fast path; it does not allocate.
func (e *Engine) HasMACs() bool { return e.hasMACs }

// Warnings returns the policy's warnings.
func (e *Engine) Warnings() []Problem { return e.pol.Warnings }

// WithMode returns an engine that shares this one's matcher with another
// mode (the command line's --mode overrides the file).
func (e *Engine) WithMode(m Mode) *Engine {
	if m == "" || m == e.pol.Mode {
		return e
	}
	p := *e.pol
	p.Mode = m
	c := *e
	c.pol = &p
	return &c
}

// Store holds the current engine; Load and Swap are atomic, so a reload
// never tears a decision in flight.
type Store struct {
	p atomic.Pointer[Engine]
}

// NewStore returns a store holding e.
func NewStore(e *Engine) *Store {
	s := &Store{}
	s.p.Store(e)
	return s
}

// Load returns the current engine.
func (s *Store) Load() *Engine { return s.p.Load() }

// Swap installs e and returns the previous engine.
func (s *Store) Swap(e *Engine) *Engine { return s.p.Swap(e) }

// Decide asks the current engine.
func (s *Store) Decide(in Input) Decision { return s.p.Load().Decide(in) }
