package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"testing"
	"time"
)

// clockRule names clockName for NTP in audit mode; the enforce policy
// keeps the rule's name but gives it another name, so that the answer
// the forwarder gave for clockName in audit mode (credited to e2e-clock in
// its table) is one no rule of the enforce policy covers.
const clockRule = `
  - name: e2e-clock
    why: an NTP server the enforce policy no longer names
    to: ["%s"]
    ports: [123/udp]
`

// TestReloadAuditToEnforceKeepsGivenAnswers: the README's rollout with a
// device that resolves its NTP server once (chrony). In audit mode the
// client asks the gateway for the seed ntp rule's name and for
// clockName, which only an audit-mode rule covers; the reload switches to
// enforce (SIGHUP: the firewall goes in then). The client's next NTP
// request to the address it was given, from a new socket and without
// asking DNS again, is answered: the enforce ruleset's learned sets start
// with the addresses the forwarder gave out for the names their rules
// cover; the request to clockName's address, which no enforce rule
// covers, is dropped. Before, the learned sets started empty and the
// switch dropped every device's NTP until it asked DNS again.
func TestReloadAuditToEnforceKeepsGivenAnswers(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	seed := testPolicy(t)
	if !bytes.Contains(seed, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile is no longer in audit mode: update the test")
	}
	d.writePolicy(append(bytes.Clone(seed), []byte(fmt.Sprintf(clockRule, clockName))...))
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	given := map[string]netip.Addr{}
	for _, name := range []string{ntpName, clockName} {
		addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", name+".")
		if err != nil || len(addrs) == 0 {
			t.Fatalf("resolving %s through the gateway in audit mode: %v %v", name, addrs, err)
		}
		given[name] = addrs[0]
	}
	ntpAsk := func(name string, timeout time.Duration) error { return tp.ntpFrom(ctx, given[name], timeout) }
	for _, name := range []string{ntpName, clockName} {
		if err := ntpAsk(name, time.Second); err != nil {
			t.Fatalf("NTP to %s in audit mode: %v", name, err)
		}
	}

	enforce := bytes.Replace(seed, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1)
	d.writePolicy(append(enforce, []byte(fmt.Sprintf(clockRule, "other-"+clockName))...))
	d.hup(true)

	// The first datagram after the switch: no retry.
	if err := ntpAsk(ntpName, 2*time.Second); err != nil {
		t.Errorf("NTP to %s (%s, resolved in audit mode) right after the switch to enforce: %v; want an answer", ntpName, given[ntpName], err)
	}
	if err := ntpAsk(clockName, 700*time.Millisecond); err == nil {
		t.Errorf("NTP to %s (%s), a name no enforce rule covers, was answered after the switch to enforce", clockName, given[clockName])
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Errorf("NTP to %s after the switch: %v, want a timeout (dropped)", clockName, err)
	}
	if !regexp.MustCompile(`"msg":"firewall install"[^\n]*"learned_seeded":[1-9]`).MatchString(d.logs()) {
		t.Errorf("no firewall install line with the addresses seeded:\n%s", d.logs())
	}
}

// TestReloadAuditToEnforceKeepsDeniedAnswers: the rollout with a name the
// audit policy denies, which the operator adds (egressd report --suggest)
// with the switch to enforce. In audit mode the client asks the gateway
// for clockName, which no rule covers (answered: audit mode), and talks
// NTP to the address from one socket; the reload to enforce adds a rule
// for clockName. The client's next request, from the same socket and from
// a new one, without asking DNS again, is answered: the forwarder learned
// the audit-mode answer (with no rule), and the enforce ruleset's learned
// sets start with it, since the new rule covers it. Before, only allowed
// answers were learned, and exactly the names the operator added were cut
// off by the switch (learned_seeded 0). Capture reports the sockets
// opened in audit mode allowed under the new rule, as the kernel let them
// out: one it decides only after the switch (one exchange: undecided) not
// opened-before-enforce (its seeded check finds the answer learned with no
// rule, as the firewall's seeding does), and one it decided in audit mode
// as a would-be deny (four exchanges: capture decides a UDP flow at its
// seventh packet) credited to the rule at the switch, so the report,
// live, counts it under the rule, not dropped. Before, that one stayed
// `deny no-rule audit` for as long as it lived, the new rule unused.
func TestReloadAuditToEnforceKeepsDeniedAnswers(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	seed := testPolicy(t)
	if !bytes.Contains(seed, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile is no longer in audit mode: update the test")
	}
	if bytes.Contains(seed, []byte(clockName)) {
		t.Fatalf("the seed profile names %s: update the test", clockName)
	}
	d.writePolicy(seed)
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", clockName+".")
	if err != nil || len(addrs) == 0 {
		t.Fatalf("resolving %s through the gateway in audit mode: %v %v", clockName, addrs, err)
	}
	dest := netip.AddrPortFrom(addrs[0], 123).String()
	ask := func(c net.Conn, timeout time.Duration) error {
		req := ntpRequest()
		return askWithin(c, timeout, req, func(r []byte) bool { return ntpAnswers(req, r) })
	}
	// kept talks NTP four times in audit mode (capture decides it: a
	// would-be deny), undecided once.
	kept, err := tp.lan.DialContext(ctx, "udp", dest)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	for i := 0; i < 4; i++ {
		if err := ask(kept, time.Second); err != nil {
			t.Fatalf("NTP to %s in audit mode (exchange %d): %v", clockName, i+1, err)
		}
	}
	undecided, err := tp.lan.DialContext(ctx, "udp", dest)
	if err != nil {
		t.Fatal(err)
	}
	defer undecided.Close()
	if err := ask(undecided, time.Second); err != nil {
		t.Fatalf("NTP to %s in audit mode: %v", clockName, err)
	}

	// Capture has seen the socket's first datagrams in audit mode.
	captureSettles(d)

	enforce := bytes.Replace(seed, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1)
	d.writePolicy(append(enforce, []byte(fmt.Sprintf(clockRule, clockName))...))
	d.hup(true)

	// The first datagrams after the switch: no retry.
	for what, c := range map[string]net.Conn{"decided": kept, "undecided": undecided} {
		if err := ask(c, 2*time.Second); err != nil {
			t.Errorf("NTP to %s (%s, denied and answered in audit mode) from the socket opened then (%s by capture), after the switch to a rule for it: %v; want an answer", clockName, addrs[0], what, err)
		}
	}
	fresh, err := tp.lan.DialContext(ctx, "udp", dest)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if err := ask(fresh, 2*time.Second); err != nil {
		t.Errorf("NTP to %s (%s) from a new socket after the switch, without asking DNS again: %v; want an answer", clockName, addrs[0], err)
	}
	if !regexp.MustCompile(`"msg":"firewall install"[^\n]*"learned_seeded":[1-9]`).MatchString(d.logs()) {
		t.Errorf("no firewall install line with the addresses seeded")
	}

	// Capture reports the sockets opened in audit mode as the kernel
	// treated them: the one decided as a would-be deny is credited to the
	// new rule at the switch, the undecided one is decided under the
	// enforce policy, whose forward chain let it out by the seeded answer
	// (capture's seeded): allowed, not opened-before-enforce. First let
	// capture read what the LAN sent (its packet count unchanged over
	// three looks). The live report counts the three flows under the new
	// rule (the decided one's event is in the event log already, the
	// others are open); the stop ends the flows.
	captureSettles(d)
	r := d.report()
	var clockFlows uint64
	for _, rr := range r.Rules {
		if rr.Name == "e2e-clock" {
			clockFlows = rr.Flows
		}
	}
	if clockFlows != 3 {
		t.Errorf("live report: rule e2e-clock counts %d flow(s), want the 3 sockets'", clockFlows)
	}
	for _, u := range r.UnusedRules {
		if u == "e2e-clock" {
			t.Errorf("live report: rule e2e-clock unused")
		}
	}
	for _, dr := range r.Dropped {
		if dr.Port == 123 && dr.Proto == "udp" {
			t.Errorf("live report: NTP dropped %+v, want none", dr)
		}
	}
	d.stop()
	for what, c := range map[string]net.Conn{"the socket capture decided in audit mode": kept, "the socket opened in audit mode, undecided": undecided, "the socket opened after the switch": fresh} {
		port := c.LocalAddr().(*net.UDPAddr).Port
		var got []flowEvent
		for _, ev := range d.allEvents() {
			if ev.Kind == "flow" && ev.Source == "capture" && ev.Proto == "udp" && ev.ClientPort == port && ev.Dest == addrs[0].String() {
				got = append(got, ev)
			}
		}
		if len(got) == 0 {
			t.Errorf("%s (port %d): no capture event", what, port)
		}
		for _, ev := range got {
			if ev.Verdict != "allow" || ev.Rule != "e2e-clock" {
				t.Errorf("%s (port %d), answered after the switch: capture recorded %v; want allow under the new rule", what, port, ev)
			}
		}
	}
}

// captureSettles waits until capture has read what the LAN sent: its
// packet count unchanged over three looks, 100 ms apart (at most 5 s).
func captureSettles(d *daemon) {
	d.t.Helper()
	last, same := d.metric("egress_capture_packets_total"), 0
	for i := 0; i < 50 && same < 3; i++ {
		time.Sleep(100 * time.Millisecond)
		n := d.metric("egress_capture_packets_total")
		if n == last {
			same++
		} else {
			last, same = n, 0
		}
	}
}
