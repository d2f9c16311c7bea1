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

// TestReportPortOfPortlessFlows: the text and HTML reports name the port
// of a flow without ports as an operator would write it: an ICMP or
// ICMPv6 echo flow the policy decided as "icmp", what a rule's ports say
// (--suggest's ports: [icmp], policy explain --port icmp), and a flow of
// another protocol by the protocol's name ("gre", a timestamp request's
// "icmp", "253"), not "0/icmp" or "0/gre": port 0 means nothing there.
// TCP and UDP keep N/proto.
func TestReportPortOfPortlessFlows(t *testing.T) {
	cli := netip.MustParseAddr("198.18.1.10")
	mk := func(dest, proto, reason string, port uint16) Event {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: cli, Dest: netip.MustParseAddr(dest), Proto: proto,
			DestPort: port, NameSource: NameNone, BytesOut: 84, Close: "idle"}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: policy.ModeAudit})
		return ev
	}
	l := NewLedger(loadPolicy(t, "policy.yaml"), LedgerOptions{})
	for _, ev := range []Event{
		mk("203.0.113.9", "icmp", policy.ReasonNoRule, 0),
		mk("2001:db8:5::9", "ipv6-icmp", policy.ReasonNoRule, 0),
		mk("203.0.113.20", "gre", "protocol-not-allowed", 0),
		mk("203.0.113.21", "icmp", "protocol-not-allowed", 0), // a timestamp request
		mk("203.0.113.22", "253", "protocol-not-allowed", 0),
		mk("203.0.113.23", "udp", policy.ReasonNoRule, 123),
	} {
		l.Emit(ev)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	var text, html bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteHTML(&html); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"203.0.113.9": "icmp", "2001:db8:5::9": "icmp", "203.0.113.20": "gre",
		"203.0.113.21": "icmp", "203.0.113.22": "253", "203.0.113.23": "123/udp",
	}
	lines := strings.Split(text.String(), "\n")
	for dest, port := range want {
		n := 0
		for _, line := range lines {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != dest {
				continue
			}
			// The table's row (DEST IP PORT ..., the IP "-" where it is
			// the destination) and the clients' line (DEST PORT: clients).
			if len(f) > 2 && f[1] == "-" && f[2] == port || f[1] == port+":" {
				n++
			}
		}
		if n != 2 {
			t.Errorf("%s: %d line(s) with port %q, want 2:\n%s", dest, n, port, text.String())
		}
		if !strings.Contains(html.String(), "<td>"+dest+"</td><td>"+dest+"</td><td>"+port+"</td>") {
			t.Errorf("HTML: no row of %s with port %q", dest, port)
		}
	}
	for _, bad := range []string{"0/icmp", "0/ipv6-icmp", "0/gre", "0/253"} {
		if strings.Contains(text.String(), bad) || strings.Contains(html.String(), bad) {
			t.Errorf("a report says %q", bad)
		}
	}
}
