package nfq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"egressd/internal/netns"
)

// Injector sends TCP segments built whole (IP header included) through raw
// sockets of the network namespace it was opened in, from any address to
// any address: the gateway speaking for a server to a client or for a
// client to a server. The kernel routes each by its destination; a
// segment goes through the output and postrouting hooks of that
// namespace's ruleset like any locally generated packet. egressd's own
// ruleset does not stop them (TestInjectUnderEnforce): it has no output
// chain, and its postrouting chain only masquerades. Conntrack sees them:
// a segment of a connection the gateway tracks takes that connection's
// NAT (a RST to the server leaves from the masqueraded address and port,
// as the server knows the client); a data segment that matches no entry
// (to the client, when the connection is masqueraded: its reply tuple
// names the WAN address) starts one of its own, whose NAT then changes
// it: send to the client with SegmentL2 and ResetL2.
type Injector struct {
	fd4, fd6 int
	fdL2     int // AF_PACKET, SOCK_DGRAM: SegmentL2
}

// NewInjector opens the raw sockets (IPv4 IPPROTO_RAW, which implies
// IP_HDRINCL, and IPv6 IPPROTO_RAW, which implies IPV6_HDRINCL) in the
// network namespace at path netNS ("": the calling thread's). It needs
// CAP_NET_RAW.
func NewInjector(netNS string) (*Injector, error) {
	if netNS != "" {
		var in *Injector
		err := netns.Do(netNS, func() (err error) { in, err = NewInjector(""); return })
		return in, err
	}
	fd4, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return nil, fmt.Errorf("nfq: raw ipv4 socket: %w", err)
	}
	fd6, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		unix.Close(fd4)
		return nil, fmt.Errorf("nfq: raw ipv6 socket: %w", err)
	}
	// Protocol 0: the socket sends only, it receives nothing.
	fdL2, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd4)
		unix.Close(fd6)
		return nil, fmt.Errorf("nfq: packet socket: %w", err)
	}
	return &Injector{fd4: fd4, fd6: fd6, fdL2: fdL2}, nil
}

// Close closes the sockets.
func (in *Injector) Close() error {
	return errors.Join(unix.Close(in.fd4), unix.Close(in.fd6), unix.Close(in.fdL2))
}

// L2 says where SegmentL2 sends: out of the interface with index IfIndex,
// to the link-layer address Addr[:AddrLen] (a queued packet's InIf and
// HWAddr).
type L2 struct {
	IfIndex int
	Addr    [8]byte
	AddrLen uint8
}

// L2Of is where an answer to the queued packet p goes: back out of the
// interface it came in on, to the address it came from.
func L2Of(p Packet) L2 {
	return L2{IfIndex: int(p.InIf), Addr: p.HWAddr, AddrLen: p.HWAddrLen}
}

// SegmentL2 sends a TCP segment as Segment does, but on the link layer
// (an AF_PACKET socket): out of l2's interface to its address, past
// netfilter and conntrack. That is the way to the client: a segment sent
// to it through the IP layer in the server's name matches no conntrack
// entry when the gateway masquerades (the connection's reply tuple names
// the WAN address), so it starts one of its own, and NAT gives that one
// another source port, as the connection's holds the tuple: the client
// never sees it (TestInject).
func (in *Injector) SegmentL2(l2 L2, from, to netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) error {
	pkt, err := BuildTCP(from, to, seq, ack, flags, payload)
	if err != nil {
		return err
	}
	proto := uint16(unix.ETH_P_IPV6)
	if to.Addr().Unmap().Is4() {
		proto = unix.ETH_P_IP
	}
	sa := &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: l2.IfIndex, Halen: l2.AddrLen, Addr: l2.Addr}
	if err := unix.Sendto(in.fdL2, pkt, 0, sa); err != nil {
		return fmt.Errorf("nfq: inject %v > %v on interface %d: %w", from, to, l2.IfIndex, err)
	}
	return nil
}

// ResetL2 sends a RST (with ACK) as Reset does, on the link layer as
// SegmentL2 does.
func (in *Injector) ResetL2(l2 L2, from, to netip.AddrPort, seq, ack uint32) error {
	return in.SegmentL2(l2, from, to, seq, ack, RST|ACK, nil)
}

// htons is a protocol number in network byte order, as sockaddr_ll wants.
func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Reset sends a RST (with ACK) from from to to: seq must be the receiver's
// next expected sequence number (its RCV.NXT: the ack field of a segment
// it sent) for the receiver to take it without a challenge ACK.
func (in *Injector) Reset(from, to netip.AddrPort, seq, ack uint32) error {
	return in.Segment(from, to, seq, ack, RST|ACK, nil)
}

// Segment sends a TCP segment with the given flags and payload.
func (in *Injector) Segment(from, to netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) error {
	pkt, err := BuildTCP(from, to, seq, ack, flags, payload)
	if err != nil {
		return err
	}
	if to.Addr().Unmap().Is4() {
		err = unix.Sendto(in.fd4, pkt, 0, &unix.SockaddrInet4{Addr: to.Addr().Unmap().As4()})
	} else {
		err = unix.Sendto(in.fd6, pkt, 0, &unix.SockaddrInet6{Addr: to.Addr().As16()})
	}
	if err != nil {
		return fmt.Errorf("nfq: inject %v > %v: %w", from, to, err)
	}
	return nil
}

// injectWindow is the window an injected segment advertises.
const injectWindow = 65535

// BuildTCP builds an IP packet (IPv4 or IPv6, as the addresses are; both
// of one family) holding a TCP segment with a 20-byte header and correct
// checksums, TTL or hop limit 64.
func BuildTCP(from, to netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) ([]byte, error) {
	src, dst := from.Addr().Unmap(), to.Addr().Unmap()
	if !src.IsValid() || !dst.IsValid() || src.Is4() != dst.Is4() {
		return nil, fmt.Errorf("nfq: segment %v > %v: addresses of one family needed", from, to)
	}
	const tcpLen = 20
	ipLen := 40
	if src.Is4() {
		ipLen = 20
	}
	total := ipLen + tcpLen + len(payload)
	if total > 0xffff {
		return nil, fmt.Errorf("nfq: segment %v > %v: %d bytes of payload is too much", from, to, len(payload))
	}
	b := make([]byte, total)
	if src.Is4() {
		b[0] = 0x45
		binary.BigEndian.PutUint16(b[2:], uint16(total))
		binary.BigEndian.PutUint16(b[6:], 0x4000) // DF
		b[8] = 64
		b[9] = unix.IPPROTO_TCP
		s4, d4 := src.As4(), dst.As4()
		copy(b[12:], s4[:])
		copy(b[16:], d4[:])
		binary.BigEndian.PutUint16(b[10:], ^fold(sum(b[:20], 0)))
	} else {
		b[0] = 0x60
		binary.BigEndian.PutUint16(b[4:], uint16(tcpLen+len(payload)))
		b[6] = unix.IPPROTO_TCP
		b[7] = 64
		s16, d16 := src.As16(), dst.As16()
		copy(b[8:], s16[:])
		copy(b[24:], d16[:])
	}
	t := b[ipLen:]
	binary.BigEndian.PutUint16(t[0:], from.Port())
	binary.BigEndian.PutUint16(t[2:], to.Port())
	binary.BigEndian.PutUint32(t[4:], seq)
	binary.BigEndian.PutUint32(t[8:], ack)
	t[12] = tcpLen / 4 << 4
	t[13] = flags
	binary.BigEndian.PutUint16(t[14:], injectWindow)
	copy(t[tcpLen:], payload)
	binary.BigEndian.PutUint16(t[16:], ^fold(sum(t, pseudo(src, dst, len(t)))))
	return b, nil
}

// pseudo is the sum of the TCP pseudo-header.
func pseudo(src, dst netip.Addr, tcpLen int) uint32 {
	s := sum(src.AsSlice(), 0)
	s = sum(dst.AsSlice(), s)
	return s + unix.IPPROTO_TCP + uint32(tcpLen>>16) + uint32(tcpLen&0xffff)
}

// sum adds b's 16-bit big-endian words to s (a trailing odd byte padded
// with zero).
func sum(b []byte, s uint32) uint32 {
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	return s
}

// fold folds a sum into 16 bits, one's complement.
func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// ChecksumOK reports whether the TCP checksum of a packet ParseTCP accepts
// is right (for tests and diagnostics: the kernel checks received ones).
func ChecksumOK(ip []byte) bool {
	seg, err := ParseTCP(ip)
	if err != nil {
		return false
	}
	var tcp []byte
	if ip[0]>>4 == 4 {
		ihl := int(ip[0]&0x0f) * 4
		tcp = ip[ihl:binary.BigEndian.Uint16(ip[2:])]
		if fold(sum(ip[:ihl], 0)) != 0xffff {
			return false
		}
	} else {
		tcp = ip[40 : 40+int(binary.BigEndian.Uint16(ip[4:]))]
	}
	return fold(sum(tcp, pseudo(seg.Src.Addr(), seg.Dst.Addr(), len(tcp)))) == 0xffff
}
