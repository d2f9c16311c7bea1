package audit

import (
	"fmt"
	"net/netip"
	"runtime"
	"strings"
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

// TestReportCopyWhileLedgerChanges: while a report is built from its copy
// of the ledger's counts, the ledger changes every clients' set the copy
// shares (a rule's, a dropped entry's, the ECH answers'), through each
// path that changes one: a new client, a new MAC of a client, a summary
// read back (importArchive), and the policy is reloaded. The report is the
// one of the ledger before (as a ledger given only those events makes),
// and the next report the one of all of it: no change reached the copy, no
// allowed_now decided under the old policy is kept for the new one.
func TestReportCopyWhileLedgerChanges(t *testing.T) {
	const allowStill = `  - name: still
    to: ["still.example"]
    ports: [443/tcp]
`
	type op func(l *Ledger)
	emit := func(kind Kind, name, client, mac string, at time.Duration) op {
		return func(l *Ledger) {
			ev := Event{Kind: kind, Source: SourceCapture, Time: t0.Add(at), Client: netip.MustParseAddr(client),
				ClientPort: uint16(40000 + at/time.Second), ClientMAC: mac, Dest: netip.MustParseAddr("203.0.113.9"),
				DestPort: 443, Proto: "tcp", Name: name, Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
			if name == "ech.example" {
				ev.Kind, ev.Source, ev.Proto, ev.DestPort, ev.Verdict, ev.Reason, ev.QType = KindDNS, SourceDNS, "udp", 53, policy.Allow, "", "HTTPS"
				ev.Filtered, ev.Rule = "ech", "dns"
			}
			l.add(&ev)
		}
	}
	allowed := func(client, mac string, at time.Duration) op {
		return func(l *Ledger) {
			ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(at), Client: netip.MustParseAddr(client),
				ClientPort: uint16(41000 + at/time.Second), ClientMAC: mac, Dest: netip.MustParseAddr("203.0.113.20"),
				DestPort: 443, Proto: "tcp", Name: "allowed.example", Verdict: policy.Allow, Rule: "web", Mode: policy.ModeAudit}
			l.add(&ev)
		}
	}
	before := []op{
		emit(KindFlow, "tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a", 1*time.Second),
		emit(KindFlow, "still.example", "192.168.50.30", "aa:bb:cc:00:00:1a", 2*time.Second),
		emit(KindDNS, "ech.example", "192.168.50.23", "aa:bb:cc:00:00:0a", 3*time.Second),
		allowed("192.168.50.23", "aa:bb:cc:00:00:0a", 4*time.Second),
	}
	// A summary with more MACs of the entries' clients, and a new one.
	sum := NewLedger(compileBase(t, ""), LedgerOptions{})
	for _, o := range []op{
		emit(KindFlow, "tracker.example", "192.168.50.23", "aa:bb:cc:00:00:4b", 11*time.Second),
		emit(KindDNS, "ech.example", "192.168.50.41", "aa:bb:cc:00:00:4c", 12*time.Second),
		allowed("192.168.50.23", "aa:bb:cc:00:00:4d", 13*time.Second),
	} {
		o(sum)
	}
	a := sum.export()
	during := []op{
		// First: the dropped entry's client in the summary is one it
		// has, with another MAC (importClients' MACs, not its add). The
		// report is held after its rules and before its dropped list.
		func(l *Ledger) { l.importArchive(a) },
		emit(KindFlow, "tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0b", time.Minute), // a new MAC
		emit(KindFlow, "tracker.example", "192.168.50.24", "", time.Minute+time.Second),      // a new client
		emit(KindDNS, "ech.example", "192.168.50.23", "aa:bb:cc:00:00:0b", time.Minute+2*time.Second),
		emit(KindDNS, "ech.example", "192.168.50.25", "", time.Minute+3*time.Second),
		allowed("192.168.50.23", "aa:bb:cc:00:00:0b", time.Minute+4*time.Second),
		allowed("192.168.50.26", "", time.Minute+5*time.Second),
		func(l *Ledger) { l.SetPolicy(compileBase(t, allowStill)) },
	}
	text := func(r *Report) string {
		var b strings.Builder
		if err := r.WriteJSON(&b); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	want := func(ops ...[]op) string {
		ref := NewLedger(compileBase(t, ""), LedgerOptions{})
		for _, os := range ops {
			for _, o := range os {
				o(ref)
			}
		}
		r := ref.Report(ReportOptions{Now: reportNow})
		if len(ops) == 1 {
			r.Coverage = nil
		}
		return text(r)
	}

	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	for _, o := range before {
		o(l)
	}
	l.Report(ReportOptions{Now: reportNow}) // the allowed_now memos, under the first policy
	done, release := holdReport(t, l, func() {})
	for _, o := range during {
		o(l)
	}
	close(release)
	// Report reads what the counts rest on (Coverage) from the ledger
	// after the build, by design (foldFile): the summary read back
	// during it is there, not in the counts.
	r := <-done
	r.Coverage = nil
	if got, w := text(r), want(before); got != w {
		t.Errorf("the report built while the ledger changed is not the ledger's before:\n got %s\nwant %s", got, w)
	}
	if got, w := text(l.Report(ReportOptions{Now: reportNow})), want(before, during); got != w {
		t.Errorf("the next report is not the ledger's after:\n got %s\nwant %s", got, w)
	}
	if !strings.Contains(want(before, during), `"allowed_now": "still"`) {
		t.Errorf("test setup: the reload allows still.example in no report")
	}
}
