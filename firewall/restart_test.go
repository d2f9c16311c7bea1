package firewall

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
	"egressd/profiles"
)

// TestRestartUnchangedPolicyKeeps: a restart with the policy unchanged
// cuts nothing: every flow a rule of the running ruleset let out, to an
// address no longer in its learned sets (an NTP server resolved a day
// ago) and none of its CIDRs, is kept under the same tag when the start
// reads the marks as the previous policy's (Deps.Previous, the state
// directory's copy, compiled from the file with the NAT64 prefixes the
// earlier run had, here this run's: no --mode override) and the new
// ruleset is that file's with this run's flags. A false cut here is an outage at every upgrade. Policies: the
// seed profile (its file says audit; run with --mode enforce) and the
// test site's, each with and without a NAT64 prefix, and with the
// earlier run's --fast-path recorded (off) or not known (an egressd
// before the record: the marks are read both ways). No kernel.
func TestRestartUnchangedPolicyKeeps(t *testing.T) {
	seed, err := profiles.Get("nirovision")
	if err != nil {
		t.Fatal(err)
	}
	site := sitePolicy(t)
	nat64 := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96")}
	noLive := func(string, netip.Addr) bool { return false }
	for _, tc := range []struct {
		name string
		prev *policy.Engine
	}{
		{"seed", compile(t, string(seed))},
		{"site", site},
	} {
		for _, n64 := range [][]netip.Prefix{nil, nat64} {
			for _, fast := range []*bool{new(bool), nil} {
				eng := tc.prev.WithMode(policy.ModeEnforce).WithNAT64(n64)
				f, err := New(siteConfig, Deps{Previous: tc.prev.WithNAT64(n64), PreviousFastPath: fast, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
				if err != nil {
					t.Fatal(err)
				}
				// Not known whether it had the fast path (an egressd before
				// the record): read with it and without.
				if want := map[bool]int{true: 1, false: 2}[fast != nil]; len(f.since) != want {
					t.Fatalf("%s: %d rulesets read from Previous, want %d", tc.name, len(f.since), want)
				}
				rs, err := Render(siteConfig, eng)
				if err != nil {
					t.Fatal(err)
				}
				if len(rs.flows) == 0 {
					t.Fatalf("%s: no rule with a tag", tc.name)
				}
				since := append(f.since, rs)
				for _, fr := range rs.flows {
					for _, dst := range []netip.Addr{netip.MustParseAddr("192.0.2.77"), netip.MustParseAddr("2001:db8:77::1")} {
						k := flowKey{client: netip.MustParseAddr("198.18.1.5"), dst: dst, port: fr.ports[0].Lo, proto: fr.ports[0].Proto}
						if keep, tag := rs.keeps(since, defaultMark(fr.tag), k, noLive); !keep || tag != fr.tag {
							t.Errorf("%s (NAT64 %v, fast path known %v): rule %s's flow to %s: keeps = %v under tag %d, want true under %d", tc.name, n64, fast != nil, fr.name, dst, keep, tag, fr.tag)
						}
					}
				}
			}
		}
	}
}

// TestRestartUnchangedNothingCut: egressd stopped and started again with
// the same policy (an upgrade, a restart), told the policy before
// (Deps.Previous: the state directory's copy), cuts none of the flows the
// ruleset in the kernel let out: those of a name rule, whose learned
// addresses the new process does not know (nothing seeds its sets here,
// as for an answer that expired), and those of a CIDR rule, IPv4 and
// IPv6. The counts of the start's look at the connections say so, and
// every flow still gets its answer.
func TestRestartUnchangedNothingCut(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000")
	fw := tp.firewall(t, Config{})
	const src = `version: 1
mode: enforce
rules:
  - {name: named, to: [ntp.test], ports: [9000/udp]}
  - {name: other, to: [198.18.2.2/32, "2001:db8:2::2/128"], ports: [9000/udp]}
`
	pol := compile(t, src)
	if err := fw.Install(pol); err != nil {
		t.Fatal(err)
	}
	flows := namedAndOtherFlows(t, tp, fw, time.Hour)
	if err := fw.Detach(); err != nil {
		t.Fatal(err)
	}
	fw2 := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Previous: compile(t, src)})
	if err := fw2.Install(compile(t, src)); err != nil {
		t.Fatal(err)
	}
	if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 0 || kept != 4 {
		t.Errorf("restart with the policy unchanged: %v cut, %v kept, want 0 and 4", cut, kept)
	}
	checkFlows(t, "restarted, policy unchanged", flows)
}

// TestRestartTCPPortsChanged: egressd stopped and started again with
// --tcp-ports changed (a list, under which forward handles a rule's TCP
// ports, to "all", under which the proxy does): a rule's fingerprint, and
// so its tag, depends on the ports forward handles, so the start must
// render the policy before with the ports the earlier run had
// (Deps.PreviousTCPPorts, egressd run: recorded beside the state
// directory's copy). Rendered with this run's, the tags are read wrong
// both ways: named's flow (an unchanged rule; its learned address no
// longer known) is cut, and a's flow (a rule removed) is kept as c's, a
// new rule that drew a's old tag and lets nothing of it out.
func TestRestartTCPPortsChanged(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	old := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
	fw := tp.firewall(t, old)
	oldCfg := fw.cfg
	const (
		named = "  - {name: named, to: [ntp.test], ports: [9000/udp, 22/tcp]}\n"
		a     = "  - {name: a, to: [198.18.2.2/32], ports: [9000/udp, 22/tcp]}\n"
	)
	r0, err := Render(oldCfg, enforceRules(t, named, a))
	if err != nil {
		t.Fatal(err)
	}
	newCfg := oldCfg
	newCfg.TCPPorts = nil
	// c has, in this run's ruleset, the tag a had in the earlier one.
	c := tagTwin(t, newCfg, named, r0.flows[1].tag, ruleC)
	before := enforceRules(t, named, a)
	if err := fw.Install(before); err != nil {
		t.Fatal(err)
	}
	if err := fw.Learn("named", netip.MustParseAddr("198.18.2.3"), time.Hour); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{"a": dialFlow(t, tp, "udp", "198.18.2.2:9000"), "named": dialFlow(t, tp, "udp", "198.18.2.3:9000")}
	checkFlows(t, "installed", flows)
	if err := fw.Detach(); err != nil {
		t.Fatal(err)
	}
	ports := old.TCPPorts
	fw2 := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Previous: before, PreviousTCPPorts: &ports})
	if err := fw2.Install(enforceRules(t, named, c)); err != nil {
		t.Fatal(err)
	}
	if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 1 || kept != 1 {
		t.Errorf("restart with --tcp-ports 443 then all, without a, c with a's old tag: %v cut, %v kept, want 1 and 1", cut, kept)
	}
	checkFlows(t, "restarted with --tcp-ports changed", flows, "a")
}

// TestRestartNAT64Changed: egressd stopped and started again with
// --nat64-prefix changed (removed, added, moved to another prefix) or
// not. A rule's tag does not depend on the prefixes (fingerprint), but
// what its accept rules open does: an IPv4 CIDR rule opens the NAT64
// forms of its prefixes, and the guarded sets hold the NAT64 forms of
// the guarded IPv4 ranges (renderAllows). So the start reads the marks
// as the policy before rendered with the prefixes the earlier run had
// (Deps.Previous, compiled WithNAT64 of them; egressd run: recorded
// beside the state directory's copy), and a rule whose accept rules open
// other addresses now has its flows decided again. Read as unchanged
// (same fingerprint), a's flow to the NAT64 form of its address is kept
// once the prefix is gone or moved, and star's flow to the NAT64 form of
// a private address (guarded once that prefix is a NAT64 one) is kept
// once it is added: each a flow the new forward chain drops. Decided
// again, the flows the new chain lets out are kept (a's to its IPv4
// address, star's to a plain IPv6 one), and with the prefixes unchanged
// nothing is cut.
func TestRestartNAT64Changed(t *testing.T) {
	requireNft(t)
	p64, p65 := netip.MustParsePrefix("2001:db8:64::/96"), netip.MustParsePrefix("2001:db8:65::/96")
	const (
		src = `version: 1
mode: enforce
rules:
  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}
  - {name: star, to: ["*"], ports: [9001/udp]}
`
		a4     = "198.18.2.2:9000"
		a64    = "[2001:db8:64::c612:202]:9000" // 198.18.2.2 under p64
		star6  = "[2001:db8:2::2]:9001"
		star64 = "[2001:db8:64::a00:1]:9001" // 10.0.0.1 under p64: guarded once p64 is a NAT64 prefix
	)
	for _, tc := range []struct {
		name     string
		old, new []netip.Prefix
		dial     []string // the flows the earlier run let out
		cut      []string
	}{
		{"removed", []netip.Prefix{p64}, nil, []string{a4, a64, star6}, []string{a64}},
		{"added", nil, []netip.Prefix{p64}, []string{a4, star6, star64}, []string{star64}},
		{"moved", []netip.Prefix{p64}, []netip.Prefix{p65}, []string{a4, a64, star6}, []string{a64}},
		{"unchanged", []netip.Prefix{p64}, []netip.Prefix{p64}, []string{a4, a64, star6}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server.AddAddr(t, "eth0", "2001:db8:64::c612:202/64", "2001:db8:64::a00:1/64")
			tp.gw.MustRun("ip", "-6", "route", "add", "2001:db8:64::/64", "via", "2001:db8:2::2")
			tp.serverUDP(t, a4, a64, star6, star64)
			fw := tp.firewall(t, Config{})
			before := compile(t, src).WithNAT64(tc.old)
			if err := fw.Install(before); err != nil {
				t.Fatal(err)
			}
			flows := map[string]*flow{}
			for _, d := range tc.dial {
				flows[d] = dialFlow(t, tp, "udp", d)
			}
			checkFlows(t, "installed", flows)
			if err := fw.Detach(); err != nil {
				t.Fatal(err)
			}
			fw2 := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
				Previous: compile(t, src).WithNAT64(tc.old)})
			if err := fw2.Install(compile(t, src).WithNAT64(tc.new)); err != nil {
				t.Fatal(err)
			}
			wantCut, wantKept := float64(len(tc.cut)), float64(len(tc.dial)-len(tc.cut))
			if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != wantCut || kept != wantKept {
				t.Errorf("restart with NAT64 %v then %v: %v cut, %v kept, want %v and %v", tc.old, tc.new, cut, kept, wantCut, wantKept)
			}
			checkFlows(t, "restarted with NAT64 "+tc.name, flows, tc.cut...)
		})
	}
}

// TestRestartCTMarkBitsChanged: egressd stopped and started again with
// --ct-mark-bits moved (0x07ff0000, then the default 0x007ff000): the
// earlier run's marks are at the old bits, which the new established rule
// does not look at. The start reads them with the bits the earlier run
// had (Deps.PreviousCTMarkBits, egressd run: recorded beside the state
// directory's copy): named's flow (an unchanged rule; its learned address
// no longer known) is kept and marked again at the new bits, a's (a rule
// removed) is cut. Before, neither was looked at: named's replies were
// dropped and its next packet met a learned set that no longer had its
// address.
func TestRestartCTMarkBitsChanged(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	const oldBits = 0x07ff0000
	fw := tp.firewall(t, Config{CTMarkBits: oldBits})
	const (
		named = "  - {name: named, to: [ntp.test], ports: [9000/udp]}\n"
		a     = "  - {name: a, to: [198.18.2.2/32], ports: [9000/udp]}\n"
	)
	before := enforceRules(t, named, a)
	restartAtDefaultBits(t, tp, fw, before, enforceRules(t, named), oldBits, "changed")
}

// TestRestartKilledBeforeRecord: egressd ran policy A (the state
// directory's copy), then installed B and was killed before it wrote B's
// copy (a kill -9 in the milliseconds between the two). The kernel's marks
// are B's, but the copy says A: read as A's alone, b's flow (b drew the
// tag a has in A) is kept at a start with A again, as a's, an unchanged
// rule, though A lets nothing of it out. The start is told of B too
// (Deps.Pending, egressd run: written before the install), and a tag
// that A and B give different rules is decided again: b's flow is cut,
// x's (the same rule in both, and in the new policy) kept.
func TestRestartKilledBeforeRecord(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	fw := tp.firewall(t, Config{})
	const (
		x = "  - {name: x, to: [198.18.2.2/32], ports: [9000/udp]}\n"
		a = "  - {name: a, to: [203.0.113.9/32], ports: [9001/udp]}\n"
	)
	rA, err := Render(fw.cfg, enforceRules(t, x, a))
	if err != nil {
		t.Fatal(err)
	}
	// b has, in B's ruleset, the tag a has in A's.
	b := tagTwin(t, fw.cfg, x, rA.flows[1].tag, func(i int) string {
		return fmt.Sprintf("  - {name: b%d, to: [198.18.2.3/32], ports: [9000/udp]}\n", i)
	})
	if err := fw.Install(enforceRules(t, x, b)); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{"x": dialFlow(t, tp, "udp", "198.18.2.2:9000"), "b": dialFlow(t, tp, "udp", "198.18.2.3:9000")}
	checkFlows(t, "B installed", flows)
	if err := fw.Detach(); err != nil {
		t.Fatal(err)
	}
	fw2 := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Previous: enforceRules(t, x, a), Pending: []Prior{{Policy: enforceRules(t, x, b)}}})
	if err := fw2.Install(enforceRules(t, x, a)); err != nil {
		t.Fatal(err)
	}
	if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 1 || kept != 1 {
		t.Errorf("restart with A after B went in unrecorded: %v cut, %v kept, want 1 and 1", cut, kept)
	}
	checkFlows(t, "restarted with A", flows, "b")
}

// restartAtDefaultBits installs before (rules named and a) with fw, at
// --ct-mark-bits oldBits, opens a UDP flow of each (a to 198.18.2.2, named
// to its learned 198.18.2.3), then starts again at the default bits with
// after (named alone), the earlier bits given: a's flow must be cut,
// named's kept and passing. how names the case in the messages.
func restartAtDefaultBits(t *testing.T, tp *topo, fw *Firewall, before, after *policy.Engine, oldBits uint32, how string) {
	t.Helper()
	if err := fw.Install(before); err != nil {
		t.Fatal(err)
	}
	if err := fw.Learn("named", netip.MustParseAddr("198.18.2.3"), time.Hour); err != nil {
		t.Fatal(err)
	}
	flows := map[string]*flow{"a": dialFlow(t, tp, "udp", "198.18.2.2:9000"), "named": dialFlow(t, tp, "udp", "198.18.2.3:9000")}
	checkFlows(t, "installed", flows)
	if err := fw.Detach(); err != nil {
		t.Fatal(err)
	}
	fw2 := tp.firewallWith(t, Config{}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Previous: before, PreviousCTMarkBits: &oldBits})
	if err := fw2.Install(after); err != nil {
		t.Fatal(err)
	}
	if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 1 || kept != 1 {
		t.Errorf("restart with --ct-mark-bits %#08x then the default, without a: %v cut, %v kept, want 1 and 1", oldBits, cut, kept)
	}
	checkFlows(t, "restarted with --ct-mark-bits "+how, flows, "a")
}
