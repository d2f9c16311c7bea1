package audit

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"egressd/policy"
)

// TestSuggestICMPEcho: denied ICMP and ICMPv6 echo flows (capture decides
// them with the protocol icmp: no-rule, port-not-allowed, ...) are
// suggested as rules with ports [icmp], by destination address or name as
// for ports; a protocol-not-allowed flow (GRE, an ICMP request that is
// not an echo) still is not. The suggestion pastes into the policy, where
// it allows the echo; a replay under that policy allows the echo flows
// and nothing else.
func TestSuggestICMPEcho(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	cli := netip.MustParseAddr("198.18.1.10")
	mk := func(dest, name, proto, reason string) Event {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: cli, Dest: netip.MustParseAddr(dest), Proto: proto,
			Name: name, NameSource: NameNone, BytesOut: 84, Close: "idle"}
		if name != "" {
			ev.NameSource = NameDNSLearned
		}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: policy.ModeAudit})
		return ev
	}
	evs := []Event{
		mk("203.0.113.9", "", "icmp", policy.ReasonNoRule),
		mk("2001:db8:5::9", "", "ipv6-icmp", policy.ReasonNoRule),
		mk("192.0.2.7", "status.vendor.example", "icmp", policy.ReasonNoRule),
		mk("203.0.113.20", "", "gre", "protocol-not-allowed"),
		mk("203.0.113.21", "", "icmp", "protocol-not-allowed"), // a timestamp request
	}
	l := NewLedger(eng, LedgerOptions{})
	for _, ev := range evs {
		l.Emit(ev)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	sugs, comments := r.Suggest()
	got := map[string]string{}
	for _, s := range sugs {
		got[strings.Join(s.To, ",")] = strings.Join(s.Ports, ",")
	}
	want := map[string]string{"203.0.113.9": "icmp", "2001:db8:5::9": "icmp", "status.vendor.example": "icmp"}
	if len(got) != len(want) {
		t.Errorf("suggestions %v, want %v", got, want)
	}
	for to, ports := range want {
		if got[to] != ports {
			t.Errorf("suggestion to %s: ports %q, want %q (all: %v)", to, got[to], ports, got)
		}
	}
	if len(comments) != 1 || !strings.Contains(comments[0], "2 flow(s) denied as protocol-not-allowed") {
		t.Errorf("comments %q, want one for the 2 protocol-not-allowed flows", comments)
	}

	var snip bytes.Buffer
	if err := r.WriteSuggestions(&snip); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(snip.String(), "ports: [icmp]") {
		t.Errorf("snippet has no icmp rule:\n%s", snip.String())
	}
	src := "version: 1\nrules:\n" + snip.String()
	pasted, err := policy.Compile("pasted.yaml", []byte(src))
	if err != nil {
		t.Fatalf("the snippet does not compile: %v\n%s", err, src)
	}
	for _, a := range []string{"203.0.113.9", "2001:db8:5::9"} {
		if d := pasted.Decide(policy.Input{Client: cli, Dest: netip.MustParseAddr(a), Proto: policy.ICMP}); !d.Allowed() {
			t.Errorf("pasted policy: echo to %s %+v", a, d)
		}
	}
	rp := NewReplayer(pasted, reportNow)
	for _, ev := range evs {
		rp.Emit(ev)
	}
	if res := rp.Result(); len(res.NewlyAllowed) != 3 || res.Unchanged != 2 {
		t.Errorf("replay: %d newly allowed, %d unchanged; want 3 and 2: %+v", len(res.NewlyAllowed), res.Unchanged, res.NewlyAllowed)
	}
}
