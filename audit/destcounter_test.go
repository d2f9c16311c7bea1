package audit

import (
	"cmp"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
)

// refCounter is the space-saving counter as a plain map, scanned for the
// least counted entry (the ledger's before the heap): the model the heap
// must agree with.
type refCounter map[string]uint64

func (r refCounter) add(name string, max int) {
	if _, ok := r[name]; ok || len(r) < max {
		r[name]++
		return
	}
	minName, minN := "", uint64(0)
	for n, c := range r {
		if minName == "" || c < minN || (c == minN && n < minName) {
			minName, minN = n, c
		}
	}
	delete(r, minName)
	r[name] = minN + 1
}

func (r refCounter) remove(name string) {
	switch c := r[name]; c {
	case 0:
	case 1:
		delete(r, name)
	default:
		r[name] = c - 1
	}
}

// TestDestCounterAgreesWithScan drives the heap and the model with the
// same random adds and removes (skewed, so that some names are heavy and
// many are evicted) and compares every entry and count after each step,
// and the heap's invariant.
func TestDestCounterAgreesWithScan(t *testing.T) {
	for _, c := range []struct {
		max        int
		uniform    bool // names drawn evenly, else a few heavy ones
		removeEach int  // one step in removeEach removes
	}{{1, false, 5}, {2, false, 5}, {3, false, 5}, {8, false, 5}, {64, false, 5}, {8, true, 2}, {64, true, 2}, {64, true, 3}} {
		max := c.max
		rng := rand.New(rand.NewPCG(uint64(max), uint64(c.removeEach)))
		var d destCounter
		ref := refCounter{}
		for step := range 20000 {
			k := int(rng.ExpFloat64() * float64(2*max))
			if c.uniform {
				k = rng.IntN(3 * max)
			}
			name := fmt.Sprintf("h%x.example", k*2654435761%1000003)
			if rng.IntN(c.removeEach) == 0 {
				d.remove(name)
				ref.remove(name)
			} else {
				d.add(name, max)
				ref.add(name, max)
			}
			if len(d.h) != len(ref) || len(d.idx) != len(ref) {
				t.Fatalf("max %d step %d: %d entries (%d indexed), want %d", max, step, len(d.h), len(d.idx), len(ref))
			}
			for i, e := range d.h {
				if ref[e.Dest] != e.Count || d.idx[e.Dest] != e || e.pos != i {
					t.Fatalf("max %d step %d: %s counted %d at %d (its position %d, indexed %v), want %d", max, step, e.Dest, e.Count, i, e.pos, d.idx[e.Dest] == e, ref[e.Dest])
				}
				if i > 0 && d.less(i, (i-1)/2) {
					t.Fatalf("max %d step %d: heap order broken at %d", max, step, i)
				}
			}
		}
		want := make([]DestCount, 0, len(ref))
		for _, n := range slices.Sorted(maps.Keys(ref)) {
			want = append(want, DestCount{n, ref[n]})
		}
		slices.SortStableFunc(want, func(a, b DestCount) int { return cmp.Compare(b.Count, a.Count) })
		if got := d.top(len(ref)); !slices.Equal(got, want) {
			t.Fatalf("max %d: top %v, want %v", max, got, want)
		}
	}
}

func TestDestCounterEmpty(t *testing.T) {
	var d destCounter
	if got := d.top(10); got == nil || len(got) != 0 {
		t.Fatalf("top of an empty counter: %#v, want an empty list (reports show [], not null)", got)
	}
	d.remove("x")
	d.add("x", 10)
	d.remove("x")
	if len(d.h) != 0 || len(d.idx) != 0 {
		t.Fatalf("after add and remove: %v %v", d.h, d.idx)
	}
}
