package audit

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayOtherNames: `audit --replay` judges a QUIC flow on each of
// the names its hellos carried (Name, OtherNames), as capture's reload
// does: a candidate that drops the rule of a later connection's host
// drops the flow, listed under that host; the recorded policy, and a
// candidate that keeps both rules, change nothing. Before session 30 the
// other names were not recorded, and the flow was judged on its first
// name only.
func TestReplayOtherNames(t *testing.T) {
	const a = "  - name: a\n    to: [a.example.com]\n    ports: [443/udp]\n"
	const b = "  - name: b\n    to: [b.example.com]\n    ports: [443/udp]\n"
	running := compileRules(t, a+b)
	ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("192.0.2.10"), ClientPort: 40000,
		Dest: netip.MustParseAddr("198.51.100.7"), DestPort: 443, Proto: "udp", Name: "a.example.com", NameSource: NameQUIC,
		OtherNames: []string{"b.example.com"}}
	ev.Stamp(running.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: 443, Proto: policy.UDP, Name: ev.Name, Now: t0}))
	for i, c := range []struct {
		cand    *policy.Engine
		dropped string
	}{
		{running, ""},
		{compileRules(t, b+a), ""},
		{compileRules(t, a), "b.example.com"},
		{compileRules(t, b), "a.example.com"},
	} {
		r := NewReplayer(c.cand, t0.Add(time.Minute))
		r.Emit(ev)
		res := r.Result()
		var got []string
		for _, ch := range res.NewlyDropped {
			got = append(got, ch.Dest)
		}
		if want := slices.DeleteFunc([]string{c.dropped}, func(s string) bool { return s == "" }); !slices.Equal(got, want) {
			t.Errorf("candidate %d: newly dropped %q, want %q", i, got, want)
		}
	}
}

// TestOtherNamesBound: Bound keeps at most MaxOtherNames other names,
// each cut as a name is, and the event log reads them back as written.
func TestOtherNamesBound(t *testing.T) {
	long := strings.Repeat("x", MaxNameBytes+10)
	ev := Event{Kind: KindFlow, Time: t0, Proto: "udp", OtherNames: []string{long, "b.test", "c.test", "d.test"}}
	orig := slices.Clone(ev.OtherNames)
	ev.Bound()
	if len(ev.OtherNames) != MaxOtherNames || len(ev.OtherNames[0]) > MaxNameBytes || !strings.HasSuffix(ev.OtherNames[0], TruncMark) || ev.OtherNames[1] != "b.test" {
		t.Errorf("bounded: %q", ev.OtherNames)
	}
	if orig[0] != long {
		t.Error("Bound changed the caller's slice")
	}
	line, err := ev.appendJSON(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(line), `"other_names":["x`) {
		t.Errorf("log line has no other_names: %s", line)
	}
}
