package audit

import (
	"bytes"
	"cmp"
	"context"
	"encoding/hex"
	"hash/maphash"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"egressd/policy"
)

// LedgerOptions tune the ledger's memory bounds. The zero value of every
// field picks the documented default.
type LedgerOptions struct {
	// MaxClients bounds the client addresses kept per rule and per dropped
	// entry; beyond it the list is marked as truncated. Default 64.
	MaxClients int
	// TopDestinations is how many destinations a rule lists in a report,
	// most used first. Default 10.
	TopDestinations int
	// MaxDestinations bounds the destinations counted per rule (a
	// space-saving counter: the top ones stay exact while the set is
	// small, and approximately right beyond it). Default 256.
	MaxDestinations int
	// MaxDropped bounds the dropped entries (dest, port, proto); flows of
	// further destinations are counted in Report.DroppedOverflow.
	// Default 4096.
	MaxDropped int
	// MaxFlows bounds the table of recent flows used to count a flow once
	// when several components report it. Default 65536.
	MaxFlows int
	// Now is the clock for expired rules; nil means time.Now.
	Now func() time.Time
}

func (o *LedgerOptions) fill() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MaxClients, 64)
	def(&o.TopDestinations, 10)
	def(&o.MaxDestinations, 256)
	def(&o.MaxDropped, 4096)
	o.MaxDropped = max(o.MaxDropped, 2)
	def(&o.MaxFlows, 65536)
	if o.Now == nil {
		o.Now = time.Now
	}
}

// How far apart two reports of one flow may start and still be the same
// flow. TCP: observers see the same connection a few milliseconds apart
// (capture sees the SYN, the proxy the accept). UDP: DESIGN.md says a UDP
// flow is one 5-tuple exchange with no more than 60 s of silence.
const (
	tcpFlowSlack = 2 * time.Second
	udpFlowIdle  = 60 * time.Second
)

// Ledger turns events into per-rule usage and the dropped list. It
// implements [Sink] (Emit never waits on anything but its own mutex, held
// for map updates only) and is safe for concurrent use.
//
// Counting rules (see also DESIGN.md):
//   - A flow event counts once per flow: events with the same 5-tuple whose
//     start times fall within the flow (2 s slack for TCP, 60 s of silence
//     for UDP) are one flow, whichever components reported it. The first
//     report attributes the flow to a rule or to a dropped entry; later
//     reports only raise its byte counts (to the largest seen, never a sum),
//     its last-seen time, and its enforced flag. Two reports take the
//     flow elsewhere: the proxy's, over capture's (reattributeLocked),
//     a deny of a flow counted allowed, after a policy reload, from the
//     component that decided it or from the firewall that cut it
//     (redecided), and an allow of a flow counted as an audit-mode
//     would-be deny, from the component that decided it, of the same
//     start, after a reload (to enforce, or in audit mode) allowed the
//     flow (recredited). A report marked revised (Event.Revised) whose
//     flow the ledger no longer holds is a duplicate: the first report's
//     count stands. (The journal clears the mark of a revised report
//     whose first report it shed or could not write: that one is the
//     connection's only report, and counts as the flow: lostFirsts.)
//   - A DNS query event is not a flow. An allowed query counts in its
//     rule's "queries" (and its name as a destination, its client as a
//     client, its time in first/last seen), so a rule whose names were only
//     resolved is used, not unused. A denied query counts in the dropped
//     list under (name, 53, "dns") with "queries" set and "flows" zero.
//     Queries are deduplicated like flows, with the name, type and DNS
//     message ID in the key, and only within 2 s of a query's first
//     report: one socket's queries each count (each takes a new ID), a
//     retransmission (the same ID, seconds later) counts with its
//     query; a query over TCP always counts (no retransmission there). Only the DNS forwarder reports queries (capture records DNS
//     to it or to another resolver as a flow, which is never merged with
//     a query).
//   - A request event (a later HTTP request on a plain-HTTP connection, or
//     a request in an inspected one) is not a flow either: allowed, it
//     counts in its rule's "requests" (with its name, client and time);
//     denied, in the dropped list under (name, port, "tcp") with
//     "requests" set. Requests are never deduplicated: one component
//     reports them, once each (the proxy; capture for connections that
//     do not pass the proxy: audit mode, offline).
//   - Unused rules are the policy's rules with neither flows, queries nor
//     requests;
//     expired rules are listed separately, with the flows they would have
//     allowed.
type Ledger struct {
	opt LedgerOptions

	// reporting is the turn to build a report (a token: full while one
	// is built). One is built at a time: a build from l copies its
	// counts (copyLocked) and gives its clients' sets back once built
	// (releaseLocked), which holds only while no other copy of l reads
	// them; and at the bounds a build allocates about 386 MB
	// (BenchmarkReportDroppedFull). What a report does before its build
	// (the wait for the start-up read, the open flows, a window's log
	// read) is done without it.
	reporting chan struct{}
	// windows is the turn to read a window (Since) of the event log into
	// a ledger of its own, held until that window's report is built: at
	// the bounds each such ledger is as big as l, and several read at
	// once took that much each (BenchmarkReportsHeap "since").
	// windowReads at a time; the others wait.
	windows chan struct{}

	mu      sync.Mutex // guards following
	eng     *policy.Engine
	rules   map[string]*ruleStats
	dropped map[dropKey]*dropStats
	// flows is the table of remembered records by flowID.hash (one
	// cheap hash per lookup; records still compare whole ids): open
	// addressing, linear probing, a power of two of slots at least
	// twice the ring's records (it doubles as the ring grows, to twice
	// MaxFlows), a record taken out with the slots after it shifted back
	// (no deleted marks). Not a Go map: each query a client sends is a
	// record of its own, so at dnsperf's rate the table takes one record
	// out and one in for nearly every query, and the map's deleted slots
	// made its lookups of a new query's (absent) hash probe long (14 %
	// of BenchmarkJournalWriteDNSSockets' CPU). A slot keeps the hash,
	// so a lookup reads no record but those of its hash.
	flows   []flowSlot
	seed    maphash.Seed
	ring    []*flowRec // insertion order, for eviction; len <= MaxFlows
	ringPos int
	totals  Totals
	// lastMode is the mode of the latest event, for reports without a
	// policy.
	lastMode policy.Mode
	// alarms are the KindAlarm events, by (reason, client, MAC, zone):
	// at most maxAlarms of them, the rest counted in alarmsDropped.
	alarms        map[alarmKey]*AlarmReport
	alarmsDropped uint64
	shed          uint64
	// unwritten counts events added here that the journal failed to
	// write: they will be missing after a restart.
	unwritten uint64
	// shedMarks are (time, count) of shed records, for windowed reports.
	shedMarks []shedMark
	// history, when set, streams the recorded events since a time: the
	// journal sets it so that reports over a window re-read the log. It
	// stops, with ctx's error, once ctx ends (at the next 64 KiB).
	ech     echStats
	history func(ctx context.Context, since time.Time, fn func(Event)) error
	// metrics, when set, counts live events per rule and verdict.
	metrics *ledgerMetrics
	// firstEvent is the time of the oldest event added (not from the
	// summary): where the detailed log begins when nothing was rotated
	// out.
	firstEvent time.Time
	// arch is what the summary of rotated-out files covers, when the
	// ledger started from one or the journal folded a file into it;
	// archNote says why a summary could not be read.
	arch     *archInfo
	archNote string
	// holding and holdGen are set by emitHold for the call: the detail
	// budget's interval. A held flow of an interval before has its
	// summary written in the log already: a later report of it then
	// merges into the flow as it counts, never moves it
	// (reattributeLocked), as the log cannot move it either.
	holding bool
	holdGen uint64
	// moved is set by addRecLocked when the event it adds moves a flow
	// (reattributeLocked). emitHold never holds back a later report of
	// a flow written one by one that moved it, or merged into it as
	// allowed: a summary (no ports) counts as a drop when the log is
	// read again, and moves nothing.
	moved bool
	// open, when set, lists the flows open now that no event reported
	// yet (SetOpenFlows): the live report counts them, the ledger not.
	open func() []Event
	// loadWait, set by a journal that reads the log in the background
	// (JournalConfig.Background), waits a while for the read to end and
	// says how far it got when it did not (nil: whole).
	loadWait func(time.Duration) *Loading
}

// archLast returns the newest file of the summary the ledger started
// from, or "".
func (l *Ledger) archLast() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.arch == nil {
		return ""
	}
	return l.arch.lastFile
}

var _ Sink = (*Ledger)(nil)

// Totals are the ledger's event counts.
type Totals struct {
	Events     uint64 `json:"events"`     // events added, duplicates included
	Duplicates uint64 `json:"duplicates"` // events merged into a flow or query already counted
	Flows      uint64 `json:"flows"`      // distinct flows
	Allowed    uint64 `json:"allowed_flows"`
	Dropped    uint64 `json:"dropped_flows"` // denied flows, enforced or not
	Queries    uint64 `json:"queries"`       // distinct DNS queries
	// Requests are HTTP requests after the first on plain-HTTP
	// connections and requests in inspected ones (each decided on its
	// own), DroppedRequests those denied.
	Requests        uint64 `json:"requests,omitempty"`
	DroppedRequests uint64 `json:"dropped_requests,omitempty"`
	Ignored         uint64 `json:"ignored"` // events of unknown kind
}

type shedMark struct {
	t time.Time
	n uint64
}

type ruleStats struct {
	name              string
	flows, queries    uint64
	requests          uint64
	bytesOut, bytesIn uint64
	denied            uint64 // flows denied citing this rule (expired)
	// withheld are queries whose answer the DNS forwarder cut because
	// full learned sets refused addresses (allowed DNS events with
	// Enforced set): RuleReport.AnswersWithheld.
	withheld    uint64
	clients     clientSet
	dests       destCounter
	first, last time.Time
}

type dropKey struct {
	dest  string
	port  uint16
	proto string
}

type dropStats struct {
	key               dropKey
	ip                netip.Addr   // the latest flow's
	ips               []netip.Addr // the distinct addresses of its flows, at most maxDropIPs
	ipsTruncated      bool
	flows, queries    uint64
	requests          uint64
	enforcedFlows     uint64
	enforced          bool // the latest flow was blocked
	bytesOut, bytesIn uint64
	reason, rule      string
	clients           clientSet
	first, last       time.Time
	// allowed is the last report's allowedNow and what it was decided
	// on: a report decides again only an entry whose inputs changed
	// since (a reload, a rule expired, a client or MAC seen).
	allowed allowedMemo
}

// maxDropIPs bounds the addresses a dropped entry lists (a name behind
// a CDN goes to many): past it the list is marked truncated.
const maxDropIPs = 8

// addIP notes an address of the entry's flows.
func (ds *dropStats) addIP(a netip.Addr) {
	if !a.IsValid() || slices.Contains(ds.ips, a) {
		return
	}
	if len(ds.ips) >= maxDropIPs {
		ds.ipsTruncated = true
		return
	}
	ds.ips = append(ds.ips, a)
}

// ipList is the entry's addresses, sorted, when it has more than one
// (or lost some to the bound): nil for one, which ip says.
func (ds *dropStats) ipList() []netip.Addr {
	if len(ds.ips) < 2 && !ds.ipsTruncated {
		return nil
	}
	l := slices.Clone(ds.ips)
	slices.SortFunc(l, netip.Addr.Compare)
	return l
}

// allowedMemo is allowedNow of a dropped entry as decided by eng, with
// expired of its rules expired, for the entry's clients at gen, its
// address ip and its reason.
type allowedMemo struct {
	eng     *policy.Engine
	expired int
	gen     uint64
	ip      netip.Addr
	reason  string
	rule    string
}

// flowID identifies a flow or a query for deduplication.
type flowID struct {
	FlowKey
	kind  Kind
	name  string // queries only
	qtype string // queries only
	qid   uint16 // queries only: the DNS message ID
}

// keyed reports whether id names one flow: it has a port, or is of an IP
// protocol without ports (capture's flows of protocols other than TCP and
// UDP, one per client, destination and protocol). An event of neither
// names none, and each counts.
func (id *flowID) keyed() bool {
	return id.ClientPort != 0 || id.DestPort != 0 || id.Proto != "tcp" && id.Proto != "udp" && id.Proto != ""
}

// hash digests id for the flows map (records still compare whole ids).
func (id *flowID) hash(seed maphash.Seed) uint64 {
	var h maphash.Hash
	h.SetSeed(seed)
	c, d := id.Client.As16(), id.Dest.As16()
	var b [16 + 16 + 4]byte
	copy(b[:16], c[:])
	copy(b[16:32], d[:])
	b[32], b[33] = byte(id.ClientPort>>8), byte(id.ClientPort)
	b[34], b[35] = byte(id.DestPort>>8), byte(id.DestPort)
	h.Write(b[:])
	h.WriteString(string(id.kind))
	h.WriteByte(0)
	h.WriteString(id.Proto)
	h.WriteByte(0)
	h.WriteString(id.name)
	h.WriteByte(0)
	h.WriteString(id.qtype)
	h.WriteByte(byte(id.qid >> 8))
	h.WriteByte(byte(id.qid))
	return h.Sum64()
}

// flowSlot is a slot of Ledger.flows: a record and its id's hash (r
// nil: empty).
type flowSlot struct {
	h uint64
	r *flowRec
}

type flowRec struct {
	id                flowID
	h                 uint64 // id.hash
	start, end        time.Time
	bytesOut, bytesIn uint64
	enforced          bool
	rule              *ruleStats   // allowed
	drop              *dropStats   // denied (nil past MaxDropped's overflow too)
	denied            *ruleStats   // denied: the expired rule that would have allowed it
	source            Source       // of the report that decided the attribution
	dest              string       // allowed: the name counted in rule.dests
	held              *heldFlow    // the journal's detail budget held its first report back
	others            *otherCredit // allowed: the other rules its other names used (creditOthersLocked)
}

// otherCredit is a rule other than its flow's own that allows one of the
// flow's other names (a QUIC flow's later connections' hosts,
// Event.OtherNames), credited the flow (creditOthersLocked) and taken
// back with the flow's own (reattributeLocked): a list, one a rule.
type otherCredit struct {
	rule *ruleStats
	dest string // the name counted in rule.dests
	next *otherCredit
}

// NewLedger returns an empty ledger for the policy eng (which may be nil:
// then no rule is unused or expired).
func NewLedger(eng *policy.Engine, opt LedgerOptions) *Ledger {
	opt.fill()
	return &Ledger{
		opt:     opt,
		eng:     eng,
		rules:   map[string]*ruleStats{},
		dropped: map[dropKey]*dropStats{},
		seed:    maphash.MakeSeed(),

		reporting: make(chan struct{}, 1),
		windows:   make(chan struct{}, windowReads),
	}
}

// SetPolicy replaces the policy whose rules the report lists as unused or
// expired, after a reload. Counts are kept.
func (l *Ledger) SetPolicy(eng *policy.Engine) {
	l.mu.Lock()
	l.eng = eng
	l.mu.Unlock()
}

// Policy returns the current policy, or nil.
func (l *Ledger) Policy() *policy.Engine {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.eng
}

// Emit adds a live event to the ledger, bounded (Event.Bound) as the
// journal bounds it.
func (l *Ledger) Emit(ev Event) { l.emit(ev) }

// emit is Emit, and reports whether ev was counted as a new flow, query
// or request (false: a duplicate, or an ignored event).
func (l *Ledger) emit(ev Event) bool {
	ev.Bound()
	l.mu.Lock()
	counted := l.addLocked(&ev)
	m := l.metrics
	l.mu.Unlock()
	if m != nil {
		m.observe(&ev, counted)
	}
	return counted
}

// emitHold is emit for the journal's writer, which decides with the
// detail budget whether ev is held back from the log: hold is called
// under the ledger's lock with whether ev counted as a new flow, query
// or request and, for a later report of a flow whose first report was
// held back, that held flow (the record keeps it for as long as the
// ledger remembers the flow, so that a later report of it is held back
// too however late it comes). hold returns whether it holds ev back and,
// for a counted flow or query it holds back, the held flow to keep on
// its record. gen is the budget's interval: a flow held back in one
// before it has its summary written, and a later report of it (the
// proxy's, which would decide where the flow counts) merges into it as
// it counts, as the log read again counts it.
func (l *Ledger) emitHold(ev Event, gen uint64, hold func(counted bool, twin *heldFlow) (bool, *heldFlow)) (counted, held bool) {
	ev.Bound()
	l.mu.Lock()
	l.holding, l.holdGen, l.moved = true, gen, false
	counted, rec := l.addRecLocked(&ev)
	l.holding = false
	var twin *heldFlow
	if rec != nil && !counted {
		twin = rec.held
	}
	var hf *heldFlow
	if counted || twin != nil || rec == nil || !l.moved && rec.rule == nil {
		held, hf = hold(counted, twin)
	}
	if rec != nil && counted && held {
		rec.held = hf
	}
	m := l.metrics
	l.mu.Unlock()
	if m != nil {
		m.observe(&ev, counted)
	}
	return counted, held
}

// add adds a recorded event (no metrics).
func (l *Ledger) add(ev *Event) {
	ev.Bound() // a log written before events were bounded
	l.mu.Lock()
	l.addLocked(ev)
	l.mu.Unlock()
}

// holdsFlow reports whether the ledger holds a flow that ev, a flow
// report, would count as a duplicate of: another report of its connection
// (another component's) counted it. The journal keeps a lost first report
// (lostFirsts) only of a connection no report counted: a later report of
// one that counted stays a duplicate, in the log too, where the ledger
// read again may have forgotten the flow by then. try: not when the lock
// is taken (Journal.Emit, which never waits on it); it reports true then.
func (l *Ledger) holdsFlow(ev *Event, try bool) bool {
	id := flowID{FlowKey: ev.Key(), kind: KindFlow}
	id.Proto = knownText(id.Proto)
	if !id.keyed() {
		return false
	}
	h := id.hash(l.seed)
	if !try {
		l.mu.Lock()
	} else if !l.mu.TryLock() {
		return true
	}
	defer l.mu.Unlock()
	rec := l.findLocked(id, h, ev.Time.UTC())
	return rec != nil && !anotherFlow(rec, ev)
}

// addShed records n events shed at t.
func (l *Ledger) addShed(t time.Time, n uint64) {
	if n == 0 {
		return
	}
	l.mu.Lock()
	l.shed += n
	l.shedMarks = append(l.shedMarks, shedMark{t.UTC(), n})
	// Bound the marks: merge pairs when there are too many (windowed
	// reports lose some precision about when, never how many).
	if len(l.shedMarks) > 4096 {
		half := l.shedMarks[:0]
		for i := 0; i+1 < len(l.shedMarks); i += 2 {
			half = append(half, shedMark{l.shedMarks[i+1].t, l.shedMarks[i].n + l.shedMarks[i+1].n})
		}
		if len(l.shedMarks)%2 == 1 {
			half = append(half, l.shedMarks[len(l.shedMarks)-1])
		}
		l.shedMarks = half
	}
	l.mu.Unlock()
}

// addUnwritten records n events that could not be written to the log.
func (l *Ledger) addUnwritten(n uint64) {
	if n == 0 {
		return
	}
	l.mu.Lock()
	l.unwritten += n
	l.mu.Unlock()
}

// Len returns the number of entries the ledger holds (rules, dropped
// entries and remembered flows): its size for metrics.
func (l *Ledger) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.rules) + len(l.dropped) + len(l.ring)
}

// addLocked adds ev and reports whether it was a new flow or query (false
// for a duplicate or an ignored event).
func (l *Ledger) addLocked(ev *Event) bool {
	counted, _ := l.addRecLocked(ev)
	return counted
}

// addRecLocked is addLocked, and returns the remembered record of the
// flow or query ev was counted as or merged into (nil: none).
func (l *Ledger) addRecLocked(ev *Event) (bool, *flowRec) {
	l.totals.Events++
	if ev.expanded == expandedDuplicate { // merged live into a flow counted already
		l.totals.Duplicates++
		if ev.Verdict == policy.Deny && ev.Kind != KindRequest {
			ds := l.dropLocked(ev)
			ds.bytesOut += ev.BytesOut
			ds.bytesIn += ev.BytesIn
			ds.seen(ev.Time.UTC())
			if ev.ClientMAC != "" {
				ds.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
			}
		}
		return false, nil
	}
	if t := ev.Time; !t.IsZero() && (l.firstEvent.IsZero() || t.Before(l.firstEvent)) {
		l.firstEvent = t.UTC()
	}
	if ev.Kind == KindRequest {
		l.addRequestLocked(ev)
		return true, nil
	}
	if ev.Kind == KindAlarm {
		l.addAlarmLocked(ev)
		return false, nil
	}
	if ev.Kind != KindFlow && ev.Kind != KindDNS {
		l.totals.Ignored++
		return false, nil
	}
	t := ev.Time.UTC()
	if ev.Mode != "" {
		l.lastMode = ev.Mode
	}
	id := flowID{FlowKey: ev.Key(), kind: KindFlow}
	id.Proto = knownText(id.Proto)
	if ev.Kind == KindDNS {
		id.kind = KindDNS
		id.name, id.qtype, id.qid = lowerASCII(trimDot(ev.Name)), knownText(ev.QType), ev.QueryID
	}
	// An event of a summary record was counted on its own live. A
	// query over TCP is never retransmitted (TCP does that below DNS),
	// and a client may take its ID again on one connection: each counts.
	dedup := id.keyed() && ev.expanded != expandedCounted &&
		!(ev.Kind == KindDNS && id.Proto == "tcp")
	var h uint64
	if dedup {
		h = id.hash(l.seed)
		if rec := l.findLocked(id, h, t); rec != nil && !anotherFlow(rec, ev) {
			l.totals.Duplicates++
			frozen := l.holding && rec.held != nil && rec.held.gen != l.holdGen
			if ev.Kind == KindFlow && !frozen && moves(rec, ev) {
				l.reattributeLocked(rec, ev, t)
				l.moved = true
			} else {
				l.mergeLocked(rec, ev, t)
			}
			return false, rec
		}
		if ev.Revised && ev.Kind == KindFlow {
			// A later report of a flow the ledger no longer holds
			// (Event.Revised): where the first report counted it is
			// not known here (a deny does not say the rule it takes
			// the flow from), so that count stands, as a held flow's
			// summary does, and this one is a duplicate. Counted
			// anew, the connection would count twice. (A first
			// report the journal lost never gets here: lostFirsts.)
			l.totals.Duplicates++
			return false, nil
		}
	}
	var rec *flowRec
	if dedup {
		rec = l.recLocked()
	} else {
		rec = new(flowRec)
	}
	rec.id, rec.h, rec.start, rec.end = id, h, t, t.Add(time.Duration(ev.Duration*float64(time.Second)))
	if ev.Filtered != "" {
		l.ech.add(ev, &l.opt)
	}
	if ev.Kind == KindFlow {
		l.totals.Flows++
	} else {
		l.totals.Queries++
	}
	l.attributeLocked(rec, ev, t)
	if !dedup {
		return true, nil
	}
	l.rememberLocked(rec)
	return true, rec
}

// attributeLocked counts a new flow or query record in its rule (allowed)
// or its dropped destination (denied), with ev's bytes.
func (l *Ledger) attributeLocked(rec *flowRec, ev *Event, t time.Time) {
	rec.source = Source(knownText(string(ev.Source)))
	if ev.Verdict == policy.Allow {
		rs := l.ruleLocked(ev.Rule)
		if ev.Kind == KindFlow {
			rs.flows++
			l.totals.Allowed++
		} else {
			rs.queries++
			if ev.Enforced {
				rs.withheld++
			}
		}
		rs.bytesOut += ev.BytesOut
		rs.bytesIn += ev.BytesIn
		rs.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
		rec.dest = rs.dests.add(recDest(rec, ev), l.opt.MaxDestinations)
		rec.shareName(rec.dest)
		rs.seen(t)
		rec.rule = rs
		if ev.Kind == KindFlow && len(ev.OtherNames) > 0 {
			l.creditOthersLocked(rec, ev, t)
		}
	} else {
		if ev.Rule != "" { // an expired rule that would have allowed it
			rs := l.ruleLocked(ev.Rule)
			if ev.Kind == KindFlow {
				rs.denied++
				rec.denied = rs
			}
		}
		if ev.Kind == KindFlow {
			l.totals.Dropped++
		}
		ds := l.dropNameLocked(ev, recDest(rec, ev))
		if ds != nil {
			rec.shareName(ds.key.dest)
			if ev.Kind == KindFlow {
				ds.flows++
				if ev.Enforced {
					ds.enforcedFlows++
				}
			} else {
				ds.queries++
			}
			if ev.Dest.IsValid() && ev.Kind == KindFlow {
				ds.addIP(ev.Dest.Unmap())
			}
			if !t.Before(ds.last) {
				ds.enforced = ev.Enforced
				if ev.Dest.IsValid() && ev.Kind == KindFlow { // a query's Dest is the resolver
					ds.ip = ev.Dest.Unmap()
				}
			}
			ds.bytesOut += ev.BytesOut
			ds.bytesIn += ev.BytesIn
			ds.reason, ds.rule = ev.Reason, ev.Rule
			ds.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
			ds.seen(t)
		}
		rec.drop = ds
	}
	rec.bytesOut, rec.bytesIn, rec.enforced = ev.BytesOut, ev.BytesIn, ev.Enforced
}

// creditOthersLocked credits the allowed flow rec of ev the rules of l's
// policy that allow ev's other names (a QUIC flow's later connections'
// hosts, each of which capture allowed by its own name), each rule once,
// but for the flow's own: the flow, its client, the name and its times,
// not its bytes (those count in its own rule). A rule used only by a
// flow's second name is used, not listed unused for `policy check` to
// suggest deleting (TestLedgerOtherNamesUseRules). Without a policy no
// rule is unused: nothing to credit.
func (l *Ledger) creditOthersLocked(rec *flowRec, ev *Event, t time.Time) {
	if l.eng == nil {
		return
	}
	pr, _ := policy.ParseProto(ev.Proto)
	in := policy.Input{Client: ev.Client.Unmap(), Dest: ev.Dest.Unmap(), Port: ev.DestPort, Proto: pr, Now: t}
	if ev.ClientMAC != "" {
		in.ClientMAC, _ = net.ParseMAC(ev.ClientMAC)
	}
	for _, o := range ev.OtherNames {
		in.Name = o
		d := l.eng.Decide(in)
		if !d.Allowed() || d.Rule == rec.rule.name {
			continue
		}
		rs := l.ruleLocked(d.Rule)
		credited := false
		for c := rec.others; c != nil && !credited; c = c.next {
			credited = c.rule == rs
		}
		if credited {
			continue
		}
		rs.flows++
		rs.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
		dest := rs.dests.add(lowerASCII(trimDot(Clip(o, MaxNameBytes))), l.opt.MaxDestinations)
		rs.seen(t)
		rec.others = &otherCredit{rule: rs, dest: dest, next: rec.others}
	}
}

// reattributeLocked lets the proxy's report of a TCP flow decide where the
// flow counts when capture's report of it came first: the proxy made and
// enforced the decision (a Host that disagrees with the URL, a request
// refused on a kept-alive connection), capture only watched the packets,
// and which of the two reaches the ledger first is a race. What capture's
// report counted is taken back, but for the clients and times it noted
// and the metrics' labels (counters do not go back); the bytes stay the
// largest either reported.
func (l *Ledger) reattributeLocked(rec *flowRec, ev *Event, t time.Time) {
	out, in := rec.bytesOut, rec.bytesIn
	if rs := rec.rule; rs != nil {
		l.totals.Allowed--
		rs.flows--
		rs.bytesOut -= out
		rs.bytesIn -= in
		rs.dests.remove(rec.dest)
		for c := rec.others; c != nil; c = c.next {
			c.rule.flows--
			c.rule.dests.remove(c.dest)
		}
	} else {
		l.totals.Dropped--
		if rs := rec.denied; rs != nil {
			rs.denied--
		}
		if ds := rec.drop; ds != nil {
			ds.flows--
			if rec.enforced {
				ds.enforcedFlows--
			}
			ds.bytesOut -= out
			ds.bytesIn -= in
		}
	}
	rec.rule, rec.drop, rec.denied, rec.dest, rec.others = nil, nil, nil, "", nil
	l.attributeLocked(rec, ev, t)
	if end := t.Add(time.Duration(ev.Duration * float64(time.Second))); end.After(rec.end) {
		rec.end = end
	}
	l.addBytesLocked(rec, out, in)
}

// redecided reports whether ev, a later report of the flow rec counts as
// allowed, denies it after a policy reload: the component that decided it
// decided it again (capture re-judging a forwarded flow, in audit mode a
// would-be deny), or the firewall cut it (enforce). Components decide a
// flow once otherwise, so a deny from the same source can only be that.
// The flow then counts as dropped, as if the deny had come first: the
// report must show what the new policy blocks, or would block. A flow
// denied all along stays where it is (but for a would-be deny the reload
// to enforce lets go on: recredited); so does one the proxy decided (its
// report wins over capture's, above). So does one whose deny from the
// same component has another start: not the flow reported again but
// another of its 5-tuple within the window (a client reconnecting from
// the port it binds, to a name no rule allows); the first flow was
// allowed, as recredited keeps a would-be deny; the deny is counted
// as a flow of its own (anotherFlow). The firewall's cut is
// timed at the cut, not at the flow's start (it reports flows capture
// does not follow), and cuts only a live flow: it moves the flow its
// window finds.
// anotherFlow reports whether ev, a deny of the 5-tuple of the allowed
// flow rec that the ledger's window finds, from the same component, is
// another flow than rec (another start: a client that binds its source
// port, reconnecting to a name no rule allows): counted as a flow of its
// own, a would-be deny, not merged into the allowed one, where it was in
// no count at all (and its bytes in the allowed rule's).
func anotherFlow(rec *flowRec, ev *Event) bool {
	return ev.Kind == KindFlow && ev.Verdict == policy.Deny && rec.rule != nil && rec.id.kind == KindFlow &&
		ev.Source == rec.source && !ev.Time.Equal(rec.start)
}

// redecided is described above (before anotherFlow). A connection the
// proxy's fast path allowed is the kernel's after the decision: the
// proxy does not follow it, and a reload's sweep cuts it as it cuts any
// forwarded flow. That cut (capture's report of it, or the firewall's)
// moves it too, though the proxy decided it: the only proxy-decided
// connections the firewall can cut are those (a redirected one never
// reaches the forward chain).
func redecided(rec *flowRec, ev *Event) bool {
	return ev.Kind == KindFlow && ev.Verdict == policy.Deny && rec.rule != nil &&
		(ev.Source == rec.source && ev.Time.Equal(rec.start) ||
			ev.Source == SourceFirewall && rec.source != SourceProxy ||
			ev.Source != SourceProxy && rec.source == SourceProxy && ev.Enforced && ev.Close == closeRevoked)
}

// closeRevoked is the close reason of a flow a reload cut (capture's and
// the firewall's reports of the cut, the proxy's of its own).
const closeRevoked = "policy-revoked"

// recredited reports whether ev, a later report of the flow rec counts as
// a would-be deny of audit mode (not enforced), allows it after a policy
// reload: the component that decided it decided it again and credits the
// rule. After the reload to enforce, the enforce ruleset lets the flow go
// on (capture: a CIDR rule admits its address, or the forwarder's answer
// the learned sets begin with); after a reload in audit mode, the new
// policy allows it (the rule --suggest proposed, added). The flow then
// counts under the rule, as if the allow had come first: the reverse of
// redecided, so the report after the reload shows what enforce would drop
// now. A deny enforced stays where it is (the kernel dropped the flow).
// So does one whose allow has another start: not the flow reported again
// but another of its 5-tuple within the window (a client reconnecting
// from the port it binds, with another name); that flow is still what
// enforce would drop, and one the detail budget held back is in a
// summary the log cannot move.
func recredited(rec *flowRec, ev *Event) bool {
	return ev.Kind == KindFlow && ev.Verdict == policy.Allow &&
		rec.rule == nil && !rec.enforced && rec.id.kind == KindFlow && ev.Source == rec.source &&
		ev.Time.Equal(rec.start)
}

// moves reports whether ev, a later report of the flow rec, takes the
// flow elsewhere (reattributeLocked): the proxy's over another
// component's, a deny after a reload (redecided), an allow of a would-be
// deny after a reload (recredited).
func moves(rec *flowRec, ev *Event) bool {
	return ev.Source == SourceProxy && rec.source != SourceProxy || redecided(rec, ev) || recredited(rec, ev)
}

// addRequestLocked counts a request event: in its rule, or in the dropped
// list; never as a flow, never deduplicated.
func (l *Ledger) addRequestLocked(ev *Event) {
	t := ev.Time.UTC()
	if ev.Mode != "" {
		l.lastMode = ev.Mode
	}
	l.totals.Requests++
	if ev.Verdict == policy.Allow {
		rs := l.ruleLocked(ev.Rule)
		rs.requests++
		rs.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
		rs.dests.add(destName(ev), l.opt.MaxDestinations)
		rs.seen(t)
		return
	}
	l.totals.DroppedRequests++
	ds := l.dropLocked(ev)
	ds.requests++
	if ev.Dest.IsValid() {
		ds.addIP(ev.Dest.Unmap())
	}
	if !t.Before(ds.last) {
		ds.enforced = ev.Enforced
		if ev.Dest.IsValid() {
			ds.ip = ev.Dest.Unmap()
		}
	}
	ds.reason, ds.rule = ev.Reason, ev.Rule
	ds.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
	ds.seen(t)
}

func (rs *ruleStats) seen(t time.Time) { widenSeen(&rs.first, &rs.last, t) }

func (ds *dropStats) seen(t time.Time) { widenSeen(&ds.first, &ds.last, t) }

func (a *AlarmReport) seen(t time.Time) { widenSeen(&a.FirstSeen, &a.LastSeen, t) }

// widenSeen widens an entry's first..last seen to t: the earliest and the
// latest time of its events, whatever order they come in (a component
// reports a flow when it is decided or ends, the log read again after a
// rotation has the summary's span first). The zero time (a log line
// without one) is no time and changes neither.
func widenSeen(first, last *time.Time, t time.Time) {
	if t.IsZero() {
		return
	}
	if first.IsZero() || t.Before(*first) {
		*first = t
	}
	if t.After(*last) {
		*last = t
	}
}

// findLocked returns the remembered flow ev belongs to, if any.
func (l *Ledger) findLocked(id flowID, h uint64, t time.Time) *flowRec {
	slack := tcpFlowSlack
	if id.Proto == "udp" && id.kind == KindFlow {
		slack = udpFlowIdle
	}
	if len(l.flows) == 0 {
		return nil
	}
	// Of two records of id whose windows hold t, the newer (a record
	// is placed after those of its hash already in the table, and
	// taking one out keeps the others' order).
	var found *flowRec
	mask := uint64(len(l.flows) - 1)
	for i := h & mask; l.flows[i].r != nil; i = (i + 1) & mask {
		if l.flows[i].h != h {
			continue
		}
		r := l.flows[i].r
		end := r.end
		if id.kind == KindDNS {
			// A query is its first report: a client that repeats
			// one ID from one socket (a retransmission comes
			// seconds later) counts once per window, not once for
			// as long as it keeps on.
			end = r.start
		}
		if r.id == id && !t.Before(r.start.Add(-slack)) && !t.After(end.Add(slack)) &&
			(found == nil || id.kind != KindFlow || !found.start.Equal(t)) {
			// A flow's: the one that started at t, else the newer
			// (a later report of a flow is of the flow of its
			// start, not of another of its 5-tuple: anotherFlow).
			found = r
		}
	}
	return found
}

// mergeLocked folds a second report of a flow into its record: bytes rise
// to the largest reported, never summed.
func (l *Ledger) mergeLocked(r *flowRec, ev *Event, t time.Time) {
	end := t.Add(time.Duration(ev.Duration * float64(time.Second)))
	if end.After(r.end) {
		r.end = end
	}
	l.addBytesLocked(r, ev.BytesOut, ev.BytesIn)
	switch {
	case r.rule != nil:
		r.rule.seen(t)
		if ev.ClientMAC != "" { // the first report may have come without it
			r.rule.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
		}
		// A retransmission the full set cut; never past the rule's
		// queries (a damaged summary may count withheld its plain query).
		if ev.Enforced && !r.enforced && r.id.kind == KindDNS && r.rule.withheld < r.rule.queries {
			r.rule.withheld++
		}
	case r.drop != nil:
		if ev.ClientMAC != "" {
			r.drop.clients.add(ev.Client.Unmap(), ev.ClientMAC, l.opt.MaxClients)
		}
		if ev.Enforced && !r.enforced && r.id.kind == KindFlow {
			r.drop.enforcedFlows++
			r.drop.enforced = true
		}
		r.drop.seen(t) // a later report may tell an earlier start (capture's SYN after the proxy's accept)
	}
	r.enforced = r.enforced || ev.Enforced
}

// addBytesLocked raises r's bytes to out and in where those are larger,
// and counts the difference where r counts.
func (l *Ledger) addBytesLocked(r *flowRec, out, in uint64) {
	var dOut, dIn uint64
	if out > r.bytesOut {
		dOut, r.bytesOut = out-r.bytesOut, out
	}
	if in > r.bytesIn {
		dIn, r.bytesIn = in-r.bytesIn, in
	}
	switch {
	case r.rule != nil:
		r.rule.bytesOut += dOut
		r.rule.bytesIn += dIn
	case r.drop != nil:
		r.drop.bytesOut += dOut
		r.drop.bytesIn += dIn
	}
}

// recLocked returns a zeroed record for a flow to remember (rememberLocked
// must follow): when the table is full, its oldest record, taken out of
// it, so that a busy ledger does not allocate one per flow or query.
func (l *Ledger) recLocked() *flowRec {
	if len(l.ring) < l.opt.MaxFlows {
		return new(flowRec)
	}
	old := l.ring[l.ringPos]
	l.unslotLocked(old)
	*old = flowRec{}
	return old
}

// rememberLocked keeps r, from recLocked, for deduplication, in the place
// of the record recLocked took out when the table was full.
func (l *Ledger) rememberLocked(r *flowRec) {
	if len(l.ring) < l.opt.MaxFlows {
		l.ring = append(l.ring, r)
		if len(l.ring) > len(l.flows)/2 {
			l.growFlowsLocked()
			return
		}
	} else {
		l.ring[l.ringPos] = r
		l.ringPos = (l.ringPos + 1) % l.opt.MaxFlows
	}
	l.slotLocked(r)
}

// growFlowsLocked doubles the flows table (to 16 slots at first) and
// places every record of the ring in it again, the oldest first (the
// ring is not full yet: in its order), so that of two records of one
// hash the newer still comes after the older.
func (l *Ledger) growFlowsLocked() {
	l.flows = make([]flowSlot, max(16, 2*len(l.flows)))
	for _, r := range l.ring {
		l.slotLocked(r)
	}
}

// slotLocked places r in the first empty slot from its hash's.
func (l *Ledger) slotLocked(r *flowRec) {
	mask := uint64(len(l.flows) - 1)
	i := r.h & mask
	for l.flows[i].r != nil {
		i = (i + 1) & mask
	}
	l.flows[i] = flowSlot{r.h, r}
}

// unslotLocked takes r out of the flows table, shifting back the records
// after it that may move (those whose hash's slot is not between the
// empty one and theirs), so that every record stays reachable from its
// hash's slot with no empty slot between, in the same order.
func (l *Ledger) unslotLocked(r *flowRec) {
	mask := uint64(len(l.flows) - 1)
	i := r.h & mask
	for l.flows[i].r != r {
		i = (i + 1) & mask
	}
	for j := (i + 1) & mask; ; j = (j + 1) & mask {
		s := l.flows[j]
		if s.r == nil {
			break
		}
		if (j-s.h)&mask >= (j-i)&mask { // its hash's slot is i or before
			l.flows[i] = s
			i = j
		}
	}
	l.flows[i] = flowSlot{}
}

func (l *Ledger) ruleLocked(name string) *ruleStats {
	rs := l.rules[name]
	if rs == nil {
		rs = &ruleStats{name: name}
		l.rules[name] = rs
	}
	return rs
}

// overflowKey collects the flows of dropped destinations beyond MaxDropped.
var overflowKey = dropKey{dest: "(other destinations)", proto: "*"}

func (l *Ledger) dropLocked(ev *Event) *dropStats { return l.dropNameLocked(ev, destName(ev)) }

// dropNameLocked is dropLocked for ev's destName, name.
func (l *Ledger) dropNameLocked(ev *Event, name string) *dropStats {
	k := dropKey{dest: name, port: ev.DestPort, proto: ev.Proto}
	if ev.Kind == KindDNS {
		k.port, k.proto = 53, "dns"
	}
	ds := l.dropped[k]
	if ds == nil {
		if len(l.dropped) >= l.opt.MaxDropped-1 { // one kept for the overflow entry
			k = overflowKey
			if ds = l.dropped[k]; ds != nil {
				return ds
			}
		}
		ds = &dropStats{key: k}
		l.dropped[k] = ds
	}
	return ds
}

// copyLocked returns a ledger with a copy of l's counts that shares
// nothing l changes (the report's overlay of the open flows, counted and
// reported from without l's lock): no flow records, log or metrics.
func (l *Ledger) copyLocked() *Ledger {
	c := &Ledger{
		opt: l.opt, eng: l.eng, seed: l.seed,
		rules:   make(map[string]*ruleStats, len(l.rules)),
		dropped: make(map[dropKey]*dropStats, len(l.dropped)),
		totals:  l.totals, lastMode: l.lastMode, shed: l.shed, unwritten: l.unwritten,
		shedMarks: slices.Clone(l.shedMarks), firstEvent: l.firstEvent,
		ech:           echStats{stripped: l.ech.stripped, wouldStrip: l.ech.wouldStrip, clients: l.ech.clients.clone(), names: l.ech.names.clone()},
		alarmsDropped: l.alarmsDropped,
	}
	if l.alarms != nil {
		c.alarms = make(map[alarmKey]*AlarmReport, len(l.alarms))
		for k, a := range l.alarms {
			b := *a
			c.alarms[k] = &b
		}
	}
	for k, rs := range l.rules {
		c.rules[k] = rs.clone()
	}
	for k, ds := range l.dropped {
		d := *ds
		d.clients = ds.clients.clone()
		c.dropped[k] = &d
	}
	return c
}

// releaseLocked says the copy of l's counts a report made (copyLocked)
// is no longer read: l's clients' sets, lent to it, change in place again,
// not each copied by its next event (TestEmitAfterReportCopiesNoClients).
// Only a report's build copies l, one at a time (reporting).
func (l *Ledger) releaseLocked() {
	for _, rs := range l.rules {
		rs.clients.release()
	}
	for _, ds := range l.dropped {
		ds.clients.release()
	}
	l.ech.clients.release()
}

// clone returns a copy of rs that shares nothing with it.
func (rs *ruleStats) clone() *ruleStats {
	c := *rs
	c.clients = rs.clients.clone()
	c.dests = rs.dests.clone()
	return &c
}

// clone returns a copy of c that shares nothing c changes: the map is
// shared, and copied by whichever of the two changes it first (own), so
// that a copy of the ledger's counts under its lock (copyLocked) costs no
// copy of every entry's clients. c lends it until release.
func (c *clientSet) clone() clientSet {
	n := *c
	c.lent = c.m != nil
	n.lent, n.borrowed = false, c.m != nil
	return n
}

// release says no copy made of c (clone) reads its map any more: c changes
// it in place again. A map c itself borrowed stays shared.
func (c *clientSet) release() { c.lent = false }

func (d *destCounter) clone() destCounter {
	n := destCounter{h: make([]*destEntry, len(d.h))}
	if d.idx != nil {
		n.idx = make(map[string]*destEntry, len(d.idx))
	}
	for i, e := range d.h {
		c := *e
		n.h[i] = &c
		n.idx[c.Dest] = &c
	}
	return n
}

// recDest is destName(ev) for ev, the report that counts rec: a query's
// key holds the same name (lowercased, without the root's dot) when the
// name is bounded, as every sink of this package bounds it, and then
// that one string, not a second copy of it (up to 255 bytes a record in
// MaxFlows of them: TestLedgerTextMemoryBound).
func recDest(rec *flowRec, ev *Event) string {
	if rec.id.kind == KindDNS && rec.id.name != "" && len(ev.Name) <= MaxNameBytes {
		return rec.id.name
	}
	return destName(ev)
}

// shareName makes rec's query name s, the string a rule's destinations
// or a dropped entry keep, when it is that name: the records of one name
// then keep one copy of it (an event carries its own, Journal.Emit's
// clone), not one each (TestLedgerRecordsShareNames).
func (rec *flowRec) shareName(s string) {
	if rec.id.name == s {
		rec.id.name = s
	}
}

// knownText returns s as the program's constant when it is one of the
// protocols, sources and common query types events carry, else s: a
// record keeps the constant, not an event's copy (the log's events, read
// on a restart, each decode their own: TestLedgerReadRecordsKeepNoText).
func knownText(s string) string {
	switch s {
	case "tcp":
		return "tcp"
	case "udp":
		return "udp"
	case "icmp":
		return "icmp"
	case "ipv6-icmp":
		return "ipv6-icmp"
	case string(SourceProxy):
		return string(SourceProxy)
	case string(SourceDNS):
		return string(SourceDNS)
	case string(SourceCapture):
		return string(SourceCapture)
	case string(SourceFirewall):
		return string(SourceFirewall)
	case "A":
		return "A"
	case "AAAA":
		return "AAAA"
	case "HTTPS":
		return "HTTPS"
	case "SVCB":
		return "SVCB"
	case "CNAME":
		return "CNAME"
	case "PTR":
		return "PTR"
	case "TXT":
		return "TXT"
	case "MX":
		return "MX"
	case "SRV":
		return "SRV"
	case "NS":
		return "NS"
	case "SOA":
		return "SOA"
	}
	return s
}

// destName is the best name known for the event's destination, else its
// address.
func destName(ev *Event) string {
	if ev.Name != "" {
		// Bounded already (Emit, add); a hostile name must not grow the
		// ledger, whoever calls.
		return lowerASCII(trimDot(Clip(ev.Name, MaxNameBytes)))
	}
	if ev.Dest.IsValid() {
		return ev.Dest.Unmap().String()
	}
	return "(unknown)"
}

func trimDot(s string) string {
	if len(s) > 1 && s[len(s)-1] == '.' {
		return s[:len(s)-1]
	}
	return s
}

func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// echStats counts DNS answers that held ECH configs (THREATS.md B1):
// stripped by egressd's forwarder (dns events), or kept by another
// resolver (capture's DNS flows, Event.Filtered). A flow is counted when
// it is first recorded: an answer seen after a flow's first event is not.
type echStats struct {
	stripped, wouldStrip uint64
	clients              clientSet
	names                destCounter
}

func (e *echStats) add(ev *Event, opt *LedgerOptions) {
	if !strings.Contains(ev.Filtered, "ech") {
		return
	}
	if ev.Kind == KindDNS {
		e.stripped++
		if ev.Name != "" {
			e.names.add(lowerASCII(trimDot(Clip(ev.Name, MaxNameBytes))), opt.MaxDestinations)
		}
	} else {
		e.wouldStrip++
	}
	e.clients.add(ev.Client.Unmap(), ev.ClientMAC, opt.MaxClients)
}

// clientSet is a bounded set of client addresses, each with the MAC
// addresses seen with it (Event.ClientMAC): on a DHCP LAN an address
// changes hands over a week, and a dual-stack device has several
// addresses, so the address alone does not say which device it was.
type clientSet struct {
	m         map[netip.Addr]macSeen
	truncated bool   // more clients were seen than kept
	gen       uint64 // counts the adds: a change to m or truncated adds one
	// lent says m is shared with a copy made of c (clone) that may still
	// read it, borrowed that c is such a copy: either way m is copied
	// before it is changed (own).
	lent, borrowed bool
}

// own makes c's map its own, not shared with a copy, before c changes it.
func (c *clientSet) own() {
	if c.lent || c.borrowed {
		c.m = maps.Clone(c.m)
		c.lent, c.borrowed = false, false
	}
}

// maxClientMACs bounds the distinct MACs kept per client address (the
// latest); more are counted as "more".
const maxClientMACs = 4

type mac6 [6]byte

// macSeen are the distinct MACs seen with one address, the latest last.
type macSeen struct {
	macs [maxClientMACs]mac6
	n    uint8 // kept in macs
	more bool  // more distinct MACs were seen than kept
}

// see records mac as the latest MAC seen with the address.
func (s *macSeen) see(mac mac6) {
	for i := 0; i < int(s.n); i++ {
		if s.macs[i] == mac {
			copy(s.macs[i:s.n], s.macs[i+1:s.n])
			s.macs[s.n-1] = mac
			return
		}
	}
	if int(s.n) == maxClientMACs {
		copy(s.macs[:], s.macs[1:])
		s.macs[maxClientMACs-1] = mac
		s.more = true
		return
	}
	s.macs[s.n] = mac
	s.n++
}

// list returns the MACs, the latest last.
func (s *macSeen) list() []mac6 { return s.macs[:s.n] }

// add adds client a, seen with mac ("" when the event had none; one that
// is not an Ethernet MAC is ignored).
func (c *clientSet) add(a netip.Addr, mac string, max int) {
	if !a.IsValid() {
		return
	}
	c.gen++
	if c.m == nil {
		c.m = map[netip.Addr]macSeen{}
	}
	s, ok := c.m[a]
	if !ok && len(c.m) >= max {
		c.truncated = true
		return
	}
	if m, valid := parseMAC6(mac); valid {
		s.see(m)
	} else if ok {
		return
	}
	c.own()
	c.m[a] = s
}

// parseMAC6 parses an Ethernet MAC as net.HardwareAddr.String writes it
// (or with dashes, or upper case), without allocating.
func parseMAC6(s string) (m mac6, ok bool) {
	if len(s) != 17 {
		return m, false
	}
	for i := range 6 {
		if i > 0 && s[3*i-1] != ':' && s[3*i-1] != '-' {
			return m, false
		}
		if _, err := hex.Decode(m[i:i+1], []byte(s[3*i:3*i+2])); err != nil {
			return m, false
		}
	}
	return m, true
}

func (m mac6) String() string { return net.HardwareAddr(m[:]).String() }

func (c *clientSet) list() []string { return addrStrings(c.addrs()) }

// addrStrings returns as as text.
func addrStrings(as []netip.Addr) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = a.String()
	}
	return out
}

// devices returns the MACs seen with the clients, in the order of list
// (nil when none had one), the clients of each MAC (sorted by MAC), and
// how many devices the clients are: the distinct MACs, and each address
// seen with none as one of its own (a client off the link, or events
// recorded without a MAC). An address seen with several MACs counts with
// each.
func (c *clientSet) devices() (macs []ClientMAC, devs []Device, n int) {
	byMAC := map[mac6][]string{}
	for _, a := range c.addrs() {
		s := c.m[a]
		if s.n == 0 {
			n++
			continue
		}
		macs = append(macs, ClientMAC{Client: a.String(), MAC: s.macs[s.n-1].String(), MACs: int(s.n), MACsTruncated: s.more})
		for _, m := range s.list() {
			byMAC[m] = append(byMAC[m], a.String())
		}
	}
	if len(byMAC) == 0 {
		return nil, nil, n
	}
	keys := make([]mac6, 0, len(byMAC))
	for m := range byMAC {
		keys = append(keys, m)
	}
	slices.SortFunc(keys, func(x, y mac6) int { return bytes.Compare(x[:], y[:]) })
	for _, m := range keys {
		devs = append(devs, Device{MAC: m.String(), Clients: byMAC[m]})
	}
	return macs, devs, n + len(keys)
}

// devicesTruncated says the device count is a lower bound: clients were
// not kept, or an address's MACs were not all kept.
func (c *clientSet) devicesTruncated() bool {
	if c.truncated {
		return true
	}
	for _, s := range c.m {
		if s.more {
			return true
		}
	}
	return false
}

// destCounter counts destinations with a bounded space-saving counter
// (Metwally et al.): when full, a new destination replaces the least
// counted one (of those, the first by name) and inherits its count, so
// heavy hitters stay on top. The entries are a min-heap by count and name,
// so that replacing the least counted one costs O(log n), not a scan of
// all n: a rule that has reached more than MaxDestinations names or
// addresses (a wildcard rule, Apple's 17.0.0.0/8) meets a new one on most
// of its flows and queries.
type destCounter struct {
	idx map[string]*destEntry
	h   []*destEntry // min-heap by (Count, Dest)
}

type destEntry struct {
	DestCount
	pos int // in h
}

// add counts name once and returns the string the counter keeps for it
// (its own when it had the name already: a caller that keeps name keeps
// that one, not another copy).
func (d *destCounter) add(name string, max int) string {
	if d.idx == nil {
		d.idx = map[string]*destEntry{}
	}
	if e := d.idx[name]; e != nil {
		e.Count++
		d.down(e.pos)
		return e.Dest
	}
	if len(d.h) < max || len(d.h) == 0 {
		e := &destEntry{DestCount{name, 1}, len(d.h)}
		d.h = append(d.h, e)
		d.idx[name] = e
		d.up(e.pos)
		return name
	}
	e := d.h[0]
	delete(d.idx, e.Dest)
	e.Dest = name
	e.Count++
	d.idx[name] = e
	d.down(0)
	return name
}

// remove takes back one count of name, if the counter still holds it.
func (d *destCounter) remove(name string) {
	e := d.idx[name]
	if e == nil {
		return
	}
	if e.Count > 1 {
		e.Count--
		d.up(e.pos)
		return
	}
	i, last := e.pos, len(d.h)-1
	d.swap(i, last)
	delete(d.idx, name)
	d.h[last] = nil
	d.h = d.h[:last]
	if i < last {
		d.down(i)
		d.up(i)
	}
}

func (d *destCounter) less(i, j int) bool {
	a, b := d.h[i], d.h[j]
	return a.Count < b.Count || (a.Count == b.Count && a.Dest < b.Dest)
}

func (d *destCounter) swap(i, j int) {
	d.h[i], d.h[j] = d.h[j], d.h[i]
	d.h[i].pos, d.h[j].pos = i, j
}

func (d *destCounter) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !d.less(i, p) {
			return
		}
		d.swap(i, p)
		i = p
	}
}

func (d *destCounter) down(i int) {
	for {
		m := 2*i + 1
		if m >= len(d.h) {
			return
		}
		if r := m + 1; r < len(d.h) && d.less(r, m) {
			m = r
		}
		if !d.less(m, i) {
			return
		}
		d.swap(i, m)
		i = m
	}
}

// DestCount is one destination and the flows (and queries) that reached it.
type DestCount struct {
	Dest  string `json:"dest"`
	Count uint64 `json:"count"`
}

func (d *destCounter) top(n int) []DestCount {
	out := make([]DestCount, len(d.h))
	for i, e := range d.h {
		out[i] = e.DestCount
	}
	slices.SortFunc(out, func(a, b DestCount) int {
		if c := cmp.Compare(b.Count, a.Count); c != 0 {
			return c
		}
		return cmp.Compare(a.Dest, b.Dest)
	})
	if len(out) > n {
		out = out[:n]
	}
	return out
}

// mergeWindow counts an alarm's window of n distinct names and top
// clients into a: DistinctNames is the most of any window, TopClients
// that window's (the first's on a tie), bounded and copied (the entry
// never shares an event's slice).
func (a *AlarmReport) mergeWindow(n uint64, top []string) {
	if n < a.DistinctNames || (n == a.DistinctNames && a.TopClients != nil) {
		return
	}
	a.DistinctNames = n
	a.TopClients = nil
	if len(top) > 0 {
		a.TopClients = boundList(top, MaxAlarmClients)
	}
}

// maxAlarms bounds the (reason, client, zone) alarm entries a ledger keeps.
const maxAlarms = 1024

type alarmKey struct {
	reason, client, mac, zone string
}

// addAlarmLocked records a KindAlarm event (THREATS.md E2: the DNS
// forwarder's dns-tunnel alarm): one entry per (reason, client, MAC,
// zone), with how many alarms, the most distinct names one window had and
// that window's top clients, and when.
func (l *Ledger) addAlarmLocked(ev *Event) {
	client := "" // a zone-wide alarm (dns-tunnel-zone) names no client
	if ev.Client.IsValid() {
		client = ev.Client.Unmap().String()
	}
	k := alarmKey{knownText(ev.Reason), client, ev.ClientMAC, lowerASCII(trimDot(Clip(ev.Name, MaxNameBytes)))}
	a := l.alarms[k]
	if a == nil {
		if len(l.alarms) >= maxAlarms {
			l.alarmsDropped++
			return
		}
		if l.alarms == nil {
			l.alarms = map[alarmKey]*AlarmReport{}
		}
		a = &AlarmReport{Reason: k.reason, Client: k.client, ClientMAC: k.mac, Zone: k.zone, Rule: ev.Rule}
		l.alarms[k] = a
	}
	a.Alarms++
	a.mergeWindow(ev.Count, ev.TopClients)
	a.seen(ev.Time.UTC())
}
