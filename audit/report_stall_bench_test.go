package audit

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"sync"
	"testing"
	"time"

	"egressd/policy"
)

// BenchmarkEmitDuringReport measures how long Emit waits while a report
// of a ledger at its bounds (fullDroppedLedger, "allowed") is made: each
// iteration starts a report and emits events, one after the other, until
// it returns (at most 10,000,000). max-emit-ms is the longest one Emit
// took, emits/report how many went in meanwhile; ns/op is the report's
// time (with the emits beside it).
func BenchmarkEmitDuringReport(b *testing.B) {
	l := fullDroppedLedger(b, true)
	var worst time.Duration
	emits := 0
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		done := make(chan struct{})
		go func() {
			l.Report(ReportOptions{Now: reportNow})
			close(done)
		}()
	emitting:
		for n := 0; n < 10_000_000; n++ {
			select {
			case <-done:
				break emitting
			default:
			}
			// A new client port and MAC of an entry the report lists.
			ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Hour + time.Duration(n)*time.Microsecond),
				Client: netip.MustParseAddr("192.168.50.1"), ClientPort: uint16(n), ClientMAC: fmt.Sprintf("02:ee:00:%02x:%02x:%02x", i&0xff, n>>8&0xff, n&0xff),
				Dest: netip.MustParseAddr("203.0.113.7"), DestPort: 443, Proto: "tcp", Name: fmt.Sprintf("h%04d.drop.example", n%l.opt.MaxDropped),
				Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
			start := time.Now()
			l.Emit(ev)
			worst = max(worst, time.Since(start))
			emits++
		}
		<-done
	}
	b.ReportMetric(float64(worst)/float64(time.Millisecond), "max-emit-ms")
	b.ReportMetric(float64(emits)/float64(b.N), "emits/report")
}

// BenchmarkReportsHeap measures the heap while callers ask for reports of
// a ledger at its bounds (fullDroppedLedger, "allowed") at once: 1 or 2
// of them (two operators polling /report.json); "since-N" are N callers
// asking for a window's report (since=), whose event log, in a temp dir,
// holds the ledger's events (1,048,576 of them), each read into a ledger
// of its own; each caller writes its report, as the admin server does, and
// lets it go, so the peak is the windows' ledgers. peak-heap-MB is the most the heap's objects took
// (live and not yet collected), sampled every millisecond, over the
// ledger's own heap-before-MB.
func BenchmarkReportsHeap(b *testing.B) {
	l := fullDroppedLedger(b, true)
	dir := b.TempDir()
	f, err := os.Create(filepath.Join(dir, CurrentLog))
	if err != nil {
		b.Fatal(err)
	}
	sink := NewNDJSONSink(f)
	fullDroppedEvents(l.opt, func(ev *Event) { sink.Emit(*ev) })
	if err := sink.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	l.mu.Lock()
	l.history = func(ctx context.Context, since time.Time, fn func(Event)) error {
		return scanDir(ctx, dir, since, "", fn)
	}
	l.mu.Unlock()
	for _, c := range []struct {
		callers int
		since   time.Time
	}{{1, time.Time{}}, {2, time.Time{}}, {1, t0}, {4, t0}} {
		name := fmt.Sprint(c.callers)
		if !c.since.IsZero() {
			name = "since-" + name
		}
		callers := c.callers
		b.Run(name, func(b *testing.B) {
			sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
			heap := func() float64 {
				metrics.Read(sample)
				return float64(sample[0].Value.Uint64()) / (1 << 20)
			}
			runtime.GC()
			before, peak := heap(), 0.0
			b.ResetTimer()
			for range b.N {
				var wg sync.WaitGroup
				done := make(chan struct{})
				sampled := make(chan struct{})
				go func() {
					defer close(sampled)
					tick := time.NewTicker(time.Millisecond)
					defer tick.Stop()
					for {
						peak = max(peak, heap())
						select {
						case <-done:
							return
						case <-tick.C:
						}
					}
				}()
				reports := make([]*Report, callers)
				for i := range callers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						r := l.Report(ReportOptions{Now: reportNow, Since: c.since})
						if c.since.IsZero() {
							reports[i] = r
						} else if err := r.WriteJSON(io.Discard); err != nil {
							b.Error(err)
						}
					}()
				}
				wg.Wait()
				close(done)
				<-sampled
				runtime.KeepAlive(reports)
			}
			b.ReportMetric(before, "heap-before-MB")
			b.ReportMetric(peak, "peak-heap-MB")
		})
	}
}

// BenchmarkReportCopyLocked is what a report holds the ledger's lock for
// at its bounds (fullDroppedLedger, "allowed"): the copy of its counts
// (copyLocked), the longest an Emit waits for a report's lock hold.
func BenchmarkReportCopyLocked(b *testing.B) {
	l := fullDroppedLedger(b, true)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		l.mu.Lock()
		l.copyLocked()
		l.mu.Unlock()
	}
}
