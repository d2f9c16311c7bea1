package audit

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayLearnedReason: `audit --replay` re-decides a flow without a
// name of its own, recorded with the name DNS gave its address out for,
// with the reason the proxy and capture give it (policy.DecideLearned):
// a candidate whose rule for the name lacks the flow's port or client
// drops it as port-not-allowed or client-not-allowed, not no-rule, and
// the recorded policy changes nothing.
func TestReplayLearnedReason(t *testing.T) {
	compile := func(src string) *policy.Engine {
		t.Helper()
		e, err := policy.Compile("p.yaml", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	running := compile("version: 1\nrules:\n  - name: api\n    to: [api.example.com]\n    ports: [443/tcp, 5229/tcp]\n")
	for _, c := range []struct{ cand, reason string }{
		{"version: 1\nrules:\n  - name: api\n    to: [api.example.com]\n    ports: [443/tcp]\n", policy.ReasonPort},
		{"version: 1\nrules:\n  - name: api\n    from: [192.0.2.99]\n    to: [api.example.com]\n    ports: [443/tcp, 5229/tcp]\n", policy.ReasonClient},
	} {
		cand := compile(c.cand)
		in := policy.Input{Client: netip.MustParseAddr("192.0.2.10"), Dest: netip.MustParseAddr("198.51.100.7"), Port: 5229, Proto: policy.TCP, Now: t0}
		// What the proxy and capture record: the address first, then
		// the name DNS gave it out for.
		d, i := running.DecideLearned(in, running.Decide(in), []string{"api.example.com"})
		if !d.Allowed() || i != 0 {
			t.Fatalf("running policy: %+v %d", d, i)
		}
		live, _ := cand.DecideLearned(in, cand.Decide(in), []string{"api.example.com"})
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: in.Client, ClientPort: 40000, Dest: in.Dest, DestPort: 5229,
			Proto: "tcp", Name: "api.example.com", NameSource: NameDNSLearned}
		ev.Stamp(d)
		for _, eng := range []*policy.Engine{running, cand} {
			r := NewReplayer(eng, t0.Add(time.Minute))
			r.Emit(ev)
			res := r.Result()
			if eng == running {
				if res.Unchanged != 1 {
					t.Errorf("the recorded policy: %+v, want unchanged", res)
				}
				continue
			}
			if len(res.NewlyDropped) != 1 || res.NewlyDropped[0].NewReason != c.reason || live.Reason != c.reason {
				t.Errorf("candidate %q: replay %+v, live %q; want both %q", c.reason, res.NewlyDropped, live.Reason, c.reason)
			}
		}
	}
}

// TestSuggestLearnedPortDrop: --suggest turns a dns-learned flow denied
// for its port (the name's rule lacks it) into a rule for the name on
// that port with a note to add the port to the rule there, and one
// denied for its client into one with a note to add the client.
func TestSuggestLearnedPortDrop(t *testing.T) {
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nrules:\n  - name: api\n    to: [api.example.com]\n    ports: [443/tcp]\n  - name: lab\n    from: [192.0.2.99]\n    to: [lab.example.com]\n    ports: [443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	l := NewLedger(eng, LedgerOptions{})
	for i, c := range []struct {
		name string
		port uint16
	}{{"api.example.com", 5229}, {"lab.example.com", 443}} {
		in := policy.Input{Client: netip.MustParseAddr("192.0.2.10"), Dest: netip.AddrFrom4([4]byte{198, 51, 100, byte(7 + i)}), Port: c.port, Proto: policy.TCP, Now: t0}
		d, _ := eng.DecideLearned(in, eng.Decide(in), []string{c.name})
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: in.Client, ClientPort: uint16(40000 + i), Dest: in.Dest, DestPort: c.port,
			Proto: "tcp", Name: c.name, NameSource: NameDNSLearned}
		ev.Stamp(d)
		l.Emit(ev)
	}
	sugs, _ := l.Report(ReportOptions{Now: t0}).Suggest()
	want := map[string]string{"api.example.com": "adding the port to it", "lab.example.com": "adding these clients"}
	for _, s := range sugs {
		if len(s.To) != 1 || want[s.To[0]] == "" {
			t.Errorf("unexpected suggestion %+v", s)
			continue
		}
		if !strings.Contains(strings.Join(s.Notes, " "), want[s.To[0]]) {
			t.Errorf("%s: notes %q, want one saying %q", s.To[0], s.Notes, want[s.To[0]])
		}
		delete(want, s.To[0])
	}
	if len(want) != 0 {
		t.Errorf("no suggestion for %v: %+v", want, sugs)
	}
}
