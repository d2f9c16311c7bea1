package capture

import (
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"egressd/audit"
	"egressd/policy"
)

// openNow asks p for its open flows as OpenFlows does, on this goroutine
// (Run's answers between packets).
func openNow(p *proc) []audit.Event {
	ch := make(chan []audit.Event, 1)
	r := &p.c.openReq
	r.mu.Lock()
	r.waits = append(r.waits, ch)
	r.wanted.Store(true)
	r.mu.Unlock()
	p.answerOpen()
	return <-ch
}

// TestOpenFlowsUDP: a UDP exchange (a DNS query to another resolver, an
// NTP-like one to an allowed address) is reported only after UDPIdle of
// silence; until then OpenFlows lists it, decided, so the live report
// counts it; once reported it is no longer listed, and a ledger given the
// open list and the event counts the flow once.
func TestOpenFlowsUDP(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.73")
	lab := netip.MustParseAddr("198.51.100.73")
	res := netip.MustParseAddr("203.0.113.53")
	w := newPcap(t)
	w.udp(true, cli, lab, 40123, 123, make([]byte, 48))
	w.udp(false, lab, cli, 123, 40123, make([]byte, 48))
	w.udp(true, cli, res, 40053, 53, dnsQuery(t, "a.allowed.test"))
	path := w.close()

	eng := testEngine(t, testPolicy)
	rec := &recorder{}
	ledger := audit.NewLedger(eng, audit.LedgerOptions{})
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Sink: audit.Tee(rec, ledger)})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rd, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var last time.Time
	for i := 0; i < 16; i++ {
		data, ci, err := rd.ReadPacketData()
		if err != nil {
			break
		}
		capt.proc.packet(data, ci.Timestamp, layers.LinkTypeEthernet)
		last = ci.Timestamp
	}
	p := capt.proc
	if n := len(rec.all()); n != 0 {
		t.Fatalf("%d events before the flows ended, want none", n)
	}
	open := openNow(p)
	byPort := map[uint16]audit.Event{}
	for _, ev := range open {
		byPort[ev.DestPort] = ev
	}
	if ev := byPort[123]; len(open) != 2 || ev.Rule != "lab" || ev.Verdict != policy.Allow || ev.Close != "" || ev.BytesIn != 48 || ev.BytesOut != 48 {
		t.Fatalf("open flows %+v, want the NTP exchange (lab, 48 bytes each way) and the DNS query", open)
	}
	if ev := byPort[53]; ev.Rule != "dns" || ev.Verdict != policy.Allow {
		t.Errorf("open DNS flow %+v, want allowed by dns", ev)
	}
	ledger.SetOpenFlows(func() []audit.Event { return openNow(p) })
	used := func(what string, wantEvents uint64) {
		t.Helper()
		r := ledger.Report(audit.ReportOptions{})
		for _, u := range r.UnusedRules {
			if u == "lab" || u == "dns" {
				t.Errorf("%s: rule %s listed unused (%v)", what, u, r.UnusedRules)
			}
		}
		if r.Totals.Flows != 2 || r.Totals.Events != wantEvents {
			t.Errorf("%s: %d flows of %d events, want 2 of %d", what, r.Totals.Flows, r.Totals.Events, wantEvents)
		}
	}
	used("open", 0)

	// UDPIdle of silence: the sweep ends and reports them.
	p.now = last.Add(2 * time.Minute)
	p.sweep()
	if n := len(rec.all()); n != 2 {
		t.Fatalf("%d events after the flows went idle, want 2", n)
	}
	if open := openNow(p); len(open) != 0 {
		t.Errorf("flows reported still listed open: %+v", open)
	}
	used("reported", 2)
}

// TestOpenFlowsReportedAfterAMinute: a UDP exchange that never goes
// silent is reported while open a minute after it began; from then on it
// is no longer listed open, and the live report counts it once, as that
// event, then as its end update when it ends.
func TestOpenFlowsReportedAfterAMinute(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.74")
	lab := netip.MustParseAddr("198.51.100.74")
	eng := testEngine(t, testPolicy)
	rec := &recorder{}
	ledger := audit.NewLedger(eng, audit.LedgerOptions{})
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Sink: audit.Tee(rec, ledger)})
	if err != nil {
		t.Fatal(err)
	}
	p := capt.proc
	p.openReport = time.Minute
	ledger.SetOpenFlows(func() []audit.Event { return openNow(p) })
	start := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	ntp := func(at time.Duration) {
		p.packet(udpFrame(t, macClient, macGW, netip.AddrPortFrom(cli, 40123), netip.AddrPortFrom(lab, 123), make([]byte, 48)), start.Add(at), layers.LinkTypeEthernet)
		p.packet(udpFrame(t, macGW, macClient, netip.AddrPortFrom(lab, 123), netip.AddrPortFrom(cli, 40123), make([]byte, 48)), start.Add(at), layers.LinkTypeEthernet)
	}
	check := func(what string, events, open int) {
		t.Helper()
		var flows, openN uint64
		r := ledger.Report(audit.ReportOptions{})
		for _, u := range r.Rules {
			if u.Name == "lab" {
				flows, openN = u.Flows, u.OpenFlows
			}
		}
		if n := len(rec.all()); n != events || flows != 1 || openN != uint64(open) {
			t.Errorf("%s: %d events, lab %d flows (%d open); want %d events, 1 flow (%d open)", what, n, flows, openN, events, open)
		}
	}
	for s := 0; s <= 50; s += 10 {
		ntp(time.Duration(s) * time.Second)
	}
	check("open", 0, 1)
	for s := 60; s <= 120; s += 10 {
		ntp(time.Duration(s) * time.Second)
		p.sweep()
	}
	check("reported open after a minute", 1, 0)
	// A busy LAN's DNS since (70,000 queries: past the ledger's 65,536
	// flows and queries), which takes the flow's record out of the
	// ledger: its end update, revised, counts as a duplicate, not as a
	// flow of its own (before session 36: 2 flows).
	dns := netip.MustParseAddr("192.0.2.1")
	for i := range 70000 {
		q := audit.Event{Kind: audit.KindDNS, Source: audit.SourceDNS, Time: start.Add(2*time.Minute + time.Duration(i)*time.Millisecond),
			Client: netip.MustParseAddr("192.0.2.75"), ClientPort: uint16(1024 + i%60000), Dest: dns, DestPort: 53, Proto: "udp",
			Name: fmt.Sprintf("q%d.allowed.test", i), QType: "A", QueryID: uint16(i)}
		q.Stamp(policy.Decision{Verdict: policy.Allow, Rule: "dns", Reason: "allowed", Mode: policy.ModeAudit})
		ledger.Emit(q)
	}
	p.now = start.Add(5 * time.Minute)
	p.sweep()
	check("ended", 2, 0)
	if evs := rec.all(); len(evs) != 2 || evs[0].Revised || !evs[1].Revised {
		t.Errorf("events %+v: want the end update revised, the first report not", evs)
	}
}
