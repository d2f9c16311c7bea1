package capture

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/policy"
)

// The VLAN tests' client and gateway MAC addresses, and the destination
// of the client's datagrams.
var (
	vlanMACC  = net.HardwareAddr{0x02, 0, 0, 0, 0xc, 1}
	vlanMACGW = net.HardwareAddr{0x02, 0, 0, 0, 0xc, 0xfe}
	vlanDst   = netip.MustParseAddrPort("198.51.100.9:9000")
)

// runLAN0 runs a capture of testPolicy on lan0, the interface of
// vlanMACGW, over src until it has read n packets (10 s at most), its
// metrics registered with reg (nil: none); its events are rec's.
func runLAN0(t *testing.T, src *fakeSource, n int, reg prometheus.Registerer) (c *Capture, rec *recorder) {
	t.Helper()
	rec = &recorder{}
	c, err := New(Config{Interfaces: []string{"lan0"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	c.sources = []source{{name: "lan0", h: src, mac: [6]byte(vlanMACGW), hasMAC: true}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	for deadline := time.Now().Add(10 * time.Second); c.Stats().Packets < uint64(n) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return c, rec
}

// flowsFrom counts the flow events of client port port.
func flowsFrom(evs []audit.Event, port uint16) int {
	n := 0
	for _, ev := range evs {
		if ev.Kind == audit.KindFlow && ev.ClientPort == port {
			n++
		}
	}
	return n
}

// TestOtherVLANSkipped: a frame whose 802.1Q tag the kernel took off into
// the socket's auxdata, with a VLAN ID that is not 0, belongs to a VLAN
// device on the interface (its own socket sees it again, untagged) or, if
// the interface has none of that ID, is dropped by the kernel: it is no
// traffic of the interface, and capture records no flow for it. An
// untagged frame and a priority-tagged one (VLAN ID 0, 802.1p) are the
// interface's: one flow each (e2e/TestVLANTagOnParent sees the kernel do
// the same).
func TestOtherVLANSkipped(t *testing.T) {
	frames := []struct {
		what string
		vlan int
		port uint16
		want int
	}{{"untagged", -1, 40000, 1}, {"VLAN 0", 0, 40001, 1}, {"VLAN 10", 10, 40002, 0}, {"VLAN 4094", 4094, 40003, 0}}
	src := &fakeSource{}
	at := time.Now()
	for _, f := range frames {
		at = at.Add(time.Millisecond)
		cli := netip.AddrPortFrom(netip.MustParseAddr("198.18.21.10"), f.port)
		src.frames = append(src.frames, udpFrame(t, vlanMACC, vlanMACGW, cli, vlanDst, []byte("ping")))
		src.times = append(src.times, at)
		src.vlans = append(src.vlans, f.vlan)
	}
	reg := prometheus.NewRegistry()
	c, rec := runLAN0(t, src, len(frames), reg)
	// An operator sees them: a trunk given to --lan whole shows why
	// capture records none of its VLANs' traffic.
	if v := counterValue(t, reg, "egress_capture_other_vlan_frames_total"); v != 2 {
		t.Errorf("egress_capture_other_vlan_frames_total %v, want 2", v)
	}
	evs := rec.all()
	for _, f := range frames {
		if n := flowsFrom(evs, f.port); n != f.want {
			t.Errorf("%s frame: %d flows, want %d", f.what, n, f.want)
		}
	}
	if st := c.Stats(); st.Packets != uint64(len(frames)) || st.OtherVLAN != 2 {
		t.Errorf("%d packets read, %d of another VLAN; want %d and 2", st.Packets, st.OtherVLAN, len(frames))
	}
}

// withTags puts 802.1Q (or 802.1ad, tpid) tags into an untagged Ethernet
// frame behind its MAC addresses, outermost first: each tag is a TCI.
func withTags(frame []byte, tpid uint16, tcis ...uint16) []byte {
	out := append([]byte{}, frame[:12]...)
	for _, tci := range tcis {
		out = append(out, byte(tpid>>8), byte(tpid), byte(tci>>8), byte(tci))
	}
	return append(out, frame[12:]...)
}

// TestInnerVLANSkipped: the kernel takes only the outer tag off into
// auxdata. Where that is a priority tag (VLAN ID 0) over another tag, it
// takes the inner tag off too and judges the frame by it (net/core/dev.c,
// __netif_receive_skb_core, check_vlan_id): a VLAN ID not 0 there is a
// VLAN device's frame or, with none, dropped (PACKET_OTHERHOST). Capture
// sees that inner tag in-line, and records no flow for it either.
// Priority tags over the IP header are the interface's own. An in-line
// tag with no auxdata is decoded as before: a VLAN device made with
// reorder_hdr off hands its sockets its own frames so (vlan_do_receive).
func TestInnerVLANSkipped(t *testing.T) {
	frames := []struct {
		what string
		aux  int // the auxdata's VLAN ID, -1: none
		tpid uint16
		tags []uint16 // in-line tags' TCIs
		port uint16
		want int
	}{
		{"priority tag over VLAN 10", 0, 0x8100, []uint16{10}, 40100, 0},
		{"802.1ad priority tag over VLAN 10", 0, 0x88a8, []uint16{0x2000 | 10}, 40101, 0},
		{"two priority tags", 0, 0x8100, []uint16{0x6000}, 40102, 1},
		{"in-line VLAN 10, no auxdata", -1, 0x8100, []uint16{10}, 40103, 1},
		{"in-line priority tag, no auxdata", -1, 0x8100, []uint16{0x6000}, 40104, 1},
		{"priority tag, untagged inside", 0, 0, nil, 40105, 1},
	}
	src := &fakeSource{}
	at := time.Now()
	for _, f := range frames {
		at = at.Add(time.Millisecond)
		cli := netip.AddrPortFrom(netip.MustParseAddr("198.18.21.10"), f.port)
		src.frames = append(src.frames, withTags(udpFrame(t, vlanMACC, vlanMACGW, cli, vlanDst, []byte("ping")), f.tpid, f.tags...))
		src.times = append(src.times, at)
		src.vlans = append(src.vlans, f.aux)
	}
	c, rec := runLAN0(t, src, len(frames), nil)
	evs := rec.all()
	skipped := uint64(0)
	for _, f := range frames {
		if n := flowsFrom(evs, f.port); n != f.want {
			t.Errorf("%s: %d flows, want %d", f.what, n, f.want)
		}
		if f.want == 0 {
			skipped++
		}
	}
	if st := c.Stats(); st.Packets != uint64(len(frames)) || st.OtherVLAN != skipped || st.Malformed != 0 {
		t.Errorf("%d packets read, %d of another VLAN, %d malformed; want %d, %d and 0", st.Packets, st.OtherVLAN, st.Malformed, len(frames), skipped)
	}
}

// counterValue is the counter name's value as a scrape of reg reads it
// (-1: no such metric).
func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return -1
}
