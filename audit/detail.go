package audit

import (
	"net/netip"
	"strings"
	"time"
	"unsafe"

	"egressd/policy"
)

// The detail budget of the event log. One LAN device in a retry loop to a
// denied destination (DNS queries at the forwarder's rate limit, denied
// TLS connections as fast as the proxy closes them, connections capture
// records as would-be drops) writes an event per attempt: hundreds to
// thousands a second, enough to push the audit week's detail out of the
// rotating log in hours. So each device (its MAC, as the limits count a
// device; its address when no MAC is known) has a budget of event lines:
// a burst of DetailBurst and DetailRate a second after it. A denied event
// of a shape (device, kind, source, verdict, rule, mode, reason, name,
// destination, …: what the report and a replay read of it) already
// written in the current interval, past the device's budget, is not
// written but counted into that shape's summary record, which the writer
// writes at the end of the interval (DetailInterval) or at close: one
// line with Count (and Duplicates) events, Time the first of them and
// Until the last, the bytes of all. Reading the log expands a summary
// into its events, so the ledger after a restart, the summary of
// rotated-out files, windowed reports and replays count exactly what the
// live ledger counted. Allowed events and the first event of each shape
// in an interval are always written one by one.

// Defaults of the detail budget (JournalConfig).
const (
	DefaultDetailBurst    = 100
	DefaultDetailRate     = 1 // events a second per device
	DefaultDetailInterval = 10 * time.Second
	// maxDetailShapes and maxDetailDevices bound what the budget tracks
	// in an interval; a shape or device beyond them is written as it
	// comes (unbudgeted), never lost.
	maxDetailShapes  = 1 << 14
	maxDetailDevices = 1 << 14
	// maxHeldFlows bounds the flows held back in an interval (the
	// journal ends the interval early when it is reached): with the
	// interval before, as many as the ledger remembers to count a flow
	// once (LedgerOptions.MaxFlows).
	maxHeldFlows = 1 << 15
	// maxDetailBytes bounds the memory of an interval's tables besides
	// the devices' (detailBudget.bytes): a shape past it is written as it
	// comes, and the journal ends the interval early, as at
	// maxHeldFlows. With the interval before, whose held flows keep
	// their summaries, a budget keeps at most twice it, and the held
	// flows of intervals past maxPinnedBytes more. Without it, a
	// device churning shapes of the longest client text an event keeps
	// (2.5 KB of name, path and front) held 164 MiB in the event log's
	// budget and 62 MiB in the decision lines' at the count bounds
	// (TestDetailBudgetMemoryBound).
	maxDetailBytes = 4 << 20
	// maxPinnedBytes bounds the summaries the held flows of intervals
	// past the one before keep (detailBudget.pinned): the ledger's
	// record of a held flow keeps it, and it its summary, so that a
	// late report of the flow merges into one, for as long as the
	// ledger remembers the flow (up to 65,536 records), outside
	// maxDetailBytes. Past it, the oldest interval's held flows let
	// their summaries go: a late report of one is written alone, as
	// a flow of its own. Without it, a device churning held flows of
	// distinct shapes of the longest text kept 219 MiB in a full
	// ledger (TestDetailPinnedMemoryBound).
	maxPinnedBytes = 8 << 20
	// maxPinnedFlows is the ledger's MaxFlows (its default): held
	// flows older than as many newer ones have left the ledger (each
	// is a record of its own), so an interval's held flows are let go
	// then, with no loss.
	maxPinnedFlows = 2 * maxHeldFlows
)

// What an entry of the budget's tables costs besides the client text it
// keeps (detailBudget.bytes): its key and value, and a map slot's share.
const (
	shapeEntryBytes = int(unsafe.Sizeof(shapeKey{})) + 16
	aggBytes        = int(unsafe.Sizeof(shapeAgg{}))
	lateEntryBytes  = shapeEntryBytes + aggBytes
	heldEntryBytes  = int(unsafe.Sizeof(heldKey{})+unsafe.Sizeof(heldFlow{})) + 16
)

// shapeKey is what makes two denied events alike for the report and a
// replay: everything but when, the client's port, and the measurements.
type shapeKey struct {
	kind       Kind
	source     Source
	client     netip.Addr
	mac        string
	dest       netip.Addr
	destPort   uint16
	proto      string
	name       string
	nameSource NameSource
	path       string
	noPath     bool
	front      string
	verdict    policy.Verdict
	rule       string
	mode       policy.Mode
	reason     string
	enforced   bool
	qtype      string
	rcode      string
	filtered   string
	nameLen    int
	pathLen    int
	frontLen   int
	// learned: a forwarded flow's LearnedName, by which a replay judges
	// it (Replayer).
	learned string
}

// owned returns k with its own copy of the client's text: an event's
// may be cut from a larger allocation (the proxy's head parse gives host
// and path in one with the request target, up to 64 KiB), which a key
// kept for the interval would keep whole.
func (k shapeKey) owned() shapeKey {
	k.name, k.path, k.front, k.learned = strings.Clone(k.name), strings.Clone(k.path), strings.Clone(k.front), strings.Clone(k.learned)
	return k
}

// ownText gives ev its own copy of the client's text, for the journal
// to keep it (queued, up to QueueLen; in the ledger, a name a dropped
// entry): cut from a head, a 20-byte name kept the 64 KiB head
// (TestJournalKeepsNoHead).
func (ev *Event) ownText() {
	ev.Name, ev.Path, ev.Front = strings.Clone(ev.Name), strings.Clone(ev.Path), strings.Clone(ev.Front)
}

// textBytes is the client text k keeps.
func (k *shapeKey) textBytes() int { return len(k.name) + len(k.path) + len(k.front) + len(k.learned) }

func shapeOf(ev *Event) shapeKey {
	return shapeKey{ev.Kind, ev.Source, ev.Client.Unmap(), ev.ClientMAC, ev.Dest.Unmap(), ev.DestPort, ev.Proto,
		ev.Name, ev.NameSource, ev.Path, ev.NoPath, ev.Front, ev.Verdict, ev.Rule, ev.Mode, ev.Reason,
		ev.Enforced, ev.QType, ev.RCode, ev.Filtered, ev.NameLen, ev.PathLen, ev.FrontLen, ev.LearnedName}
}

// shapeAgg is one shape of the interval: written once at least, and the
// events held back since (ev is the first of them, with the sums).
type shapeAgg struct {
	key     shapeKey // its key in the interval's map (held flows point here, not at a copy)
	ev      Event
	n, dups uint64
}

type devTokens struct {
	tokens float64
	last   time.Time
}

// heldKey names a flow or query whose event was held back, so that
// another component's report of it (a duplicate for the ledger) is held
// back too: written alone, it would count as a new flow when the log is
// read again, beside the summary that holds its twin.
type heldKey struct {
	FlowKey
	kind  Kind
	name  string
	qtype string
	qid   uint16
}

func heldOf(ev *Event) heldKey {
	k := heldKey{FlowKey: ev.Key(), kind: ev.Kind}
	if ev.Kind == KindDNS {
		k.name, k.qtype, k.qid = lowerASCII(trimDot(ev.Name)), ev.QType, ev.QueryID
	}
	return k
}

// heldFlow is a flow or query held back: the summary that counts it, and
// what the ledger's merge of a later report of it reads. The ledger's
// record of the flow keeps it too (flowRec.held), for as long as the
// ledger remembers the flow: a later report after the budget's held and
// prevHeld forgot it finds it there, while the summaries of past
// intervals cost at most maxPinnedBytes (pinned; past it, agg is nil).
type heldFlow struct {
	agg     *shapeAgg
	gen     uint64 // the interval of agg
	out, in uint64
	source  Source
}

// detailBudget is the writer's (no locks: one goroutine).
type detailBudget struct {
	burst    float64
	rate     float64
	interval time.Duration
	start    time.Time
	gen      uint64 // the interval's number
	shapes   map[shapeKey]*shapeAgg
	// late are this interval's summaries of later reports of flows
	// held back in the interval before (their twins' summaries are
	// written): duplicates only.
	late map[shapeKey]*shapeAgg
	devs map[string]*devTokens
	// held and prevHeld are the flows held back in this interval and
	// the one before (a twin may come after the interval ended).
	held, prevHeld map[heldKey]*heldFlow
	// bytes is what this interval's tables (shapes, late, held) cost,
	// an estimate bounded by maxDetailBytes (the interval before's,
	// which prevHeld keeps, cost at most as much).
	bytes int
	// lines makes it the budget of decision log lines: no later
	// reports (each component's line is its own).
	lines bool
	// pinned are the held flows of past intervals (those prevHeld let
	// go at an interval's end, oldest first), which the ledger's
	// records may keep with their summaries; pinnedBytes is what their
	// summaries cost (pinGen.bytes), pinnedFlows how many there are.
	pinned      []pinGen
	pinnedBytes int
	pinnedFlows int
}

// pinGen is the held flows of one past interval and what their distinct
// summaries cost (text, summary and a pointer a flow).
type pinGen struct {
	flows []*heldFlow
	bytes int
}

func newDetailBudget(burst int, rate float64, interval time.Duration) *detailBudget {
	return &detailBudget{burst: float64(burst), rate: rate, interval: interval,
		shapes: map[shapeKey]*shapeAgg{}, late: map[shapeKey]*shapeAgg{}, devs: map[string]*devTokens{},
		held: map[heldKey]*heldFlow{}, prevHeld: map[heldKey]*heldFlow{}}
}

// budgeted reports whether ev may be held back: a denied flow, query or
// request, not a summary.
func budgeted(ev *Event) bool {
	return ev.Verdict == policy.Deny && (ev.Kind == KindFlow || ev.Kind == KindDNS || ev.Kind == KindRequest) && ev.Count == 0
}

// hold reports whether ev is held back (counted into a summary) rather
// than written now. counted says the live ledger counted it as a new
// flow, query or request (false: a later report of one it had).
func (b *detailBudget) hold(ev *Event, counted bool, now time.Time) bool {
	held, _ := b.holdFlow(ev, counted, nil, now)
	return held
}

// holdFlow is hold for an event the ledger has just counted or merged:
// twin is the held flow the ledger's record of it keeps (nil: none), for
// a later report that comes after the budget forgot the flow (the
// interval after the one that held it is over: a connection the proxy
// reports at its close). It returns the held flow to keep on the record
// of a flow or query it held back.
func (b *detailBudget) holdFlow(ev *Event, counted bool, twin *heldFlow, now time.Time) (bool, *heldFlow) {
	if !budgeted(ev) {
		// A later report of a held-back flow that allows it (the
		// proxy's, which names what capture could not): written
		// alone beside the summary that counts the flow as denied,
		// it would count a second time when the log is read again.
		if counted || b.lines || ev.Kind != KindFlow && ev.Kind != KindDNS || ev.Count != 0 || ev.Duplicates != 0 {
			return false, nil
		}
		hf := b.twinOf(ev, twin)
		if hf == nil {
			return false, nil
		}
		if hf.gen == b.gen && ev.Kind == KindFlow && ev.Source == SourceProxy && hf.source != SourceProxy {
			// The ledger moved the flow to the proxy's rule: so
			// does the log, the flow taken out of its summary
			// (a duplicate there) and the proxy's report written
			// with the flow's bytes.
			b.release(hf, ev)
			return false, nil
		}
		// Else the ledger merged it into the flow as denied (the
		// summary is written: it cannot move): so does the log.
		return b.merge(hf, ev), nil
	}
	if b.start.IsZero() {
		b.start = now
	}
	if !counted {
		// A duplicate is held back exactly when its twin was, so
		// that reading the log counts the flow once either way; its
		// summary is its twin's, which takes what the ledger's merge
		// took from it.
		if hf := b.twinOf(ev, twin); hf != nil {
			return b.merge(hf, ev), nil
		}
		// A later report of a flow written one by one is held back
		// like a first one, as a duplicate, when all the ledger's
		// merge takes from it is the drop's last seen and the client's
		// MAC (the summary gives both): a retransmitted query (its ID
		// again from one port: counted once), capture's report without bytes of
		// a flow not enforced. Else it is written.
		if ev.Kind != KindDNS && (ev.Kind != KindFlow || ev.Source == SourceProxy || ev.BytesOut != 0 || ev.BytesIn != 0 || ev.Enforced) {
			return false, nil
		}
	}
	if counted && !b.lines && ev.Kind == KindFlow && ev.Source == SourceCapture && ev.Close == "" {
		// Capture's report of a flow still open (a minute on): its end
		// update comes when the flow ends, minutes or days later, long
		// after the budget forgot the flow; written alone beside a
		// summary (which has no ports), it would count as a second
		// flow when the log is read again. So it is written.
		b.spend(ev, now)
		return false, nil
	}
	key := shapeOf(ev)
	agg, seen := b.shapes[key]
	if !seen { // the first of its shape: written
		if len(b.shapes) < maxDetailShapes && b.bytes < maxDetailBytes {
			key = key.owned()
			b.shapes[key] = nil // nothing held yet
			b.bytes += shapeEntryBytes + key.textBytes()
		}
		b.spend(ev, now)
		return false, nil
	}
	if b.spend(ev, now) || !b.lines && (len(b.held) >= maxHeldFlows || b.bytes >= maxDetailBytes) ||
		agg == nil && b.bytes >= maxDetailBytes {
		return false, nil
	}
	if agg == nil {
		agg = b.newAgg(key, true)
	}
	if !counted {
		agg.add(ev)
		agg.dups++
		return true, nil
	}
	var hf *heldFlow
	if !b.lines {
		hk := heldOf(ev)
		hk.name = strings.Clone(hk.name)
		hf = &heldFlow{agg: agg, gen: b.gen, out: ev.BytesOut, in: ev.BytesIn, source: ev.Source}
		b.held[hk] = hf
		b.bytes += heldEntryBytes + len(hk.name)
	}
	agg.add(ev)
	agg.n++
	return true, hf
}

// newAgg makes the summary of shape key, which the shapes table holds
// already (seen, with nil) or not.
func (b *detailBudget) newAgg(key shapeKey, seen bool) *shapeAgg {
	agg := &shapeAgg{key: key.owned()}
	b.bytes += aggBytes
	if seen {
		delete(b.shapes, key) // its key's text is the copy agg's replaces
	} else {
		b.bytes += shapeEntryBytes + agg.key.textBytes()
	}
	b.shapes[agg.key] = agg
	return agg
}

// twinOf returns the held flow ev is a later report of: held back in this
// interval or the one before, else twin (the ledger's record keeps it);
// nil when none, or when its flow was released (written after all).
func (b *detailBudget) twinOf(ev *Event, twin *heldFlow) *heldFlow {
	hk := heldOf(ev)
	hf := b.held[hk]
	if hf == nil {
		hf = b.prevHeld[hk]
	}
	if hf == nil {
		hf = twin
	}
	if hf == nil || hf.agg == nil {
		return nil
	}
	return hf
}

// release takes the held flow hf out of its summary, this interval's
// (a duplicate there now), for ev, a later report of it to write alone:
// ev takes the flow's bytes where larger, as the ledger's merge does.
func (b *detailBudget) release(hf *heldFlow, ev *Event) {
	old := hf.agg
	old.n--
	old.ev.BytesOut -= hf.out
	old.ev.BytesIn -= hf.in
	old.dups++ // the first report stays in the totals
	ev.BytesOut, ev.BytesIn = max(hf.out, ev.BytesOut), max(hf.in, ev.BytesIn)
	hf.agg = nil
}

// add adds ev's times and bytes to the summary.
func (agg *shapeAgg) add(ev *Event) {
	if agg.n == 0 && agg.dups == 0 {
		agg.ev = *ev
		// The key's copy of the client's text, not ev's.
		agg.ev.Name, agg.ev.Path, agg.ev.Front, agg.ev.LearnedName = agg.key.name, agg.key.path, agg.key.front, agg.key.learned
		agg.ev.ClientPort = 0 // the shape, not one connection
		agg.ev.QueryID = 0    // nor one query
		agg.ev.Until = ev.Time
		return
	}
	if ev.Time.Before(agg.ev.Time) {
		agg.ev.Time = ev.Time
	}
	if ev.Time.After(agg.ev.Until) {
		agg.ev.Until = ev.Time
	}
	agg.ev.BytesOut += ev.BytesOut
	agg.ev.BytesIn += ev.BytesIn
}

// merge holds back ev, a later report of the held flow hf, as the ledger
// merged it: its bytes raise the flow's where larger (addBytesLocked), it
// moves the drop's last seen on, and a proxy's report moves a flow
// another component reported first to the proxy's shape
// (reattributeLocked; not across an interval's end, where the first
// report's summary is written already). It reports false (write ev) only
// when there is no room for the summary.
func (b *detailBudget) merge(hf *heldFlow, ev *Event) bool {
	stale := hf.gen != b.gen
	if !stale && ev.Kind == KindFlow && ev.Source == SourceProxy && hf.source != SourceProxy {
		key := shapeOf(ev)
		agg, seen := b.shapes[key]
		if agg == nil {
			if b.bytes >= maxDetailBytes || !seen && len(b.shapes) >= maxDetailShapes {
				return false
			}
			agg = b.newAgg(key, seen)
		}
		old := hf.agg
		old.n--
		old.ev.BytesOut -= hf.out
		old.ev.BytesIn -= hf.in
		old.dups++ // the first report stays in the totals
		hf.out, hf.in = max(hf.out, ev.BytesOut), max(hf.in, ev.BytesIn)
		e := *ev
		e.BytesOut, e.BytesIn = hf.out, hf.in
		agg.add(&e)
		agg.n++
		hf.agg, hf.source = agg, ev.Source
		return true
	}
	agg := hf.agg
	if stale {
		if agg = b.late[hf.agg.key]; agg == nil {
			if len(b.late) >= maxDetailShapes || b.bytes >= maxDetailBytes {
				return false
			}
			b.bytes += lateEntryBytes // its text is its twin's
			agg = &shapeAgg{key: hf.agg.key, ev: hf.agg.ev}
			agg.ev.Time, agg.ev.Until = ev.Time, time.Time{}
			agg.ev.BytesOut, agg.ev.BytesIn = 0, 0
			b.late[agg.key] = agg
		}
	}
	if ev.BytesOut > hf.out {
		agg.ev.BytesOut += ev.BytesOut - hf.out
		hf.out = ev.BytesOut
	}
	if ev.BytesIn > hf.in {
		agg.ev.BytesIn += ev.BytesIn - hf.in
		hf.in = ev.BytesIn
	}
	if ev.Time.After(agg.ev.Until) && ev.Time.After(agg.ev.Time) {
		agg.ev.Until = ev.Time
	}
	agg.dups++
	return true
}

// spend takes one event from ev's device's budget; false when it has none
// left.
func (b *detailBudget) spend(ev *Event, now time.Time) bool {
	dev := ev.ClientMAC
	if dev == "" {
		dev = ev.Client.Unmap().String()
	}
	d := b.devs[dev]
	if d == nil {
		if len(b.devs) >= maxDetailDevices {
			return true
		}
		d = &devTokens{tokens: b.burst, last: now}
		b.devs[dev] = d
	}
	if el := now.Sub(d.last).Seconds(); el > 0 {
		d.tokens = min(b.burst, d.tokens+el*b.rate)
		d.last = now
	}
	if d.tokens >= 1 {
		d.tokens--
		return true
	}
	return false
}

// full reports whether the interval holds back as many flows, or its
// tables as many bytes, as it may: the journal ends it then.
func (b *detailBudget) full() bool { return len(b.held) >= maxHeldFlows || b.bytes >= maxDetailBytes }

// due reports whether the interval has ended at now.
func (b *detailBudget) due(now time.Time) bool {
	return !b.start.IsZero() && now.Sub(b.start) >= b.interval
}

// roll ends the interval: it calls fn with the summary record of each
// shape that held events back, and forgets the shapes and the devices
// whose budget is full again.
func (b *detailBudget) roll(now time.Time, fn func(Event)) {
	for _, m := range []map[shapeKey]*shapeAgg{b.shapes, b.late} {
		for _, agg := range m {
			if agg == nil || agg.n == 0 && agg.dups == 0 {
				continue
			}
			s := agg.ev
			s.Count, s.Duplicates = agg.n, agg.dups
			if !s.Until.After(s.Time) {
				s.Until = time.Time{}
			}
			fn(s)
		}
		clear(m)
	}
	b.pin()
	b.held, b.prevHeld = b.prevHeld, b.held
	clear(b.held)
	b.bytes = 0
	b.gen++
	for k, d := range b.devs {
		if d.tokens+now.Sub(d.last).Seconds()*b.rate >= b.burst {
			delete(b.devs, k)
		}
	}
	b.start = time.Time{}
}

// pin keeps the held flows prevHeld lets go at the interval's end as a
// past interval's (pinned), and lets the summaries of the oldest go while
// the past intervals' cost more than maxPinnedBytes, or their flows have
// left the ledger (maxPinnedFlows newer ones). A flow let go has no
// summary (agg nil): a later report of it is no twin (twinOf) and is
// written alone, and when the ledger still remembers the flow (past
// maxPinnedBytes only), the log read again counts it a second time where
// the live ledger counted it once.
func (b *detailBudget) pin() {
	if len(b.prevHeld) > 0 {
		g := pinGen{flows: make([]*heldFlow, 0, len(b.prevHeld))}
		aggs := make(map[*shapeAgg]struct{}, len(b.prevHeld))
		for _, hf := range b.prevHeld {
			if hf.agg == nil {
				continue // released: written after all
			}
			g.flows = append(g.flows, hf)
			if _, ok := aggs[hf.agg]; !ok {
				aggs[hf.agg] = struct{}{}
				g.bytes += aggBytes + hf.agg.key.textBytes()
			}
		}
		g.bytes += len(g.flows) * int(unsafe.Sizeof(uintptr(0)))
		if len(g.flows) > 0 {
			b.pinned = append(b.pinned, g)
			b.pinnedBytes += g.bytes
			b.pinnedFlows += len(g.flows)
		}
	}
	newer := len(b.held) // they stay in prevHeld
	for len(b.pinned) > 0 && (b.pinnedBytes > maxPinnedBytes || b.pinnedFlows-len(b.pinned[0].flows)+newer >= maxPinnedFlows) {
		g := b.pinned[0]
		for _, hf := range g.flows {
			hf.agg = nil
		}
		b.pinnedBytes -= g.bytes
		b.pinnedFlows -= len(g.flows)
		b.pinned[0] = pinGen{}
		b.pinned = b.pinned[1:]
	}
	if len(b.pinned) == 0 {
		b.pinned = nil // the array's start, let go
	}
}

// isSummary reports whether ev is a summary record of held-back events
// (Count of them, Duplicates more), not one event.
func (ev *Event) isSummary() bool {
	return (ev.Kind == KindFlow || ev.Kind == KindDNS || ev.Kind == KindRequest) && (ev.Count != 0 || ev.Duplicates != 0)
}

// expand calls fn with the events a summary record stands for: Count
// events, each counted on its own (never merged into another as the same
// flow), the first at Time and the last at Until; then Duplicates events
// the live ledger had merged into flows it counted already (they add to
// the totals' events and duplicates, and move the drop's last seen to
// Until). The bytes go with the first of them.
func (ev Event) expand(fn func(Event)) {
	n, dups, until := ev.Count, ev.Duplicates, ev.Until
	ev.Count, ev.Duplicates, ev.Until = 0, 0, time.Time{}
	first := true
	emit := func(e Event) {
		if !first {
			e.BytesOut, e.BytesIn = 0, 0
		}
		first = false
		fn(e)
	}
	ev.expanded = expandedCounted
	for i := uint64(0); i < n; i++ {
		e := ev
		if i == n-1 && n > 1 && !until.IsZero() {
			e.Time = until
		}
		emit(e)
	}
	ev.expanded = expandedDuplicate
	if !until.IsZero() {
		ev.Time = until
	}
	for i := uint64(0); i < dups; i++ {
		emit(ev)
	}
}

// The kinds of events expanded from a summary record (Event.expanded).
const (
	expandedCounted   = 1 // counted on its own, never deduplicated
	expandedDuplicate = 2 // a duplicate the live ledger merged
)
