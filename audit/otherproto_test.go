package audit

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"egressd/policy"
)

// TestOtherProtocolNeverSuggested: capture records packets of IP
// protocols other than TCP and UDP (an ICMP echo, GRE, protocol 253) as
// flows with no ports, denied as protocol-not-allowed. The report lists
// them among the drops under their protocol; --suggest proposes no rule
// (a rule's ports are TCP or UDP ports) and says why; the event log reads
// them back as written; a replay under a policy that opens every port of
// every address keeps them denied.
func TestOtherProtocolNeverSuggested(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	d := policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: "protocol-not-allowed", Mode: policy.ModeAudit}
	cli := netip.MustParseAddr("198.18.1.10")
	var evs []Event
	for _, p := range []string{"icmp", "gre", "253"} {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: cli, Dest: netip.MustParseAddr("203.0.113.9"), Proto: p,
			NameSource: NameNone, BytesOut: 84, Close: "idle"}
		ev.Stamp(d)
		evs = append(evs, ev)
	}
	l := NewLedger(eng, LedgerOptions{})
	for _, ev := range evs {
		b, err := ev.appendJSON(nil)
		if err != nil {
			t.Fatal(err)
		}
		checkDecode(t, b[:len(b)-1])
		var back Event
		if !decodeEvent(b[:len(b)-1], &back) || back.Proto != ev.Proto {
			t.Fatalf("event %s read back as %+v", b, back)
		}
		l.Emit(back)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	protos := map[string]bool{}
	for _, dr := range r.Dropped {
		if dr.Reason != "protocol-not-allowed" || dr.Dest != "203.0.113.9" || dr.Flows != 1 || dr.Port != 0 {
			t.Errorf("dropped %+v, want one flow to 203.0.113.9 denied as protocol-not-allowed", dr)
		}
		protos[dr.Proto] = true
	}
	if len(protos) != 3 || !protos["icmp"] || !protos["gre"] || !protos["253"] {
		t.Errorf("dropped protocols %v, want icmp, gre, 253", protos)
	}
	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "protocol-not-allowed") || !strings.Contains(text.String(), "gre") {
		t.Errorf("the report does not show them:\n%s", text.String())
	}
	sugs, comments := r.Suggest()
	if len(sugs) != 0 {
		t.Errorf("suggested %+v for other protocols", sugs)
	}
	why := unsuggestedWhy("protocol-not-allowed")
	if len(comments) != 1 || !strings.Contains(comments[0], "3 flow(s) denied as protocol-not-allowed") || !strings.Contains(comments[0], why) {
		t.Errorf("comments %q, want one for protocol-not-allowed", comments)
	}
	if why == unsuggestedWhy("no-such-reason") {
		t.Errorf("no word on why other protocols get no rule: %q", why)
	}

	open, err := policy.Compile("open.yaml", []byte("version: 1\nrules:\n  - name: all\n    to: [\"*\"]\n    ports: [any]\n"))
	if err != nil {
		t.Fatal(err)
	}
	rp := NewReplayer(open, reportNow)
	for _, ev := range evs {
		rp.Emit(ev)
	}
	if res := rp.Result(); len(res.NewlyAllowed) != 0 || res.Unchanged != 3 {
		t.Errorf("replay: %d newly allowed, %d unchanged; want 0 and 3: %+v", len(res.NewlyAllowed), res.Unchanged, res.NewlyAllowed)
	}
}

// TestOtherProtocolFlowCountsOnce: a flow of another IP protocol has no
// ports, but it is one flow all the same, keyed by client, destination,
// protocol and start: listed open by capture it counts in the live report;
// reported while open and again at its end, it counts once.
func TestOtherProtocolFlowCountsOnce(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	d := policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: "protocol-not-allowed", Mode: policy.ModeAudit}
	ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("198.18.1.10"),
		Dest: netip.MustParseAddr("203.0.113.9"), Proto: "icmp", NameSource: NameNone, BytesOut: 84}
	ev.Stamp(d)
	l := NewLedger(eng, LedgerOptions{})
	l.SetOpenFlows(func() []Event { return []Event{ev} })
	flows := func(what string, want uint64) {
		t.Helper()
		r := l.Report(ReportOptions{Now: reportNow})
		var got uint64
		for _, dr := range r.Dropped {
			if dr.Proto == "icmp" {
				got += dr.Flows
			}
		}
		if got != want {
			t.Errorf("%s: %d icmp flows dropped, want %d: %+v", what, got, want, r.Dropped)
		}
	}
	flows("listed open", 1)
	l.Emit(ev) // reported while open
	flows("reported open", 1)
	end := ev
	end.Close, end.Duration, end.BytesOut = "idle", 90, 840
	l.Emit(end)
	l.SetOpenFlows(nil)
	flows("ended", 1)
}
