package audit

import (
	"bytes"
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// How a flow's first report was lost (lostFirsts).
type lostHow uint8

const (
	lostNone lostHow = iota
	// lostShed: Emit shed it (the queue was full), or a write during the
	// background read lost it past the hold's bound: neither the ledger
	// nor the log has it.
	lostShed
	// lostUnwritten: its write failed (a full or read-only disk): the
	// ledger counted it, the log does not have it.
	lostUnwritten
)

// maxLostFirsts bounds the flows lostFirsts keeps (some 1.5 MB at the
// bound): past it the oldest are forgotten, and a revised report of one
// counts as a duplicate, as before.
const maxLostFirsts = 65536

// lostFirsts are the flows whose first report (a flow event not marked
// revised) the journal shed or could not write, by a hash of the
// component, the 5-tuple and the start. A later report of such a flow
// (Event.Revised, the same start) is the only report of the connection
// there is in the ledger (shed) or in the log (unwritten): the journal
// writes it as a first report, its mark cleared, so that it counts as the
// flow, attributed as it says (Journal.writeEvent), where the ledger,
// which cannot tell a flow it never counted from one it forgot (past
// MaxFlows, in the summary of rotated-out files), counts a revised report
// of a flow it does not hold as a duplicate. A shed first report's later
// report is counted so live too; an unwritten one's merges live into the
// flow counted (it is counted once as it is), and counts as it after a
// restart.
type lostFirsts struct {
	n    atomic.Int64 // len(m): writeEvent looks up nothing while 0
	mu   sync.Mutex   // guards following
	seed maphash.Seed
	m    map[uint64]lostHow
	ring []uint64 // insertion order, for the bound
	pos  int
}

// lostKey is what a flow's first report and its revised one share.
type lostKey struct {
	FlowKey
	source Source
	start  int64 // Unix ns
}

func newLostFirsts() *lostFirsts { return &lostFirsts{seed: maphash.MakeSeed()} }

// hash digests ev's lostKey.
func (lf *lostFirsts) hash(ev *Event) uint64 {
	return maphash.Comparable(lf.seed, lostKey{ev.Key(), ev.Source, ev.Time.UnixNano()})
}

// firstReport reports whether ev is a flow's first report (one that
// lostFirsts keeps when it is lost).
func firstReport(ev *Event) bool { return ev.Kind == KindFlow && !ev.Revised && !ev.isSummary() }

// add notes ev, a first report, as lost how.
func (lf *lostFirsts) add(ev *Event, how lostHow) {
	if !firstReport(ev) {
		return
	}
	h := lf.hash(ev)
	lf.mu.Lock()
	defer lf.mu.Unlock()
	if lf.m == nil {
		lf.m = map[uint64]lostHow{}
	}
	if _, ok := lf.m[h]; !ok {
		if len(lf.ring) < maxLostFirsts {
			lf.ring = append(lf.ring, h)
		} else {
			delete(lf.m, lf.ring[lf.pos])
			lf.ring[lf.pos] = h
			lf.pos = (lf.pos + 1) % maxLostFirsts
		}
	}
	lf.m[h] = how
	lf.n.Store(int64(len(lf.m)))
}

// addLines notes the first reports among event lines of buf that did not
// reach the log (ends: each line's end in buf) as lost how.
func (lf *lostFirsts) addLines(buf []byte, ends []int, how lostHow) {
	for _, end := range ends {
		start := bytes.LastIndexByte(buf[:end-1], '\n') + 1
		body := bytes.TrimSpace(buf[start:end])
		var ev Event
		if len(body) > 0 && body[0] == '{' && decodeEvent(body, &ev) {
			lf.add(&ev, how)
		}
	}
}

// take returns how the first report of ev's flow was lost, and forgets
// it (lostNone: it was not, or not that lostFirsts remembers). ev is a
// revised flow report.
func (lf *lostFirsts) take(ev *Event) lostHow {
	if lf.n.Load() == 0 {
		return lostNone
	}
	h := lf.hash(ev)
	lf.mu.Lock()
	defer lf.mu.Unlock()
	how, ok := lf.m[h]
	if ok {
		delete(lf.m, h)
		lf.n.Store(int64(len(lf.m)))
	}
	return how
}
