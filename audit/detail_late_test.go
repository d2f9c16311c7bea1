package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudgetLateTwin: capture's reports of denied connections,
// past the device's budget, are held back into a summary; the proxy's
// reports of the same connections come two intervals later (a
// connection the proxy reports at its close, 20 s and more after
// capture's report). Live, the ledger merges each into its flow. The
// budget had forgotten the held flows by then (it remembered this
// interval's and the one before), so it wrote the proxy's reports one by
// one, and the ledger read back from the log (a restart) counted each
// connection twice: once in capture's summary, once alone. The log must
// read back as the live report.
func TestDetailBudgetLateTwin(t *testing.T) {
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	r := newTwinRig(t, twinFlows{name: "tracker.example", captureNamed: true, decision: &deny})
	want, reread := r.run(t, 2) // two intervals end
	if want.Totals.Flows != twinConns || want.Totals.Duplicates != twinConns {
		t.Fatalf("live totals %+v, want %d flows and as many duplicates", want.Totals, twinConns)
	}
	if d := cmp.Diff(want, reread); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
}

// twinConns is how many connections a twinRig's flows are, the first
// twinBurst of them in the device's detail budget.
const twinConns, twinBurst = 60, 10

// twinFlows says what a twinRig's connections are: the name the proxy's
// reports give them (SNI), whether capture's reports know it too, and
// the decision both reports carry (nil: the policy's for each).
type twinFlows struct {
	name         string
	captureNamed bool
	decision     *policy.Decision
}

// twinRig is the late-twin tests' journal and the reports of their
// connections: one client's to 203.0.113.20:443, reported by capture
// (reset, 600 bytes out) and by the proxy (517 bytes out), with a detail
// budget of twinBurst and a clock that stands still (no refill: the
// burst alone).
type twinRig struct {
	eng  *policy.Engine
	dir  string
	j    *Journal
	live *Ledger
	now  time.Time
	tf   twinFlows
}

func newTwinRig(t *testing.T, tf twinFlows) *twinRig {
	t.Helper()
	r := &twinRig{eng: loadPolicy(t, "policy.yaml"), dir: t.TempDir(), tf: tf,
		now: time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)}
	r.j, r.live, _ = openJournal(t, JournalConfig{Dir: r.dir, DetailBurst: twinBurst, DetailRate: 1, DetailInterval: time.Hour}, r.eng)
	r.j.now = func() time.Time { return r.now }
	return r
}

// flow is src's report of connection i.
func (r *twinRig) flow(i int, src Source) Event {
	ev := Event{Kind: KindFlow, Source: src, Time: r.now.Add(time.Duration(i) * time.Millisecond),
		Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i), ClientMAC: "aa:bb:cc:00:00:07",
		Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: r.tf.name, NameSource: NameSNI, BytesOut: 517, Duration: 30}
	if src == SourceCapture {
		if !r.tf.captureNamed {
			ev.Name, ev.NameSource = "", NameNone
		}
		ev.BytesOut, ev.BytesIn, ev.Close, ev.Duration = 600, 60, "rst", 0.5
	}
	if r.tf.decision != nil {
		ev.Stamp(*r.tf.decision)
	} else {
		ev.Stamp(r.eng.Decide(policy.Input{Client: ev.Client, Name: ev.Name, Dest: ev.Dest, Port: ev.DestPort, Proto: policy.TCP, Now: ev.Time}))
	}
	return ev
}

// run emits the twinConns connections' reports through emitTwins, rolls
// intervals between capture's and the proxy's, and returns the live
// report and the one read back from the log.
func (r *twinRig) run(t *testing.T, rolls int) (live, reread *Report) {
	t.Helper()
	emitTwins(t, r.j, twinConns, rolls, r.flow)
	live = r.live.Report(ReportOptions{Now: reportNow})
	back, _, err := LoadDir(r.dir, r.eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return live, back.Report(ReportOptions{Now: reportNow})
}

// emitTwins emits capture's report of conns flows (flow(i, SourceCapture)),
// writes them, ends rolls intervals of the detail budget (their summaries
// written), checks that some were held back, then emits the proxy's
// report of each (flow(i, SourceProxy)) and closes the journal.
func emitTwins(t *testing.T, j *Journal, conns, rolls int, flow func(i int, src Source) Event) {
	t.Helper()
	for i := range conns {
		j.Emit(flow(i, SourceCapture))
	}
	j.takeBatch()
	for range rolls {
		j.takeBatch()
		j.writeSummaries()
	}
	if j.summarized.Load() == 0 {
		t.Fatalf("nothing was held back: the test does not reach the detail budget")
	}
	for i := range conns {
		j.Emit(flow(i, SourceProxy))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}
