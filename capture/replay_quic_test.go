package capture

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestReplayQUICLearnedName: `audit --replay` judges a QUIC flow as
// capture does: by the name DNS gave its address out for (the event's
// learned_name), not by its hellos' names, which the forward chain never
// reads. The flow's address was learned for b.allowed.test (rule b), its
// hellos named x.unlisted.test (no rule) and c.allowed.test (rule c).
// Capture records it allowed by rule b under the first hello's name; its
// events go through the event log, and the replay of that log against
// each candidate must give the verdict capture's own reload to the
// candidate gives the open flow (Redecide). Before session 32 the event
// did not carry the learned name and the replay judged each hello's
// name: the recorded policy itself "newly dropped" the flow (x has no
// rule), and so did a candidate of rule b alone. A log without the field
// (written before) replays as before: on the hellos' names.
func TestReplayQUICLearnedName(t *testing.T) {
	ruleB, ruleC := udpRule("b"), udpRule("c")
	learnedB := netip.MustParseAddr("203.0.113.80") // DNS gave it out for b.allowed.test
	cli := netip.MustParseAddr("192.0.2.96")
	const cport = 47620
	hello := func(name string) []byte { return handHello(sniExt(name))[5:] }
	hellos := [][]byte{hello("x.unlisted.test"), hello("c.allowed.test")}
	dcids := [][]byte{{1, 2, 3, 4, 5, 6, 7, 8}, {9, 9, 9, 9}}
	each := func(p *pcapWriter, s int) {
		if s == 0 {
			for i, h := range hellos {
				p.udp(true, cli, learnedB, cport, 443, clientInitialV(t, quicV1, dcids[i], nil, 0, 0, h))
			}
		}
		p.udp(true, cli, learnedB, cport, 443, append([]byte{0x40}, make([]byte, 40)...))
		p.udp(false, learnedB, cli, 443, cport, append([]byte{0x40}, make([]byte, 40)...))
	}
	facts := factsMap{learnedB: {"b.allowed.test"}}
	pol := func(rules string) string { return fmt.Sprintf(ntpPolicy, policy.ModeAudit, rules) }
	running := pol(ruleB + ruleC)

	// The recording: the running policy throughout, its events written
	// to an event log as egressd run's journal writes them.
	rec, _ := reloadRunEach(t, running, facts, 90*time.Second, each, func(*Capture, *policy.Store) {})
	recorded := lastFlowEvent(rec, cport)
	if recorded.Verdict != policy.Allow || recorded.Rule != "b" || recorded.Name != "x.unlisted.test" || recorded.LearnedName != "b.allowed.test" {
		t.Fatalf("recorded %s %s rule %q name %q learned %q others %q; want allowed by rule b under x.unlisted.test, learned for b.allowed.test",
			recorded.Verdict, recorded.Reason, recorded.Rule, recorded.Name, recorded.LearnedName, recorded.OtherNames)
	}
	logDir := func(strip bool) string {
		dir := t.TempDir()
		j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, Logger: slog.New(slog.DiscardHandler)}, audit.NewLedger(nil, audit.LedgerOptions{}))
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range rec.all() {
			if strip {
				ev.LearnedName = "" // a log written before the field
			}
			j.Emit(ev)
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	withField, without := logDir(false), logDir(true)
	replay := func(dir, cand string) *audit.ReplayResult {
		t.Helper()
		r := audit.NewReplayer(testEngine(t, pol(cand)), recorded.Time.Add(2*time.Minute))
		if _, err := audit.ReplayPath(dir, r); err != nil {
			t.Fatal(err)
		}
		return r.Result()
	}
	dropped := func(res *audit.ReplayResult) string {
		if len(res.NewlyAllowed)+len(res.RuleChanged) != 0 || len(res.NewlyDropped) > 1 {
			return fmt.Sprintf("%+v", res)
		}
		if len(res.NewlyDropped) == 0 {
			return ""
		}
		d := res.NewlyDropped[0]
		return d.Dest + " " + d.NewReason
	}

	for _, c := range []struct{ name, rules string }{
		{"recorded policy", ruleB + ruleC},
		{"rule b alone", ruleB},
		{"rule b gone", ruleC},
		{"rules reordered", ruleC + ruleB},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Live: capture's own reload to the candidate, the flow open.
			liveRec, _ := reloadRunEach(t, running, facts, 40*time.Second, each, redecideTo(t, policy.ModeAudit, c.rules))
			live := lastFlowEvent(liveRec, cport)
			want := ""
			if live.Verdict != policy.Allow {
				want = live.Name + " " + live.Reason
			}
			res := replay(withField, c.rules)
			if got := dropped(res); got != want {
				t.Errorf("replay: newly dropped %q; capture's reload: %q (live %s %s rule %q name %q)", got, want, live.Verdict, live.Reason, live.Rule, live.Name)
			}
			if want == "" && res.Unchanged != 1 {
				t.Errorf("replay: %d unchanged, want the flow", res.Unchanged)
			}
		})
	}

	// A log without learned_name: each hello's name, as before (the
	// first hello's x.unlisted.test has no rule).
	if got := dropped(replay(without, ruleB+ruleC)); got != "x.unlisted.test "+policy.ReasonNoRule {
		t.Errorf("old log: newly dropped %q, want x.unlisted.test on the hellos' names as before", got)
	}
}

// TestRedecideQUICFourNames: a QUIC flow whose four connections' hellos
// named four hosts (the first and three others, as many as capture
// keeps), its address learned for a fifth, which a reload in audit mode
// makes a would-be deny: recorded under the learned name, the event
// carries all four hellos' names in other_names. Before session 32 it
// carried three (audit.MaxOtherNames was capture's bound on the other
// names, one fewer than the hellos): the record lost a host the client
// named.
func TestRedecideQUICFourNames(t *testing.T) {
	learnedB := netip.MustParseAddr("203.0.113.81") // DNS gave it out for b.allowed.test
	cli := netip.MustParseAddr("192.0.2.97")
	const cport = 47621
	names := []string{"x.unlisted.test", "a.allowed.test", "c.allowed.test", "d.allowed.test"}
	each := func(p *pcapWriter, s int) {
		if s == 0 {
			for i, n := range names {
				p.udp(true, cli, learnedB, cport, 443, clientInitialV(t, quicV1, []byte{byte(i + 1), 2, 3, 4}, nil, 0, 0, handHello(sniExt(n))[5:]))
			}
		}
		p.udp(true, cli, learnedB, cport, 443, append([]byte{0x40}, make([]byte, 40)...))
		p.udp(false, learnedB, cli, 443, cport, append([]byte{0x40}, make([]byte, 40)...))
	}
	others := udpRule("a") + udpRule("c") + udpRule("d")
	rec, _ := reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, udpRule("b")+others), factsMap{learnedB: {"b.allowed.test"}}, 40*time.Second,
		each, redecideTo(t, policy.ModeAudit, others))
	ev := lastFlowEvent(rec, cport)
	if ev.Verdict != policy.Deny || ev.Name != "b.allowed.test" || !slices.Equal(ev.OtherNames, names) {
		t.Errorf("last event %s %s %q others %q; want a would-be deny under b.allowed.test, others %q (events %q)",
			ev.Verdict, ev.Reason, ev.Name, ev.OtherNames, names, flowEvents(rec, cport))
	}
	// The log keeps them.
	ev.Bound()
	if !slices.Equal(ev.OtherNames, names) {
		t.Errorf("bounded: others %q, want %q", ev.OtherNames, names)
	}
}
