package audit

import (
	"net/netip"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
	"unsafe"

	"egressd/policy"
)

// TestReplayLearnedNameNotHello: a forwarded QUIC flow whose address was
// learned for b.example.com and whose hello named c.example.com is judged
// by its address and then b alone: a candidate that allows c but not b
// drops it (the forward chain reads no hello; capture's reload cuts it,
// capture/TestReplayQUICLearnedName), listed under b. Judged with the
// hello's name as the address's input, c's rule let it out.
func TestReplayLearnedNameNotHello(t *testing.T) {
	b, c := quicRule("b"), quicRule("c")
	ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: netip.MustParseAddr("192.0.2.10"), ClientPort: 40000,
		Dest: netip.MustParseAddr("203.0.113.7"), DestPort: 443, Proto: "udp", Name: "c.example.com", NameSource: NameQUIC,
		LearnedName: "b.example.com"}
	ev.Stamp(policy.Decision{Verdict: policy.Allow, Rule: "b", Reason: policy.ReasonAllowed, Mode: policy.ModeAudit})
	for _, cand := range []struct{ rules, dropped string }{{b + c, ""}, {c + b, ""}, {c, "b.example.com"}, {b, ""}} {
		r := NewReplayer(compileRules(t, cand.rules), t0.Add(time.Minute))
		r.Emit(ev)
		res := r.Result()
		got := ""
		if len(res.NewlyDropped) == 1 {
			got = res.NewlyDropped[0].Dest
		}
		if got != cand.dropped || len(res.NewlyDropped) > 1 || len(res.NewlyAllowed)+len(res.RuleChanged) != 0 {
			t.Errorf("candidate %q: dropped %+v allowed %+v rule changed %+v; want %q dropped", cand.rules, res.NewlyDropped, res.NewlyAllowed, res.RuleChanged, cand.dropped)
		}
	}
}

// TestLearnedNameBound: Bound cuts a learned_name read back from a log
// to MaxNameBytes and writes a byte not UTF-8 as U+FFFD, as it does a
// name (a log may hold anything), and needsBound sees either.
func TestLearnedNameBound(t *testing.T) {
	for _, n := range []string{strings.Repeat("b", 300) + ".example.com", "b\xff.example.com"} {
		ev := Event{Kind: KindFlow, Time: t0, Proto: "udp", LearnedName: n}
		if !ev.needsBound() {
			t.Errorf("%q: needsBound false", n)
		}
		ev.Bound()
		if len(ev.LearnedName) > MaxNameBytes || !utf8.ValidString(ev.LearnedName) || ev.needsBound() {
			t.Errorf("%q bounded to %q (%d bytes)", n, ev.LearnedName, len(ev.LearnedName))
		}
	}
}

// TestLearnedNameBytesCounted: the journal's queue bound and the detail
// budget count a learned name's bytes, and a summary's shape keeps its
// own copy of it (not the event's, which may share a larger buffer).
func TestLearnedNameBytesCounted(t *testing.T) {
	ev := Event{Kind: KindFlow, Time: t0, Proto: "udp", Name: "a.test"}
	base, kb := queueBytes(&ev), shapeOf(&ev)
	ev.LearnedName = strings.Repeat("b", 200)
	if got, want := queueBytes(&ev), base+200; got != want {
		t.Errorf("queueBytes with a learned name %d, want %d", got, want)
	}
	k := shapeOf(&ev)
	if got, want := k.textBytes(), kb.textBytes()+200; got != want {
		t.Errorf("shape textBytes with a learned name %d, want %d", got, want)
	}
	if o := k.owned(); unsafe.StringData(o.learned) == unsafe.StringData(ev.LearnedName) {
		t.Errorf("owned shape key shares the event's learned name")
	}
}
