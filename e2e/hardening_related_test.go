package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// relatedMark is the data an attacker hides after the quoted datagram of
// an ICMP error, or in a packet of another protocol.
var relatedMark = bytes.Repeat([]byte("RELATED-EXFIL-"), 40)

// quoteUDP4 is an IPv4 header and UDP header, as an ICMP error quotes the
// datagram it is about, followed by the first bytes of its data.
func quoteUDP4(src, dst netip.AddrPort, data []byte) []byte {
	b := make([]byte, 28, 28+len(data))
	b[0], b[8], b[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(b[2:], uint16(28+len(data)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], dst.Port())
	binary.BigEndian.PutUint16(b[24:], uint16(8+len(data)))
	binary.BigEndian.PutUint16(b[10:], icmpChecksum(b[:20]))
	return append(b, data...)
}

// icmpMsg is an ICMP message of type and code with the 4 bytes after the
// checksum zero and body after them.
func icmpMsg(typ, code byte, body []byte) []byte {
	b := append([]byte{typ, code, 0, 0, 0, 0, 0, 0}, body...)
	binary.BigEndian.PutUint16(b[2:], icmpChecksum(b))
	return b
}

// newMarkWitness counts packets of network to addr that carry
// relatedMark.
func (tp *topo) newMarkWitness(t *testing.T, network, addr string) *rawWitness {
	return tp.newRawWitnessAt(t, network, addr, func(b []byte, _ net.Addr) bool { return bytes.Contains(b, relatedMark) })
}

// ntpFlow is a LAN client's UDP socket to an NTP server, with IP_RECVERR
// set: ICMP errors about its datagrams are queued on it for the
// (unprivileged) process to read.
type ntpFlow struct {
	c           *net.UDPConn
	local, peer netip.AddrPort
}

func (tp *topo) openNTPFlow(t *testing.T, peer netip.Addr) *ntpFlow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "udp4", netip.AddrPortFrom(peer, 123).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	uc := c.(*net.UDPConn)
	rc, err := uc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1) }); err != nil || serr != nil {
		t.Fatalf("IP_RECVERR: %v %v", err, serr)
	}
	req := ntpRequest()
	if err := askWithin(uc, 3*time.Second, req, func(r []byte) bool { return ntpAnswers(req, r) }); err != nil {
		t.Fatalf("NTP to %s: %v", peer, err)
	}
	return &ntpFlow{c: uc, local: netip.MustParseAddrPort(uc.LocalAddr().String()), peer: netip.AddrPortFrom(peer, 123)}
}

// readErrQueue waits up to 2 s for an error on f's socket's error queue
// and returns the data the kernel gives with it (the quoted datagram's
// data and what follows it), or nil.
func (f *ntpFlow) readErrQueue(t *testing.T) []byte {
	t.Helper()
	rc, err := f.c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 4096), make([]byte, 512)
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		n := -1
		rc.Control(func(fd uintptr) {
			n, _, _, _, _ = unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		})
		if n >= 0 {
			return buf[:n]
		}
	}
	return nil
}

// TestHardeningRelated: traffic conntrack calls "related" to a flow a
// rule let out (the seed's ntp rule: time.google.com, UDP 123), and
// packets of other protocols to its address and port, in enforce mode.
// An ICMP error's outer destination must be the flow's peer (the
// kernel's check, nf_conntrack_inet_error), so the LAN cannot address
// one to another host; an internet host that is no peer can address one
// to the LAN client (residual).
func TestHardeningRelated(t *testing.T) {
	tp := newTopo(t)
	toDeny := tp.newMarkWitness(t, "ip4:icmp", udpDenyIP)
	toPeer := tp.newMarkWitness(t, "ip4:icmp", ntpIP)
	protos := []struct {
		name string
		w    *rawWitness
	}{
		{"ip4:136", tp.newMarkWitness(t, "ip4:136", ntpIP)}, // UDP-lite
		{"ip4:132", tp.newMarkWitness(t, "ip4:132", ntpIP)}, // SCTP
		{"ip4:33", tp.newMarkWitness(t, "ip4:33", ntpIP)},   // DCCP
	}
	// Each would-be UDP-like header: source port, destination port 123.
	protoMsg := append([]byte{0x9c, 0x41, 0, 123, 0, 0, 0, 0}, relatedMark...)

	peer := netip.MustParseAddr(ntpIP)
	// errTo is a port-unreachable error from the LAN client to dst
	// quoting the peer's datagram to the client's NTP socket.
	errTo := func(f *ntpFlow) []byte {
		return icmpMsg(3, 3, append(quoteUDP4(f.peer, f.local, []byte("ntp")), relatedMark...))
	}
	// Without egressd each reaches its witness.
	f := tp.openNTPFlow(t, peer)
	if n := tp.sendRawTo(t, toDeny, "ip4:icmp", udpDenyIP, errTo(f)); n == 0 {
		t.Fatalf("without egressd, an ICMP error from the LAN does not reach %s: the test would prove nothing", udpDenyIP)
	}
	for _, p := range protos {
		if n := tp.sendRawTo(t, p.w, p.name, ntpIP, protoMsg); n == 0 {
			t.Fatalf("without egressd, %s from the LAN does not reach %s: the test would prove nothing", p.name, ntpIP)
		}
	}

	d := newDaemon(t, tp, "enforce")
	d.start()
	defer d.stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if a := tp.resolve4(t, ctx, ntpName); a != peer {
		t.Fatalf("%s resolved to %s, want %s", ntpName, a, peer)
	}
	f = tp.openNTPFlow(t, peer)

	t.Run("error-to-another-host", func(t *testing.T) {
		// Held: the quoted datagram is the flow's, the outer destination
		// is not its peer: conntrack finds no relation, the packet is
		// no connection's and the forward chain drops it.
		if n := tp.sendRawTo(t, toDeny, "ip4:icmp", udpDenyIP, errTo(f)); n != 0 {
			t.Errorf("%d of 3 ICMP errors quoting the NTP flow reached %s", n, udpDenyIP)
		}
		noFlow := icmpMsg(11, 0, append(quoteUDP4(netip.MustParseAddrPort(udpDenyIP+":7777"), f.local, []byte("x")), relatedMark...))
		if n := tp.sendRawTo(t, toDeny, "ip4:icmp", udpDenyIP, noFlow); n != 0 {
			t.Errorf("%d of 3 ICMP time-exceeded quoting no flow reached %s", n, udpDenyIP)
		}
		// The same error to the flow's own peer is related and passes:
		// no address the rule does not allow (and proof that the raw
		// socket's errors get out at all).
		if n := tp.sendRawTo(t, toPeer, "ip4:icmp", ntpIP, errTo(f)); n == 0 {
			t.Errorf("no ICMP error quoting the NTP flow reached its peer %s", ntpIP)
		}
	})

	t.Run("other-protocols-to-allowed-port", func(t *testing.T) {
		// Held: UDP-lite, SCTP and DCCP to the address and port the ntp
		// rule opens for UDP ("udp dport" checks meta l4proto first).
		for _, p := range protos {
			if n := tp.sendRawTo(t, p.w, p.name, ntpIP, protoMsg); n != 0 {
				t.Errorf("%d of 3 %s packets reached %s", n, p.name, ntpIP)
			}
		}
	})

	t.Run("error-from-another-host", func(t *testing.T) {
		// Residual: an internet host no rule names sends the LAN client
		// an ICMP error quoting its NTP datagram, with 560 bytes of its
		// own after the quote. Conntrack takes it as related to the
		// flow (any source may send an error: a router on the path
		// does), the forward chain accepts it, and the client's kernel
		// queues the quote's data and what follows on the UDP socket,
		// for an unprivileged process to read (IP_RECVERR).
		pc, err := tp.inet.ListenPacket("ip4:icmp", udpDenyIP)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		msg := icmpMsg(3, 3, append(quoteUDP4(f.local, f.peer, []byte("ntp")), relatedMark...))
		if _, err := pc.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(lanClient4)}); err != nil {
			t.Fatal(err)
		}
		got := f.readErrQueue(t)
		if !bytes.Contains(got, relatedMark) {
			t.Errorf("the LAN client's socket read %q from its error queue, not %s's data: if this now holds, update the README's row", got, udpDenyIP)
		}
	})
}
