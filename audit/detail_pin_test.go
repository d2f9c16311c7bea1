package audit

import (
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"egressd/policy"
)

// The heap a hostile device makes the journal's ledger and detail budget
// hold together. The ledger's record of a held-back flow keeps its held
// flow (flowRec.held), and that its summary (the shape's text and its
// first event), for as long as the ledger remembers the flow (MaxFlows
// records), so that a late report of it merges into a summary: past the
// interval that held it, outside the budget's byte bound. pinChurn drives
// a ledger and a budget as the journal's writer does (writeEvent: end
// the interval when the budget is full, then emitHold), with held flows
// whose shapes are all distinct and as long as an event keeps, until the
// ledger's records are all such flows.

// pinFeed is the journal writer's path for one event (writeEvent, with
// Emit's Bound and ownText).
type pinFeed struct {
	l      *Ledger
	b      *detailBudget
	now    time.Time
	events int
}

func (f *pinFeed) give(ev Event) (counted, held bool) {
	ev.Bound()
	ev.ownText()
	if f.b.full() {
		f.b.roll(f.now, func(Event) {})
	}
	f.events++
	return f.l.emitHold(ev, f.b.gen, func(counted bool, twin *heldFlow) (bool, *heldFlow) {
		return f.b.holdFlow(&ev, counted, twin, f.now)
	})
}

// pinChurn fills the ledger of f with held-back flows of distinct shapes
// of the longest client text: one written flow of capture's opens each
// interval, a later report of it of each new shape (written: the first
// of its shape, no record of its own), then the held-back flow of the
// shape (its own record, which keeps the summary). It returns the number
// of held flows.
func pinChurn(f *pinFeed, records int) int {
	// Audit mode: capture's would-be drops (a later report of one,
	// not enforced and without bytes, is held as its shape's).
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: policy.ReasonNoRule}
	client := netip.MustParseAddr("192.168.10.7")
	dest := netip.MustParseAddr("203.0.113.20")
	const mac = "aa:bb:cc:00:00:07"
	flow := func(port int, id string, close string) Event {
		// A client address each 64,000 ports: a flow's 5-tuple is
		// its own.
		c := client.As4()
		c[3] += byte(port / 64000)
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: f.now, Client: netip.AddrFrom4(c), ClientPort: uint16(1024 + port%64000), ClientMAC: mac,
			Dest: dest, DestPort: 443, Proto: "tcp", Close: close}
		if id != "" {
			ev.Name, ev.NameSource = churnText(id, MaxNameBytes, "n"), NameSNI
			ev.Path = "/" + churnText(id, MaxPathBytes-1, "p")
			ev.Front = churnText(id, MaxNameBytes, "f")
		}
		ev.Stamp(deny)
		return ev
	}
	port, held, opener := 0, 0, -1
	gen := ^uint64(0)
	// The clock moves 100 µs a shape: a port comes again seconds later
	// (a new flow), an interval's flows are within the TCP slack of its
	// opener's.
	for s := 0; held < records; s++ {
		f.now = f.now.Add(100 * time.Microsecond)
		if f.b.gen != gen || f.b.full() {
			// A new interval: a flow to report again (its first
			// report written, so its later ones are not held as
			// its twins).
			if f.b.full() {
				f.b.roll(f.now, func(Event) {})
			}
			gen = f.b.gen
			opener = port
			port++
			f.give(flow(opener, "", ""))
		}
		id := fmt.Sprintf("s%d-", s)
		f.give(flow(opener, id, "")) // a later report: the first of its shape
		ev := flow(port, id, "fin")
		port++
		if _, h := f.give(ev); h {
			held++
		}
		if s > 4*records {
			break
		}
	}
	return held
}

// pinnedAggs counts the distinct summaries the ledger's records keep, and
// their client text.
func pinnedAggs(l *Ledger) (aggs, text int) {
	seen := map[*shapeAgg]bool{}
	for _, r := range l.ring {
		if r.held != nil && r.held.agg != nil && !seen[r.held.agg] {
			seen[r.held.agg] = true
			text += r.held.agg.key.textBytes()
		}
	}
	return len(seen), text
}

// pinHeap drives pinChurn and returns the live heap of the ledger with
// its records' held flows (and the budget), of the ledger alone (its
// records' held flows let go, the budget gone), the held flows, the
// summaries the records kept and their text.
func pinHeap(tb testing.TB) (withPins, alone uint64, held, aggs, text int) {
	base := heapAfterGC()
	f := &pinFeed{l: NewLedger(nil, LedgerOptions{}), now: time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)}
	f.b = newDetailBudget(DefaultDetailBurst, DefaultDetailRate, DefaultDetailInterval)
	held = pinChurn(f, f.l.opt.MaxFlows)
	aggs, text = pinnedAggs(f.l)
	withPins = heapAfterGC() - base
	f.b = nil
	for _, r := range f.l.ring {
		r.held = nil
	}
	alone = heapAfterGC() - base
	runtime.KeepAlive(f)
	return
}

// maxPinnedHeap is the ceiling of the heap the held flows of a full
// ledger keep with the detail budget: the budget's (12 MiB measured, see
// maxBudgetHeap) and the summaries past intervals' held flows keep
// (maxPinnedBytes): measured at 14 MiB, with room. Before that bound,
// 65,000 held flows kept their distinct summaries: 220 MiB.
const maxPinnedHeap = 32 << 20

// maxLedgerHeap is the ceiling of the heap of a full ledger (MaxFlows
// records, MaxDropped entries) with the longest client text: measured at
// 25 MiB of denied flows (a record keeps none of their text), with room.
const maxLedgerHeap = 32 << 20

// maxLedgerTextHeap is the ceiling of the heap of a full ledger of
// allowed queries of distinct 255-byte uppercase names, the text a
// record keeps most of: measured at 37 MiB (589 bytes a record: the
// lowercased name once, shared by its key and its destination), with
// room. Before the record shared it, 53 MiB (845 bytes a record: the
// name twice).
const maxLedgerTextHeap = 42 << 20

// TestDetailPinnedMemoryBound: a device churning shapes of the longest
// text, each with a held-back flow, until every record of the ledger is
// one, keeps at most maxPinnedHeap in the held flows' summaries and the
// budget, besides the ledger's own heap.
func TestDetailPinnedMemoryBound(t *testing.T) {
	if testing.Short() {
		t.Skip("drives 130k events of 2.5 KB")
	}
	withPins, alone, held, aggs, text := pinHeap(t)
	pinned := int64(withPins) - int64(alone)
	t.Logf("%d held flows, %d summaries kept by the ledger's records (%.1f MiB of text): %.1f MiB with them, %.1f MiB the ledger alone, %.1f MiB pinned",
		held, aggs, float64(text)/(1<<20), float64(withPins)/(1<<20), float64(alone)/(1<<20), float64(pinned)/(1<<20))
	if held < 65536/2 {
		t.Fatalf("the churn held back %d flows: not the worst", held)
	}
	if pinned > maxPinnedHeap {
		t.Errorf("held flows keep %d MiB of summaries and budget, ceiling %d MiB", pinned>>20, maxPinnedHeap>>20)
	}
	if alone > maxLedgerHeap {
		t.Errorf("the ledger alone holds %d MiB, ceiling %d MiB", alone>>20, maxLedgerHeap>>20)
	}
}

// TestLedgerTextMemoryBound: the ledger's own heap at MaxFlows records of
// the text it keeps most of: allowed queries of distinct uppercase names
// of MaxNameBytes (a record keeps the lowercased name in its key and as
// its destination).
func TestLedgerTextMemoryBound(t *testing.T) {
	if testing.Short() {
		t.Skip("drives 65k events")
	}
	base := heapAfterGC()
	l := NewLedger(nil, LedgerOptions{})
	allow := policy.Decision{Verdict: policy.Allow, Mode: policy.ModeEnforce, Rule: "dns"}
	for q := range 2 * l.opt.MaxFlows {
		ev := Event{Kind: KindDNS, Source: SourceDNS, Time: time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC), Client: netip.MustParseAddr("192.168.10.7"),
			ClientPort: uint16(1024 + q%60000), Dest: netip.MustParseAddr("192.168.10.1"), DestPort: 53, Proto: "udp",
			Name: strings.ToUpper(churnText(fmt.Sprintf("q%d-", q), MaxNameBytes, "x")), QType: "A", RCode: "NOERROR", QueryID: uint16(q)}
		ev.Stamp(allow)
		ev.ownText()
		l.Emit(ev)
	}
	h := heapAfterGC() - base
	runtime.KeepAlive(l)
	t.Logf("%d records of %d-byte names: %.1f MiB, %d bytes a record", len(l.ring), MaxNameBytes, float64(h)/(1<<20), h/uint64(len(l.ring)))
	if len(l.ring) != l.opt.MaxFlows {
		t.Fatalf("%d records, want %d", len(l.ring), l.opt.MaxFlows)
	}
	if h > maxLedgerTextHeap {
		t.Errorf("the ledger holds %d MiB at its bound, ceiling %d MiB", h>>20, maxLedgerTextHeap>>20)
	}
	// Each record keeps the name once: its key's and its destination
	// are one string.
	for _, r := range l.ring {
		if len(r.dest) != MaxNameBytes || unsafe.StringData(r.dest) != unsafe.StringData(r.id.name) {
			t.Fatalf("a record keeps its name twice (%d and %d bytes)", len(r.dest), len(r.id.name))
		}
	}
}

// BenchmarkDetailPinnedHeap reports the heap held flows keep in a full
// ledger (pinned-MiB) and the ledger's own (ledger-MiB).
func BenchmarkDetailPinnedHeap(b *testing.B) {
	var withPins, alone uint64
	var aggs int
	for range b.N {
		withPins, alone, _, aggs, _ = pinHeap(b)
	}
	b.ReportMetric(float64(int64(withPins)-int64(alone))/(1<<20), "pinned-MiB")
	b.ReportMetric(float64(alone)/(1<<20), "ledger-MiB")
	b.ReportMetric(float64(aggs), "summaries")
}

// TestDetailBudgetPinnedLetGo: the held flows of past intervals keep
// their summaries, for a late report to merge into, until they cost
// maxPinnedBytes (then the oldest let them go: a late report of one is
// written alone) or the ledger has forgotten them (maxPinnedFlows newer
// held flows): a held flow the ledger remembers keeps its summary while
// the summaries are under the bound.
func TestDetailBudgetPinnedLetGo(t *testing.T) {
	if testing.Short() {
		t.Skip("drives 200k events")
	}
	t.Run("flows", func(t *testing.T) {
		// One short shape, flows held back as fast as the budget
		// takes them: five intervals of maxHeldFlows.
		f := &pinFeed{l: NewLedger(nil, LedgerOptions{}), now: time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)}
		f.b = newDetailBudget(0, DefaultDetailRate, DefaultDetailInterval)
		deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: policy.ReasonNoRule}
		held := 0
		for i := range 5*maxHeldFlows + 1 {
			f.now = f.now.Add(100 * time.Microsecond)
			ev := Event{Kind: KindFlow, Source: SourceCapture, Time: f.now, Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(1024 + i%64000),
				ClientMAC: "aa:bb:cc:00:00:07", Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: "tracker.example", NameSource: NameSNI, Close: "rst"}
			ev.Stamp(deny)
			if _, h := f.give(ev); h {
				held++
			}
			if f.b.pinnedFlows > maxPinnedFlows {
				t.Fatalf("%d pinned flows, bound %d", f.b.pinnedFlows, maxPinnedFlows)
			}
		}
		if held < 4*maxHeldFlows || f.b.gen < 4 {
			t.Fatalf("%d flows held back in %d intervals: not past the ledger's memory", held, f.b.gen)
		}
		kept := 0
		for _, r := range f.l.ring {
			if r.held != nil {
				if r.held.agg == nil {
					t.Fatalf("a held flow of interval %d (now %d) the ledger remembers let its summary go", r.held.gen, f.b.gen)
				}
				kept++
			}
		}
		if kept < maxPinnedFlows-8 { // the first of each interval's shape written
			t.Errorf("the ledger's records keep %d held flows, want its %d records'", kept, maxPinnedFlows)
		}
	})
	t.Run("bytes", func(t *testing.T) {
		f := &pinFeed{l: NewLedger(nil, LedgerOptions{}), now: time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)}
		f.b = newDetailBudget(DefaultDetailBurst, DefaultDetailRate, DefaultDetailInterval)
		pinChurn(f, f.l.opt.MaxFlows)
		if f.b.pinnedBytes > maxPinnedBytes {
			t.Errorf("past intervals' summaries cost %d bytes, bound %d", f.b.pinnedBytes, maxPinnedBytes)
		}
		// The oldest held flows the ledger remembers let their
		// summaries go, the newest of past intervals keep theirs.
		var oldest, newest *flowRec
		for _, r := range f.l.ring {
			if r.held == nil || r.held.gen+1 >= f.b.gen {
				continue // not held, or the budget's still
			}
			if oldest == nil || r.held.gen < oldest.held.gen {
				oldest = r
			}
			if newest == nil || r.held.gen > newest.held.gen {
				newest = r
			}
		}
		if oldest == nil || oldest.held.agg != nil {
			t.Fatalf("the oldest held flow keeps its summary past the bound")
		}
		if newest.held.agg == nil {
			t.Fatalf("the newest held flow of a past interval let its summary go under the bound")
		}
		// A late report of each: merged into a late summary (held),
		// or, let go, written alone.
		late := func(r *flowRec) bool {
			ev := Event{Kind: KindFlow, Source: SourceCapture, Time: r.start, Client: r.id.Client, ClientPort: r.id.ClientPort, ClientMAC: "aa:bb:cc:00:00:07",
				Dest: r.id.Dest, DestPort: r.id.DestPort, Proto: r.id.Proto, Name: "late.example", NameSource: NameSNI, BytesOut: 1 << 20}
			ev.Stamp(policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: policy.ReasonNoRule})
			counted, held := f.give(ev)
			if counted {
				t.Fatalf("a late report counted as a new flow")
			}
			return held
		}
		if late(oldest) {
			t.Errorf("a late report of a held flow let go was held back")
		}
		if !late(newest) {
			t.Errorf("a late report of a held flow under the bound was written alone")
		}
	})
}
