package audit

import (
	"bufio"
	"encoding/json"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudget: one device repeating a denied query and a denied
// connection (reported by the proxy and, as a duplicate, by capture)
// fills the event log with as many lines as attempts. Past its detail
// budget the repeats are held back into one summary record per shape;
// another device's events, and the noisy device's allowed ones, are all
// written meanwhile; and the ledger read back from the log (a restart)
// equals the live one, as does a replay's count.
func TestDetailBudget(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	const burst, noisy, quiet, allowed, conns, oneport = 20, 1000, 15, 200, 300, 500
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour}, eng)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now } // no refill: the burst alone

	a, b := netip.MustParseAddr("192.168.10.7"), netip.MustParseAddr("192.168.10.8")
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	query := func(c netip.Addr, mac string, i int) Event {
		ev := Event{Kind: KindDNS, Source: SourceDNS, Time: now.Add(time.Duration(i) * time.Millisecond),
			Client: c, ClientPort: uint16(10000 + i), ClientMAC: mac, Proto: "udp", Name: "tracker.example", QType: "A", RCode: "NOERROR"}
		ev.Stamp(deny)
		return ev
	}
	for i := range noisy {
		j.Emit(query(a, "aa:bb:cc:00:00:07", i))
		if i < oneport {
			// A query repeated from one port with its ID (a
			// retransmission; within 2 s): one query for the
			// ledger, the rest merged into it.
			ev := query(a, "aa:bb:cc:00:00:07", i)
			ev.ClientPort, ev.Name = 9999, "ads.example"
			j.Emit(ev)
		}
		if i < quiet { // the other device, meanwhile
			j.Emit(query(b, "aa:bb:cc:00:00:08", i))
		}
		// A denied connection, reported by the proxy and by capture:
		// one flow. Capture's report comes first for every third, and
		// the other report five attempts later.
		flow := func(i int, src Source) {
			ev := Event{Kind: KindFlow, Source: src, Time: now.Add(time.Duration(i) * time.Millisecond),
				Client: a, ClientPort: uint16(20000 + i), ClientMAC: "aa:bb:cc:00:00:07", Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443,
				Proto: "tcp", Name: "tracker.example", NameSource: NameSNI, BytesOut: 517}
			if src == SourceCapture {
				// Its report of a flow that ended (one still open
				// is written: TestDetailBudgetLongFlow).
				ev.NameSource, ev.BytesOut, ev.BytesIn, ev.Close = NameDNSLearned, 600, 60, "rst"
			}
			ev.Stamp(deny)
			j.Emit(ev)
		}
		order := func(i int) (Source, Source) {
			if i%3 == 0 {
				return SourceCapture, SourceProxy
			}
			return SourceProxy, SourceCapture
		}
		if i < conns {
			first, _ := order(i)
			flow(i, first)
		}
		if k := i - 5; k >= 0 && k < conns {
			_, second := order(k)
			flow(k, second)
		}
		if i == conns/2 {
			// The interval ends between the reports of some flows.
			j.takeBatch()
			j.writeSummaries()
		}
		if i < allowed {
			ev := Event{Kind: KindFlow, Source: SourceProxy, Time: now.Add(time.Duration(i) * time.Millisecond),
				Client: a, ClientPort: uint16(40000 + i), ClientMAC: "aa:bb:cc:00:00:07", Dest: netip.MustParseAddr("198.51.100.1"), DestPort: 443,
				Proto: "tcp", Name: "api.nirovision.com", NameSource: NameSNI, BytesOut: 1000, BytesIn: 5000}
			ev.Stamp(policy.Decision{Verdict: policy.Allow, Rule: "vendor-cloud", Mode: policy.ModeAudit})
			j.Emit(ev)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	// What the log holds, per kind of line.
	type lineKey struct {
		client, kind, source, verdict string
		summary                       bool
	}
	lines := map[lineKey]int{}
	var held uint64
	f, err := os.Open(filepath.Join(dir, CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("%v: %s", err, sc.Bytes())
		}
		lines[lineKey{ev.Client.String(), string(ev.Kind), string(ev.Source), string(ev.Verdict), ev.Count+ev.Duplicates > 0}]++
		held += ev.Count + ev.Duplicates
	}
	if got := lines[lineKey{b.String(), "dns", "dnsfilter", "deny", false}]; got != quiet {
		t.Errorf("the other device's %d queries: %d lines, want every one", quiet, got)
	}
	if got := lines[lineKey{a.String(), "flow", "proxy", "allow", false}]; got != allowed {
		t.Errorf("the noisy device's %d allowed connections: %d lines, want every one", allowed, got)
	}
	denied := lines[lineKey{a.String(), "dns", "dnsfilter", "deny", false}] + lines[lineKey{a.String(), "flow", "proxy", "deny", false}] +
		lines[lineKey{a.String(), "flow", "capture", "deny", false}]
	// The burst, each shape's first in each of the two intervals, and
	// the later report of a flow written so.
	if limit := 2 * (burst + 6); denied > limit {
		t.Errorf("the noisy device's %d denied queries and %d denied connections wrote %d lines; its budget is %d (lines %v)", noisy, conns, denied, limit, lines)
	}
	if n := lines[lineKey{a.String(), "dns", "dnsfilter", "deny", true}]; n != 4 {
		t.Errorf("%d summary records of the noisy device's queries, want 4, one a name an interval (lines %v)", n, lines)
	}
	if want := uint64(noisy + oneport + 2*conns - denied); held != want || j.summarized.Load() != want {
		t.Errorf("summaries hold %d events, the metric says %d; want %d", held, j.summarized.Load(), want)
	}

	// A restart: the ledger read from the log is the live one.
	want := live.Report(ReportOptions{Now: reportNow})
	if want.Totals.Queries != noisy+quiet+1 || want.Totals.Flows != conns+allowed {
		t.Fatalf("live totals %+v, want %d queries and %d flows", want.Totals, noisy+quiet+1, conns+allowed)
	}
	reread, st, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Events != uint64(noisy+oneport+quiet+2*conns+allowed) {
		t.Errorf("load read %d events, want %d", st.Events, noisy+oneport+quiet+2*conns+allowed)
	}
	if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
	// A window that starts after the first held query still sees the
	// last (a summary's last event is at Until).
	since := now.Add(noisy * time.Millisecond / 2)
	wWant, wGot := live.Report(ReportOptions{Now: reportNow, Since: since}), reread.Report(ReportOptions{Now: reportNow, Since: since})
	if wGot.Totals.Queries == 0 || wGot.Totals.Queries > wWant.Totals.Queries {
		t.Errorf("window since %s: %d queries read back, %d live", since, wGot.Totals.Queries, wWant.Totals.Queries)
	}

	// A replay judges each event a summary stands for.
	r := NewReplayer(eng, reportNow)
	if _, err := ReplayPath(dir, r); err != nil {
		t.Fatal(err)
	}
	if res := r.Result(); res.Queries != noisy+quiet+1 || res.Flows != conns+allowed || res.Events != uint64(noisy+oneport+quiet+2*conns+allowed) {
		t.Errorf("replay: %d events, %d queries, %d flows; want %d, %d, %d", res.Events, res.Queries, res.Flows, noisy+oneport+quiet+2*conns+allowed, noisy+quiet+1, conns+allowed)
	}
}

// TestQuietLine: the decision log lines of one device's repeated denials
// past its budget are left out and counted into a summary line (a
// decision line with count); another device's lines are all logged, and
// so are allowed ones.
func TestQuietLine(t *testing.T) {
	var logBuf syncBuffer
	const burst, noisy, quiet = 10, 500, 9
	j, _, _ := openJournal(t, JournalConfig{Dir: t.TempDir(), DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour,
		Logger: slog.New(slog.NewJSONHandler(&logBuf, nil))}, nil)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now }
	ev := func(c, mac string, v policy.Verdict, i int) *Event {
		e := &Event{Kind: KindFlow, Source: SourceProxy, Time: now.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr(c), ClientPort: uint16(20000 + i), ClientMAC: mac, Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443,
			Proto: "tcp", Name: "tracker.example", NameSource: NameSNI}
		e.Stamp(policy.Decision{Verdict: v, Mode: policy.ModeEnforce, Reason: "no-rule"})
		return e
	}
	logged := map[string]int{}
	for i := range noisy {
		for _, e := range []*Event{ev("192.0.2.7", "aa:bb:cc:00:00:07", policy.Deny, i), ev("192.0.2.7", "aa:bb:cc:00:00:07", policy.Allow, i)} {
			if !QuietLine(j, e) {
				logged[string(e.Verdict)]++
			}
		}
		if i < quiet && !QuietLine(j, ev("192.0.2.8", "aa:bb:cc:00:00:08", policy.Deny, i)) {
			logged["other"]++
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if logged["deny"] > burst+1 || logged["allow"] != noisy || logged["other"] != quiet {
		t.Errorf("lines logged: %v; want at most %d denials of the noisy device, %d allowed, %d of the other device", logged, burst+1, noisy, quiet)
	}
	var sum uint64
	var sums int
	for _, l := range strings.Split(strings.TrimSpace(logBuf.String()), "\n") {
		var rec struct {
			Msg   string `json:"msg"`
			Count uint64 `json:"count"`
		}
		if json.Unmarshal([]byte(l), &rec) == nil && rec.Msg == CanonicalMessage && rec.Count > 0 {
			sum += rec.Count
			sums++
		}
	}
	if want := uint64(noisy - logged["deny"]); sums != 1 || sum != want || j.quieted.Load() != want {
		t.Errorf("%d summary lines count %d; metric %d; want one of %d\n%s", sums, sum, j.quieted.Load(), want, logBuf.String())
	}
}

// TestDetailBudgetFull: more flows held back than an interval may hold
// end the interval early (summaries written, the held flows forgotten
// a generation later); the log still counts what the live ledger did,
// and the flood stays held back.
func TestDetailBudgetFull(t *testing.T) {
	dir := t.TempDir()
	const burst, conns = 10, maxHeldFlows + maxHeldFlows/4
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour}, nil)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now }
	for i := range conns {
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: now.Add(time.Duration(i) * time.Microsecond),
			Client: netip.MustParseAddr("192.0.2.7"), ClientPort: uint16(1024 + i%60000), Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443,
			Proto: "tcp", Name: "tracker.example", NameSource: NameSNI, BytesOut: 517}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: "no-rule"})
		j.Emit(ev)
		ev.Source, ev.BytesIn = SourceCapture, 60
		j.Emit(ev)
		if i%1000 == 999 {
			j.takeBatch() // the writer keeps up
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if w := j.Written(); w > 4*(burst+4) {
		t.Errorf("%d lines written for %d denied connections, want at most %d", w, conns, 4*(burst+4))
	}
	want := live.Report(ReportOptions{Now: reportNow})
	reread, _, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
}

// TestDetailBudgetLongFlow: capture reports a flow still open after a
// minute at once and again when it ends, minutes later (the ledger
// merges the two). A noisy device's open reports past its budget are
// held back into a summary; the end updates come intervals after, when
// the budget no longer remembers the flows. The log read back must still
// count each flow once, with the bytes the live ledger had.
func TestDetailBudgetLongFlow(t *testing.T) {
	dir := t.TempDir()
	const burst, conns = 5, 40
	j, live, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: burst, DetailRate: 1, DetailInterval: time.Hour}, nil)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now }
	start := now
	flow := func(i int) Event {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: start.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.0.2.7"), ClientPort: uint16(20000 + i), ClientMAC: "aa:bb:cc:00:00:07",
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: "tracker.example", NameSource: NameSNI,
			BytesOut: 1000, BytesIn: 2000}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"})
		return ev
	}
	for i := range conns { // the open reports
		j.Emit(flow(i))
	}
	j.takeBatch()
	for range 3 { // intervals pass while the flows stay open
		now = now.Add(time.Hour)
		j.writeSummaries()
	}
	for i := range conns { // the end updates
		ev := flow(i)
		ev.BytesOut, ev.BytesIn, ev.Duration, ev.Close = 5000, 9000, 600, "fin"
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	want := live.Report(ReportOptions{Now: reportNow})
	if want.Totals.Flows != conns {
		t.Fatalf("live: %d flows, want %d: %+v", want.Totals.Flows, conns, want.Totals)
	}
	reread, _, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, reread.Report(ReportOptions{Now: reportNow})); d != "" {
		t.Errorf("the report read back from the log differs (-live +read):\n%s", d)
	}
}

// BenchmarkQuietLineAllowed: what asking the budget of decision lines
// costs a component for an allowed event (every DNS answer the forwarder
// logs asks), from every processor at once.
func BenchmarkQuietLineAllowed(b *testing.B) {
	j, _, _ := openJournal(&testing.T{}, JournalConfig{Dir: b.TempDir()}, nil)
	defer j.Close()
	ev := Event{Kind: KindDNS, Source: SourceDNS, Time: time.Now(), Client: netip.MustParseAddr("192.0.2.7"), ClientPort: 5353,
		Proto: "udp", Name: "www.allowed.test", QType: "A", RCode: "NOERROR"}
	ev.Stamp(policy.Decision{Verdict: policy.Allow, Rule: "r", Mode: policy.ModeEnforce})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if QuietLine(j, &ev) {
				b.Fatal("an allowed line held back")
			}
		}
	})
}
