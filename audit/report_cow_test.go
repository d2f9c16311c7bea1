package audit

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"egressd/policy"
)

// TestEmitAfterReportCopiesNoClients: a report shares the clients' sets
// of the ledger's entries with its copy (clientSet.clone), and once it is
// made the copy is gone: an event recorded after it, of a client and MAC
// an entry has seen, must not copy the entry's clients (at the ledger's
// bounds that was about 8 KB and 4 allocations an Emit, 34 MB for a round
// of the dropped list after each report, under the ledger's lock:
// BenchmarkEmitAfterReport), as it copies none without a report.
func TestEmitAfterReportCopiesNoClients(t *testing.T) {
	const entries = 256
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	port := 0
	ev := func(e int) Event {
		port++
		return Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(port) * time.Millisecond),
			Client: netip.AddrFrom4([4]byte{192, 168, 50, 1}), ClientPort: uint16(port), ClientMAC: fmt.Sprintf("02:00:00:00:%02x:%02x", e>>8, e&0xff),
			Dest: netip.AddrFrom4([4]byte{203, 0, 113, byte(e)}), DestPort: 443, Proto: "tcp", Name: fmt.Sprintf("h%04d.drop.example", e),
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	}
	round := func() uint64 {
		evs := make([]Event, entries)
		for e := range evs {
			evs[e] = ev(e)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for _, e := range evs {
			l.Emit(e)
		}
		runtime.ReadMemStats(&after)
		return after.Mallocs - before.Mallocs
	}
	round() // the entries, and room for their flows
	round()
	without := round()
	if r := l.Report(ReportOptions{Now: reportNow}); len(r.Dropped) != entries {
		t.Fatalf("report: %d dropped entries, want %d", len(r.Dropped), entries)
	}
	with := round()
	if with > without+entries/4 {
		t.Errorf("a round of %d Emits (a client and MAC each entry has) allocated %d times after a report, %d without one: each Emit copies its entry's clients, shared with a report made already", entries, with, without)
	}
	// The report copies, and the ledger's counts stay its own: a second
	// report sees the round's flows, not the first's counts.
	if r := l.Report(ReportOptions{Now: reportNow}); r.Totals.Flows != 4*entries {
		t.Errorf("second report: %d flows, want %d", r.Totals.Flows, 4*entries)
	}
}
