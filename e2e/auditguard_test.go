package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestAuditGatewayGuard: audit mode reports what enforce mode's gateway
// hardening would drop from the LAN, and enforce mode what it dropped. A LAN host sends UDP from a forged
// source off the LAN (IPv4 and IPv6), from a subnet the gateway routes
// via the LAN (which passes the reverse-path check), a rogue Router
// Advertisement, an ICMP redirect to the gateway and a TCP connection to
// 127.0.0.1 through the gateway. Each dropped kind must be in the event
// log as a deny with its reason, the forged sources once per flow (three
// datagrams each), and the routed subnet's flow with no forged-source
// reason. Before session 26 capture recorded the forged sources as
// clients, and none of the rest. Enforce mode with --no-firewall installs
// no hardening: the drops are recorded as enforce's would be, not
// enforced (before session 27, enforced though nothing dropped them).
func TestAuditGatewayGuard(t *testing.T) {
	for _, mode := range []string{"audit", "enforce", "enforce-no-firewall"} {
		t.Run(mode, func(t *testing.T) { testGatewayGuardRecorded(t, mode) })
	}
}

func testGatewayGuardRecorded(t *testing.T, mode string) {
	noFirewall := mode == "enforce-no-firewall"
	if noFirewall {
		mode = "enforce"
	}
	tp := newTopo(t)
	const forged4, forged6 = "198.51.100.77", "2001:db8:99::77"
	const routed4 = "198.18.7.2"
	tp.lan.AddAddr(t, "lo", forged4+"/32", forged6+"/128", routed4+"/32")
	tp.gw.MustRun("ip", "route", "add", "198.18.7.0/24", "via", lanClient4, "dev", "lan0")
	tp.gw.MustRun("ip", "route", "add", lanRouted, "via", lanRouter4, "dev", "lan0")
	tp.lan.MustRun("ip", "addr", "add", lanRouter4+"/32", "dev", "eth0")

	d := newDaemon(t, tp, mode)
	if noFirewall {
		d.extra = append(d.extra, "--no-firewall")
	}
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output (last 4 KiB):\n%s", tail(d.logs(), 4096))
		}
	})

	send := func(src, dst string) {
		t.Helper()
		pc, err := tp.lan.ListenPacket("udp", net.JoinHostPort(src, "0"))
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		to := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(dst))
		for range 3 {
			if _, err := pc.WriteTo([]byte("forged"), to); err != nil {
				t.Fatalf("udp from %s: %v", src, err)
			}
		}
	}
	send(forged4, inetWAN4+":9000")
	send(forged6, "["+inetWAN6+"]:9000")
	send(routed4, inetWAN4+":9001")
	tp.sendRogueRA(t)
	tp.sendRedirect(t)
	tp.dialLoopbackViaGW(t, "127.0.0.1:9902") // the gateway drops it as a martian: no answer

	// Capture reads its ring in blocks (64 ms) and at most every 100 ms;
	// the flows still open are recorded when egressd stops.
	time.Sleep(time.Second)
	d.stop()
	var forged, rest []flowEvent
	reasons := map[string]int{}
	for _, ev := range d.allEvents() {
		if ev.Kind != "flow" {
			continue
		}
		reasons[ev.Reason]++
		switch {
		case ev.Client == forged4 || ev.Client == forged6:
			forged = append(forged, ev)
		default:
			rest = append(rest, ev)
		}
	}
	var log strings.Builder
	for _, ev := range append(forged, rest...) {
		log.WriteString(ev.String() + "\n")
	}
	if len(forged) != 2 {
		t.Errorf("forged sources: %d flow events, want 2 (one per flow):\n%s", len(forged), log.String())
	}
	for _, ev := range forged {
		if ev.Verdict != "deny" || ev.Reason != "forged-source" || ev.Enforced != (mode == "enforce" && !noFirewall) {
			t.Errorf("forged source: %v, want a deny with reason forged-source, enforced in enforce mode with egressd's firewall only", ev)
		}
	}
	for _, ev := range rest {
		guarded := ev.Reason == "router-advertisement" || ev.Reason == "redirect" || ev.Reason == "loopback-destination"
		if guarded && ev.Enforced != (mode == "enforce" && !noFirewall) {
			t.Errorf("%v: enforced=%v, want it enforced in enforce mode with egressd's firewall only", ev, ev.Enforced)
		}
	}
	for _, ev := range rest {
		if ev.Client == routed4 && ev.Reason == "forged-source" {
			t.Errorf("the routed subnet's source is no forged one: %v", ev)
		}
	}
	for _, r := range []string{"router-advertisement", "redirect", "loopback-destination"} {
		if reasons[r] == 0 {
			t.Errorf("no flow event with reason %s:\n%s", r, log.String())
		}
	}

	// The report names them among the drops, and --suggest proposes no
	// rule for them (none would let them through enforce mode).
	r, out := d.reportStateJSON()
	want := map[string]string{inetWAN4 + " 9000/udp": forged4, inetWAN6 + " 9000/udp": forged6}
	for _, dr := range r.Dropped {
		k := fmt.Sprintf("%s %d/%s", dr.Dest, dr.Port, dr.Proto)
		if cli, ok := want[k]; ok && dr.Reason == "forged-source" && slices.Contains(dr.Clients, cli) {
			delete(want, k)
		}
	}
	if len(want) != 0 {
		t.Errorf("report: no forged-source drop for %v in\n%s", want, out)
	}
	if sug := string(d.reportState("--suggest")); strings.Contains(sug, inetWAN4+"/") || strings.Contains(sug, "9000/udp") {
		t.Errorf("report --suggest proposes a rule for the forged sources' flows:\n%s", sug)
	}
}

// TestAuditLoopbackNamedLive: audit mode's capture records TCP, UDP and
// ICMP echo from the LAN to the gateway's loopback as enforce mode's
// antispoof chain would drop them (loopback-destination), under a rule
// naming 127.0.0.1/32 too (explainPolicy's x-loop), though in audit mode
// they get through (the gateway has route_localnet=1): audit predicts
// enforce (e2e/TestExplainMatchesDaemon). The offline audit and --replay:
// cmd/egressd/TestAuditLoopbackNamed.
func TestAuditLoopbackNamedLive(t *testing.T) {
	tp := newTopo(t)
	w := tp.newWitness(t, nil, nil)
	svc := startLoopServices(t, tp, []string{"9902"}, []string{"7780"})
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.lan0.route_localnet=1")
	d := newDaemon(t, tp, "audit")
	d.writePolicy([]byte(strings.Replace(explainPolicy, "mode: enforce", "mode: audit", 1)))
	d.start()
	cases := []explainCase{
		{kind: "tcp", to: "127.0.0.1", port: "9902/tcp", loop: true},
		{kind: "udp", to: "127.0.0.1", port: "7780/udp", loop: true},
		{kind: "icmp", to: "127.0.0.1", port: "icmp", loop: true},
	}
	for _, c := range cases {
		var ok bool
		tp.loopbackViaGW(t, func() { ok = tryCase(t, tp, w, svc, c, c.to) })
		if !ok {
			t.Fatalf("audit mode: %s to 127.0.0.1 (%s) does not get through: the test would prove nothing", c.kind, c.port)
		}
	}
	time.Sleep(time.Second) // capture's ring blocks
	d.stop()
	seen := map[string]bool{}
	var log strings.Builder
	for _, ev := range d.allEvents() {
		if ev.Kind != "flow" || ev.Dest != "127.0.0.1" {
			continue
		}
		log.WriteString(ev.String() + "\n")
		seen[ev.Proto] = true
		if ev.Verdict != "deny" || ev.Reason != "loopback-destination" || ev.Enforced {
			t.Errorf("%v: want deny loopback-destination, not enforced (audit mode)", ev)
		}
	}
	for _, p := range []string{"tcp", "udp", "icmp"} {
		if !seen[p] {
			t.Errorf("no %s flow event to 127.0.0.1:\n%s", p, log.String())
		}
	}
}
