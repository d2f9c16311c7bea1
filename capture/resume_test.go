package capture

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// resumeProc is a capture pipeline as Run drives it on one LAN socket
// (source 1, the gateway's MAC macGW): frames are fed to it directly,
// at packet times the test picks (no sleeping).
func resumeProc(t *testing.T, cfg Config, mode policy.Mode) (*proc, *recorder) {
	t.Helper()
	rec := &recorder{}
	cfg.Interfaces, cfg.OwnAddrs = []string{"lan1"}, []netip.Addr{}
	c, err := New(cfg, Deps{Policy: policy.NewStore(testEngine(t, testPolicy).WithMode(mode)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	p := c.proc
	p.src = 1
	p.setSources([]source{{name: "lan1", mac: [6]byte(macGW), hasMAC: true}})
	return p, rec
}

// tcpFrameMAC is a TCP segment in an Ethernet frame from srcMAC.
func tcpFrameMAC(t *testing.T, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, flags string, seq, ack uint32, data []byte) []byte {
	t.Helper()
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), Seq: seq, Ack: ack, Window: 65535,
		SYN: bytes.ContainsRune([]byte(flags), 'S'), ACK: bytes.ContainsRune([]byte(flags), 'A')}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: srcMAC, DstMAC: dstMAC, EthernetType: layers.EthernetTypeIPv4}, ip, tcp, gopacket.Payload(data)); err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(buf.Bytes())
}

// flowsOf lists the recorded flows as "client > dest proto reason".
func flowsOf(evs []audit.Event) []string {
	var out []string
	for _, ev := range evs {
		if ev.Kind == audit.KindFlow {
			out = append(out, netip.AddrPortFrom(ev.Client, ev.ClientPort).String()+" > "+netip.AddrPortFrom(ev.Dest, ev.DestPort).String()+" "+ev.Proto+" "+ev.Reason)
		}
	}
	return out
}

var (
	resLAN    = netip.MustParseAddrPort("198.18.61.10:40123")
	resWAN    = netip.MustParseAddrPort("203.0.113.61:3478")
	resOther  = netip.MustParseAddrPort("198.18.61.11:40500")
	resStart  = time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	resNoRule = " udp " + policy.ReasonNoRule
)

// out is a datagram from the LAN host (its own MAC), in is one from the
// WAN host the gateway sends out of the LAN interface (the gateway's).
func resOut(t *testing.T, p *proc, from, to netip.AddrPort, at time.Duration) {
	p.packet(udpFrame(t, macClient, macGW, from, to, []byte("out")), resStart.Add(at), layers.LinkTypeEthernet)
}

func resIn(t *testing.T, p *proc, from, to netip.AddrPort, at time.Duration) {
	p.packet(udpFrame(t, macGW, macClient, from, to, []byte("in")), resStart.Add(at), layers.LinkTypeEthernet)
}

// TestResumedUDPFromWANIsNotInbound: a LAN host's UDP exchange (a game or
// VoIP session, STUN's port) silent past capture's 60 s UDP idle time but
// inside conntrack's (120 s once replied; 180 s on older kernels)
// resumes from the WAN side.
// Capture ended the flow; the enforce firewall passes the resumed
// datagram (conntrack still holds the entry), so it is the LAN host's
// exchange again, in both modes: two flows of the LAN host, none
// inbound. Past conntrack's timeout the same datagram starts a new flow
// from outside, which enforce drops: inbound.
func TestResumedUDPFromWANIsNotInbound(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		p, rec := resumeProc(t, Config{}, mode)
		resOut(t, p, resLAN, resWAN, 0)
		resIn(t, p, resWAN, resLAN, time.Second)
		// 90 s of silence: the WAN host speaks first.
		resIn(t, p, resWAN, resLAN, 91*time.Second)
		resOut(t, p, resLAN, resWAN, 92*time.Second)
		// 200 s more: conntrack forgot it too.
		resIn(t, p, resWAN, resLAN, 292*time.Second)
		p.flush("end-of-capture")
		got := flowsOf(rec.all())
		want := []string{resLAN.String() + " > " + resWAN.String() + resNoRule, resLAN.String() + " > " + resWAN.String() + resNoRule}
		wantInbound := uint64(1)
		if mode == policy.ModeAudit {
			want = append(want, resWAN.String()+" > "+resLAN.String()+" udp "+ReasonInbound)
		}
		if !sameFlows(got, want) || p.stats.inbound.Load() != wantInbound {
			t.Errorf("%s: flows %q, %d inbound; want %q, %d inbound", mode, got, p.stats.inbound.Load(), want, wantInbound)
		}
	}
}

// TestResumedInboundFromLANStaysInbound is the mirror case: a WAN host's
// exchange with a LAN host (inbound) silent past capture's idle time and
// resumed by the LAN host is still the WAN host's inbound exchange, not
// the LAN host's egress (which audit mode would list as a drop that
// enforce never makes: the datagram is a reply). UDP, and TCP past
// capture's 5 min TCP idle time (conntrack keeps an established
// connection 5 days) resumed by the LAN server's data.
func TestResumedInboundFromLANStaysInbound(t *testing.T) {
	p, rec := resumeProc(t, Config{}, policy.ModeAudit)
	resIn(t, p, resWAN, resLAN, 0)
	resOut(t, p, resLAN, resWAN, time.Second)
	resOut(t, p, resLAN, resWAN, 91*time.Second)
	resIn(t, p, resWAN, resLAN, 92*time.Second)

	wanTCP := netip.MustParseAddrPort("203.0.113.62:8443")
	lanTCP := netip.MustParseAddrPort("198.18.61.10:2222")
	tcpAt := func(from, to netip.AddrPort, mac net.HardwareAddr, flags string, seq, ack uint32, data string, at time.Duration) {
		p.packet(tcpFrameMAC(t, mac, macClient, from, to, flags, seq, ack, []byte(data)), resStart.Add(at), layers.LinkTypeEthernet)
	}
	tcpAt(wanTCP, lanTCP, macGW, "S", 100, 0, "", 100*time.Second)
	tcpAt(lanTCP, wanTCP, macClient, "SA", 500, 101, "", 100*time.Second)
	tcpAt(wanTCP, lanTCP, macGW, "A", 101, 501, "hi", 101*time.Second)
	tcpAt(lanTCP, wanTCP, macClient, "A", 501, 103, "SSH-2.0", 101*time.Second)
	// 10 min of silence, then the LAN server speaks first.
	tcpAt(lanTCP, wanTCP, macClient, "A", 508, 103, "more", 701*time.Second)
	tcpAt(wanTCP, lanTCP, macGW, "A", 103, 512, "ok", 701*time.Second)
	p.flush("end-of-capture")

	got := flowsOf(rec.all())
	in := resWAN.String() + " > " + resLAN.String() + " udp " + ReasonInbound
	inTCP := wanTCP.String() + " > " + lanTCP.String() + " tcp " + ReasonInbound
	want := []string{in, in, inTCP, inTCP}
	if !sameFlows(got, want) || p.stats.inbound.Load() != 4 {
		t.Errorf("flows %q, %d inbound; want %q, 4 inbound", got, p.stats.inbound.Load(), want)
	}
}

// TestEvictedFlowResumesOriented: a flow the full table evicted and that
// then resumes from the other side continues as what it was: the LAN
// host's exchange answered from the WAN is not inbound, a WAN host's
// exchange answered by the LAN host is not the LAN host's egress. A
// datagram from the WAN no flow knows stays inbound.
func TestEvictedFlowResumesOriented(t *testing.T) {
	p, rec := resumeProc(t, Config{MaxFlows: 1}, policy.ModeAudit)
	resOut(t, p, resLAN, resWAN, 0)
	resIn(t, p, resWAN, resLAN, 0)
	wan2 := netip.MustParseAddrPort("203.0.113.63:5000")
	resIn(t, p, wan2, resOther, time.Second) // evicts the LAN host's flow
	resOut(t, p, resOther, wan2, time.Second)
	resIn(t, p, resWAN, resLAN, 2*time.Second) // evicts wan2's
	resOut(t, p, resOther, wan2, 3*time.Second)
	resIn(t, p, netip.MustParseAddrPort("203.0.113.64:5000"), resLAN, 4*time.Second)
	p.flush("end-of-capture")

	got := flowsOf(rec.all())
	egress := resLAN.String() + " > " + resWAN.String() + resNoRule
	in2 := wan2.String() + " > " + resOther.String() + " udp " + ReasonInbound
	want := []string{egress, egress, in2, in2, "203.0.113.64:5000 > " + resLAN.String() + " udp " + ReasonInbound}
	if !sameFlows(got, want) || p.stats.evicted.Load() != 4 || p.stats.inbound.Load() != 3 {
		t.Errorf("flows %q, %d evicted, %d inbound; want %q, 4 evicted, 3 inbound", got, p.stats.evicted.Load(), p.stats.inbound.Load(), want)
	}
}

// TestResumeMemoryBounded: capture remembers at most MaxFlows ended
// flows, and forgets each once conntrack would have.
func TestResumeMemoryBounded(t *testing.T) {
	p, _ := resumeProc(t, Config{MaxFlows: 8}, policy.ModeAudit)
	for i := range 100 {
		cli := netip.AddrPortFrom(resLAN.Addr(), uint16(41000+i))
		resOut(t, p, cli, resWAN, time.Duration(i)*time.Millisecond)
		resIn(t, p, resWAN, cli, time.Duration(i)*time.Millisecond)
		if n := len(p.resumable); n > 8 {
			t.Fatalf("after %d flows: %d remembered, want at most 8", i+1, n)
		}
	}
	if len(p.resumable) == 0 {
		t.Fatal("no evicted flow remembered")
	}
	p.now = resStart.Add(10 * time.Minute)
	p.sweep()
	if n := len(p.resumable); n != 0 {
		t.Errorf("%d flows remembered 10 min after their last packet, want 0", n)
	}
}

// sameFlows compares two lists of flows as multisets.
func sameFlows(got, want []string) bool {
	if len(got) != len(want) {
		return false
	}
	m := map[string]int{}
	for _, s := range want {
		m[s]++
	}
	for _, s := range got {
		if m[s] == 0 {
			return false
		}
		m[s]--
	}
	return true
}

// TestResumedTCPSYNStartsAfresh: a TCP SYN says who starts a connection,
// whatever capture remembers of an earlier one on the same port pair:
// the LAN host's SYN after a WAN host's connection to it went idle is
// the LAN host's egress, not the inbound connection resumed.
func TestResumedTCPSYNStartsAfresh(t *testing.T) {
	p, rec := resumeProc(t, Config{}, policy.ModeAudit)
	wanTCP := netip.MustParseAddrPort("203.0.113.66:8443")
	lanTCP := netip.MustParseAddrPort("198.18.61.10:2222")
	tcpAt := func(from, to netip.AddrPort, mac net.HardwareAddr, flags string, seq, ack uint32, data string, at time.Duration) {
		p.packet(tcpFrameMAC(t, mac, macClient, from, to, flags, seq, ack, []byte(data)), resStart.Add(at), layers.LinkTypeEthernet)
	}
	tcpAt(wanTCP, lanTCP, macGW, "S", 100, 0, "", 0)
	tcpAt(lanTCP, wanTCP, macClient, "SA", 500, 101, "", 0)
	tcpAt(wanTCP, lanTCP, macGW, "A", 101, 501, "hi", time.Second)
	tcpAt(lanTCP, wanTCP, macClient, "SYN", 900, 0, "", 601*time.Second)
	tcpAt(wanTCP, lanTCP, macGW, "SA", 300, 901, "", 601*time.Second)
	p.flush("end-of-capture")
	got := flowsOf(rec.all())
	want := []string{wanTCP.String() + " > " + lanTCP.String() + " tcp " + ReasonInbound, lanTCP.String() + " > " + wanTCP.String() + " tcp " + policy.ReasonNoRule}
	if !sameFlows(got, want) || p.stats.inbound.Load() != 1 {
		t.Errorf("flows %q, %d inbound; want %q, 1 inbound", got, p.stats.inbound.Load(), want)
	}
}

// ipFrame is an IPv4 packet of protocol proto in an Ethernet frame.
func ipFrame(t *testing.T, srcMAC, dstMAC net.HardwareAddr, src, dst netip.Addr, proto layers.IPProtocol, payload []byte) []byte {
	t.Helper()
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: srcMAC, DstMAC: dstMAC, EthernetType: layers.EthernetTypeIPv4}, ip, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(buf.Bytes())
}

// TestResumedOtherProtocolFromWANIsNotInbound: a LAN host's GRE or ESP
// tunnel (another IP protocol, other.go) silent past capture's 60 s idle
// time and resumed by the WAN peer is the LAN host's flow again, as a
// UDP exchange is (conntrack holds a replied GRE flow 180 s, an ESP one
// as any unknown protocol 600 s): not an inbound flow from the peer.
// Past that, the peer's packet starts an inbound flow. The mirror case,
// an inbound tunnel the LAN host resumes, stays inbound.
func TestResumedOtherProtocolFromWANIsNotInbound(t *testing.T) {
	lan, wan := resLAN.Addr(), resWAN.Addr()
	for _, proto := range []layers.IPProtocol{layers.IPProtocolGRE, layers.IPProtocolESP} {
		p, rec := resumeProc(t, Config{}, policy.ModeAudit)
		name := protoName(uint8(proto))
		out := func(at time.Duration) {
			p.packet(ipFrame(t, macClient, macGW, lan, wan, proto, []byte("out")), resStart.Add(at), layers.LinkTypeEthernet)
		}
		in := func(at time.Duration) {
			p.packet(ipFrame(t, macGW, macClient, wan, lan, proto, []byte("in")), resStart.Add(at), layers.LinkTypeEthernet)
		}
		out(0)
		in(time.Second)
		in(91 * time.Second) // 90 s of silence: the peer speaks first
		out(92 * time.Second)
		in(1000 * time.Second) // conntrack forgot it too
		p.flush("end-of-capture")
		lanFlow := netip.AddrPortFrom(lan, 0).String() + " > " + netip.AddrPortFrom(wan, 0).String() + " " + name + " " + ReasonProtocol
		want := []string{lanFlow, lanFlow, netip.AddrPortFrom(wan, 0).String() + " > " + netip.AddrPortFrom(lan, 0).String() + " " + name + " " + ReasonInbound}
		if got := flowsOf(rec.all()); !sameFlows(got, want) || p.stats.inbound.Load() != 1 {
			t.Errorf("%s: flows %q, %d inbound; want %q, 1 inbound", name, got, p.stats.inbound.Load(), want)
		}
	}

	// The mirror: the peer's tunnel to the LAN host, resumed by it.
	p, rec := resumeProc(t, Config{}, policy.ModeAudit)
	p.packet(ipFrame(t, macGW, macClient, wan, lan, layers.IPProtocolGRE, []byte("in")), resStart, layers.LinkTypeEthernet)
	p.packet(ipFrame(t, macClient, macGW, lan, wan, layers.IPProtocolGRE, []byte("out")), resStart.Add(time.Second), layers.LinkTypeEthernet)
	p.packet(ipFrame(t, macClient, macGW, lan, wan, layers.IPProtocolGRE, []byte("out")), resStart.Add(91*time.Second), layers.LinkTypeEthernet)
	p.flush("end-of-capture")
	inb := netip.AddrPortFrom(wan, 0).String() + " > " + netip.AddrPortFrom(lan, 0).String() + " gre " + ReasonInbound
	if got := flowsOf(rec.all()); !sameFlows(got, []string{inb, inb}) {
		t.Errorf("inbound GRE resumed from the LAN: flows %q; want %q twice", got, inb)
	}
}

// TestResumeForgetsUnansweredSYNs: a LAN client's SYNs that nobody
// answered (a SYN flood: 65,536 of them evicted a round) are not kept:
// their next packet, a SYN or the server's SYN-ACK, says who the client
// is, and the memory cost the flooded daemon what it needs at its stop
// under a memory limit (e2e TestMemoryMaxUnderFlood was OOM-killed at
// SIGTERM). An answered connection evicted is still kept.
func TestResumeForgetsUnansweredSYNs(t *testing.T) {
	p, _ := resumeProc(t, Config{MaxFlows: 8}, policy.ModeEnforce)
	srv := netip.MustParseAddrPort("203.0.113.62:443")
	for i := range 64 {
		cli := netip.AddrPortFrom(resLAN.Addr(), uint16(42000+i))
		p.packet(tcpFrameMAC(t, macClient, macGW, cli, srv, "S", 1, 0, nil), resStart.Add(time.Duration(i)*time.Millisecond), layers.LinkTypeEthernet)
	}
	if n := len(p.resumable); n != 0 {
		t.Errorf("%d unanswered SYNs remembered after their eviction, want 0", n)
	}
	for i := range 16 {
		cli := netip.AddrPortFrom(resLAN.Addr(), uint16(43000+i))
		at := resStart.Add(time.Second + time.Duration(i)*time.Millisecond)
		p.packet(tcpFrameMAC(t, macClient, macGW, cli, srv, "S", 1, 0, nil), at, layers.LinkTypeEthernet)
		p.packet(tcpFrameMAC(t, macGW, macClient, srv, cli, "SA", 9, 2, nil), at, layers.LinkTypeEthernet)
	}
	if len(p.resumable) == 0 {
		t.Error("no answered connection remembered after its eviction")
	}
}
