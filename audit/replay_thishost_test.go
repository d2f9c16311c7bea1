package audit

import (
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestReplayThisHost: a candidate policy whose rule names 0.0.0.0/32 or
// ::/128 does not newly allow a LAN host's flow there: the transparent
// proxy refuses a TCP connection redirected to "this host" as loopback
// whatever the rules (dialled, it is the gateway itself), and the kernel
// forwards nothing to it. Before, audit --replay said such a flow would
// be allowed while the proxy refused it; DNS to it stays the
// forwarder's.
func TestReplayThisHost(t *testing.T) {
	cli := netip.MustParseAddr("198.18.1.10")
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	mk := func(dest string, port uint16, proto string) Event {
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0, Client: cli, Dest: netip.MustParseAddr(dest), DestPort: port, Proto: proto,
			NameSource: NameNone, BytesOut: 60, Close: "idle"}
		ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit})
		return ev
	}
	cand, err := policy.Compile("cand.yaml", []byte("version: 1\nrules:\n  - {name: zero, to: [\"0.0.0.0/32\", \"::/128\"], ports: [80/tcp, 81/udp, 53/udp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	rp := NewReplayer(cand, t0)
	for _, ev := range []Event{mk("0.0.0.0", 80, "tcp"), mk("::", 80, "tcp"), mk("0.0.0.0", 81, "udp"), mk("0.0.0.0", 53, "udp")} {
		rp.Emit(ev)
	}
	res := rp.Result()
	if len(res.NewlyAllowed) != 1 || res.NewlyAllowed[0].Port != 53 {
		t.Errorf("newly allowed %+v: want only DNS to 0.0.0.0 (the forwarder's)", res.NewlyAllowed)
	}
}
