package audit

import (
	"testing"
	"time"

	"egressd/policy"
)

// BenchmarkReportOpenFlows is the live report with capture's flow table
// full (65536 flows open, none reported yet: the default MaxFlows), a
// third of them denied, on a ledger of 100000 events; compare with
// BenchmarkReport, the same ledger without open flows.
func BenchmarkReportOpenFlows(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	for i := range uint64(100000) {
		ev := benchEvent(i)
		if i%3 == 0 {
			ev.Verdict, ev.Rule, ev.Name = policy.Deny, "", "x"+string(rune('a'+i%26))+".example"
		}
		l.Emit(ev)
	}
	open := make([]Event, 65536)
	for i := range open {
		ev := benchEvent(uint64(200000 + i))
		ev.Source, ev.Proto, ev.DestPort, ev.ClientPort = SourceCapture, "udp", 123, uint16(1024+i)
		ev.Time = t0.Add(time.Hour)
		if i%3 == 0 {
			ev.Verdict, ev.Rule, ev.Name = policy.Deny, "", "y"+string(rune('a'+i%26))+".example"
		}
		open[i] = ev
	}
	l.SetOpenFlows(func() []Event { return open })
	if r := l.Report(ReportOptions{}); r.OpenFlows != uint64(len(open)) {
		b.Fatalf("%d open flows counted, want %d", r.OpenFlows, len(open))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.Report(ReportOptions{})
	}
}

// BenchmarkReportOpenFlowsStall is BenchmarkReportOpenFlows with the
// journal's writer adding events meanwhile: stall-ms is the longest one
// Emit waited (for the ledger's lock) while the reports were made.
func BenchmarkReportOpenFlowsStall(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	for i := range uint64(100000) {
		l.Emit(benchEvent(i))
	}
	open := make([]Event, 65536)
	for i := range open {
		ev := benchEvent(uint64(200000 + i))
		ev.Source, ev.Proto, ev.DestPort, ev.ClientPort = SourceCapture, "udp", 123, uint16(1024+i)
		ev.Time = t0.Add(time.Hour)
		open[i] = ev
	}
	l.SetOpenFlows(func() []Event { return open })
	stop := make(chan struct{})
	worst := make(chan time.Duration)
	go func() {
		var w time.Duration
		for i := uint64(300000); ; i++ {
			select {
			case <-stop:
				worst <- w
				return
			default:
			}
			start := time.Now()
			l.Emit(benchEvent(i))
			w = max(w, time.Since(start))
			time.Sleep(100 * time.Microsecond)
		}
	}()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.Report(ReportOptions{})
	}
	b.StopTimer()
	close(stop)
	b.ReportMetric(float64(<-worst)/float64(time.Millisecond), "stall-ms")
}
