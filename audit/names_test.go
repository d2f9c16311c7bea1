package audit

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unsafe"

	"egressd/policy"
)

// TestLedgerRecordsShareNames: the ledger's records of one name keep one
// copy of it, whatever case or trailing dot each event wrote it with and
// however many events carried their own copy (the journal's Emit clones
// each event's text): a query's key and destination are one string, and
// the records of a name counted in a rule or a dropped entry take that
// entry's.
func TestLedgerRecordsShareNames(t *testing.T) {
	l := NewLedger(nil, LedgerOptions{})
	at := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	client := netip.MustParseAddr("192.168.10.7")
	resolver := netip.MustParseAddr("192.168.10.1")
	allow := policy.Decision{Verdict: policy.Allow, Mode: policy.ModeEnforce, Rule: "web"}
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule}
	spell := []string{"WWW.Example.COM", "www.example.com.", "www.example.com", "WWW.EXAMPLE.COM."}
	const n = 64
	for i := range n {
		name := strings.Clone(spell[i%len(spell)])
		q := Event{Kind: KindDNS, Source: SourceDNS, Time: at, Client: client, ClientPort: uint16(2000 + i), Dest: resolver, DestPort: 53,
			Proto: "udp", Name: name, QType: "A", QueryID: uint16(i)}
		q.Stamp(allow)
		l.Emit(q)
		d := q
		d.Name, d.ClientPort = strings.Clone("Ads"+name[3:]), uint16(3000+i)
		d.Stamp(deny)
		l.Emit(d)
		f := Event{Kind: KindFlow, Source: SourceProxy, Time: at, Client: client, ClientPort: uint16(4000 + i),
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: strings.Clone(name), NameSource: NameSNI}
		f.Stamp(allow)
		l.Emit(f)
	}
	if len(l.ring) != 3*n {
		t.Fatalf("%d records, want %d", len(l.ring), 3*n)
	}
	copies := map[string]map[*byte]bool{}
	see := func(s string) {
		if s == "" {
			return
		}
		if copies[s] == nil {
			copies[s] = map[*byte]bool{}
		}
		copies[s][unsafe.StringData(s)] = true
	}
	for _, r := range l.ring {
		see(r.id.name)
		see(r.dest)
		if r.drop != nil {
			see(r.drop.key.dest)
		}
	}
	for _, e := range l.rules["web"].dests.idx {
		see(e.Dest)
	}
	for _, name := range []string{"www.example.com", "ads.example.com"} {
		if len(copies[name]) != 1 {
			t.Errorf("the records keep %d copies of %s, want 1", len(copies[name]), name)
		}
	}
	if len(copies) != 2 {
		t.Errorf("the records keep names %v, want the two lowercased", copies)
	}
}

// TestLedgerReadRecordsKeepNoText: records rebuilt from the event log
// (each event decoded on its own, its strings its own) keep the
// ledger's constants for their kind, protocol, query type and source,
// not the decoded copies: on a restart a full ledger held 65,536 of each.
func TestLedgerReadRecordsKeepNoText(t *testing.T) {
	l := NewLedger(nil, LedgerOptions{})
	at := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	allow := policy.Decision{Verdict: policy.Allow, Mode: policy.ModeEnforce, Rule: "web"}
	for i := range 8 {
		ev := Event{Kind: KindDNS, Source: SourceDNS, Time: at, Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(2000 + i),
			Dest: netip.MustParseAddr("192.168.10.1"), DestPort: 53, Proto: "udp", Name: "www.example.com", QType: "AAAA", QueryID: uint16(i)}
		if i%2 == 1 {
			ev = Event{Kind: KindFlow, Source: SourceCapture, Time: at, Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(2000 + i),
				Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 443, Proto: "tcp", Name: "www.example.com", NameSource: NameSNI}
		}
		ev.Stamp(allow)
		b, err := json.Marshal(&ev)
		if err != nil {
			t.Fatal(err)
		}
		var back Event
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		l.add(&back)
	}
	same := func(what, got, want string) {
		if unsafe.StringData(got) != unsafe.StringData(want) {
			t.Errorf("a record keeps its own %s %q", what, got)
		}
	}
	for _, r := range l.ring {
		if r.id.kind == KindDNS {
			same("kind", string(r.id.kind), string(KindDNS))
			same("proto", r.id.Proto, "udp")
			same("query type", r.id.qtype, "AAAA")
			same("source", string(r.source), string(SourceDNS))
		} else {
			same("kind", string(r.id.kind), string(KindFlow))
			same("proto", r.id.Proto, "tcp")
			same("source", string(r.source), string(SourceCapture))
		}
	}
}
