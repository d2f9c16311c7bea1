package e2e

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/internal/testnet"
)

// TestVLANTagOnParent: 802.1Q-tagged frames that reach a LAN interface
// which has no VLAN device of their ID (a trunk port given to --lan whole,
// or a VLAN the gateway does not serve) are not that interface's traffic:
// the kernel takes the tag off into the packet's metadata (the packet
// socket's auxdata), finds no VLAN device, and drops the packet. So does
// capture, which must not record a flow the gateway never forwarded. A
// priority-tagged frame (VLAN ID 0, 802.1p) is the interface's own, and
// an untagged one of course: the kernel forwards both and capture records
// both; but a priority tag over a VLAN's tag is that VLAN's (the kernel
// takes the priority tag off and judges the frame by the inner one), and
// dropped. It needs no 802.1Q in the kernel: the client writes the frames
// whole with a packet socket. Counted, before egressd and in audit mode:
// the UDP echo server's datagrams and capture's flows, by source port.
func TestVLANTagOnParent(t *testing.T) {
	tp := newTopo(t)
	gwMAC, err := net.ParseMAC(macOf(t, tp.gw, "lan0"))
	if err != nil {
		t.Fatal(err)
	}
	cliMAC, err := net.ParseMAC(macOf(t, tp.lan, "eth0"))
	if err != nil {
		t.Fatal(err)
	}
	// tcis: the frame's 802.1Q tags, outermost first (none: untagged;
	// 0x6000: priority 3, VLAN 0). The kernel takes a priority tag off
	// and judges the frame by the tag inside it, if any.
	frames := []struct {
		what   string
		tcis   []int
		echoed bool
	}{
		{"untagged", nil, true}, {"priority-tagged (VLAN 0)", []int{0x6000}, true}, {"tagged VLAN 10", []int{10}, false},
		{"priority-tagged over VLAN 10", []int{0x6000, 10}, false},
	}
	send := func(base int) {
		t.Helper()
		for i, f := range frames {
			if err := sendUDPFrame(tp.lan, "eth0", cliMAC, gwMAC, base+i, f.tcis...); err != nil {
				t.Fatalf("%s: %v", f.what, err)
			}
		}
	}
	// waitEchoes waits (5s at most) for the echo server to count want
	// more datagrams than before, then a moment for any more.
	waitEchoes := func(before, want int64) int64 {
		for deadline := time.Now().Add(5 * time.Second); tp.udpEchoes.Load()-before < want && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
		return tp.udpEchoes.Load() - before
	}
	wantEchoes := int64(0)
	for _, f := range frames {
		if f.echoed {
			wantEchoes++
		}
	}

	// Without egressd: the kernel forwards the untagged and the
	// priority-tagged frame, and drops the one of VLAN 10.
	before := tp.udpEchoes.Load()
	send(41000)
	if n := waitEchoes(before, wantEchoes); n != wantEchoes {
		t.Fatalf("without egressd the echo server got %d datagrams of the frames, want %d", n, wantEchoes)
	}

	d := newDaemon(t, tp, "audit")
	d.start()
	base := 42000
	before = tp.udpEchoes.Load()
	send(base)
	if n := waitEchoes(before, wantEchoes); n != wantEchoes {
		t.Errorf("audit mode: the echo server got %d datagrams of the frames, want %d", n, wantEchoes)
	}
	counters := d.captureCounters()
	// A clean stop ends the UDP flows: capture records them then.
	d.stop()
	evs := d.allEvents()
	for i, f := range frames {
		n := 0
		for _, ev := range evs {
			if ev.Kind == "flow" && ev.Source == "capture" && ev.Proto == "udp" && ev.ClientPort == base+i && ev.DestPort == udpDenyPort {
				n++
				if ev.Client != lanClient4 || ev.Dest != udpDenyIP || ev.ClientMAC != cliMAC.String() {
					t.Errorf("%s: %v mac %s, want from %s (%s) to %s", f.what, ev, ev.ClientMAC, lanClient4, cliMAC, udpDenyIP)
				}
			}
		}
		want := 0
		if f.echoed {
			want = 1
		}
		if n != want {
			t.Errorf("%s frame: capture recorded %d flows, want %d (the kernel forwarded it: %v)", f.what, n, want, f.echoed)
		}
	}
	if t.Failed() {
		t.Logf("capture: %s\nevents:\n%s", counters, d.events())
	}
}

// sendUDPFrame writes one Ethernet frame out of ns's interface dev with a
// packet socket: UDP from lanClient4, source port sport, to the echo
// server, behind 802.1Q tags with tcis, outermost first.
func sendUDPFrame(ns *testnet.NS, dev string, src, dst net.HardwareAddr, sport int, tcis ...int) error {
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: net.ParseIP(lanClient4).To4(), DstIP: net.ParseIP(udpDenyIP).To4()}
	udp := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: udpDenyPort}
	udp.SetNetworkLayerForChecksum(ip)
	ls := []gopacket.SerializableLayer{eth}
	for i, tci := range tcis {
		tag := &layers.Dot1Q{Priority: uint8(tci >> 13), VLANIdentifier: uint16(tci & 0xfff), Type: layers.EthernetTypeIPv4}
		if i < len(tcis)-1 {
			tag.Type = layers.EthernetTypeDot1Q
		}
		if i == 0 {
			eth.EthernetType = layers.EthernetTypeDot1Q
		}
		ls = append(ls, tag)
	}
	ls = append(ls, ip, udp, gopacket.Payload(fmt.Sprintf("frame from port %d", sport)))
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		return err
	}
	fs, err := openFrameSender(ns, dev)
	if err != nil {
		return err
	}
	defer fs.close()
	return fs.send(buf.Bytes())
}
