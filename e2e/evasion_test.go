package e2e

import (
	"bytes"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// TestCaptureEvasion (session 28's red team, Ptacek & Newsham's
// insertion attacks): in audit mode capture reads a connection's
// ClientHello from the frames on the LAN interface, and the report says
// what enforce mode would drop. A LAN client that shows capture one hello
// and the server another has a flow enforce would drop reported as
// allowed. Each case opens a real connection to the Go TLS server at
// registryIP:443 (the kernel does the handshake), learns its sequence
// numbers (TCP_REPAIR), and then writes the client's bytes itself as
// frames from a packet socket: a decoy hello naming registry (allowed)
// that the server never reads, and the real hello, of the same length,
// naming evasionName (no rule). The server records the name it read;
// capture's flow event must not be an allow of registry.
//
//   - ttl: the decoy has IPv4 TTL 1, which the gateway does not forward
//     (time exceeded) and capture sees on the LAN side.
//   - ip-checksum: the decoy's IPv4 header checksum is wrong: the
//     gateway's IP layer drops it.
//   - tcp-checksum: the decoy's TCP checksum is wrong: the gateway
//     forwards it, the server's kernel drops it.
//   - overlap: two out-of-order pieces at the same sequence number, the
//     second longer: Linux replaces the first with it (tcp_data_queue_ofo),
//     capture kept the first ("first copy wins") where they differ.
//   - rst-out-of-window: a reset far outside the server's window, which
//     its kernel ignores (RFC 5961), before the hello: capture ended the
//     flow at it and read no hello.
//   - hop-limit-v6, tcp-checksum-v6: ttl and tcp-checksum over IPv6, to
//     the same server at registryIP6 (IPv6 has no header checksum).
//   - broadcast-mac, foreign-mac, multicast-mac-v6, foreign-mac-v6: the
//     decoy's frame is sent to a MAC address not the gateway's (the
//     broadcast one, another host's, IPv6 all-nodes): Linux routes none
//     of them, capture's socket reads each. foreign-mac-after: the real
//     hello first, the decoy after it.
//   - ttl-gateway-mac: ttl, the decoy's frame with the gateway's MAC
//     address as its source, which capture takes for one the gateway
//     sent and checks no TTL of: read, the conflict watch denies it.
//   - forged-ack: tcp-checksum, with between the decoy and the real hello
//     the server's acknowledgement of the decoy, forged by the client (a
//     frame from the server's address and the gateway's MAC address to
//     the client's, which capture takes for one the gateway sent).
func TestCaptureEvasion(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()
	defer d.stop()
	// Capture learns the name of each address, for the client's address
	// that asked.
	for _, q := range []struct {
		cli, gw string
		qt      uint16
	}{{lanClient4, gwLAN4, dns.TypeA}, {lanClient6, gwLAN6, dns.TypeAAAA}} {
		if m, err := dnsAsk(tp.lan, q.cli, q.gw, registry, q.qt, false); err != nil || len(m.Answer) == 0 {
			t.Fatalf("dns %s type %d from %s: %v %v", registry, q.qt, q.cli, m, err)
		}
	}
	fs, src, dst := tp.lanFrameSender(t)
	defer fs.close()

	allowed := buildHello(helloSpec{sni: [][]string{{registry}}})
	denied := bytes.Replace(allowed, []byte(registry), []byte(evasionName), 1)
	if len(evasionName) != len(registry) || bytes.Equal(allowed, denied) {
		t.Fatal("the two hellos must differ in their name only")
	}
	// seg is one client segment: bytes at offset off of the stream, and
	// what is done to its frame.
	type seg struct {
		off   int
		data  []byte
		ttl   uint8
		spoil func(frame []byte) // nil: the frame as serialized
		rst   bool
		dmac  net.HardwareAddr // nil: the gateway's
		gwSrc bool             // sent with the gateway's MAC address as its source
		// ack: not client bytes but the server's acknowledgement of the
		// hello, forged by the client: from the server's address and
		// the gateway's MAC address, to the client's.
		ack bool
	}
	const ipOff, tcpOff, tcpOff6 = 14, 14 + 20, 14 + 40
	badIPSum := func(f []byte) { f[ipOff+10] ^= 0x5a }
	badTCPSum := func(f []byte) { f[tcpOff+16] ^= 0x5a }
	badTCPSum6 := func(f []byte) { f[tcpOff6+16] ^= 0x5a }
	for _, c := range []struct {
		name string
		v6   bool
		segs []seg
		// reads: capture skips the decoy and reads the real hello (its
		// name, not stream-conflict from the watch behind the skip).
		reads bool
	}{
		{"ttl", false, []seg{{off: 0, data: allowed, ttl: 1}, {off: 0, data: denied, ttl: 64}}, true},
		{"ip-checksum", false, []seg{{off: 0, data: allowed, ttl: 64, spoil: badIPSum}, {off: 0, data: denied, ttl: 64}}, true},
		{"tcp-checksum", false, []seg{{off: 0, data: allowed, ttl: 64, spoil: badTCPSum}, {off: 0, data: denied, ttl: 64}}, false},
		{"overlap", false, []seg{{off: 5, data: allowed[5:120], ttl: 64}, {off: 5, data: denied[5:], ttl: 64}, {off: 0, data: denied[:5], ttl: 64}}, false},
		{"rst-out-of-window", false, []seg{{off: 1 << 20, data: nil, ttl: 64, rst: true}, {off: 0, data: denied, ttl: 64}}, true},
		{"hop-limit-v6", true, []seg{{off: 0, data: allowed, ttl: 1}, {off: 0, data: denied, ttl: 64}}, true},
		{"tcp-checksum-v6", true, []seg{{off: 0, data: allowed, ttl: 64, spoil: badTCPSum6}, {off: 0, data: denied, ttl: 64}}, false},
		{"broadcast-mac", false, []seg{{off: 0, data: allowed, ttl: 64, dmac: bcastMAC}, {off: 0, data: denied, ttl: 64}}, true},
		{"foreign-mac", false, []seg{{off: 0, data: allowed, ttl: 64, dmac: foreignMAC}, {off: 0, data: denied, ttl: 64}}, true},
		{"foreign-mac-after", false, []seg{{off: 0, data: denied, ttl: 64}, {off: 0, data: allowed, ttl: 64, dmac: foreignMAC}}, true},
		{"multicast-mac-v6", true, []seg{{off: 0, data: allowed, ttl: 64, dmac: allNodesMAC}, {off: 0, data: denied, ttl: 64}}, true},
		{"foreign-mac-v6", true, []seg{{off: 0, data: allowed, ttl: 64, dmac: foreignMAC}, {off: 0, data: denied, ttl: 64}}, true},
		{"ttl-gateway-mac", false, []seg{{off: 0, data: allowed, ttl: 1, gwSrc: true}, {off: 0, data: denied, ttl: 64}}, false},
		{"forged-ack", false, []seg{{off: 0, data: allowed, ttl: 64, spoil: badTCPSum}, {ttl: 63, ack: true}, {off: 0, data: denied, ttl: 64}}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv, cli, et := registryIP+":443", lanClient4, layers.EthernetTypeIPv4
			if c.v6 {
				srv, cli, et = "["+registryIP6+"]:443", lanClient6, layers.EthernetTypeIPv6
			}
			conn := tp.mustDial(t, srv, nil)
			defer func() { conn.SetLinger(0); conn.Close() }()
			lport := conn.LocalAddr().(*net.TCPAddr).Port
			sndNxt, rcvNxt, err := tcpSeqs(conn)
			if err != nil {
				t.Fatalf("TCP_REPAIR: %v", err)
			}
			frame := func(off int, data []byte, ttl uint8, flags string, dmac net.HardwareAddr, ack bool) []byte {
				cliIP, srvIP := net.ParseIP(cli).To4(), net.ParseIP(registryIP).To4()
				if c.v6 {
					cliIP, srvIP = net.ParseIP(cli), net.ParseIP(registryIP6)
				}
				smac, sport, dport, seq, acked := src, lport, 443, sndNxt+uint32(off), rcvNxt
				if dmac == nil {
					dmac = dst
				}
				if ack {
					cliIP, srvIP, smac, dmac = srvIP, cliIP, dst, src
					sport, dport, seq, acked = 443, lport, rcvNxt, sndNxt+uint32(len(allowed))
				}
				var ip gopacket.NetworkLayer = &layers.IPv4{Version: 4, TTL: ttl, Flags: layers.IPv4DontFragment, Protocol: layers.IPProtocolTCP,
					SrcIP: cliIP, DstIP: srvIP}
				if c.v6 {
					ip = &layers.IPv6{Version: 6, HopLimit: ttl, NextHeader: layers.IPProtocolTCP, SrcIP: cliIP, DstIP: srvIP}
				}
				tcp := &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: layers.TCPPort(dport), Seq: seq, Ack: acked,
					ACK: true, PSH: flags == "psh", RST: flags == "rst", Window: 1024}
				tcp.SetNetworkLayerForChecksum(ip)
				buf := gopacket.NewSerializeBuffer()
				eth := &layers.Ethernet{SrcMAC: smac, DstMAC: dmac, EthernetType: et}
				if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true},
					eth, ip.(gopacket.SerializableLayer), tcp, gopacket.Payload(data)); err != nil {
					t.Fatal(err)
				}
				return buf.Bytes()
			}
			for _, s := range c.segs {
				flags := "psh"
				if s.rst {
					flags = "rst"
				}
				f := frame(s.off, s.data, s.ttl, flags, s.dmac, s.ack)
				if s.gwSrc {
					copy(f[6:12], dst)
				}
				if s.spoil != nil {
					s.spoil(f)
				}
				if err := fs.send(f); err != nil {
					t.Fatalf("send: %v", err)
				}
				time.Sleep(20 * time.Millisecond)
			}
			var got any
			for deadline := time.Now().Add(5 * time.Second); got == nil && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				got, _ = tp.registrySNI.Load(lport)
			}
			// End the connection at the stream's end, for the server
			// and for capture.
			if err := fs.send(frame(len(denied), nil, 64, "rst", nil, false)); err != nil {
				t.Fatalf("send: %v", err)
			}
			if got != evasionName {
				t.Fatalf("the server read the name %v, not %s: the attack did not reach it as meant", got, evasionName)
			}
			ce := d.waitEvent(t, "capture's record of "+c.name, func(e flowEvent) bool {
				return e.Kind == "flow" && e.Source == "capture" && e.ClientPort == lport
			})
			if ce.Verdict == "allow" || ce.Name == registry || c.reads && ce.Name != evasionName {
				t.Errorf("%s: the server read %s, capture recorded %v", c.name, evasionName, ce)
			} else {
				t.Logf("%s: capture recorded %v", c.name, ce)
			}
		})
	}
}

// MAC addresses a decoy frame is sent to: none is the gateway's, so the
// gateway routes none of them (ip_forward drops what is not
// PACKET_HOST), but capture's packet socket reads them.
var (
	bcastMAC    = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	foreignMAC  = net.HardwareAddr{0x02, 0x00, 0x5e, 0x16, 0x00, 0x99}
	allNodesMAC = net.HardwareAddr{0x33, 0x33, 0x00, 0x00, 0x00, 0x01}
)

// evasionName is a name no rule allows, as long as registry.
const evasionName = "tracker-1.example.io"

// tcpSeqs reads the sequence numbers of an established connection: the
// next one it sends and the next one it expects (TCP_REPAIR, which needs
// CAP_NET_ADMIN), and leaves repair mode without a window probe.
func tcpSeqs(c *net.TCPConn) (snd, rcv uint32, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	const recvQueue, sendQueue = 1, 2
	cerr := rc.Control(func(fd uintptr) {
		s := int(fd)
		if err = unix.SetsockoptInt(s, syscall.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
			return
		}
		defer unix.SetsockoptInt(s, syscall.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
		var v [2]int
		for i, q := range []int{sendQueue, recvQueue} {
			if err = unix.SetsockoptInt(s, syscall.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, q); err != nil {
				return
			}
			if v[i], err = unix.GetsockoptInt(s, syscall.IPPROTO_TCP, unix.TCP_QUEUE_SEQ); err != nil {
				return
			}
		}
		snd, rcv = uint32(v[0]), uint32(v[1])
	})
	if cerr != nil {
		return 0, 0, cerr
	}
	if err != nil {
		return 0, 0, fmt.Errorf("tcp seqs: %w", err)
	}
	return snd, rcv, nil
}
