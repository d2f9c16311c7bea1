package capture

import (
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestUnforwardedCounted: egress_capture_unforwarded_frames_total counts
// only client frames the gateway would have routed and drops: to its MAC
// address, toward an address not its own, not redirected to its proxy or
// DNS forwarder. A TTL-1 frame to the LAN's subnet broadcast (a
// broadcast frame: the gateway routes none), one to the gateway's own
// address or one with a wrong header checksum to it (no forwarding
// decision) are not counted; in enforce mode a TTL-1 frame the firewall
// redirects to the proxy (or DNS to the forwarder) is delivered to the
// gateway, not forwarded: the proxy reads it, and so does capture. Before
// session 29 each counted, and capture skipped the redirected one.
func TestUnforwardedCounted(t *testing.T) {
	decoy := realClientHello(t, decoyName)
	cli := netip.MustParseAddr("198.18.5.10")
	gw := netip.MustParseAddr("198.18.5.1")
	bcast := netip.MustParseAddr("198.18.5.255")
	srv := netip.MustParseAddr("203.0.113.10")
	toBroadcast := func(b []byte) { copy(b[:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}) }
	badSum := func(b []byte) { b[14+10] ^= 0x5a }

	r := newGuardRig(t, policy.ModeAudit)
	r.liveTCP(false, cli, bcast, 40000, 443, "S", 100, nil, 1, toBroadcast)
	r.liveTCP(false, cli, srv, 40001, 443, "S", 100, nil, 1, toBroadcast)
	r.liveTCP(false, cli, gw, 40002, 443, "S", 100, nil, 64, badSum)
	r.liveTCP(false, cli, gw, 40003, 443, "S", 100, nil, 1, nil)
	if n := r.c.Stats().Unforwarded; n != 0 {
		t.Errorf("audit: %d unforwarded frames counted, want 0 (none would have been routed)", n)
	}
	r.liveTCP(false, cli, srv, 40004, 443, "S", 100, nil, 1, nil)
	if n := r.c.Stats().Unforwarded; n != 1 {
		t.Errorf("audit: %d unforwarded frames counted, want 1 (a TTL-1 frame toward %s)", n, srv)
	}

	e := newGuardRigLog(t, policy.ModeEnforce, true, nil)
	sp := uint16(41000)
	e.liveTCP(false, cli, srv, sp, 443, "S", 100, nil, 64, nil)
	e.liveTCP(true, srv, cli, 443, sp, "SA", 500, nil, 64, nil)
	e.liveTCP(false, cli, srv, sp, 443, "A", 101, nil, 64, nil)
	e.liveTCP(false, cli, srv, sp, 443, "A", 101, decoy, 1, nil)
	e.liveTCP(false, cli, srv, 41001, 53, "S", 100, nil, 1, nil)
	if n := e.c.Stats().Unforwarded; n != 0 {
		t.Errorf("enforce: %d unforwarded frames counted, want 0 (redirected to the proxy and the forwarder)", n)
	}
	e.c.proc.flush("shutdown")
	var got audit.Event
	for _, ev := range e.rec.all() {
		if ev.ClientPort == sp {
			got = ev
		}
	}
	if got.Name != decoyName {
		t.Errorf("enforce: %+v, want the hello of the TTL-1 frame (%s) read, as the proxy reads it", got, decoyName)
	}
}

// TestUnforwardedNoFirewall: enforce mode's redirects are the firewall's
// (firewall/render.go, redirectRules): DNS to the forwarder and TCP to
// the proxy's port whether the proxy listens or not. Without egressd's
// firewall (--no-firewall, one that did not install) nothing redirects a
// TTL-1 frame to port 53 of an internet address: the gateway would
// route it and drops it, and capture skips and counts it. With the
// firewall and no proxy listening, TCP to port 443 is still redirected
// (to a port nothing listens on): delivered to the gateway, not counted.
// Before session 29 (R16) DNS was taken for redirected whenever capture
// ran beside the proxy, and TCP only while the proxy listened.
func TestUnforwardedNoFirewall(t *testing.T) {
	cli := netip.MustParseAddr("198.18.5.10")
	srv := netip.MustParseAddr("203.0.113.10")
	for _, installed := range []bool{false, true} {
		r := newGuardRigLog(t, policy.ModeEnforce, false, nil)
		r.c.cfg.Firewall = func() bool { return installed }
		r.liveTCP(false, cli, srv, 42000, 53, "S", 100, nil, 1, nil)
		r.liveTCP(false, cli, srv, 42001, 443, "S", 100, nil, 1, nil)
		want := uint64(0)
		if !installed {
			want = 2
		}
		if n := r.c.Stats().Unforwarded; n != want {
			t.Errorf("firewall installed %v: %d unforwarded frames counted, want %d", installed, n, want)
		}
	}
}
