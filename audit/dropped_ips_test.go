package audit

import (
	"bytes"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestDroppedListsAddresses: a dropped entry whose flows went to more
// than one address lists them (ips, sorted; ip stays the latest) in the
// JSON, the text report (an ADDRESSES section, "+N" in the IP column)
// and the HTML row; an entry of one address is shown as before. Before
// session 32 only the latest address was shown: two flows to .20 then
// one to .10 read as "203.0.113.10 … 3".
func TestDroppedListsAddresses(t *testing.T) {
	l := NewLedger(compileBase(t, ""), LedgerOptions{})
	n := 0
	flow := func(name, dest string) {
		n++
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(n) * time.Second),
			Client: netip.MustParseAddr("192.168.50.23"), ClientPort: uint16(40000 + n),
			Dest: netip.MustParseAddr(dest), DestPort: 443, Proto: "tcp", Name: name,
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
		l.add(&ev)
	}
	flow("tracker.example", "203.0.113.20")
	flow("tracker.example", "203.0.113.20")
	flow("tracker.example", "203.0.113.10")
	flow("one.example", "203.0.113.30")
	r := l.Report(ReportOptions{Now: reportNow})
	var tracker, one DroppedReport
	for _, d := range r.Dropped {
		switch d.Dest {
		case "tracker.example":
			tracker = d
		case "one.example":
			one = d
		}
	}
	if tracker.IP != "203.0.113.10" || !slices.Equal(tracker.IPs, []string{"203.0.113.10", "203.0.113.20"}) || tracker.Flows != 3 {
		t.Errorf("tracker.example: ip %q ips %q flows %d, want the latest 203.0.113.10, both addresses, 3 flows", tracker.IP, tracker.IPs, tracker.Flows)
	}
	if one.IP != "203.0.113.30" || one.IPs != nil {
		t.Errorf("one.example: ip %q ips %q, want 203.0.113.30 and no list", one.IP, one.IPs)
	}
	var text, page bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "  tracker.example 443/tcp: 203.0.113.10, 203.0.113.20\n") ||
		!strings.Contains(text.String(), "203.0.113.10 +1") || strings.Contains(text.String(), "one.example 443/tcp: 203.0.113.30") {
		t.Errorf("text report does not list tracker.example's two addresses (and only its):\n%s", text.String())
	}
	if err := r.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	for _, row := range strings.Split(page.String(), "<tr>") {
		if strings.Contains(row, "<td>tracker.example</td>") && !strings.Contains(row, "<td>203.0.113.10, 203.0.113.20</td>") {
			t.Errorf("HTML row of tracker.example does not list both addresses: %s", row)
		}
	}

	// Many addresses: a bounded list, marked truncated.
	for i := range 3 * maxDropIPs {
		flow("many.example", netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)}).String())
	}
	r = l.Report(ReportOptions{Now: reportNow})
	for _, d := range r.Dropped {
		if d.Dest == "many.example" && (len(d.IPs) != maxDropIPs || !d.IPsTruncated) {
			t.Errorf("many.example: %d addresses listed, truncated %v; want %d, truncated", len(d.IPs), d.IPsTruncated, maxDropIPs)
		}
	}
}
