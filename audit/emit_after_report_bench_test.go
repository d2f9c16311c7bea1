package audit

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// BenchmarkEmitAfterReport measures a round of Emits, one into each
// dropped entry of a ledger at its bounds (fullDroppedLedger), of a
// client and MAC each entry has seen already, with ("report") and
// without ("none") a report made before the round (not timed). A report
// shares the entries' clients' sets copy-on-write (clientSet.clone):
// whatever the ledger then keeps of that copy is paid for by the Emits.
func BenchmarkEmitAfterReport(b *testing.B) {
	l := fullDroppedLedger(b, true)
	evs := make([]Event, l.opt.MaxDropped-1)
	for e := range evs {
		evs[e] = Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(2 * time.Hour),
			Client: netip.AddrFrom4([4]byte{192, 168, 50, 1}), ClientMAC: fmt.Sprintf("02:00:00:%02x:%02x:%02x", 0, maxClientMACs-1, e%256),
			Dest: netip.AddrFrom4([4]byte{203, 0, 113, byte(e)}), DestPort: 443, Proto: "tcp", Name: fmt.Sprintf("h%04d.drop.example", e),
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
	}
	port := 0
	for _, report := range []bool{false, true} {
		name := "none"
		if report {
			name = "report"
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				b.StopTimer()
				if report {
					l.Report(ReportOptions{Now: reportNow})
				}
				b.StartTimer()
				for i := range evs {
					port++
					evs[i].ClientPort = uint16(port)
					l.Emit(evs[i])
				}
			}
			b.ReportMetric(float64(len(evs)), "emits/op")
		})
	}
}
