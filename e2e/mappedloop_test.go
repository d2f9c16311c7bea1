package e2e

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// mappedLoopPolicy names the gateway's loopback on 80/tcp and opens
// 0.0.0.0/0 on 443/tcp: both ports the transparent proxy takes.
const mappedLoopPolicy = `mode: enforce
rules:
  - name: m-loop
    to: ["127.0.0.1/32"]
    ports: [80/tcp]
  - name: m-wide
    to: ["0.0.0.0/0"]
    ports: [443/tcp]
`

// TestMappedLoopbackTransparent: a LAN client's IPv6 TCP to the
// IPv4-mapped ::ffff:127.0.0.1, on a port the transparent proxy takes.
// Linux drops an IPv6 packet with a mapped source (ip6_rcv_core), not
// one with a mapped destination, and the antispoof chain's loopback rule
// is IPv4's: the SYN is REDIRECTed to the proxy, whose original
// destination reads 127.0.0.1. From the LAN, loopback is refused on every
// protocol whatever the rules (policy.LANRefuses): the proxy must not
// dial the gateway's 127.0.0.1, under a rule naming 127.0.0.1/32 (port
// 80) or not (443, under 0.0.0.0/0). The client's kernel cannot send
// such a SYN (connect on a v6-only socket refuses a mapped address, a
// dual-stack one sends IPv4): the handshake is the test's own, over a
// packet socket.
func TestMappedLoopbackTransparent(t *testing.T) {
	tp := newTopo(t)
	svc := startLoopServices(t, tp, []string{"80", "443"}, nil)
	// The client's kernel would reset the proxy's SYN-ACK (no socket of
	// its own has the flow): the handshake is the packet socket's.
	tp.lan.MustRun("nft", "add table ip6 e2emapped")
	tp.lan.MustRun("nft", "add chain ip6 e2emapped pre { type filter hook prerouting priority -300 ; }")
	tp.lan.MustRun("nft", "add rule ip6 e2emapped pre ip6 saddr ::ffff:0.0.0.0/96 drop")
	d := newDaemon(t, tp, "enforce")
	d.writePolicy([]byte(mappedLoopPolicy))
	d.start()
	ports := []uint16{80, 443}
	for i, port := range ports {
		accepted, err := mappedHandshake(tp, uint16(40000+i), port)
		if err != nil {
			t.Fatalf("handshake to port %d: %v", port, err)
		}
		if !accepted {
			t.Fatalf("no SYN-ACK from ::ffff:127.0.0.1:%d: the proxy did not take the flow (the test would prove nothing)\n%s", port, d.logs())
		}
	}
	// The proxy decides once it has the request, then dials.
	time.Sleep(2 * time.Second)
	d.stop()
	for _, port := range ports {
		if n := svc.hits(fmt.Sprint(port), "tcp"); n != 0 {
			t.Errorf("the gateway's 127.0.0.1:%d reached %d times from the LAN by ::ffff:127.0.0.1", port, n)
		}
		seen := false
		for _, ev := range d.allEvents() {
			if ev.Kind != "flow" || ev.Dest != "127.0.0.1" || ev.DestPort != int(port) {
				continue
			}
			seen = true
			if ev.Verdict != "deny" {
				t.Errorf("%v: want deny", ev)
			}
		}
		if !seen {
			t.Errorf("no flow event to 127.0.0.1:%d", port)
		}
	}
	if t.Failed() {
		t.Logf("events:\n%s\nlog:\n%s", d.events(), d.logs())
	}
}

// mappedHandshake sends, from the LAN client's eth0 to the gateway, a
// TCP SYN from lanClient6:sport to [::ffff:127.0.0.1]:dport, and when a
// SYN-ACK comes back (within 3 s), the ACK with an HTTP request. It
// reports whether the SYN-ACK came.
func mappedHandshake(tp *topo, sport, dport uint16) (bool, error) {
	const ethIPv6 = 0x86dd
	htons := func(v uint16) uint16 { return v<<8 | v>>8 }
	var fd int
	var src, dst net.HardwareAddr
	if err := tp.gw.Do(func() error {
		ifi, err := net.InterfaceByName("lan0")
		if err == nil {
			dst = ifi.HardwareAddr
		}
		return err
	}); err != nil {
		return false, err
	}
	var ifindex int
	err := tp.lan.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		src, ifindex = ifi.HardwareAddr, ifi.Index
		fd, err = syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(htons(ethIPv6)))
		if err != nil {
			return err
		}
		return syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(ethIPv6), Ifindex: ifindex})
	})
	if err != nil {
		return false, err
	}
	defer syscall.Close(fd)
	tv := syscall.NsecToTimeval(int64(200 * time.Millisecond))
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return false, err
	}
	client, mapped := net.ParseIP(lanClient6), net.ParseIP("::ffff:127.0.0.1")
	send := func(tcp *layers.TCP, payload []byte) error {
		eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv6}
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP, SrcIP: client, DstIP: mapped}
		tcp.SrcPort, tcp.DstPort, tcp.Window = layers.TCPPort(sport), layers.TCPPort(dport), 64240
		tcp.SetNetworkLayerForChecksum(ip)
		buf := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, tcp, gopacket.Payload(payload)); err != nil {
			return err
		}
		sa := &syscall.SockaddrLinklayer{Ifindex: ifindex, Halen: 6}
		copy(sa.Addr[:6], dst)
		return syscall.Sendto(fd, buf.Bytes(), 0, sa)
	}
	const iss = 1000
	if err := send(&layers.TCP{SYN: true, Seq: iss}, nil); err != nil {
		return false, err
	}
	frame := make([]byte, 2048)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		n, _, err := syscall.Recvfrom(fd, frame, 0)
		if err != nil {
			if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EINTR) {
				continue
			}
			return false, err
		}
		p := gopacket.NewPacket(frame[:n], layers.LayerTypeEthernet, gopacket.NoCopy)
		ip, _ := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
		tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if ip == nil || tcp == nil || !ip.SrcIP.Equal(mapped) || tcp.DstPort != layers.TCPPort(sport) || !tcp.SYN || !tcp.ACK {
			continue
		}
		req := "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: e2e\r\n\r\n"
		err = send(&layers.TCP{ACK: true, PSH: true, Seq: iss + 1, Ack: tcp.Seq + 1}, []byte(req))
		return true, err
	}
	return false, nil
}
