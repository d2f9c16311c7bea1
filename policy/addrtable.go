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
// starts[i+1]; rules[i] are its rules in file order (nil: none).
type rangeTable struct {
	starts []u128
	rules  [][]int32
	// starts4 is starts as 32-bit values for IPv4: four times denser in
	// the cache, which is what a lookup in a large table pays for.
	starts4 []uint32
	// index16[k] is the number of ranges starting below k<<16, so that a
	// lookup reads one index entry and searches a handful of ranges
	// instead of the whole table. Built for large tables only.
	index16 []uint32
}

func (t *rangeTable) lookup(a u128) []int32 {
	// The last start <= a: lo is the first index whose start is > a.
	lo, hi := 0, len(t.starts)
	if t.starts4 != nil {
		v := uint32(a.lo)
		if t.index16 != nil {
			// Only the ranges starting under the same /16 need a search.
			top := v >> 16
			lo, hi = int(t.index16[top]), int(t.index16[top+1])
		}
		for lo < hi {
			mid := int(uint(lo+hi) >> 1)
			if v < t.starts4[mid] {
				hi = mid
			} else {
				lo = mid + 1
			}
		}
	} else {
		for lo < hi {
			mid := int(uint(lo+hi) >> 1)
			if a.less(t.starts[mid]) {
				hi = mid
			} else {
				lo = mid + 1
			}
		}
	}
	if lo == 0 {
		return nil
	}
	return t.rules[lo-1]
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
	t.v4.starts4 = make([]uint32, len(t.v4.starts))
	for i, s := range t.v4.starts {
		t.v4.starts4[i] = uint32(s.lo)
	}
	if len(t.v4.starts4) > 256 {
		idx := make([]uint32, 1<<16+1)
		i := 0
		for k := range idx {
			for i < len(t.v4.starts4) && uint64(t.v4.starts4[i])>>16 < uint64(k) {
				i++
			}
			idx[k] = uint32(i)
		}
		t.v4.index16 = idx
	}
	t.v6 = t.flatten(p6)
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

func (t *addrTable) lookup(a netip.Addr) []int32 {
	if a.Is4() {
		return t.v4.lookup(toU128(a))
	}
	return t.v6.lookup(toU128(a))
}
