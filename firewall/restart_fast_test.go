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
)

// TestRestartFastPathFlipped: egressd stopped and started again with
// --fast-path turned on or off, the policy unchanged. The fast path
// reserves the last tag (ruleTags), so the rules of a ruleset with it draw
// their tags from one fewer, and every rule's tag may move: the start must
// render the policy before as the earlier run did, with or without the
// fast path (Deps.PreviousFastPath; egressd run: recorded beside the
// state directory's copy). Rendered with this run's setting, the tags are
// read as no rule's and every flow is decided again: named's, whose
// learned addresses the new process does not know, are cut.
func TestRestartFastPathFlipped(t *testing.T) {
	requireNft(t)
	const src = `version: 1
mode: enforce
rules:
  - {name: named, to: [ntp.test], ports: [9000/udp]}
  - {name: other, to: [198.18.2.2/32, "2001:db8:2::2/128"], ports: [9000/udp]}
`
	for _, was := range []bool{false, true} {
		t.Run(fmt.Sprintf("fast path %v then %v", was, !was), func(t *testing.T) {
			// The premise: the rules' tags differ with and without it.
			on, off := siteConfig, siteConfig
			on.FastPath = true
			ron, err := Render(on, compile(t, src))
			if err != nil {
				t.Fatal(err)
			}
			roff, err := Render(off, compile(t, src))
			if err != nil {
				t.Fatal(err)
			}
			if ron.flows[0].tag == roff.flows[0].tag {
				t.Fatalf("named has tag %d with and without the fast path", ron.flows[0].tag)
			}
			tp := newTopo(t)
			tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000")
			fw := tp.firewall(t, Config{FastPath: was})
			if err := fw.Install(compile(t, src)); err != nil {
				t.Fatal(err)
			}
			flows := namedAndOtherFlows(t, tp, fw, time.Hour)
			if err := fw.Detach(); err != nil {
				t.Fatal(err)
			}
			fw2 := tp.firewallWith(t, Config{FastPath: !was}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
				Previous: compile(t, src), PreviousFastPath: &was})
			if err := fw2.Install(compile(t, src)); err != nil {
				t.Fatal(err)
			}
			if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 0 || kept != 4 {
				t.Errorf("restart with the fast path %v then %v, the policy unchanged: %v cut, %v kept, want 0 and 4", was, !was, cut, kept)
			}
			checkFlows(t, "restarted with the fast path flipped", flows)
		})
	}
}

// TestRestartFastPathOnCutsForwarded: without the fast path, a rule's
// TCP port that is not redirected (--tcp-ports 443) is let out by
// forward, and the rule may draw the last tag: its flows carry the mark
// the fast path gives the connections it let out (fast-allowed). A start
// with --fast-path and every TCP port redirected (--tcp-ports all) must
// decide such a flow again, as the rule's, and cut it (forward lets no
// TCP out any more: the proxy or the fast path decides it); read as the
// fast path's, it was kept while the TCP rules were unchanged, a
// connection no proxy ever saw. Whether the earlier run had the fast
// path recorded (false) or not known (an egressd before the record), the
// flow is cut.
func TestRestartFastPathOnCutsForwarded(t *testing.T) {
	requireNft(t)
	tls := []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
	oldCfg := Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: proxyPort, DNSPort: dnsPort, TCPPorts: tls}
	var rule string
	for i := range 50000 {
		r := fmt.Sprintf("  - {name: r%d, to: [198.18.2.2/32], ports: [9001/tcp]}\n", i)
		rs, err := Render(oldCfg, enforceRules(t, r))
		if err != nil {
			t.Fatal(err)
		}
		if len(rs.flows) == 1 && rs.flows[0].tag == rs.mark.count {
			rule = r
			break
		}
	}
	if rule == "" {
		t.Fatal("no rule drew the last tag")
	}
	for _, tc := range []struct {
		name string
		was  *bool
	}{
		{"recorded", new(bool)},
		{"not known", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.echoTCP(t, "198.18.2.2:9001")
			fw := tp.firewall(t, Config{TCPPorts: tls})
			if err := fw.Install(enforceRules(t, rule)); err != nil {
				t.Fatal(err)
			}
			flows := map[string]*flow{"r": dialFlow(t, tp, "tcp", "198.18.2.2:9001")}
			checkFlows(t, "installed", flows)
			if err := fw.Detach(); err != nil {
				t.Fatal(err)
			}
			ports := tls
			fw2 := tp.firewallWith(t, Config{FastPath: true}, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
				Previous: enforceRules(t, rule), PreviousTCPPorts: &ports, PreviousFastPath: tc.was})
			if err := fw2.Install(enforceRules(t, rule)); err != nil {
				t.Fatal(err)
			}
			if cut, kept := flowsMetric(fw2, "cut"), flowsMetric(fw2, "kept"); cut != 1 || kept != 0 {
				t.Errorf("restart with --fast-path and every TCP port redirected, the rule on the last tag: %v cut, %v kept, want 1 and 0", cut, kept)
			}
			checkFlows(t, "restarted with the fast path", flows, "r")
		})
	}
}

// TestRestartFastPathOffDecidesFastFlows: a connection the fast path let
// out has the mark fast-allowed (the last tag), which no rule of a
// ruleset with the fast path draws, but a rule of one without it may
// (x here). A start without --fast-path after a run with it must not
// read a fast-allowed connection as x's (an unchanged rule: kept, though
// x lets out UDP to another address): it is decided again, and cut
// (forward lets out no TCP 443: the proxy has it). No kernel.
func TestRestartFastPathOffDecidesFastFlows(t *testing.T) {
	const web = "  - {name: web, to: [\"*.example.test\"], ports: [443/tcp]}\n"
	var x string
	for i := range 20000 {
		r := fmt.Sprintf("  - {name: x%d, to: [198.51.100.9], ports: [9/udp]}\n", i)
		rs := renderEnforce(t, web+r)
		if len(rs.flows) == 1 && rs.flows[0].tag == rs.mark.count {
			x = r
			break
		}
	}
	if x == "" {
		t.Fatal("no rule drew the last tag")
	}
	src := "version: 1\nmode: enforce\nrules:\n" + web + x
	noLive := func(string, netip.Addr) bool { return false }
	k := flowKey{client: netip.MustParseAddr("198.18.1.2"), dst: netip.MustParseAddr("198.51.100.7"), port: 443, proto: policy.TCP}
	for _, tc := range []struct {
		name string
		was  *bool
	}{
		{"recorded", func() *bool { b := true; return &b }()},
		{"not known", nil},
	} {
		f, err := New(siteConfig, Deps{Previous: compile(t, src), PreviousFastPath: tc.was, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		rs, err := Render(siteConfig, compile(t, src))
		if err != nil {
			t.Fatal(err)
		}
		mark := rs.mark.fastAllowed()
		if keep, tag := rs.keeps(append(f.since, rs), mark, k, noLive); keep {
			t.Errorf("%s: a fast-allowed connection to %v after a run with the fast path is kept under tag %d (x's: %q)", tc.name, k.dst, tag, x)
		}
	}
}
