package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestGuardsAgreeThisNetwork: policy explain, capture's guard and audit
// --replay's (policy.Engine.LANRefuses) judge a LAN host's flow to
// 0.0.0.0/8 alike, through policy.LANThisHost: 0.0.0.0 has no path out
// whatever the rules (TCP: the transparent proxy refuses it as loopback;
// UDP and ICMP: Linux drops it as a martian), while 0.0.0.5 and
// 0.255.255.255, which Linux (since 5.3) routes and forwards like any
// address, are the special-range guard's: opened by a CIDR rule inside
// 0.0.0.0/8, not by 0.0.0.0/0. Before, explain denied UDP and ICMP to all
// of 0.0.0.0/8 as martian while capture and replay allowed 0.0.0.5 under
// a rule naming it.
func TestGuardsAgreeThisNetwork(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	client := netip.MustParseAddr("198.18.1.10")
	for _, pc := range []struct {
		name, to string
		open     bool // opens 0.0.0.5 and 0.255.255.255
	}{
		{"named", `["0.0.0.0/32", "0.0.0.5/32", "0.255.255.255/32"]`, true},
		{"this-network", `["0.0.0.0/8"]`, true},
		{"wide", `["0.0.0.0/0"]`, false},
	} {
		src := fmt.Sprintf("version: 1\nmode: enforce\nrules:\n  - {name: zero, to: %s, ports: [80/tcp, 80/udp, icmp]}\n", pc.to)
		pol := filepath.Join(dir, pc.name+".yaml")
		if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		eng, err := policy.Compile(pol, []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		for _, dest := range []string{"0.0.0.0", "0.0.0.5", "0.255.255.255"} {
			for _, pp := range []struct {
				port  string
				num   uint16
				proto policy.Proto
				name  string
			}{{"80/tcp", 80, policy.TCP, "tcp"}, {"80/udp", 80, policy.UDP, "udp"}, {"icmp", 0, policy.ICMP, "icmp"}} {
				name := pc.name + " " + dest + " " + pp.port
				want := pc.open && dest != "0.0.0.0"
				ex := explainJSON(t, pol, "--to", dest, "--port", pp.port)
				explained := ex.Verdict == "allow"
				in := policy.Input{Client: client, Dest: netip.MustParseAddr(dest), Port: pp.num, Proto: pp.proto, Now: t0}
				_, refused := eng.LANRefuses(in, nil, nil)
				captured := eng.Decide(in).Allowed() && !refused
				rp := audit.NewReplayer(eng, t0)
				ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceCapture, Time: t0, Client: client, Dest: in.Dest, DestPort: pp.num, Proto: pp.name,
					NameSource: audit.NameNone, BytesOut: 60, Close: "idle"}
				ev.Stamp(policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit})
				rp.Emit(ev)
				replayed := len(rp.Result().NewlyAllowed) == 1
				if explained != want || captured != want || replayed != want {
					t.Errorf("%s: explain %s (%s, guard %q), capture's guard allows %v, replay allows %v: want all allow=%v",
						name, ex.Verdict, ex.Reason, ex.Guard, captured, replayed, want)
				}
				if !want && ex.Reason != "special-range" {
					t.Errorf("%s: explain %s %s, want special-range", name, ex.Verdict, ex.Reason)
				}
			}
		}
	}
}
