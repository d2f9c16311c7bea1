package audit

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"egressd/policy"
)

// TestInboundNeverSuggested: capture records a connection or datagram
// started from the WAN side toward a LAN host as denied with reason
// inbound (client: the WAN host; destination: the LAN host). The report
// lists it with that reason; --suggest turns it into no rule (no rule
// expresses or allows inbound traffic, though the policy's "ntp" allows
// 123/udp to any address) and says why in its comment; a replay under a
// policy whose rules allow the destination keeps it denied.
func TestInboundNeverSuggested(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	inbound := policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: "inbound", Mode: policy.ModeAudit}
	evs := []Event{
		{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("198.18.2.2"), ClientPort: 40000,
			Dest: netip.MustParseAddr("198.18.1.10"), DestPort: 8081, Proto: "tcp", NameSource: NameNone},
		{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("198.18.2.2"), ClientPort: 500,
			Dest: netip.MustParseAddr("198.18.1.10"), DestPort: 123, Proto: "udp", NameSource: NameNone},
	}
	l := NewLedger(eng, LedgerOptions{})
	for i := range evs {
		evs[i].Stamp(inbound)
		l.Emit(evs[i])
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if len(r.Dropped) != 2 {
		t.Fatalf("dropped %+v, want the two inbound flows", r.Dropped)
	}
	for _, d := range r.Dropped {
		if d.Reason != "inbound" || d.Dest != "198.18.1.10" {
			t.Errorf("dropped %+v, want 198.18.1.10 denied as inbound", d)
		}
	}
	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "inbound") {
		t.Errorf("the report does not say inbound:\n%s", text.String())
	}
	sugs, comments := r.Suggest()
	if len(sugs) != 0 {
		t.Errorf("suggested %+v for inbound flows", sugs)
	}
	if len(comments) != 1 || !strings.Contains(comments[0], "denied as inbound") || !strings.Contains(comments[0], unsuggestedWhy("inbound")) {
		t.Errorf("comments %q, want one for inbound", comments)
	}
	if unsuggestedWhy("inbound") == unsuggestedWhy("no-such-reason") {
		t.Errorf("no word on why inbound flows get no rule: %q", unsuggestedWhy("inbound"))
	}

	open, err := policy.Compile("open.yaml", []byte("version: 1\nrules:\n  - name: all\n    to: [\"*\"]\n    ports: [any]\n"))
	if err != nil {
		t.Fatal(err)
	}
	rp := NewReplayer(open, reportNow)
	for _, ev := range evs {
		rp.Emit(ev)
	}
	if res := rp.Result(); len(res.NewlyAllowed) != 0 || res.Unchanged != 2 {
		t.Errorf("replay: %d newly allowed, %d unchanged; want 0 and 2: %+v", len(res.NewlyAllowed), res.Unchanged, res.NewlyAllowed)
	}
}
