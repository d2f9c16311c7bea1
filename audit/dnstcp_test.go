package audit

import (
	"testing"
	"time"
)

// TestQueriesOnOneTCPConnection: a client sends its queries one after
// another on one TCP connection, and may take one ID again once its
// query is answered (RFC 7766; a client that always uses ID 0). Over TCP
// a query is never retransmitted (TCP does that below DNS): each counts.
func TestQueriesOnOneTCPConnection(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	const n = 20
	for i := range n {
		at := t0.Add(time.Duration(i) * 50 * time.Millisecond)
		ev := dnsEvent(eng, at, 40001, 0, "tracker.example") // one connection, ID 0 each time
		ev.Proto = "tcp"
		l.Emit(ev)
		ev = dnsEvent(eng, at, 40002, uint16(i%2), "tracker.example") // another, two IDs in turn
		ev.Proto = "tcp"
		l.Emit(ev)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if _, d := queryCounts(r, "tracker.example"); d != 2*n || r.Totals.Duplicates != 0 {
		t.Errorf("%d queries on two TCP connections: %d counted, %d duplicates", 2*n, d, r.Totals.Duplicates)
	}
}
