package capture

import (
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestUnroutedMACDecoy: Linux routes only a frame sent to the receiving
// interface's MAC address (ip_forward drops what is not PACKET_HOST),
// but capture's packet socket reads a frame to the broadcast address, to
// a multicast one or (on a veth, a bridge, a promiscuous NIC) to another
// host's. A decoy hello in such a frame toward the server, then the real
// hello at the same sequence number to the gateway's MAC address: capture
// skips the decoy, which no server reads, and records the real hello's
// name. Before session 29 it read the decoy, and only the conflict watch
// kept the flow from an allow (stream-conflict, the name the server read
// in no event). A frame to such an address toward the gateway's own
// address, which Linux may deliver, is read as before.
func TestUnroutedMACDecoy(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	decoy := realClientHello(t, decoyName)
	real := realClientHello(t, realName)
	to := func(mac ...byte) func([]byte) { return func(b []byte) { copy(b[:6], mac) } }
	cli4, cli6 := netip.MustParseAddr("198.18.5.10"), netip.MustParseAddr("2001:db8:5::10")
	srv4, srv6 := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8:99::10")
	cases := []struct {
		what     string
		cli, srv netip.Addr
		spoil    func([]byte)
	}{
		{"broadcast", cli4, srv4, to(0xff, 0xff, 0xff, 0xff, 0xff, 0xff)},
		{"another host's", cli4, srv4, to(0x02, 0, 0x5e, 0x16, 0, 0x99)},
		{"ipv4 multicast", cli4, srv4, to(0x01, 0, 0x5e, 0, 0, 0xfb)},
		{"ipv6 all-nodes", cli6, srv6, to(0x33, 0x33, 0, 0, 0, 1)},
		{"another host's, ipv6", cli6, srv6, to(0x02, 0, 0x5e, 0x16, 0, 0x99)},
	}
	for i, c := range cases {
		sp := uint16(47000 + i)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "S", 100, nil, 64, nil)
		r.liveTCP(true, c.srv, c.cli, 443, sp, "SA", 500, nil, 64, nil)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "A", 101, nil, 64, nil)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "A", 101, decoy, 64, c.spoil)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "A", 101, real, 64, nil)
	}
	if n := r.c.Stats().Unforwarded; n != 0 {
		t.Errorf("unforwarded frames: %d, want 0 (none would have been routed)", n)
	}
	r.c.proc.flush("shutdown")
	got := map[uint16]audit.Event{}
	for _, ev := range r.rec.all() {
		got[ev.ClientPort] = ev
	}
	for i, c := range cases {
		if ev := got[uint16(47000+i)]; ev.Name != realName || ev.Verdict != policy.Deny {
			t.Errorf("decoy to %s MAC address: %+v, want the real hello's name %s", c.what, ev, realName)
		}
	}
}
