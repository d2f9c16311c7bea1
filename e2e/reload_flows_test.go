package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// udpRule lets the LAN send UDP to the echo at udpDenyIP: a second
// forwarded rule next to the seed's ntp.
const udpRule = `
  - name: e2e-udp
    why: a forwarded UDP flow that the reload keeps
    to: ["` + udpDenyIP + `"]
    ports: [7777/udp]
`

// TestReloadCutsRemovedRulesFlows: the brief's case. In enforce mode a
// device's NTP flow (one socket, the seed's ntp rule) and a UDP flow of
// another rule go out; the operator removes the ntp rule and reloads
// (SIGHUP): the NTP flow's next request gets no answer, the other flow
// carries on, and the reload's firewall line and metric count one flow
// cut.
func TestReloadCutsRemovedRulesFlows(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	seed := testPolicy(t)
	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.start()

	f := openUDPFlows(t, tp)
	ntp, echo := f.ntp, f.echo
	if err := ntp(); err != nil {
		t.Fatalf("NTP before the reload: %v", err)
	}
	if err := echo(); err != nil {
		t.Fatalf("UDP echo before the reload: %v", err)
	}

	d.writePolicy(append(withoutNTPRule(t, seed), udpRule...))
	d.hup(true)

	if err := ntp(); err == nil {
		t.Error("the NTP flow still gets answers after its rule was removed")
	} else if err := ntp(); err == nil {
		t.Error("the NTP flow's second request after the reload got an answer")
	}
	if err := echo(); err != nil {
		t.Errorf("the other rule's UDP flow after the reload: %v", err)
	}
	if v := d.metric(`egress_firewall_reload_flows_total{result="cut"}`); v != 1 {
		t.Errorf(`egress_firewall_reload_flows_total{result="cut"} = %v, want 1`, v)
	}
	if !strings.Contains(d.logs(), `"flows_cut":1`) {
		t.Errorf("no firewall line with flows_cut 1:\n%s", d.logs())
	}

	// The cut is a decision: one line of its own, and the flow's record
	// (capture's: it follows the flow) says dropped, so the report does.
	local := netip.MustParseAddrPort(f.ntpConn.LocalAddr().String())
	var lines []string
	for _, l := range strings.Split(d.logs(), "\n") {
		if strings.Contains(l, "firewall: flow cut") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 {
		t.Errorf("%d lines of a cut flow, want 1:\n%s", len(lines), strings.Join(lines, "\n"))
	} else {
		for _, attr := range []string{`"kind":"flow"`, `"client":"` + local.Addr().String() + `"`, fmt.Sprintf(`"client_port":%d`, local.Port()),
			`"dest":"` + f.ntpAddr.String() + `"`, `"dest_port":123`, `"proto":"udp"`, `"prev_rule_id":"ntp"`, `"reason":"no-rule"`,
			`"verdict":"deny"`, `"enforced":true`, `"close":"policy-revoked"`} {
			if !strings.Contains(lines[0], attr) {
				t.Errorf("the cut's line has no %s: %s", attr, lines[0])
			}
		}
	}
	ev := wantEvent(t, d, "the cut NTP flow", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.ClientPort == int(local.Port()) && ev.Verdict == "deny"
	}, "deny", "no-rule")
	if ev.Source != "capture" || ev.Close != "policy-revoked" {
		for _, e := range d.allEvents() {
			if e.DestPort == 123 {
				t.Logf("%v", e)
			}
		}
		t.Errorf("the cut NTP flow's event: %v (source %s), want capture's, close policy-revoked", ev, ev.Source)
	}
	waitReport(t, d, func(r *report) bool { return droppedFlows(r, 123, "udp", true) == 1 })
	r := d.report()
	if n := ruleFlows(r, "ntp"); n != 0 {
		t.Errorf("report: the removed ntp rule still has %d flows", n)
	}
	if n := droppedFlows(r, udpDenyPort, "udp", false); n != 0 {
		t.Errorf("report: %d flows of the kept rule dropped", n)
	}
}

// droppedFlows adds up the report's dropped flows to port/proto (enforced
// ones only, when enforced is set), whatever their destination's name.
func droppedFlows(r *report, port uint16, proto string, enforced bool) uint64 {
	var n uint64
	for _, dr := range r.Dropped {
		if dr.Port == port && dr.Proto == proto && (dr.Enforced || !enforced) {
			n += dr.Flows
		}
	}
	return n
}

// TestReloadAuditRejudgesForwardedFlows: the audit-mode sibling. A
// device's NTP flow runs while the operator removes the seed's ntp rule
// and reloads: nothing is cut (audit), but capture judges the live flow
// again, and the report counts it as a flow enforce would now drop (not
// enforced), with an info line saying so; the other rule's flow is
// untouched. Before, the flow kept its audit allow to its end.
func TestReloadAuditRejudgesForwardedFlows(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	seed := testPolicy(t)
	if !bytes.Contains(seed, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile no longer says mode: audit: update the test")
	}
	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.start()

	f := openUDPFlows(t, tp)
	ntp, echo := f.ntp, f.echo
	// Four exchanges: capture decides a UDP flow it finds no QUIC in
	// after six datagrams (or ten seconds); one decided under the old
	// policy is the one to judge again.
	for range 4 {
		if err := ntp(); err != nil {
			t.Fatalf("NTP before the reload: %v", err)
		}
	}
	if err := echo(); err != nil {
		t.Fatalf("UDP echo before the reload: %v", err)
	}
	// Capture reads the ring a block at a time (within about 0.2s): let
	// it decide the flow under the policy it began in, as a flow that has
	// run for a while is.
	time.Sleep(time.Second)
	d.writePolicy(append(withoutNTPRule(t, seed), udpRule...))
	d.hup(true)

	if err := ntp(); err != nil {
		t.Errorf("audit mode: the NTP flow lost its answers after the reload: %v", err)
	}
	if err := echo(); err != nil {
		t.Errorf("the other rule's UDP flow after the reload: %v", err)
	}
	local := netip.MustParseAddrPort(f.ntpConn.LocalAddr().String())
	ev := d.waitEvent(t, "the NTP flow judged again", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.ClientPort == int(local.Port()) && ev.Verdict == "deny"
	})
	if ev.Enforced || ev.Reason != "no-rule" || ev.Source != "capture" {
		t.Errorf("the NTP flow's event after the reload: %v, want capture's would-be deny no-rule, not enforced", ev)
	}
	waitReport(t, d, func(r *report) bool { return droppedFlows(r, 123, "udp", false) == 1 })
	r := d.report()
	if n := droppedFlows(r, 123, "udp", true); n != 0 {
		t.Errorf("report: the NTP flow counts as enforced in audit mode")
	}
	if n := ruleFlows(r, "ntp"); n != 0 {
		t.Errorf("report: the removed ntp rule still has %d flows", n)
	}
	if n := ruleFlows(r, "e2e-udp"); n > 1 || droppedFlows(r, udpDenyPort, "udp", false) != 0 {
		t.Errorf("report: the kept rule's flow moved (rule e2e-udp %d flows)", n)
	}
	if !strings.Contains(d.logs(), "policy reload: the new policy would deny this open flow (audit mode: kept)") {
		t.Errorf("no line for the NTP flow judged again:\n%s", d.logs())
	}
	if v := d.metric(`egress_firewall_reload_flows_total{result="cut"}`); v != 0 {
		t.Errorf("audit mode cut %v flows", v)
	}
}

// udpFlows are a LAN client's two forwarded UDP flows, each on its own
// socket: NTP to the address the gateway's DNS gave for ntpName (the
// seed's ntp rule) and the echo at udpDenyIP (udpRule).
type udpFlows struct {
	ntpAddr           netip.Addr
	ntpConn, echoConn net.Conn
}

func openUDPFlows(t *testing.T, tp *topo) *udpFlows {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", ntpName+".")
	if err != nil || len(addrs) == 0 {
		t.Fatalf("resolving %s through the gateway: %v %v", ntpName, addrs, err)
	}
	f := &udpFlows{ntpAddr: addrs[0]}
	dial := func(addr string) net.Conn {
		c, err := tp.lan.DialContext(ctx, "udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	f.ntpConn = dial(netip.AddrPortFrom(f.ntpAddr, 123).String())
	f.echoConn = dial(netip.AddrPortFrom(netip.MustParseAddr(udpDenyIP), udpDenyPort).String())
	return f
}

// ntp sends one NTP request on the flow's socket and waits up to a second
// for its answer.
func (f *udpFlows) ntp() error {
	req := ntpRequest()
	return ask(f.ntpConn, req, func(r []byte) bool { return ntpAnswers(req, r) })
}

// echo sends "ping" to the echo and waits up to a second for its answer.
func (f *udpFlows) echo() error {
	return ask(f.echoConn, []byte("ping"), func(r []byte) bool { return string(r) == "echo:ping" })
}

// ntpRequest is a client-mode NTPv4 request whose transmit time is now.
func ntpRequest() []byte {
	req := make([]byte, 48)
	req[0] = 0<<6 | 4<<3 | 3
	binary.BigEndian.PutUint64(req[40:], uint64(time.Now().UnixNano()))
	return req
}

// ntpAnswers says whether r answers req (its origin time is req's
// transmit time).
func ntpAnswers(req, r []byte) bool {
	return len(r) >= 48 && string(r[24:32]) == string(req[40:48])
}

// withoutNTPRule is the seed policy without its ntp rule.
func withoutNTPRule(t *testing.T, seed []byte) []byte {
	t.Helper()
	i := bytes.Index(seed, []byte("  - name: ntp\n"))
	j := bytes.Index(seed, []byte("    ports: [123/udp]\n"))
	if i < 0 || j < i {
		t.Fatal("the seed profile's ntp rule moved: update the test")
	}
	return append(bytes.Clone(seed[:i]), seed[j+len("    ports: [123/udp]\n"):]...)
}

// ask sends req on c and waits up to a second for an answer ok accepts.
func ask(c net.Conn, req []byte, ok func([]byte) bool) error {
	return askWithin(c, time.Second, req, ok)
}

// askWithin sends req on c and waits up to timeout for an answer ok accepts.
func askWithin(c net.Conn, timeout time.Duration, req []byte, ok func([]byte) bool) error {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(req); err != nil {
		return err
	}
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if ok(buf[:n]) {
			return nil
		}
	}
}

// TestReloadAuditToEnforceForwardedFlows: the README's rollout with live
// forwarded flows. A device's NTP flow (the seed's ntp rule, by name) and
// a UDP flow of another rule (e2e-udp, by address) run in audit mode; the
// reload switches to enforce and drops e2e-udp. Neither flow carries the
// enforce ruleset's mark, so the forward chain judges their next
// datagrams as new flows: whatever it does to each, capture's record of
// the flow must say the same (dropped and enforced where the datagrams
// get no answer, not dropped where they do). The NTP flow's address was
// given out by the forwarder for a name the enforce ntp rule covers, so
// the rule's learned set starts with it and the flow goes on (until the
// sets were seeded at the switch, it was dropped).
func TestReloadAuditToEnforceForwardedFlows(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	seed := testPolicy(t)
	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.start()

	f := openUDPFlows(t, tp)
	ntp, echo := f.ntp, f.echo
	for range 4 { // decided by capture (see TestReloadAuditRejudgesForwardedFlows)
		if err := ntp(); err != nil {
			t.Fatalf("NTP before the reload: %v", err)
		}
		if err := echo(); err != nil {
			t.Fatalf("UDP echo before the reload: %v", err)
		}
	}
	time.Sleep(time.Second)
	d.writePolicy(bytes.Replace(seed, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1))
	d.hup(true)

	for _, f := range []struct {
		name string
		c    net.Conn
		ask  func() error
	}{{"ntp", f.ntpConn, ntp}, {"e2e-udp", f.echoConn, echo}} {
		answered := f.ask() == nil
		port := netip.MustParseAddrPort(f.c.LocalAddr().String()).Port()
		time.Sleep(time.Second) // capture applies the reload's judgement once the ring has caught up
		var denied *flowEvent
		for _, ev := range d.allEvents() {
			if ev.Kind == "flow" && ev.ClientPort == int(port) && ev.Verdict == "deny" {
				denied = &ev
			}
		}
		t.Logf("%s flow after the switch to enforce: answered %v, capture's deny %v", f.name, answered, denied)
		switch {
		case answered && denied != nil:
			t.Errorf("%s: the flow still gets answers, but capture records it dropped: %v", f.name, denied)
		case !answered && (denied == nil || !denied.Enforced || denied.Close != "policy-revoked"):
			t.Errorf("%s: the flow gets no answer after the switch to enforce, but capture's record says %v", f.name, denied)
		}
		if f.name == "e2e-udp" && answered {
			t.Errorf("the flow of the rule the reload removed still gets answers")
		}
		if f.name == "ntp" && !answered {
			t.Errorf("the NTP flow to an address the forwarder gave out for the ntp rule's name gets no answer after the switch to enforce")
		}
	}
}
