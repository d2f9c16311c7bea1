package audit

import (
	"bytes"
	"encoding/binary"
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// How a flow's first report was lost (lostFirsts).
type lostHow uint64

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

// lostSlots is the size of lostFirsts' table (512 KiB, made at the
// first loss): it keeps about the last 65,536 flows lost, fewer where
// two take one slot (the newer stays); a revised report of one it lost
// counts as a duplicate, as before.
const lostSlots = 1 << 16

// lostFirsts are the flows whose first report (a flow event not marked
// revised) the journal shed or could not write, by a hash of the
// component, the 5-tuple and the start, where no other component's report
// of the connection counted it (Ledger.holdsFlow when shed; the ledger's
// count when the write failed). A later report of such a flow
// (Event.Revised, the same start) is the only report of the connection
// there is in the ledger (shed) or in the log (unwritten): the journal
// writes it as a first report, its mark cleared, so that it counts as the
// flow, attributed as it says (Journal.writeEvent), where the ledger,
// which cannot tell a flow it never counted from one it forgot (past
// MaxFlows, in the summary of rotated-out files), counts a revised report
// of a flow it does not hold as a duplicate. A shed first report's later
// report is counted so live too; an unwritten one's merges live into the
// flow counted (it is counted once as it is), and counts as it after a
// restart. Where another component's report counted the connection (the
// proxy's of a connection capture reports too), that report stands, in
// the log too: the later report stays marked, a duplicate where the
// ledger forgot the flow, as before (counted anew, the connection would
// count twice: TestRevisedAfterShedFirstOfAFlowCounted).
//
// A table of lostSlots hashes, each slot the hash of one flow with how
// its first report was lost in the low bits, written and taken with
// atomics: Emit's shed, the path of a journal that cannot keep up, takes
// no lock more for it (it tries the ledger's, for Ledger.holdsFlow, and
// notes nothing where the writer holds it: a revised report of that
// connection counts as a duplicate, as before, never twice).
type lostFirsts struct {
	seed  maphash.Seed
	once  sync.Once
	slots atomic.Pointer[[lostSlots]atomic.Uint64]
}

const lostHowBits = 3 // the low bits of a slot: its lostHow

func newLostFirsts() *lostFirsts { return &lostFirsts{seed: maphash.MakeSeed()} }

// hash digests what a flow's first report and its revised one share: the
// component, the 5-tuple and the start; its low bits are zero.
func (lf *lostFirsts) hash(ev *Event) uint64 {
	var a [96]byte
	b := a[:0]
	k := ev.Key()
	c, d := k.Client.As16(), k.Dest.As16()
	b = append(b, c[:]...)
	b = append(b, d[:]...)
	b = binary.BigEndian.AppendUint16(b, k.ClientPort)
	b = binary.BigEndian.AppendUint16(b, k.DestPort)
	b = binary.BigEndian.AppendUint64(b, uint64(ev.Time.UnixNano()))
	b = append(b, k.Proto...)
	b = append(b, 0)
	b = append(b, ev.Source...)
	return maphash.Bytes(lf.seed, b) &^ (1<<lostHowBits - 1)
}

// firstReport reports whether ev is a flow's first report (one that
// lostFirsts keeps when it is lost).
func firstReport(ev *Event) bool { return ev.Kind == KindFlow && !ev.Revised && !ev.isSummary() }

// add notes ev, a first report, as lost how.
func (lf *lostFirsts) add(ev *Event, how lostHow) {
	if !firstReport(ev) {
		return
	}
	t := lf.slots.Load()
	if t == nil {
		lf.once.Do(func() { lf.slots.Store(new([lostSlots]atomic.Uint64)) })
		t = lf.slots.Load()
	}
	h := lf.hash(ev)
	t[(h>>lostHowBits)%lostSlots].Store(h | uint64(how))
}

// addLine notes the first report of the event line of buf that ends at
// end, which did not reach the log, as lost how.
func (lf *lostFirsts) addLine(buf []byte, end int, how lostHow) {
	start := bytes.LastIndexByte(buf[:end-1], '\n') + 1
	body := bytes.TrimSpace(buf[start:end])
	var ev Event
	if len(body) > 0 && body[0] == '{' && decodeEvent(body, &ev) {
		lf.add(&ev, how)
	}
}

// take returns how the first report of ev's flow was lost, and forgets
// it (lostNone: it was not, or not that lostFirsts remembers). ev is a
// revised flow report.
func (lf *lostFirsts) take(ev *Event) lostHow {
	t := lf.slots.Load()
	if t == nil {
		return lostNone
	}
	h := lf.hash(ev)
	s := &t[(h>>lostHowBits)%lostSlots]
	v := s.Load()
	if v&^(1<<lostHowBits-1) != h || !s.CompareAndSwap(v, 0) {
		return lostNone
	}
	return lostHow(v & (1<<lostHowBits - 1))
}
