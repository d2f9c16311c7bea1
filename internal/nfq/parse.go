package nfq

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// TCP flags, as in TCPSegment.Flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
	URG = 0x20
	ECE = 0x40
	CWR = 0x80
)

// TCPSegment is a TCP segment read from an IP packet by ParseTCP.
type TCPSegment struct {
	Src, Dst netip.AddrPort
	Seq, Ack uint32
	Flags    uint8
	Window   uint16
	// Payload is the segment's data: a slice of the packet given to
	// ParseTCP, valid as long as it is.
	Payload []byte
}

// Errors of ParseTCP.
var (
	errShort    = errors.New("nfq: packet too short")
	errVersion  = errors.New("nfq: not ipv4 or ipv6")
	errLength   = errors.New("nfq: ip length does not fit the packet")
	errFragment = errors.New("nfq: ip fragment")
	errNotTCP   = errors.New("nfq: not tcp (or behind an ipv6 extension header)")
	errTCPHdr   = errors.New("nfq: bad tcp header length")
)

// ParseTCP reads the TCP segment in an IPv4 or IPv6 packet (ip starts at
// the IP header). The lengths are checked against the header fields (bytes
// after the IP total length are ignored). A fragment is an error; IPv4
// options are skipped (by the header length); IPv6 extension headers are
// not walked: a next header other than TCP is an error, as is a jumbogram.
// Checksums are not verified (the kernel has, or will, before delivering).
func ParseTCP(ip []byte) (TCPSegment, error) {
	var s TCPSegment
	if len(ip) < 1 {
		return s, errShort
	}
	var src, dst netip.Addr
	var tcp []byte
	switch ip[0] >> 4 {
	case 4:
		if len(ip) < 20 {
			return s, errShort
		}
		ihl := int(ip[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(ip[2:]))
		if ihl < 20 || total < ihl || total > len(ip) {
			return s, errLength
		}
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 { // MF or an offset
			return s, errFragment
		}
		if ip[9] != 6 {
			return s, errNotTCP
		}
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		tcp = ip[ihl:total]
	case 6:
		if len(ip) < 40 {
			return s, errShort
		}
		plen := int(binary.BigEndian.Uint16(ip[4:]))
		if plen == 0 || 40+plen > len(ip) { // 0: a jumbogram, or nothing
			return s, errLength
		}
		if ip[6] == 44 {
			return s, errFragment
		}
		if ip[6] != 6 {
			return s, errNotTCP
		}
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		tcp = ip[40 : 40+plen]
	default:
		return s, errVersion
	}
	if len(tcp) < 20 {
		return s, errTCPHdr
	}
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		return s, errTCPHdr
	}
	s.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:]))
	s.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:]))
	s.Seq = binary.BigEndian.Uint32(tcp[4:])
	s.Ack = binary.BigEndian.Uint32(tcp[8:])
	s.Flags = tcp[13]
	s.Window = binary.BigEndian.Uint16(tcp[14:])
	s.Payload = tcp[doff:]
	return s, nil
}
