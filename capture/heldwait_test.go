package capture

import (
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestSentHeldReleased: the bytes an allowed TCP flow was decided on are
// kept until the server acknowledges them, but not past heldWait: a
// server that never acknowledges them (silent, or gone) no longer makes
// capture hold them for the connection's life. A digest of them stays:
// after the release a copy of the whole run that differs is still a
// stream-conflict, the same whole copy is none, and a copy of part of
// it, which capture can no longer compare, is a conflict too (the safe
// side: a decoy naming an allowed host must not be read as allowed). The
// server's acknowledgement ends the watch as before. Before session 29
// the bytes stayed until the flow ended.
func TestSentHeldReleased(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	decoy := realClientHello(t, decoyName)
	real := realClientHello(t, realName)
	if len(decoy) != len(real) || len(decoy) <= 1400 {
		t.Fatalf("hellos of %d and %d bytes, want one length past 1400", len(decoy), len(real))
	}
	srv := netip.MustParseAddr("198.51.100.10") // the lab rule: allowed by address too
	cli := netip.MustParseAddr("198.18.5.10")
	const n = 2000
	var ms0, ms1, ms2 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	for i := range n {
		sp := uint16(30000 + i)
		r.liveTCP(false, cli, srv, sp, 443, "S", 100, nil, 64, nil)
		r.liveTCP(true, srv, cli, 443, sp, "SA", 500, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, decoy[:1400], 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 1501, decoy[1400:], 64, nil)
	}
	runtime.GC()
	runtime.ReadMemStats(&ms1)
	held := r.c.proc.streamBytes
	if held < n*len(decoy) {
		t.Fatalf("%d bytes held, want at least %d", held, n*len(decoy))
	}
	// The server stays silent; a packet of another flow, 20 s on, runs
	// the sweep.
	r.now = r.now.Add(20 * time.Second)
	r.liveTCP(false, cli, srv, 29999, 443, "S", 100, nil, 64, nil)
	runtime.GC()
	runtime.ReadMemStats(&ms2)
	t.Logf("%d flows, hello %d bytes: %d bytes held (%.0f a flow), heap +%d; after the release %d held, heap +%d (%.0f a flow, the flow table included)",
		n, len(decoy), held, float64(held)/n, ms1.HeapAlloc-ms0.HeapAlloc, r.c.proc.streamBytes,
		int64(ms2.HeapAlloc)-int64(ms0.HeapAlloc), float64(int64(ms2.HeapAlloc)-int64(ms0.HeapAlloc))/n)
	if held := r.c.proc.streamBytes; held != 0 {
		t.Errorf("%d bytes held 20 s on, the server silent, want 0", held)
	}
	ack := func(sp uint16) {
		r.liveIP(true, ipLayer(srv, cli, layers.IPProtocolTCP), &layers.TCP{SrcPort: 443, DstPort: layers.TCPPort(sp),
			Seq: 501, Ack: 101 + uint32(len(decoy)), ACK: true, Window: 65535})
	}
	cases := []struct {
		what   string
		send   func(sp uint16)
		reason string
	}{
		{"a different whole copy", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, real, 64, nil)
		}, ReasonStreamConflict},
		{"a different copy in two segments", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, real[:1400], 64, nil)
			r.liveTCP(false, cli, srv, sp, 443, "A", 1501, real[1400:], 64, nil)
		}, ReasonStreamConflict},
		{"the same whole copy", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, decoy, 64, nil)
		}, policy.ReasonAllowed},
		{"the same whole copy with the next bytes", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, append(append([]byte(nil), decoy...), "next"...), 64, nil)
		}, policy.ReasonAllowed},
		{"the next bytes only", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101+uint32(len(decoy)), []byte("next"), 64, nil)
		}, policy.ReasonAllowed},
		// A LAN client can forge the acknowledgement (e2e
		// TestCaptureEvasion/forged-ack): its digest stays. Before
		// session 29 (R16) the acknowledgement ended the watch, and
		// this was allowed.
		{"the server's acknowledgement, then a different copy", func(sp uint16) {
			ack(sp)
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, real, 64, nil)
		}, ReasonStreamConflict},
		{"the server's acknowledgement, then a different first segment", func(sp uint16) {
			ack(sp)
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, real[:1400], 64, nil)
		}, ReasonStreamConflict},
		{"the server's acknowledgement, then the same copy and more", func(sp uint16) {
			ack(sp)
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, append(append([]byte(nil), decoy...), "next"...), 64, nil)
		}, policy.ReasonAllowed},
	}
	for i, c := range cases {
		c.send(uint16(30000 + i))
	}
	r.c.proc.flush("shutdown")
	got := eventsByPort(r.rec.all())
	for i, c := range cases {
		if ev := got[uint16(30000+i)]; ev.Reason != c.reason {
			t.Errorf("%s: %+v, want %s", c.what, ev, c.reason)
		}
	}
}

// TestSentDigestWraps: the digest of an acknowledged hello stays for the
// flow's life (TestSentHeldReleased), but its sequence numbers come round
// again after 4 GiB of the client's bytes: past sentSpan of them, bytes
// at the hello's sequence numbers are new data, no copy of it.
func TestSentDigestWraps(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	decoy := realClientHello(t, decoyName)
	real := realClientHello(t, realName)
	srv := netip.MustParseAddr("198.51.100.10")
	cli := netip.MustParseAddr("198.18.5.10")
	for _, sp := range []uint16{31000, 31001} {
		r.liveTCP(false, cli, srv, sp, 443, "S", 100, nil, 64, nil)
		r.liveTCP(true, srv, cli, 443, sp, "SA", 500, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, decoy, 64, nil)
		r.liveIP(true, ipLayer(srv, cli, layers.IPProtocolTCP), &layers.TCP{SrcPort: 443, DstPort: layers.TCPPort(sp),
			Seq: 501, Ack: 101 + uint32(len(decoy)), ACK: true, Window: 65535})
	}
	for _, f := range r.c.proc.flows {
		if f.cport == 31001 && len(f.sent) == 1 {
			f.bytes[0] += sentSpan
		}
	}
	r.liveTCP(false, cli, srv, 31000, 443, "A", 101, real, 64, nil)
	r.liveTCP(false, cli, srv, 31001, 443, "A", 101, real, 64, nil)
	r.c.proc.flush("shutdown")
	got := eventsByPort(r.rec.all())
	if ev := got[31000]; ev.Reason != ReasonStreamConflict {
		t.Errorf("a different copy after the acknowledgement: %+v, want %s", ev, ReasonStreamConflict)
	}
	if ev := got[31001]; ev.Reason != policy.ReasonAllowed {
		t.Errorf("bytes at the hello's sequence numbers 2 GiB on: %+v, want allowed", ev)
	}
}

// TestSentAckedRetransmitted: a hello in two segments that the server
// acknowledged, the acknowledgement lost on the LAN after capture saw it
// (a lossy Wi-Fi link), is sent again by the client's stack in part: its
// retransmission timer resends the first segment, a tail loss probe the
// last. Those are copies of part of the hello, the same bytes: no
// conflict. Before R18 the acknowledgement gave the bytes way to their
// digest at once (d623b87), a copy of part of it could not be compared,
// and a plain lossy link denied allowed connections as stream-conflict.
// A copy of part of it that differs is still one (a forged
// acknowledgement, then the real hello: TestSentHeldReleased). Past
// ackedWait after the acknowledgement only the digest stays, and a copy
// of part of it is taken as differing (the residual, README "Capture in
// audit mode").
func TestSentAckedRetransmitted(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	hello := realClientHello(t, decoyName)
	other := realClientHello(t, realName)
	if len(hello) != len(other) || len(hello) <= 1400 {
		t.Fatalf("hellos of %d and %d bytes, want one length past 1400", len(hello), len(other))
	}
	srv := netip.MustParseAddr("198.51.100.10")
	cli := netip.MustParseAddr("198.18.5.10")
	end := 101 + uint32(len(hello))
	open := func(sp uint16) {
		r.liveTCP(false, cli, srv, sp, 443, "S", 100, nil, 64, nil)
		r.liveTCP(true, srv, cli, 443, sp, "SA", 500, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, hello[:1400], 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 1501, hello[1400:], 64, nil)
		r.liveIP(true, ipLayer(srv, cli, layers.IPProtocolTCP), &layers.TCP{SrcPort: 443, DstPort: layers.TCPPort(sp),
			Seq: 501, Ack: end, ACK: true, Window: 65535})
	}
	cases := []struct {
		what   string
		send   func(sp uint16)
		reason string
	}{
		{"the first segment again (retransmission timer)", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, hello[:1400], 64, nil)
		}, policy.ReasonAllowed},
		{"the last segment again (tail loss probe)", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 1501, hello[1400:], 64, nil)
		}, policy.ReasonAllowed},
		{"the first segment again, by a smaller MSS", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, hello[:1200], 64, nil)
		}, policy.ReasonAllowed},
		{"the first segment of another hello", func(sp uint16) {
			r.liveTCP(false, cli, srv, sp, 443, "A", 101, other[:1400], 64, nil)
		}, ReasonStreamConflict},
	}
	for i, c := range cases {
		sp := uint16(32000 + i)
		open(sp)
		r.now = r.now.Add(500 * time.Millisecond)
		c.send(sp)
	}
	// Past ackedWait, the digest alone: a copy of part of it is taken as
	// differing.
	const late = 32100
	open(late)
	r.now = r.now.Add(heldWait + time.Second)
	r.liveTCP(false, cli, srv, 29999, 443, "S", 100, nil, 64, nil) // runs the sweep
	r.liveTCP(false, cli, srv, late, 443, "A", 101, hello[:1400], 64, nil)
	r.c.proc.flush("shutdown")
	got := eventsByPort(r.rec.all())
	for i, c := range cases {
		if ev := got[uint16(32000+i)]; ev.Reason != c.reason {
			t.Errorf("%s: %+v, want %s", c.what, ev, c.reason)
		}
	}
	if ev := got[late]; ev.Reason != ReasonStreamConflict {
		t.Errorf("the first segment again past ackedWait: %+v, want %s", ev, ReasonStreamConflict)
	}
}
