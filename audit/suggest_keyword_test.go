package audit

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestSuggestNoKeywordName: a LAN client chooses the names it asks for,
// and "private" (any case, a trailing dot) is a valid host name that the
// policy, written in a rule's to:, reads as the keyword for RFC 1918 and
// ULA. Pasted, a suggestion naming it opened every private address to
// the client, on the port it chose: a query and a TLS connection for the
// name were enough. The denials are decided by the real engine, counted
// by a real ledger, and the suggestions pasted under a real policy.
func TestSuggestNoKeywordName(t *testing.T) {
	eng, err := policy.Compile("base.yaml", []byte(suggestBase))
	if err != nil {
		t.Fatal(err)
	}
	l := NewLedger(nil, LedgerOptions{})
	client := netip.MustParseAddr("192.168.10.5")
	for i, name := range []string{"PRIVATE.", "private", "Private"} {
		for _, kind := range []Kind{KindDNS, KindFlow} {
			ev := Event{Kind: kind, Source: SourceProxy, Time: t0.Add(time.Duration(i) * time.Second), Client: client,
				ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: name,
				NameSource: NameSNI, Mode: policy.ModeAudit}
			in := policy.Input{Client: client, Dest: ev.Dest, Port: 443, Proto: policy.TCP, Name: name, Now: ev.Time}
			if kind == KindDNS {
				ev.Source, ev.Dest, ev.DestPort, ev.Proto, ev.NameSource, ev.QType = SourceDNS, netip.MustParseAddr("192.168.10.1"), 53, "udp", "", "A"
				ev.Stamp(eng.DecideName(in))
			} else {
				ev.Stamp(eng.Decide(in))
			}
			l.add(&ev)
		}
	}
	r := l.Report(ReportOptions{Now: reportNow})
	var snip bytes.Buffer
	if err := r.WriteSuggestions(&snip); err != nil {
		t.Fatal(err)
	}
	pasted, err := policy.Compile("pasted.yaml", []byte(suggestBase+snip.String()))
	if err != nil {
		t.Fatalf("the pasted suggestions do not compile: %v\n%s", err, snip.String())
	}
	for _, dst := range []string{"10.1.2.3", "172.16.0.9", "192.168.99.1", "fd12::1"} {
		d := pasted.Decide(policy.Input{Client: client, Dest: netip.MustParseAddr(dst), Port: 443, Proto: policy.TCP, Now: t0})
		if d.Allowed() {
			t.Errorf("pasted suggestions allow %s:443 to the client that asked for \"private\" (rule %s):\n%s", dst, d.Rule, snip.String())
		}
	}
	if !strings.Contains(snip.String(), `"private"`) {
		t.Errorf("the snippet does not say why the name \"private\" is not suggested:\n%s", snip.String())
	}
}
