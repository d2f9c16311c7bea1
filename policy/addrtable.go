package policy

import (
	"encoding/binary"
	"net/netip"
	"slices"
)

// addrTable maps addresses to the rules whose prefixes contain them. The
// prefixes of one family are flattened into sorted, non-overlapping ranges,
// each carrying the rules of every prefix that covers it (prefixes nest or
// are disjoint, so a range's rules are those of a chain of nested
// prefixes). A lookup is one binary search, whatever the number of rules.
type addrTable struct {
	v4, v6 rangeTable
	// byPrefix keeps the rules of each prefix, for the linter.
	byPrefix map[netip.Prefix][]int32
	bits4    []int // distinct prefix lengths, for the linter
	bits16   []int
}

type u128 struct{ hi, lo uint64 }

func (a u128) less(b u128) bool { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo) }

func (a u128) inc() (u128, bool) {
	lo := a.lo + 1
	hi := a.hi
	if lo == 0 {
		hi++
		if hi == 0 {
			return u128{}, true // wrapped: the end of the address space
		}
	}
	return u128{hi, lo}, false
}

func toU128(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{0, uint64(binary.BigEndian.Uint32(b[:]))}
	}
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

// lastAddr returns the last address of a masked prefix.
func lastAddr(p netip.Prefix) u128 {
	a := toU128(p.Addr())
	host := p.Addr().BitLen() - p.Bits()
	switch {
	case host >= 128:
		return u128{^uint64(0), ^uint64(0)}
	case host >= 64:
		a.lo = ^uint64(0)
		a.hi |= (uint64(1) << (host - 64)) - 1
	case host > 0:
		a.lo |= (uint64(1) << host) - 1
	}
	return a
}

// rangeTable is the flattened form: starts[i] begins range i, which runs to
// starts[i+1]; rules[i] are its rules in file order (nil: none). seal turns
// them into the lookup form.
type rangeTable struct {
	starts []u128
	rules  [][]int32
	// What a lookup reads, built from starts and rules: a range's first
	// rule sits beside its start, so the common case (the first rule
	// decides) touches the search's cache line and nothing else of the
	// table; all its rules are flat[off:off+n].
	ents4 []ent4     // IPv4 tables: starts as 32-bit values
	pay   []rangePay // IPv6 tables, beside starts
	flat  []int32
	// index16[k] is the number of ranges starting below k<<16, so that a
	// lookup reads one index entry and searches a handful of ranges
	// instead of the whole table. Built for large IPv4 tables only.
	index16 []uint32
}

// rangePay is a range's rules: first (-1: none) and flat[off:off+n], which
// starts with first.
type rangePay struct {
	first  int32
	off, n uint32
}

type ent4 struct {
	start uint32
	rangePay
}

// seal builds the lookup form of a table whose starts and rules are final.
func (t *rangeTable) seal(v4 bool) {
	pays := make([]rangePay, len(t.rules))
	for i, rs := range t.rules {
		pays[i] = rangePay{first: -1, off: uint32(len(t.flat)), n: uint32(len(rs))}
		if len(rs) > 0 {
			pays[i].first = rs[0]
			t.flat = append(t.flat, rs...)
		}
	}
	t.rules = nil
	if !v4 {
		t.pay = pays
		return
	}
	t.ents4 = make([]ent4, len(t.starts))
	for i, s := range t.starts {
		t.ents4[i] = ent4{start: uint32(s.lo), rangePay: pays[i]}
	}
	t.starts = nil
	if len(t.ents4) > 256 {
		idx := make([]uint32, 1<<16+1)
		i := 0
		for k := range idx {
			for i < len(t.ents4) && uint64(t.ents4[i].start)>>16 < uint64(k) {
				i++
			}
			idx[k] = uint32(i)
		}
		t.index16 = idx
	}
}

var noRange = rangePay{first: -1}

// find returns the rules of the range holding a.
func (t *rangeTable) find(a u128) rangePay {
	// The last start <= a: lo is the first index whose start is > a.
	if t.ents4 != nil {
		lo, hi := 0, len(t.ents4)
		v := uint32(a.lo)
		if t.index16 != nil {
			// Only the ranges starting under the same /16 need a search.
			top := v >> 16
			lo, hi = int(t.index16[top]), int(t.index16[top+1])
		}
		for lo < hi {
			mid := int(uint(lo+hi) >> 1)
			if v < t.ents4[mid].start {
				hi = mid
			} else {
				lo = mid + 1
			}
		}
		if lo == 0 {
			return noRange
		}
		return t.ents4[lo-1].rangePay
	}
	lo, hi := 0, len(t.starts)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if a.less(t.starts[mid]) {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	if lo == 0 {
		return noRange
	}
	return t.pay[lo-1]
}

func (t *addrTable) add(pf netip.Prefix, rule int32) {
	if t.byPrefix == nil {
		t.byPrefix = map[netip.Prefix][]int32{}
	}
	list := t.byPrefix[pf]
	if len(list) > 0 && list[len(list)-1] == rule {
		return
	}
	t.byPrefix[pf] = append(list, rule)
	bits := &t.bits16
	if pf.Addr().Is4() {
		bits = &t.bits4
	}
	if !slices.Contains(*bits, pf.Bits()) {
		*bits = append(*bits, pf.Bits())
	}
}

// build flattens the prefixes into the range tables.
func (t *addrTable) build() {
	var p4, p6 []netip.Prefix
	for pf, rules := range t.byPrefix {
		slices.Sort(rules)
		t.byPrefix[pf] = slices.Compact(rules)
		if pf.Addr().Is4() {
			p4 = append(p4, pf)
		} else {
			p6 = append(p6, pf)
		}
	}
	t.v4 = t.flatten(p4)
	// A range can only start past the last IPv4 address as the empty one
	// after a prefix that reaches it; drop it.
	if n := len(t.v4.starts); n > 0 && t.v4.starts[n-1].lo > 0xffffffff {
		t.v4.starts, t.v4.rules = t.v4.starts[:n-1], t.v4.rules[:n-1]
	}
	t.v4.seal(true)
	t.v6 = t.flatten(p6)
	t.v6.seal(false)
}

func (t *addrTable) flatten(pfs []netip.Prefix) rangeTable {
	// Outer prefixes first: by start, then shorter first.
	slices.SortFunc(pfs, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	type open struct {
		end   u128 // last address
		rules []int32
	}
	var rt rangeTable
	var stack []open
	emit := func(start u128) {
		var rules []int32
		switch len(stack) {
		case 0:
		case 1:
			rules = stack[0].rules
		default:
			for _, o := range stack {
				rules = append(rules, o.rules...)
			}
			slices.Sort(rules)
			rules = slices.Compact(rules)
		}
		if n := len(rt.starts); n > 0 && rt.starts[n-1] == start {
			rt.rules[n-1] = rules
			return
		}
		rt.starts = append(rt.starts, start)
		rt.rules = append(rt.rules, rules)
	}
	// pop closes the innermost prefixes that end before addr.
	pop := func(before u128, all bool) {
		for len(stack) > 0 {
			top := stack[len(stack)-1]
			if !all && !top.end.less(before) {
				return
			}
			stack = stack[:len(stack)-1]
			next, wrapped := top.end.inc()
			if !wrapped && (all || next.less(before) || next == before) {
				emit(next)
			}
		}
	}
	for _, pf := range pfs {
		start := toU128(pf.Addr())
		pop(start, false)
		stack = append(stack, open{end: lastAddr(pf), rules: t.byPrefix[pf]})
		emit(start)
	}
	pop(u128{}, true)
	return rt
}

// lookup returns the rules whose prefixes hold a, in file order; the first
// (or -1) is also returned apart, read without touching the list.
func (t *addrTable) lookup(a netip.Addr) (first int32, all []int32) {
	tab := &t.v6
	if a.Is4() {
		tab = &t.v4
	}
	p := tab.find(toU128(a))
	if p.first < 0 {
		return -1, nil
	}
	return p.first, tab.flat[p.off : p.off+p.n : p.off+p.n]
}
