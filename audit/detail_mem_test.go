package audit

import (
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// The heap the detail budget holds under hostile shape churn: every shape
// new, each with the longest client text an event keeps (MaxNameBytes of
// name and front, MaxPathBytes of path), uppercase DNS names (so each held
// query keeps its own lowercased copy), and as many devices, shapes, held
// flows (this interval's and the one before) and late summaries as the
// budget takes. churnBudget drives one budget as the journal's writer
// does (ending the interval when it is full) through two intervals, over
// times its bounds, and leaves it at its fullest: what it holds then is
// the worst it holds.

// churnText returns n bytes of client text, unique to id, in an allocation
// of its own (as a component's parse makes one).
func churnText(id string, n int, fill string) string {
	var b strings.Builder
	b.Grow(n)
	b.WriteString(id)
	for b.Len() < n {
		b.WriteString(fill)
	}
	return b.String()[:n]
}

// churnStats are the sizes of a budget's tables.
type churnStats struct{ shapes, aggs, late, devs, held, prevHeld int }

func (b *detailBudget) stats() churnStats {
	st := churnStats{shapes: len(b.shapes), late: len(b.late), devs: len(b.devs), held: len(b.held), prevHeld: len(b.prevHeld)}
	for _, a := range b.shapes {
		if a != nil {
			st.aggs++
		}
	}
	return st
}

// churnBudget drives b over times its bounds (1: to them) and returns
// the number of events it was given. It calls fullest when b is at its
// fullest: before each end of an interval, and at the end.
func churnBudget(b *detailBudget, over int, fullest func()) int {
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC) // no refill: the burst alone
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule}
	client := netip.MustParseAddr("192.168.10.7")
	dest := netip.MustParseAddr("203.0.113.20")
	const mac = "aa:bb:cc:00:00:07"
	events := 0
	give := func(ev Event, counted bool) {
		ev.Stamp(deny)
		ev.Bound()
		if b.full() {
			fullest()
			b.roll(now, func(Event) {})
		}
		b.hold(&ev, counted, now)
		events++
	}
	// request is the k-th (0, 1) request of shape s of interval gen: its
	// own port each, the same destination port.
	request := func(gen, s, k int) Event {
		pair := gen*over*maxDetailShapes + s
		id := fmt.Sprintf("g%d-s%d-", gen, s)
		return Event{Kind: KindRequest, Source: SourceProxy, Time: now, Client: client, ClientPort: uint16(1024 + (2*pair+k)%60000), ClientMAC: mac,
			Dest: dest, DestPort: uint16(80 + pair/30000), Proto: "tcp",
			Name: churnText(id, MaxNameBytes, "n"), NameSource: NameHost, Path: "/" + churnText(id, MaxPathBytes-1, "p"),
			Front: churnText(id, MaxNameBytes, "f")}
	}
	for gen := range 2 {
		shapes := over*maxDetailShapes - 1 // one is the DNS name's
		for s := range shapes {
			give(request(gen, s, 0), true) // the first of its shape (the first burst of them spend the budget)
			give(request(gen, s, 1), true) // the second: held back, a summary
		}
		if gen == 1 {
			// Later reports of the flows held back in the interval
			// before: a late summary each.
			for s := range min(shapes, maxDetailShapes) {
				give(request(0, s, 1), false)
			}
		}
		// One denied name, queried from ever new ports: a held query
		// each, up to the bound.
		name := churnText(fmt.Sprintf("G%d-Q-", gen), MaxNameBytes, "Q")
		if debugChurn {
			fmt.Printf("gen %d before dns: %+v\n", gen, b.stats())
		}
		for q := range over*maxHeldFlows - len(b.held) - 1 {
			give(Event{Kind: KindDNS, Source: SourceDNS, Time: now, Client: client, ClientPort: uint16(1024 + q%60000), ClientMAC: mac,
				Dest: netip.AddrFrom4([4]byte{192, 168, 10, byte(1 + q/60000)}), DestPort: 53, Proto: "udp",
				Name: name, QType: "A", RCode: "REFUSED"}, true)
		}
		if debugChurn {
			fmt.Printf("gen %d: %+v\n", gen, b.stats())
		}
		if gen == 0 {
			fullest()
			b.roll(now, func(Event) {}) // the interval's end
		}
	}
	// Devices: each one denied query of a name of its own.
	for d := range over * maxDetailDevices {
		m := fmt.Sprintf("02:00:00:%02x:%02x:%02x", d>>16&0xff, d>>8&0xff, d&0xff)
		give(Event{Kind: KindDNS, Source: SourceDNS, Time: now, Client: client, ClientPort: 53000, ClientMAC: m, Proto: "udp",
			Name: churnText(m, MaxNameBytes, "d"), QType: "A", RCode: "REFUSED"}, true)
	}
	fullest()
	return events
}

var debugChurn = false

// heapAfterGC is the live heap.
func heapAfterGC() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// churnHeap returns the most heap one budget held in churnBudget, its
// tables' largest sizes then and the largest estimate of its bytes, and
// the number of events; lines makes it the decision lines' budget.
func churnHeap(over int, lines bool) (uint64, churnStats, int, int) {
	base := heapAfterGC()
	b := newDetailBudget(DefaultDetailBurst, DefaultDetailRate, DefaultDetailInterval)
	b.lines = lines
	var most uint64
	var st churnStats
	var bytes int
	n := churnBudget(b, over, func() {
		if h := heapAfterGC() - base; h > most {
			most = h
		}
		s := b.stats()
		st.shapes, st.aggs, st.late = max(st.shapes, s.shapes), max(st.aggs, s.aggs), max(st.late, s.late)
		st.devs, st.held, st.prevHeld = max(st.devs, s.devs), max(st.held, s.held), max(st.prevHeld, s.prevHeld)
		bytes = max(bytes, b.bytes)
	})
	runtime.KeepAlive(b)
	return most, st, bytes, n
}

// maxBudgetHeap is the ceiling of the heap one detail budget may hold:
// measured at 12 MiB for the event log's (6 MiB for the decision lines'),
// with room. Without maxDetailBytes, with the count bounds alone, the
// churn held 164 MiB (62 MiB); without those, more with every shape.
const maxBudgetHeap = 24 << 20

// TestDetailBudgetMemoryBound: a device churning shapes holds the detail
// budget at its bounds, never past them, and the heap the budget keeps
// then stays under maxBudgetHeap, whether driven to its bounds or twice
// past them.
func TestDetailBudgetMemoryBound(t *testing.T) {
	if testing.Short() {
		t.Skip("drives 100k events of 2.5 KB")
	}
	for _, lines := range []bool{false, true} {
		var at uint64
		for _, over := range []int{1, 2} {
			held, st, bytes, n := churnHeap(over, lines)
			t.Logf("lines %v, %dx the bounds (%d events): heap %.1f MiB at the most; tables at the most %+v, %d bytes counted", lines, over, n, float64(held)/(1<<20), st, bytes)
			if st.shapes > maxDetailShapes || st.late > maxDetailShapes || st.devs > maxDetailDevices || st.held > maxHeldFlows || st.prevHeld > maxHeldFlows {
				t.Errorf("lines %v, %dx: the budget's tables are past their bounds: %+v", lines, over, st)
			}
			if held > maxBudgetHeap {
				t.Errorf("lines %v, %dx the bounds: the budget holds %d MiB, its ceiling is %d MiB", lines, over, held>>20, maxBudgetHeap>>20)
			}
			if over == 1 {
				at = held
				// It reached its bounds (else the figure is not the worst).
				if bytes < maxDetailBytes || st.devs < maxDetailDevices || !lines && st.prevHeld == 0 {
					t.Errorf("lines %v: the churn did not reach the bounds: %+v, %d bytes", lines, st, bytes)
				}
			} else if held > at+at/4 {
				t.Errorf("lines %v: twice past the bounds holds %d MiB, %d MiB at them", lines, held>>20, at>>20)
			}
		}
	}
}

// BenchmarkDetailBudgetChurnHeap reports the heap each budget of the
// journal (the event log's, the decision lines') holds at its bounds
// under hostile churn: heap-MiB.
func BenchmarkDetailBudgetChurnHeap(b *testing.B) {
	for _, lines := range []bool{false, true} {
		b.Run(fmt.Sprintf("lines=%v", lines), func(b *testing.B) {
			var held uint64
			var st churnStats
			for range b.N {
				held, st, _, _ = churnHeap(1, lines)
			}
			b.ReportMetric(float64(held)/(1<<20), "heap-MiB")
			b.ReportMetric(float64(st.aggs), "summaries")
			b.ReportMetric(float64(st.held+st.prevHeld), "held-flows")
			b.ReportMetric(float64(st.devs), "devices")
		})
	}
}

// TestDetailBudgetKeepsNoHead: an event's client text may be cut from a
// larger allocation: the proxy's head parse gives a request's host and
// path in one allocation with its target, which a fragment ("/a#" and
// 60 KB) makes up to 64 KiB however short the path. The budget keeps the
// text of each shape it tracks for the interval; it must keep its own
// copy, not the 64 KiB. Before, 1,000 such shapes held 64 MB.
func TestDetailBudgetKeepsNoHead(t *testing.T) {
	const shapes = 1000
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule}
	for _, lines := range []bool{false, true} {
		base := heapAfterGC()
		b := newDetailBudget(0, DefaultDetailRate, DefaultDetailInterval) // no burst: every repeat held
		b.lines = lines
		for s := range shapes {
			for k := range 2 {
				target := churnText(fmt.Sprintf("/s%d-k%d#", s, k), 64<<10, "x")
				head := "GET" + target + fmt.Sprintf("h%d.example", s) + "/s" // one allocation, as httpwire's detach makes
				host := head[3+len(target) : len(head)-2]
				ev := Event{Kind: KindRequest, Source: SourceProxy, Time: now, Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(1024 + 2*s + k),
					ClientMAC: "aa:bb:cc:00:00:07", Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 80, Proto: "tcp",
					Name: host, NameSource: NameHost, Path: head[len(head)-2:], Front: host}
				ev.Stamp(deny)
				ev.Bound()
				b.hold(&ev, true, now)
			}
		}
		held := heapAfterGC() - base
		st := b.stats()
		runtime.KeepAlive(b)
		t.Logf("lines %v: %d shapes hold %d KiB: %+v", lines, shapes, held>>10, st)
		if st.aggs != shapes {
			t.Fatalf("lines %v: %d summaries, want %d", lines, st.aggs, shapes)
		}
		if per := held / shapes; per > 8<<10 {
			t.Errorf("lines %v: %d bytes a shape of a 20-byte name and a 2-byte path", lines, per)
		}
	}
}

// TestJournalKeepsNoHead: the journal keeps an event, queued (up to
// QueueLen, 65,536) and in the ledger (a dropped entry per name), with
// its own copy of the client's text, not the head it was cut from (see
// TestDetailBudgetKeepsNoHead). Before, 1,000 denied requests whose host
// was cut from a 64 KiB head held 73 MB in the ledger, and as much
// queued.
func TestJournalKeepsNoHead(t *testing.T) {
	const names = 1000
	eng := loadPolicy(t, "policy.yaml")
	base := heapAfterGC()
	j, l, _ := openJournal(t, JournalConfig{Dir: t.TempDir()}, eng)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	for s := range names {
		target := churnText(fmt.Sprintf("/s%d#", s), 64<<10, "x")
		head := "GET" + target + fmt.Sprintf("h%d.example", s) + "/s" // one allocation, as httpwire's detach makes
		host := head[3+len(target) : len(head)-2]
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: now, Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(1024 + s),
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 80, Proto: "tcp", Name: host, NameSource: NameHost, Path: head[len(head)-2:]}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule})
		j.Emit(ev)
	}
	queued := heapAfterGC() - base
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	kept := heapAfterGC() - base
	runtime.KeepAlive(l)
	t.Logf("%d denied requests: %d KiB queued, %d KiB kept (the ledger)", names, queued>>10, kept>>10)
	if queued/names > 8<<10 || kept/names > 8<<10 {
		t.Errorf("%d denied requests of 20-byte names hold %d KiB queued, %d KiB in the ledger: the 64 KiB heads", names, queued>>10, kept>>10)
	}
}
