package audit

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"egressd/policy"
)

// quicRule is a rule, as a YAML list item, named n allowing
// n.example.com on 443/udp.
func quicRule(n string) string {
	return "  - name: " + n + "\n    to: [" + n + ".example.com]\n    ports: [443/udp]\n"
}

// quicFlowEvent is capture's event of a QUIC flow whose first hello named
// a.example.com and whose later ones named others, decided by eng.
func quicFlowEvent(eng *policy.Engine, others ...string) Event {
	ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("192.0.2.10"), ClientPort: 40000,
		Dest: netip.MustParseAddr("198.51.100.7"), DestPort: 443, Proto: "udp", Name: "a.example.com", NameSource: NameQUIC,
		OtherNames: others}
	ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: 443, Proto: policy.UDP, Name: ev.Name, Now: t0}))
	return ev
}

// TestReplayOtherNames: `audit --replay` judges a QUIC flow whose event
// does not carry the name its address was learned for (LearnedName: a log
// written before session 32) on each of the names its hellos carried
// (Name, OtherNames), as capture lets a later connection through only
// where the policy allows its name: a candidate that drops the rule of a later connection's host
// drops the flow, listed under that host; the recorded policy, and a
// candidate that keeps both rules, change nothing. Before session 30 the
// other names were not recorded, and the flow was judged on its first
// name only.
func TestReplayOtherNames(t *testing.T) {
	a, b := quicRule("a"), quicRule("b")
	running := compileRules(t, a+b)
	ev := quicFlowEvent(running, "b.example.com")
	for i, c := range []struct {
		cand    *policy.Engine
		dropped string
	}{
		{running, ""},
		{compileRules(t, b+a), ""},
		{compileRules(t, a), "b.example.com"},
		{compileRules(t, b), "a.example.com"},
	} {
		r := NewReplayer(c.cand, t0.Add(time.Minute))
		r.Emit(ev)
		res := r.Result()
		var got []string
		for _, ch := range res.NewlyDropped {
			got = append(got, ch.Dest)
		}
		if want := slices.DeleteFunc([]string{c.dropped}, func(s string) bool { return s == "" }); !slices.Equal(got, want) {
			t.Errorf("candidate %d: newly dropped %q, want %q", i, got, want)
		}
	}
}

// TestOtherNamesBound: Bound keeps at most MaxOtherNames other names,
// each cut as a name is, and the event log reads them back as written.
func TestOtherNamesBound(t *testing.T) {
	long := strings.Repeat("x", MaxNameBytes+10)
	ev := Event{Kind: KindFlow, Time: t0, Proto: "udp", OtherNames: []string{long, "b.test", "c.test", "d.test"}}
	orig := slices.Clone(ev.OtherNames)
	ev.Bound()
	if len(ev.OtherNames) != MaxOtherNames || len(ev.OtherNames[0]) > MaxNameBytes || !strings.HasSuffix(ev.OtherNames[0], TruncMark) || ev.OtherNames[1] != "b.test" {
		t.Errorf("bounded: %q", ev.OtherNames)
	}
	if orig[0] != long {
		t.Error("Bound changed the caller's slice")
	}
	line, err := ev.appendJSON(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(line), `"other_names":["x`) {
		t.Errorf("log line has no other_names: %s", line)
	}
}

// TestLedgerOtherNamesUseRules: a QUIC flow whose later connection named
// a host another rule allows (OtherNames) uses that rule too: the report
// credits it the flow (once, however often the flow is reported) and
// the host, and does not list it unused, where `policy check` and the
// report would have told the operator to delete a rule in use. Its bytes
// stay with the flow's own rule. A reload that denies the flow takes the
// credit back with the flow's own. Before session 30 (R27) the ledger
// read Rule alone: rule b, used only by the second name, was unused.
func TestLedgerOtherNamesUseRules(t *testing.T) {
	eng := compileRules(t, quicRule("a")+quicRule("b")+quicRule("c"))
	ev := quicFlowEvent(eng, "b.example.com", "B.example.com.", "nothing.example.com")
	ev.BytesOut, ev.BytesIn = 500, 5000
	l := NewLedger(eng, LedgerOptions{})
	l.Emit(ev)
	again := ev
	again.BytesOut, again.Duration = 900, 5
	l.Emit(again) // the same flow reported again: no second credit
	r := l.Report(ReportOptions{Now: t0.Add(time.Hour)})
	if !slices.Equal(r.UnusedRules, []string{"c"}) {
		t.Errorf("unused rules %q, want [c]: b is used by the flow's second name", r.UnusedRules)
	}
	rules := map[string]RuleReport{}
	for _, rr := range r.Rules {
		rules[rr.Name] = rr
	}
	if ra := rules["a"]; ra.Flows != 1 || ra.BytesOut != 900 || !slices.Equal(ra.Destinations, []string{"a.example.com"}) {
		t.Errorf("rule a %+v", ra)
	}
	if rb := rules["b"]; rb.Flows != 1 || rb.BytesOut != 0 || !slices.Equal(rb.Destinations, []string{"b.example.com"}) ||
		!slices.Equal(rb.Clients, []string{"192.0.2.10"}) {
		t.Errorf("rule b %+v, want the flow, its second name and client, no bytes", rb)
	}
	if tt := r.Totals; tt.Flows != 1 || tt.Allowed != 1 {
		t.Errorf("totals %+v", tt)
	}

	// A reload denies the flow (capture's redecide, same start): neither
	// rule keeps it.
	deny := again
	deny.Name, deny.OtherNames = "b.example.com", []string{"a.example.com"}
	deny.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce})
	l.Emit(deny)
	r = l.Report(ReportOptions{Now: t0.Add(time.Hour)})
	if len(r.Rules) != 0 || !slices.Equal(r.UnusedRules, []string{"a", "b", "c"}) {
		t.Errorf("after the deny: rules %+v, unused %q", r.Rules, r.UnusedRules)
	}
}

// TestOpenFlowsOtherNamesMoved: an open flow's deny (a reload, not in the
// log yet) moves on the report's overlay the flow the ledger counts for
// its first name and, through its second name, for another rule: the
// report shows neither rule using it, and the ledger's own counts are
// left as they are (the overlay's record must not take the credit back
// from the ledger's rule: run with -race, it wrote it without the lock).
func TestOpenFlowsOtherNamesMoved(t *testing.T) {
	eng := compileRules(t, quicRule("a")+quicRule("b"))
	ev := quicFlowEvent(eng, "b.example.com")
	l := NewLedger(eng, LedgerOptions{})
	l.Emit(ev)
	deny := ev
	deny.Name, deny.OtherNames = "b.example.com", []string{"a.example.com"}
	deny.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce})
	l.SetOpenFlows(func() []Event { return []Event{deny} })
	for i := range 2 {
		r := l.Report(ReportOptions{Now: t0.Add(time.Minute)})
		if len(r.Rules) != 0 || !slices.Equal(r.UnusedRules, []string{"a", "b"}) {
			t.Errorf("report %d with the open deny: rules %+v, unused %q", i, r.Rules, r.UnusedRules)
		}
	}
	l.SetOpenFlows(nil)
	r := l.Report(ReportOptions{Now: t0.Add(time.Minute)})
	if len(r.Rules) != 2 || r.Rules[0].Flows != 1 || r.Rules[1].Flows != 1 || len(r.UnusedRules) != 0 {
		t.Errorf("the ledger's own counts after the reports: rules %+v, unused %q; want a and b used once each", r.Rules, r.UnusedRules)
	}
}

// TestQueueBytesOtherNames: the journal's queue bound (QueueBytes) counts
// an event's other names as it counts its top clients: up to 4 names of
// 255 bytes each an event, which it left out before session 30 (R27).
func TestQueueBytesOtherNames(t *testing.T) {
	ev := Event{Kind: KindFlow, Time: t0, Proto: "udp", Name: "a.test"}
	base := queueBytes(&ev)
	ev.OtherNames = []string{strings.Repeat("b", 200), "c.test"}
	if got, want := queueBytes(&ev), base+2*int64(unsafe.Sizeof(""))+206; got != want {
		t.Errorf("queueBytes with two other names %d, want %d", got, want)
	}
}

// TestReplayLearnedNameSummary: a noisy device's denied QUIC flows past
// its detail budget are held back into summary records, one per shape;
// the name each flow's address was learned for (LearnedName) is part of
// the shape, so the events a summary stands for replay on their own
// learned name: a candidate that allows b.example.com newly allows the
// flows learned for it and none of those learned for c.example.com,
// whose hellos named the same host. Without it in the shape the two
// kinds would be one summary, replayed on the first's name.
func TestReplayLearnedNameSummary(t *testing.T) {
	dir := t.TempDir()
	j, _, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: 2, DetailRate: 1, DetailInterval: time.Hour}, nil)
	j.now = func() time.Time { return t0 } // no refill: the burst alone
	const n = 40
	for i := range n {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(i) * time.Millisecond), Client: netip.MustParseAddr("192.0.2.10"),
			ClientPort: uint16(40000 + i), ClientMAC: "aa:bb:cc:00:00:07", Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "udp",
			Name: "x.unlisted.test", NameSource: NameQUIC, LearnedName: []string{"b.example.com", "c.example.com"}[i%2], Close: "idle"}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: policy.ReasonNoRule})
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	summaries := 0
	if _, _, err := readPath(dir, func(ev Event) {
		if ev.expanded != 0 {
			summaries++
		}
	}); err != nil {
		t.Fatal(err)
	}
	if summaries == 0 {
		b, _ := os.ReadFile(filepath.Join(dir, CurrentLog))
		t.Fatalf("no event came from a summary record: the test proves nothing\n%s", b)
	}
	r := NewReplayer(compileRules(t, quicRule("b")), t0.Add(time.Minute))
	if _, err := ReplayPath(dir, r); err != nil {
		t.Fatal(err)
	}
	res := r.Result()
	allowed := uint64(0)
	for _, ch := range res.NewlyAllowed {
		allowed += ch.Flows
	}
	if res.Flows != n || allowed != n/2 || res.Unchanged != n/2 {
		t.Errorf("replay: %d flows, %d newly allowed, %d unchanged; want %d, %d, %d (%+v)", res.Flows, allowed, res.Unchanged, n, n/2, n/2, res.NewlyAllowed)
	}
}
