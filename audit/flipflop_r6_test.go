package audit

import (
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestReloadFlipFlopReadBack: capture's reports of one open flow across
// three reloads in audit mode (allowed, would-be deny, allowed again),
// then its close: the flow counts once, under the rule, and the log read
// back after the stop counts as the live ledger did, with and without a
// detail budget (it holds back no report of an open flow, nor the close
// of one written already).
func TestReloadFlipFlopReadBack(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	t0 := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	allow := policy.Decision{Verdict: policy.Allow, Rule: "ntp", Mode: policy.ModeAudit, Reason: "allowed"}
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	ev := func(i int, d policy.Decision, bytes uint64) Event {
		e := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.168.10.7"), ClientPort: uint16(20000 + i),
			Dest: netip.MustParseAddr("203.0.113.20"), DestPort: 123, Proto: "tcp", BytesOut: bytes, Duration: 1}
		e.Stamp(d)
		return e
	}
	for _, burst := range []int{0, 2} {
		const n = 6
		want, _ := readBackAgrees(t, eng, t0, burst, func(j *Journal) {
			for _, step := range []struct {
				d     policy.Decision
				bytes uint64
				close string
			}{
				{deny, 10, ""}, {allow, 20, ""}, {deny, 30, ""}, {allow, 40, ""}, {allow, 50, "fin"},
			} {
				for i := range n {
					e := ev(i, step.d, step.bytes)
					e.Close = step.close
					j.Emit(e)
				}
				j.takeBatch()
			}
		})
		if rr := ruleOf(want, "ntp"); rr == nil || rr.Flows != n || len(want.Dropped) != 0 && want.Dropped[0].Flows != 0 {
			t.Errorf("burst %d: live: rule %+v, dropped %+v; want %d flows under ntp", burst, rr, want.Dropped, n)
		}
	}
}
