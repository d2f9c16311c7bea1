package capture

import (
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestSentHeldCost (R13): 10,000 allowed TLS flows whose hellos the
// server has not acknowledged yet hold each about its hello (in
// MaxStreamBytes, flow.held), no more than twice it; ackedWait after
// the server's acknowledgements it is all free. The flows open within a few milliseconds
// of one another (the rig's clock steps back after each): past heldWait
// unacknowledged the bytes are released (TestSentHeldReleased).
func TestSentHeldCost(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	hello := realClientHello(t, decoyName)
	srv := netip.MustParseAddr("198.51.100.10") // the lab rule: allowed by address too
	const n = 10000
	start := r.now
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	for i := range n {
		cli := netip.AddrFrom4([4]byte{198, 18, 5, byte(10 + i%200)})
		sp := uint16(20000 + i/200)
		r.liveTCP(false, cli, srv, sp, 443, "S", 100, nil, 64, nil)
		r.liveTCP(true, srv, cli, 443, sp, "SA", 500, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, nil, 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 101, hello[:1400], 64, nil)
		r.liveTCP(false, cli, srv, sp, 443, "A", 1501, hello[1400:], 64, nil)
		r.now = start
	}
	runtime.GC()
	runtime.ReadMemStats(&ms1)
	held := r.c.proc.streamBytes
	t.Logf("%d flows, hello %d bytes: %d bytes held (%.0f a flow), heap +%d (%.0f a flow, the flow table included)",
		n, len(hello), held, float64(held)/n, ms1.HeapAlloc-ms0.HeapAlloc, float64(ms1.HeapAlloc-ms0.HeapAlloc)/n)
	if held < n*len(hello) || held > 2*n*len(hello) {
		t.Errorf("%d bytes held, want about %d", held, n*len(hello))
	}
	for i := range n {
		cli := netip.AddrFrom4([4]byte{198, 18, 5, byte(10 + i%200)})
		sp := uint16(20000 + i/200)
		r.liveIP(true, ipLayer(srv, cli, layers.IPProtocolTCP), &layers.TCP{SrcPort: 443, DstPort: layers.TCPPort(sp),
			Seq: 501, Ack: 101 + uint32(len(hello)), ACK: true, Window: 65535})
	}
	// They are kept ackedWait after the acknowledgement (an
	// acknowledgement lost on the LAN: TestSentAckedRetransmitted); a
	// packet of another flow past it runs the sweep.
	r.now = r.now.Add(ackedWait + sweepInterval + time.Second)
	r.liveTCP(false, netip.MustParseAddr("198.18.5.9"), srv, 19999, 443, "S", 100, nil, 64, nil)
	if held := r.c.proc.streamBytes; held != 0 {
		t.Errorf("%d bytes held ackedWait after the acknowledgements, want 0", held)
	}
}
