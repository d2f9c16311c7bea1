package capture

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/afpacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/internal/testnet"
	"egressd/policy"
)

// fakeSource is a capture socket that hands out scripted frames, then
// nothing (the ring's timeout). vlans, where it is as long as frames,
// are the VLAN IDs the kernel took off the frames into auxdata (-1: no
// tag).
type fakeSource struct {
	frames [][]byte
	times  []time.Time
	vlans  []int
}

func (f *fakeSource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	if len(f.frames) == 0 {
		return nil, gopacket.CaptureInfo{}, afpacket.ErrTimeout
	}
	b, ts := f.frames[0], f.times[0]
	f.frames, f.times = f.frames[1:], f.times[1:]
	ci := gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(b), Length: len(b)}
	if len(f.vlans) > 0 {
		if f.vlans[0] >= 0 {
			ci.AncillaryData = []any{afpacket.AncillaryVLAN{VLAN: f.vlans[0]}}
		}
		f.vlans = f.vlans[1:]
	}
	return b, ci, nil
}

func (f *fakeSource) KernelDrops() (uint64, error) { return 0, nil }
func (f *fakeSource) Close()                       {}

// udpFrame is an Ethernet frame of a UDP datagram.
func udpFrame(t testing.TB, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, payload []byte) []byte {
	t.Helper()
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
	u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	u.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: srcMAC, DstMAC: dstMAC, EthernetType: layers.EthernetTypeIPv4}, ip, u, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(buf.Bytes())
}

// TestSeveralSourcesForwardedOnce: a datagram the gateway forwards from
// one LAN interface to another crosses both capture sockets (in on the
// first, out of the second), and capture counts it once, on the
// interface it came in on (the earlier time stamp; at the same time, the
// frame the gateway did not send), whichever socket holds it first in
// the list: the flow between the
// two LANs has the bytes that were sent, not twice as many, and its
// client's MAC address, not the gateway's, which the copy sent out of
// the gateway carries. A flow seen on one interface only is untouched.
func TestSeveralSourcesForwardedOnce(t *testing.T) {
	var (
		macA   = net.HardwareAddr{0x02, 0, 0, 0, 0xa, 1} // the client on LAN A
		macB   = net.HardwareAddr{0x02, 0, 0, 0, 0xb, 1} // the host on LAN B
		macGWA = net.HardwareAddr{0x02, 0, 0, 0, 0xa, 0xfe}
		macGWB = net.HardwareAddr{0x02, 0, 0, 0, 0xb, 0xfe}
		cli    = netip.MustParseAddrPort("198.18.21.10:40000")
		peer   = netip.MustParseAddrPort("198.18.22.20:7000")
		bCli   = netip.MustParseAddrPort("198.18.22.20:40001")
		out    = netip.MustParseAddrPort("198.51.100.9:9000")
	)
	for _, order := range []struct{ bFirst, sameTime bool }{{true, false}, {false, false}, {true, true}, {false, true}} {
		bFirst := order.bFirst
		a, b := &fakeSource{}, &fakeSource{}
		at := time.Now()
		add := func(s *fakeSource, frame []byte, copied bool) {
			if !copied || !order.sameTime {
				at = at.Add(time.Millisecond)
			}
			s.frames, s.times = append(s.frames, frame), append(s.times, at)
		}
		for range 3 {
			req, resp := []byte("ping"), []byte("pong!")
			// In on A from the client, out of B from the gateway.
			add(a, udpFrame(t, macA, macGWA, cli, peer, req), false)
			add(b, udpFrame(t, macGWB, macB, cli, peer, req), true)
			// The reply: in on B from the host, out of A.
			add(b, udpFrame(t, macB, macGWB, peer, cli, resp), false)
			add(a, udpFrame(t, macGWA, macA, peer, cli, resp), true)
		}
		// B's host to the internet: on B only.
		add(b, udpFrame(t, macB, macGWB, bCli, out, []byte("hello")), false)
		add(b, udpFrame(t, macGWB, macB, out, bCli, []byte("hi")), false)

		rec := &recorder{}
		c, err := New(Config{Interfaces: []string{"lana", "lanb"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
		if err != nil {
			t.Fatal(err)
		}
		srcs := []source{{name: "lana", h: a, mac: [6]byte(macGWA), hasMAC: true}, {name: "lanb", h: b, mac: [6]byte(macGWB), hasMAC: true}}
		if bFirst {
			srcs[0], srcs[1] = srcs[1], srcs[0]
		}
		c.sources = srcs
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		deadline := time.Now().Add(10 * time.Second)
		for c.Stats().Packets < 14 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		evs := rec.all()
		var between, toNet []audit.Event
		for _, ev := range evs {
			switch {
			case ev.Kind != audit.KindFlow:
			case ev.DestPort == peer.Port():
				between = append(between, ev)
			case ev.DestPort == out.Port():
				toNet = append(toNet, ev)
			}
		}
		if len(between) != 1 || len(toNet) != 1 {
			t.Fatalf("order %+v: %d events of the flow between the LANs, %d of B's flow out, want 1 each: %+v", order, len(between), len(toNet), evs)
		}
		ev := between[0]
		if ev.Client != cli.Addr() || ev.ClientPort != cli.Port() || ev.ClientMAC != macA.String() || ev.BytesOut != 12 || ev.BytesIn != 15 {
			t.Errorf("order %+v: flow between the LANs: client %s:%d %s, %d bytes out, %d in; want %s %s, 12 and 15", order,
				ev.Client, ev.ClientPort, ev.ClientMAC, ev.BytesOut, ev.BytesIn, cli, macA)
		}
		if ev := toNet[0]; ev.Client != bCli.Addr() || ev.ClientMAC != macB.String() || ev.BytesOut != 5 || ev.BytesIn != 2 {
			t.Errorf("order %+v: B's flow out: client %s %s, %d bytes out, %d in; want %s %s, 5 and 2", order, ev.Client, ev.ClientMAC, ev.BytesOut, ev.BytesIn, bCli.Addr(), macB)
		}
		if st := c.Stats(); st.Copies != 6 || st.Packets != 14 {
			t.Errorf("order %+v: %d copies of %d packets, want 6 of 14", order, st.Copies, st.Packets)
		}
	}
}

// TestLiveSeveralInterfaces captures on two LAN interfaces of a gateway
// namespace that forwards between them, and on a third that does not
// exist: Open says which one it could not open and the capture runs on
// the other two. A UDP exchange and a TCP connection between hosts of
// the two LANs (each packet crosses both sockets) are each one flow,
// with its client, the client's MAC address and the bytes sent.
func TestLiveSeveralInterfaces(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.New(t, "h1capa")
	b := testnet.New(t, "h1capb")
	gw := testnet.New(t, "h1capg")
	testnet.Link(t, a, "eth0", []string{"198.18.21.10/24"}, gw, "lan1", []string{"198.18.21.1/24"})
	testnet.Link(t, b, "eth0", []string{"198.18.22.20/24"}, gw, "lan2", []string{"198.18.22.1/24"})
	a.MustRun("ip", "route", "add", "default", "via", "198.18.21.1")
	b.MustRun("ip", "route", "add", "default", "via", "198.18.22.1")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	macOf := func(ns *testnet.NS) string {
		f := strings.Fields(ns.MustRun("cat", "/sys/class/net/eth0/address"))
		if len(f) != 1 {
			t.Fatalf("MAC address of eth0 in %s: %q", ns.Name, f)
		}
		return f[0]
	}
	macA, macB := macOf(a), macOf(b)

	udpEcho(t, b, "198.18.22.20:7000")
	ln, err := a.Listen("tcp", "198.18.21.10:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			buf := make([]byte, 16)
			n, _ := c.Read(buf)
			c.Write(append([]byte("got "), buf[:n]...))
			c.Close()
		}
	}()

	rec := &recorder{}
	c, err := New(Config{Interfaces: []string{"lan1", "nosuch0", "lan2"}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	err = gw.Do(c.Open)
	if err == nil || !strings.Contains(err.Error(), "nosuch0") || strings.Contains(err.Error(), "lan1") || strings.Contains(err.Error(), "lan2") {
		t.Errorf("Open: %v; want an error naming nosuch0 only", err)
	}
	if got := c.Listening(); strings.Join(got, ",") != "lan1,lan2" {
		t.Fatalf("listening on %q, want lan1 and lan2", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	lc := &liveCapture{Capture: c, cancel: cancel, errc: make(chan error, 1)}
	go func() { lc.errc <- c.Run(ctx) }()

	uc, err := a.DialContext(context.Background(), "udp", "198.18.22.20:7000")
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	for range 3 {
		if err := askWithin(uc, 3*time.Second, []byte("ping")); err != nil {
			t.Fatalf("UDP from A to B: %v", err)
		}
	}
	tc, err := b.DialContext(context.Background(), "tcp", "198.18.21.10:8080")
	if err != nil {
		t.Fatal(err)
	}
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	tc.Write([]byte("hello"))
	buf := make([]byte, 64)
	n, _ := tc.Read(buf)
	tc.Close()
	if string(buf[:n]) != "got hello" {
		t.Fatalf("TCP from B to A: %q", buf[:n])
	}
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().Flows < 1 && time.Now().Before(deadline) { // the TCP flow, ended by FIN
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // TPACKET_V3 hands blocks over after 64 ms
	if err := lc.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	var udp, tcp []audit.Event
	for _, ev := range rec.all() {
		switch {
		case ev.Kind != audit.KindFlow:
		case ev.DestPort == 7000:
			udp = append(udp, ev)
		case ev.DestPort == 8080:
			tcp = append(tcp, ev)
		}
	}
	if len(udp) != 1 || len(tcp) != 1 {
		t.Fatalf("%d UDP and %d TCP flow events between the LANs, want 1 each: %+v", len(udp), len(tcp), rec.all())
	}
	if ev := udp[0]; ev.Client != netip.MustParseAddr("198.18.21.10") || ev.ClientMAC != macA || ev.BytesOut != 12 || ev.BytesIn != 27 {
		t.Errorf("UDP from A to B: client %s %s, %d bytes out, %d in; want 198.18.21.10 %s, 12 and 27", ev.Client, ev.ClientMAC, ev.BytesOut, ev.BytesIn, macA)
	}
	if ev := tcp[0]; ev.Client != netip.MustParseAddr("198.18.22.20") || ev.ClientMAC != macB || ev.BytesOut != 5 || ev.BytesIn != 9 {
		t.Errorf("TCP from B to A: client %s %s, %d bytes out, %d in; want 198.18.22.20 %s, 5 and 9", ev.Client, ev.ClientMAC, ev.BytesOut, ev.BytesIn, macB)
	}
	if st := c.Stats(); st.Copies == 0 {
		t.Errorf("no copies counted: %+v", st)
	}
}

// udpEcho answers each datagram to addr in ns with "echo:" and it, until
// the test ends.
func udpEcho(t *testing.T, ns *testnet.NS, addr string) {
	t.Helper()
	pc, err := ns.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	testnet.UDPEcho(t, pc, func(p []byte, _ net.Addr) []byte { return append([]byte("echo:"), p...) })
}

// askWithin sends req on c and waits up to timeout for an echo of it.
func askWithin(c net.Conn, timeout time.Duration, req []byte) error {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(req); err != nil {
		return err
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != "echo:"+string(req) {
		return errors.New("capture test: wrong answer " + string(buf[:n]))
	}
	return nil
}

// TestSeveralSourcesClockSetBack: the wall clock set back (NTP stepping a
// clock that ran ahead) leaves the packets already in a ring stamped
// after the new time. With another socket that has nothing to hand over,
// such a packet must still go into the pipeline, not wait until the clock
// has caught up with its stamp (an hour here), holding its socket's ring
// and blinding capture on that interface the while.
func TestSeveralSourcesClockSetBack(t *testing.T) {
	var (
		macA   = net.HardwareAddr{0x02, 0, 0, 0, 0xa, 1}
		macGWA = net.HardwareAddr{0x02, 0, 0, 0, 0xa, 0xfe}
		macGWB = net.HardwareAddr{0x02, 0, 0, 0, 0xb, 0xfe}
		cli    = netip.MustParseAddrPort("198.18.21.10:40000")
		out    = netip.MustParseAddrPort("198.51.100.9:9000")
	)
	a, b := &fakeSource{}, &fakeSource{}
	ahead := time.Now().Add(time.Hour) // stamped before the clock went back an hour
	for i := range 3 {
		a.frames = append(a.frames, udpFrame(t, macA, macGWA, cli, out, []byte("ping")))
		a.times = append(a.times, ahead.Add(time.Duration(i)*time.Millisecond))
	}
	c, err := New(Config{Interfaces: []string{"lana", "lanb"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}})
	if err != nil {
		t.Fatal(err)
	}
	c.sources = []source{{name: "lana", h: a, mac: [6]byte(macGWA), hasMAC: true}, {name: "lanb", h: b, mac: [6]byte(macGWB), hasMAC: true}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for c.Stats().Packets < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := c.Stats().Packets; n != 3 {
		t.Errorf("%d of 3 packets stamped before the clock went back read while the other socket is idle", n)
	}
}
