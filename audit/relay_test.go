package audit

import (
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayPrivateRelay: a Private Relay denial (THREATS.md B3) is the
// policy's, so a candidate decides it again: one that names the relay
// exactly shows its flows and queries as newly allowed; one that only
// widens a wildcard changes nothing.
func TestReplayPrivateRelay(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.7")
	flow := Event{Kind: KindFlow, Source: SourceProxy, Time: t0, Client: cli, ClientPort: 40000,
		Dest: netip.MustParseAddr("203.0.113.17"), DestPort: 443, Proto: "tcp", Name: policy.PrivateRelayH2, NameSource: NameSNI}
	flow.Stamp(policy.Decision{Verdict: policy.Deny, Reason: policy.ReasonPrivateRelay, Mode: policy.ModeEnforce})
	q := Event{Kind: KindDNS, Source: SourceDNS, Time: t0.Add(time.Second), Client: cli, ClientPort: 5353, Proto: "udp",
		Name: policy.PrivateRelayH2, QType: "A"}
	q.Stamp(policy.Decision{Verdict: policy.Deny, Reason: policy.ReasonPrivateRelay, Mode: policy.ModeEnforce})
	for _, c := range []struct {
		what, rules string
		allowed     int
	}{
		{"wildcard and CIDR", "  - {name: apple, to: [203.0.113.0/24, \"*.icloud.com\"], ports: [443/tcp]}\n", 0},
		{"named exactly", "  - {name: relay, to: [mask-h2.icloud.com], ports: [443/tcp]}\n", 2},
	} {
		cand, err := policy.Compile("c.yaml", []byte("version: 1\nmode: enforce\nrules:\n"+c.rules))
		if err != nil {
			t.Fatal(err)
		}
		r := NewReplayer(cand, t0)
		r.Emit(flow)
		r.Emit(q)
		res := r.Result()
		n := 0
		for _, ch := range res.NewlyAllowed {
			n += int(ch.Flows + ch.Queries)
		}
		if n != c.allowed || len(res.NewlyDropped) != 0 || int(res.Unchanged) != 2-c.allowed {
			t.Errorf("%s: %d newly allowed, %d unchanged, %+v; want %d newly allowed", c.what, n, res.Unchanged, res, c.allowed)
		}
	}
}

// TestSuggestLeavesOutPrivateRelay: --suggest never proposes a rule for
// the relay's names (a rule naming them exactly opens the relay), and says
// why in a comment.
func TestSuggestLeavesOutPrivateRelay(t *testing.T) {
	r := &Report{GeneratedAt: t0, Dropped: []DroppedReport{{Dest: policy.PrivateRelayH2, Port: 443, Proto: "tcp", Flows: 3,
		Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: policy.ReasonPrivateRelay, FirstSeen: t0, LastSeen: t0}}}
	if sugs, _ := r.Suggest(); len(sugs) != 0 {
		t.Errorf("suggested %+v", sugs)
	}
	if why := unsuggestedWhy(policy.ReasonPrivateRelay); why == unsuggestedWhy("no-such-reason") {
		t.Errorf("no explanation for %s: %q", policy.ReasonPrivateRelay, why)
	}
}
