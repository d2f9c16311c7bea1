package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// dnsEvent is a query's event as the DNS forwarder writes it (dnsfilter's
// finish): the client's address and port, no destination, the query's ID.
func dnsEvent(eng *policy.Engine, at time.Time, port, id uint16, name string) Event {
	ev := Event{Kind: KindDNS, Source: SourceDNS, Time: at, Client: netip.MustParseAddr("192.168.10.5"), ClientPort: port,
		ClientMAC: "02:00:00:00:10:05", Proto: "udp", Name: name, QType: "A", QueryID: id, RCode: "NOERROR", Latency: 0.001}
	ev.Stamp(eng.DecideName(policy.Input{Client: ev.Client, Name: name, Now: at}))
	return ev
}

// queryCounts returns what r counts of queries for name: credited to a
// rule (allowed) or in its dropped entry (denied).
func queryCounts(r *Report, name string) (allowed, denied uint64) {
	for _, u := range r.Rules {
		for _, d := range u.TopDestinations {
			if d.Dest == name {
				allowed += u.Queries
			}
		}
	}
	for _, d := range r.Dropped {
		if d.Dest == name && d.Proto == "dns" {
			denied += d.Queries
		}
	}
	return allowed, denied
}

// TestQueriesFromOneSocket: a client asking again and again from one
// socket (a flood, a stub that keeps its port) makes one query per DNS
// message ID, and the ledger counts each: before, it keyed a query by
// the client's address and port, name and type, and every query within
// 2 s of the one before merged into the first (a flood from one socket
// counted 1). A retransmission, which keeps its ID, still counts once;
// so does a flood that keeps one ID, once per 2 s (a query's record
// spans its first report, not every repeat).
func TestQueriesFromOneSocket(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	const n = 50
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * 100 * time.Millisecond) }
	for i := range n {
		l.Emit(dnsEvent(eng, at(i), 5353, uint16(1000+i), "updates.example.org")) // allowed (dns-only)
		l.Emit(dnsEvent(eng, at(i), 5354, uint16(2000+i), "tracker.example"))     // denied
		if i%10 == 0 {
			// A retransmission of the query before, its ID kept.
			l.Emit(dnsEvent(eng, at(i).Add(time.Second), 5353, uint16(1000+i), "updates.example.org"))
			l.Emit(dnsEvent(eng, at(i).Add(time.Second), 5354, uint16(2000+i), "tracker.example"))
		}
	}
	// One ID again and again, 10 s long: a query per 2 s window.
	for i := range 100 {
		l.Emit(dnsEvent(eng, at(1000+i), 5355, 7, "tracker.example"))
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if a, _ := queryCounts(r, "updates.example.org"); a != n {
		t.Errorf("%d allowed queries from one socket counted %d", n, a)
	}
	if _, d := queryCounts(r, "tracker.example"); d != n+5 {
		t.Errorf("%d denied queries from one socket and a 10 s flood of one ID counted %d, want %d", n, d, n+5)
	}
	if r.Totals.Queries != 2*n+5 || r.Totals.Duplicates != 2*n/10+95 {
		t.Errorf("totals: %d queries, %d duplicates; want %d and %d", r.Totals.Queries, r.Totals.Duplicates, 2*n+5, 2*n/10+95)
	}
}

// TestQueriesFromOneSocketRestart: a device flooding denied queries from
// one socket past its detail budget: the live report counts each query,
// and so does the report read back from the event log (the summaries
// stand for each query; a retransmission's event stays a duplicate).
func TestQueriesFromOneSocketRestart(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: 10, DetailRate: 1, DetailInterval: time.Hour}, eng)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now }
	const n = 300
	for i := range n {
		at := now.Add(time.Duration(i) * 10 * time.Millisecond)
		j.Emit(dnsEvent(eng, at, 5354, uint16(i), "tracker.example"))
		if i%3 == 0 {
			j.Emit(dnsEvent(eng, at.Add(time.Millisecond), 5354, uint16(i), "tracker.example"))
		}
		if i == n/2 {
			j.takeBatch()
			j.writeSummaries() // an interval ends midway
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	want := live.Report(ReportOptions{Now: reportNow})
	if _, d := queryCounts(want, "tracker.example"); d != n || want.Totals.Duplicates != n/3 {
		t.Errorf("live: %d queries from one socket counted %d (%d duplicates, want %d)", n, d, want.Totals.Duplicates, n/3)
	}
	if j.summarized.Load() == 0 {
		t.Fatalf("nothing was held back: the test does not reach the detail budget")
	}
	reread, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
}

// TestQueriesFromOneSocketArchive: the summary of rotated-out files
// remembers the latest queries with their IDs (open_flows), so a
// retransmission in the next file counts with its query and the socket's
// next query, a new ID, counts on its own.
func TestQueriesFromOneSocketArchive(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	for i := range 3 {
		l.Emit(dnsEvent(eng, t0.Add(time.Duration(i)*100*time.Millisecond), 5354, uint16(i), "tracker.example"))
	}
	next := fromSummary(t, eng, l)
	for _, id := range []uint16{2, 3} { // the last one again, and a new one
		ev := dnsEvent(eng, t0.Add(time.Second), 5354, id, "tracker.example")
		next.add(&ev)
	}
	r := next.Report(ReportOptions{Now: reportNow})
	if _, d := queryCounts(r, "tracker.example"); d != 4 || r.Totals.Duplicates != 1 {
		t.Errorf("3 queries, a retransmission and a 4th from one socket across a rotation: %d queries, %d duplicates; want 4 and 1", d, r.Totals.Duplicates)
	}
}
