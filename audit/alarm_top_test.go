package audit

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestReportAlarmTopClients: a zone-wide alarm's top clients (the
// devices, addresses or "unresolved" that added the most names, which
// the DNS forwarder puts in the event) are in the report in all three
// formats, beside its kind, zone, count and time: at most
// MaxAlarmClients of them, each cut to MaxNameBytes, those of the window
// with the most names (the one DistinctNames is of), and escaped as
// every client-controlled string is (the zone is a client's name; an
// event log read back may hold anything). Before, they were in the
// forwarder's log line only.
func TestReportAlarmTopClients(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 8, 0, 0, 0, time.UTC)
	hostile := "evil\n" + "FORGEDT4 <script>x</script>"
	long := strings.Repeat("l", 400)
	zone := "z\n" + "FORGEDT4<b>.example"
	alarm := func(at time.Duration, n uint64, top ...string) Event {
		return Event{Kind: KindAlarm, Source: SourceDNS, Time: t0.Add(at), Proto: "udp", Name: zone, Count: n,
			Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel-zone-slow", TopClients: top}
	}
	l := NewLedger(nil, LedgerOptions{Now: func() time.Time { return t0 }})
	l.Emit(alarm(0, 2003, "02:00:00:00:00:01", "192.0.2.7", "unresolved", hostile, long, "past-the-bound"))
	l.Emit(alarm(time.Hour, 2001, "192.0.2.99"))
	r := l.Report(ReportOptions{})
	top := []string{"02:00:00:00:00:01", "192.0.2.7", "unresolved", hostile, Clip(long, MaxNameBytes)}
	want := []AlarmReport{{Reason: "dns-tunnel-zone-slow", Zone: lowerASCII(zone), Rule: "tenant", TopClients: top,
		Alarms: 2, DistinctNames: 2003, FirstSeen: t0, LastSeen: t0.Add(time.Hour)}}
	if d := cmp.Diff(want, r.Alarms); d != "" {
		t.Errorf("alarms (-want +got):\n%s", d)
	}

	var buf bytes.Buffer
	if err := r.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	text := buf.String()
	line := `  dns-tunnel-zone-slow  all clients (most names from 02:00:00:00:00:01, 192.0.2.7, unresolved, "evil\nFORGEDT4 <script>x</script>", "` +
		Clip(long, MaxNameBytes) + `")  zone "z\nforgedt4<b>.example": 2003 distinct names in a window (2 alarms, rule tenant), ` +
		"2026-12-05T08:00:00Z to 2026-12-05T09:00:00Z\n"
	if !strings.Contains(text, line) {
		t.Errorf("text report lacks\n%s\n%s", line, text)
	}
	buf.Reset()
	if err := r.WriteHTML(&buf); err != nil {
		t.Fatal(err)
	}
	html := buf.String()
	if s := "dns-tunnel-zone-slow: all clients (most names from 02:00:00:00:00:01, 192.0.2.7, unresolved, evil\nFORGEDT4 &lt;script&gt;x&lt;/script&gt;, "; !strings.Contains(html, s) {
		t.Errorf("HTML report lacks %q:\n%s", s, html)
	}
	buf.Reset()
	if err := r.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	js := buf.String()
	back, err := ReadReportJSON(strings.NewReader(js))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, back.Alarms); d != "" {
		t.Errorf("JSON report alarms (-want +got):\n%s", d)
	}
	if !strings.Contains(js, `"top_clients": [`) {
		t.Errorf("JSON report has no top_clients:\n%s", js)
	}
	// Markup matters in the HTML (and the JSON, which a page may show),
	// lines in the text and the JSON (a newline in HTML is a space).
	for name, out := range map[string]string{"HTML": html, "JSON": js} {
		if strings.Contains(out, "<script>") || strings.Contains(out, "<b>") {
			t.Errorf("%s report holds a client's markup unescaped", name)
		}
	}
	for name, out := range map[string]string{"text": text, "JSON": js} {
		for _, ln := range strings.Split(out, "\n") {
			if strings.HasPrefix(ln, "FORGEDT4") || strings.HasPrefix(ln, "forgedt4") {
				t.Errorf("%s report has a line a client forged: %q", name, ln)
			}
		}
	}
}

// TestAlarmTopClientsInLog: an alarm's top clients survive the event
// log (the fast encoder and decoder, and encoding/json for a line the
// fast decoder leaves; TestAlarmSurvivesRotation: the summary of
// rotated-out files); a log line naming more than MaxAlarmClients, or
// longer ones, is held to the bounds when read.
func TestAlarmTopClientsInLog(t *testing.T) {
	ev := Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Proto: "udp", Name: "t.tenant.example", Count: 1003,
		Verdict: policy.Allow, Rule: "tenant", Mode: policy.ModeAudit, Reason: "dns-tunnel-zone", TopClients: []string{"192.0.2.7", "a\"b\\c"}}
	b, err := ev.appendJSON(nil)
	if err != nil {
		t.Fatal(err)
	}
	checkDecode(t, bytes.TrimSpace(b))
	var dec Event
	if !decodeEvent(bytes.TrimSpace(b), &dec) || !cmp.Equal(dec.TopClients, ev.TopClients) {
		t.Errorf("decoded top clients %q from %s, want %q", dec.TopClients, b, ev.TopClients)
	}
	plain := []byte(`{"kind":"alarm","source":"dnsfilter","time":"2026-12-04T13:05:06Z","client":"","proto":"udp","verdict":"allow","mode":"audit","top_clients":["a","b"]}`)
	if !checkDecode(t, plain) {
		t.Errorf("decodeFast left %s to encoding/json", plain)
	}

	many := ev
	many.TopClients = []string{"1", "2", "3", "4", "5", "6", strings.Repeat("x", 300)}
	many.Bound()
	if len(many.TopClients) != MaxAlarmClients {
		t.Errorf("bounded top clients %q, want %d", many.TopClients, MaxAlarmClients)
	}
	cut := ev
	cut.TopClients = []string{strings.Repeat("x", 300), "\xff"}
	orig := cut.TopClients[0]
	cut.Bound()
	if cut.TopClients[0] != Clip(orig, MaxNameBytes) || cut.TopClients[1] != "\uFFFD" {
		t.Errorf("bounded top clients %q", cut.TopClients)
	}

}

// TestReportAlarmTextLines: an alarm read back from an event log (which
// may hold anything) with a line break in its MAC, rule or reason is one
// line of the text report, as one with a break in its zone or top
// clients is: no line of it is forged. Before, the MAC, rule and reason
// were written as they came.
func TestReportAlarmTextLines(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 8, 0, 0, 0, time.UTC)
	l := NewLedger(nil, LedgerOptions{Now: func() time.Time { return t0 }})
	l.Emit(Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Proto: "udp", Name: "t.tenant.example", Count: 600,
		Client: netip.MustParseAddr("192.0.2.7"), ClientMAC: "02:00:00:00:00:01\nFORGEDMAC 1",
		Verdict: policy.Allow, Rule: "tenant\nFORGEDRULE 2", Mode: policy.ModeAudit, Reason: "dns-tunnel\nFORGEDREASON 3"})
	var buf bytes.Buffer
	if err := l.Report(ReportOptions{}).WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	text := buf.String()
	if !strings.Contains(text, "t.tenant.example") {
		t.Fatalf("text report has no alarm:\n%s", text)
	}
	for _, ln := range strings.Split(text, "\n") {
		if strings.HasPrefix(ln, "FORGED") {
			t.Errorf("text report has a forged line %q:\n%s", ln, text)
		}
	}
}
