package e2e

import (
	"bytes"
	"context"
	"net/netip"
	"testing"
	"time"
)

// TestReloadEnforceAuditKeepsForwardedDrop: a forwarded flow (UDP to the
// echo, rule e2e-udp) opened in audit mode is dropped at the reload to an
// enforce policy without its rule (enforced, policy-revoked). At the
// reload back to audit mode its datagrams pass again, and its record
// stays the drop enforced: that is what happened while enforce mode was
// on. A flow opened after the switch back is judged in audit mode: a
// would-be drop, not enforced. (capture/TestRedecideForwardedDropBackToAudit
// is the same for forwarded TCP.)
func TestReloadEnforceAuditKeepsForwardedDrop(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	seed := testPolicy(t)
	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.start()

	f := openUDPFlows(t, tp)
	for range 4 {
		if err := f.echo(); err != nil {
			t.Fatalf("UDP echo before the reload: %v", err)
		}
	}
	time.Sleep(time.Second)
	d.writePolicy(bytes.Replace(seed, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1))
	d.hup(true)
	if err := f.echo(); err == nil {
		t.Fatal("the echo flow still gets answers after the switch to enforce without its rule")
	}
	old := int(netip.MustParseAddrPort(f.echoConn.LocalAddr().String()).Port())
	d.waitEvent(t, "the echo flow dropped at the switch to enforce", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.ClientPort == old && ev.Verdict == "deny" && ev.Enforced && ev.Close == "policy-revoked"
	})

	d.writePolicy(seed) // audit mode, still without the rule
	d.hup(true)
	answered := f.echo() == nil
	t.Logf("the dropped flow's datagram after the switch back to audit: answered %v", answered)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "udp", netip.AddrPortFrom(netip.MustParseAddr(udpDenyIP), udpDenyPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 6 { // capture decides a UDP flow after six datagrams
		if err := ask(c, []byte("ping"), func(r []byte) bool { return string(r) == "echo:ping" }); err != nil {
			t.Errorf("audit mode: datagram %d of a new flow to the echo got no answer: %v", i, err)
		}
	}
	fresh := int(netip.MustParseAddrPort(c.LocalAddr().String()).Port())
	time.Sleep(time.Second)
	d.stop() // capture reports its open flows at its end (else after a minute)
	ev := d.waitEvent(t, "the new flow after the switch back", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.ClientPort == fresh
	})
	if ev.Verdict != "deny" || ev.Enforced || ev.Reason != "no-rule" {
		t.Errorf("the flow opened after the switch back: %+v, want a would-be deny no-rule of audit mode, not enforced", ev)
	}
	for _, ev := range d.allEvents() {
		if ev.Kind == "flow" && ev.ClientPort == old && ev.Verdict == "deny" && !ev.Enforced {
			t.Errorf("the flow dropped while enforce mode was on has an event %+v: its record must stay the drop enforced", ev)
		}
	}
}
