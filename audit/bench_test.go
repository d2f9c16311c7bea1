package audit

import (
	"context"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"egressd/policy"
)

func benchEvent(i uint64) Event {
	return Event{
		Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(i) * time.Millisecond),
		Client: netip.AddrFrom4([4]byte{192, 168, 10, byte(i)}), ClientPort: uint16(i),
		Dest: netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), DestPort: 443, Proto: "tcp",
		Name: "api.nirovision.com", NameSource: NameSNI, Verdict: policy.Allow, Rule: "vendor-cloud",
		Mode: policy.ModeAudit, Reason: policy.ReasonAllowed, BytesOut: 1000, BytesIn: 10000,
	}
}

// BenchmarkLedgerEmit is the in-memory ledger alone (what the journal's
// writer does per event besides encoding and writing).
func BenchmarkLedgerEmit(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	var n atomic.Uint64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l.Emit(benchEvent(n.Add(1)))
		}
	})
}

// BenchmarkJournalEmit is the cost a component pays per event: an append
// to the queue under its lock (or a shed), here with every CPU emitting
// at once, so mostly contended sheds. Compare with BenchmarkLedgerEmit.
func BenchmarkJournalEmit(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: b.TempDir()}, l)
	if err != nil {
		b.Fatal(err)
	}
	go j.Run(context.Background())
	defer j.Close()
	var n atomic.Uint64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			j.Emit(benchEvent(n.Add(1)))
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(j.Shed())/float64(b.N), "shed/op")
}

// BenchmarkJournalWrite is the writer's cost per event (ledger update,
// JSON encoding, buffered append to the real file): the rate at which the
// disk side drains the queue.
func BenchmarkJournalWrite(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: b.TempDir()}, l)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		j.writeEvent(benchEvent(uint64(i)))
	}
	j.flush()
	b.StopTimer()
	if j.Written() != uint64(b.N) {
		b.Fatalf("written %d of %d", j.Written(), b.N)
	}
	j.Close()
}

func BenchmarkReport(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	for i := range uint64(100000) {
		ev := benchEvent(i)
		if i%3 == 0 {
			ev.Verdict, ev.Rule, ev.Name = policy.Deny, "", "x"+string(rune('a'+i%26))+".example"
		}
		l.Emit(ev)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.Report(ReportOptions{})
	}
}

// BenchmarkJournalWriteDNS is the writer's cost per DNS query event, as
// the forwarder emits them: a client's queries from changing ports, a
// thousand names, a quarter of them refused.
func BenchmarkJournalWriteDNS(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	// Every event is written (no detail budget): a quarter of them are
	// denials from 7 clients, which the default budget would fold into
	// summary records, and this measures the cost of writing each.
	j, _, err := OpenJournal(JournalConfig{Dir: b.TempDir(), DetailBurst: -1}, l)
	if err != nil {
		b.Fatal(err)
	}
	evs := make([]Event, 4096)
	for i := range evs {
		evs[i] = benchDNSEvent(uint64(i))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ev := evs[i%len(evs)]
		ev.Time = t0.Add(time.Duration(i) * time.Microsecond)
		ev.ClientPort = uint16(1024 + i%60000)
		j.writeEvent(ev)
	}
	j.flush()
	b.StopTimer()
	if j.Written() != uint64(b.N) {
		b.Fatalf("written %d of %d", j.Written(), b.N)
	}
	j.Close()
}

func benchDNSEvent(i uint64) Event {
	ev := Event{
		Kind: KindDNS, Source: SourceDNS, Time: t0,
		Client: netip.AddrFrom4([4]byte{192, 168, 10, byte(i % 7)}), ClientPort: uint16(i), Proto: "udp",
		Name: fmt.Sprintf("h%d.allowed.test.", i%1000), QType: "A", RCode: "NOERROR", CacheHit: true,
		Verdict: policy.Allow, Rule: "vendor-cloud", Mode: policy.ModeAudit, Reason: policy.ReasonAllowed,
		Latency: 1.2e-5 + float64(i%100)*1e-7,
	}
	if i%4 == 3 {
		ev.Name = fmt.Sprintf("x%d.denied.test.", i%1000)
		ev.Verdict, ev.Rule, ev.Reason, ev.RCode, ev.CacheHit = policy.Deny, "", "no-rule", "REFUSED", false
	}
	return ev
}

// BenchmarkJournalWriteDNSSockets is the writer's cost per DNS query
// event under dnsperf's load in bench/dns.sh (QUERY_LOG=1): one client
// address, a few fixed source ports, the query file's names again and
// again (75 % allowed, each 3 times; 25 % refused), a new message ID each
// query, about 150,000 queries a second, with the default detail budget
// as bench/cmd/dnsbench -journal runs it. Each query counts (its own ID):
// the ledger's and the budget's per-query cost. "oneid" gives every
// query ID 0: what the ledger's merge costs, as each port's queries of a
// name merged into one before session 23.
func BenchmarkJournalWriteDNSSockets(b *testing.B) {
	b.Run("ids", func(b *testing.B) { benchJournalWriteDNSSockets(b, true) })
	b.Run("oneid", func(b *testing.B) { benchJournalWriteDNSSockets(b, false) })
}

// BenchmarkLedgerDNSSockets is BenchmarkJournalWriteDNSSockets' ledger
// alone (no budget, no encoding, no file).
func BenchmarkLedgerDNSSockets(b *testing.B) {
	l := NewLedger(nil, LedgerOptions{})
	evs := dnsperfEvents()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ev := evs[i%len(evs)]
		ev.Time = t0.Add(time.Duration(i) * 6500 * time.Nanosecond)
		ev.ClientPort = uint16(40000 + i%8)
		ev.QueryID = uint16(i / 8)
		l.Emit(ev)
	}
}

// dnsperfEvents are the queries of bench/dns.sh's query file (1000
// names a kind), shuffled deterministically as it is.
func dnsperfEvents() []Event {
	const names = 1000
	var evs []Event
	for i := range names {
		for range 3 {
			evs = append(evs, Event{
				Kind: KindDNS, Source: SourceDNS, Client: netip.AddrFrom4([4]byte{127, 0, 0, 1}), Proto: "udp",
				Name: fmt.Sprintf("h%04d.allowed.test", i), QType: "A", RCode: "NOERROR", CacheHit: true,
				Verdict: policy.Allow, Rule: "allowed", Mode: policy.ModeEnforce, Reason: policy.ReasonAllowed,
				Latency: 1.2e-5,
			})
		}
		dn := fmt.Sprintf("h%04d.denied.test", i)
		if i%2 == 0 {
			dn = fmt.Sprintf("h%04d.evil.example", i)
		}
		evs = append(evs, Event{
			Kind: KindDNS, Source: SourceDNS, Client: netip.AddrFrom4([4]byte{127, 0, 0, 1}), Proto: "udp",
			Name: dn, QType: "A", RCode: "REFUSED", Enforced: true,
			Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule, Latency: 4e-6,
		})
	}
	for i := len(evs) - 1; i > 0; i-- {
		k := int(uint64(i) * 2654435761 % uint64(i+1))
		evs[i], evs[k] = evs[k], evs[i]
	}
	return evs
}

func benchJournalWriteDNSSockets(b *testing.B, ids bool) {
	l := NewLedger(nil, LedgerOptions{})
	j, _, err := OpenJournal(JournalConfig{Dir: b.TempDir()}, l)
	if err != nil {
		b.Fatal(err)
	}
	var now time.Time
	j.now = func() time.Time { return now }
	const ports = 8
	evs := dnsperfEvents()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ev := evs[i%len(evs)]
		now = t0.Add(time.Duration(i) * 6500 * time.Nanosecond)
		ev.Time = now
		ev.ClientPort = uint16(40000 + i%ports)
		if ids {
			ev.QueryID = uint16(i / ports)
		}
		j.writeEvent(ev)
		if j.detail.due(now) {
			j.writeSummaries()
		}
	}
	j.flush()
	b.StopTimer()
	if j.Written()+j.summarized.Load() < uint64(b.N) {
		b.Fatalf("written %d and summarized %d of %d", j.Written(), j.summarized.Load(), b.N)
	}
	j.Close()
}
