package audit

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// TestFlowTableDifferential drives the ledger's flows table (recLocked,
// rememberLocked, findLocked) with random records against a reference:
// the ring's records in insertion order, newest last. Few ids share few
// hashes (some in the table's last slots, so that runs wrap to its first
// ones), windows overlap, MaxFlows varies from 1 up past a growth or two.
// After each step it checks the table's invariant (every record reachable
// from its hash's slot with no empty slot between, the records of one
// hash in insertion order, as many records as the ring holds) and that
// findLocked returns what the reference says: of the kept records of the
// id whose windows hold t, the newest.
func TestFlowTableDifferential(t *testing.T) {
	hashes := []uint64{0, 1, 2, 3, 7, 15, 16, 17, 31, 63, ^uint64(0), ^uint64(0) - 1, ^uint64(0) - 16, 1 << 40}
	for seed := range uint64(60) {
		rng := rand.New(rand.NewPCG(seed, 99))
		maxFlows := 1 + rng.IntN(70)
		l := NewLedger(nil, LedgerOptions{MaxFlows: maxFlows})
		nIDs := 1 + rng.IntN(3*maxFlows+2)
		ids := make([]flowID, nIDs)
		idHash := make([]uint64, nIDs)
		for i := range ids {
			ids[i] = flowID{kind: KindDNS, name: fmt.Sprintf("q%d.example", i)}
			idHash[i] = hashes[rng.IntN(len(hashes))]
		}
		type refRec struct {
			id  int
			r   *flowRec
			beg time.Time
		}
		var ref []refRec // kept records, oldest first
		for step := range 400 {
			k := rng.IntN(nIDs)
			start := t0.Add(time.Duration(rng.IntN(20)) * time.Second)
			r := l.recLocked()
			r.id, r.h, r.start, r.end = ids[k], idHash[k], start, start
			l.rememberLocked(r)
			ref = append(ref, refRec{k, r, start})
			if len(ref) > maxFlows {
				ref = ref[1:]
			}
			checkFlowTable(t, l, fmt.Sprintf("seed %d step %d", seed, step))
			// Every kept record is the ref's; in insertion order per hash.
			if len(l.ring) != len(ref) {
				t.Fatalf("seed %d step %d: ring %d, reference %d", seed, step, len(l.ring), len(ref))
			}
			order := map[uint64][]*flowRec{}
			for _, rr := range ref {
				order[rr.r.h] = append(order[rr.r.h], rr.r)
			}
			for h, want := range order {
				var got []*flowRec
				mask := uint64(len(l.flows) - 1)
				for i := h & mask; l.flows[i].r != nil; i = (i + 1) & mask {
					if l.flows[i].h == h {
						got = append(got, l.flows[i].r)
					}
				}
				if fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("seed %d step %d: hash %#x: records in probe order %p, want insertion order %p", seed, step, h, got, want)
				}
			}
			// Look-ups: random ids and times.
			for range 8 {
				q := rng.IntN(nIDs)
				at := t0.Add(time.Duration(rng.IntN(24)-2) * time.Second)
				var want *flowRec
				for _, rr := range ref {
					if rr.id == q && !at.Before(rr.beg.Add(-tcpFlowSlack)) && !at.After(rr.beg.Add(tcpFlowSlack)) {
						want = rr.r
					}
				}
				if got := l.findLocked(ids[q], idHash[q], at); got != want {
					t.Fatalf("seed %d step %d: find id %d at %v: %p, want %p", seed, step, q, at.Sub(t0), got, want)
				}
			}
		}
	}
}

// checkFlowTable checks the flows table's invariant: a power of two of
// slots, at most half full, each record reachable from its hash's slot
// with no empty slot between, each ring record in it once.
func checkFlowTable(t *testing.T, l *Ledger, what string) {
	t.Helper()
	n := len(l.flows)
	if n == 0 || n&(n-1) != 0 {
		t.Fatalf("%s: %d slots, not a power of two", what, n)
	}
	mask := uint64(n - 1)
	inTable := map[*flowRec]int{}
	used := 0
	for i, s := range l.flows {
		if s.r == nil {
			continue
		}
		used++
		inTable[s.r]++
		if s.h != s.r.h {
			t.Fatalf("%s: slot %d hash %#x, its record's %#x", what, i, s.h, s.r.h)
		}
		for j := s.h & mask; j != uint64(i); j = (j + 1) & mask {
			if l.flows[j].r == nil {
				t.Fatalf("%s: slot %d (hash %#x, home %d) not reachable: slot %d empty", what, i, s.h, s.h&mask, j)
			}
		}
	}
	if used != len(l.ring) || 2*used > n {
		t.Fatalf("%s: %d slots used of %d, ring %d", what, used, n, len(l.ring))
	}
	for _, r := range l.ring {
		if inTable[r] != 1 {
			t.Fatalf("%s: ring record %p in the table %d times", what, r, inTable[r])
		}
	}
}
