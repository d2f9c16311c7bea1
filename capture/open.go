package capture

import (
	"sync"
	"sync/atomic"
	"time"

	"egressd/audit"
)

// openWait bounds how long OpenFlows waits for Run's goroutine, which
// answers between packets and at least every maxRingWait when idle.
const openWait = 2 * time.Second

// openReqs are the OpenFlows calls waiting for Run's goroutine.
type openReqs struct {
	mu     sync.Mutex
	waits  []chan []audit.Event
	wanted atomic.Bool
}

// OpenFlows returns an event (no close reason) for each flow open now
// that capture decided and has not reported yet: a UDP flow is reported
// after UDPIdle of silence and any flow ReportOpenAfter after it began,
// and until then it is in no event. The live report counts them
// (audit.Ledger.SetOpenFlows); nothing is emitted. Nil when Run is not
// running (offline every flow is reported) or did not answer within
// openWait.
func (c *Capture) OpenFlows() []audit.Event {
	c.mu.Lock()
	running := c.running
	c.mu.Unlock()
	if !running {
		return nil
	}
	ch := make(chan []audit.Event, 1)
	r := &c.openReq
	r.mu.Lock()
	r.waits = append(r.waits, ch)
	r.wanted.Store(true)
	r.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(openWait)
	defer t.Stop()
	select {
	case evs := <-ch:
		return evs
	case <-t.C:
		return nil
	}
}

// answerOpen answers the waiting OpenFlows calls, on Run's goroutine.
func (p *proc) answerOpen() {
	r := &p.c.openReq
	if !r.wanted.Load() {
		return
	}
	r.mu.Lock()
	waits := r.waits
	r.waits = nil
	r.wanted.Store(false)
	r.mu.Unlock()
	// Counted first: with the table full (tens of thousands of flows
	// open) growing the list as it fills copied it over and over, on
	// this goroutine, which reads no packet meanwhile
	// (BenchmarkAnswerOpen).
	n := 0
	for _, f := range p.flows {
		if p.listedOpen(f) {
			n++
		}
	}
	evs := make([]audit.Event, 0, n)
	var g flow
	for _, f := range p.flows {
		if !p.listedOpen(f) {
			continue
		}
		if !f.decided {
			// A UDP flow whose client sent no QUIC Initial (NTP, a
			// VPN, a game) shows no name: it is decided by address,
			// but only classifyWait after it began or at its end, in
			// case a DNS answer on another socket is late, or a QUIC
			// Initial comes after all. It is listed decided as it
			// would be now, on a copy (the flow is decided as
			// before).
			g = *f
			p.classify(&g)
			evs = append(evs, p.event(&g, ""))
			continue
		}
		evs = append(evs, p.event(f, ""))
	}
	for _, ch := range waits {
		ch <- evs // buffered: a caller that gave up does not hold Run
	}
}

// listedOpen says whether answerOpen lists f: open, not reported, one
// emit would record, and decided, or a UDP flow that would be decided by
// address (a TCP flow or a QUIC one may still show its name, and waits
// as it does).
func (p *proc) listedOpen(f *flow) bool {
	if f.closed || f.reported || p.unrecorded(f) {
		return false
	}
	return f.decided || f.proto == 17 && f.app != appQUIC && f.pkts[0] != 0
}
