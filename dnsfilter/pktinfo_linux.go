package dnsfilter

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"
)

// A wildcard listener's sockets (0.0.0.0 and [::]) are told the
// destination address of each datagram (IP_PKTINFO, IPV6_RECVPKTINFO),
// and each answer leaves from it (IP_PKTINFO, IPV6_PKTINFO on the send),
// as unbound's interface-automatic and dnsmasq do: without, the kernel
// picks the source by its route, and on an interface with several
// addresses the answer to any but the one it picks comes from another
// address, which the client drops.

// oobCap is the room for one datagram's control data, in or out: one
// in_pktinfo or in6_pktinfo message (32 and 40 bytes on 64-bit systems).
// A message with more is cut (MSG_CTRUNC) and parses as none.
const oobCap = 64

// setPktinfo asks the kernel for the destination address of each datagram
// fd receives.
func setPktinfo(fd int, v6 bool) error {
	if v6 {
		return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
	}
	return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
}

// cmsgHdrLen is where a control message's data begins.
var cmsgHdrLen = unix.CmsgLen(0)

// parseAnswerFrom reads the address a datagram was sent to from its
// control data oob, as recvmsg filled it in. Anything else (no message,
// one cut short, a multicast or unspecified address) gives the zero
// answerFrom: the answer's source is the kernel's choice.
func parseAnswerFrom(oob []byte) answerFrom {
	var f answerFrom
	for len(oob) >= cmsgHdrLen {
		var l uint64
		if unix.SizeofPtr == 8 {
			l = binary.NativeEndian.Uint64(oob)
		} else {
			l = uint64(binary.NativeEndian.Uint32(oob))
		}
		if l < uint64(cmsgHdrLen) || l > uint64(len(oob)) {
			return answerFrom{}
		}
		level := int32(binary.NativeEndian.Uint32(oob[unix.SizeofPtr:]))
		typ := int32(binary.NativeEndian.Uint32(oob[unix.SizeofPtr+4:]))
		data := oob[cmsgHdrLen:l]
		switch {
		case level == unix.IPPROTO_IP && typ == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			// ipi_spec_dst: the header's destination for a unicast
			// datagram, the local address the kernel would answer a
			// broadcast from.
			a := netip.AddrFrom4([4]byte(data[4:8]))
			if a.IsUnspecified() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
				return answerFrom{}
			}
			f = answerFrom{addr: a}
		case level == unix.IPPROTO_IPV6 && typ == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			a := netip.AddrFrom16([16]byte(data[:16]))
			if a.IsUnspecified() || a.IsMulticast() || a.Is4In6() {
				return answerFrom{}
			}
			f = answerFrom{addr: a}
			if a.IsLinkLocalUnicast() {
				// The same link-local address may be on several
				// interfaces: the one the query came in on.
				f.ifindex = binary.NativeEndian.Uint32(data[16:20])
			}
		}
		oob = oob[min(uint64(unix.CmsgSpace(int(l)-cmsgHdrLen)), uint64(len(oob))):]
	}
	return f
}

// put writes f as the control data of a send into oob (at least oobCap
// long) and returns its length: zero for the zero answerFrom.
func (f answerFrom) put(oob []byte) int {
	if !f.addr.IsValid() {
		return 0
	}
	var n, level, typ int
	data := oob[cmsgHdrLen:]
	if f.addr.Is4() {
		// in_pktinfo: no interface (the route decides: a query that
		// came in on one interface may be answered through another),
		// the source in ipi_spec_dst.
		n, level, typ = unix.SizeofInet4Pktinfo, unix.IPPROTO_IP, unix.IP_PKTINFO
		binary.NativeEndian.PutUint32(data, 0)
		a := f.addr.As4()
		copy(data[4:8], a[:])
		clear(data[8:12])
	} else {
		n, level, typ = unix.SizeofInet6Pktinfo, unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
		a := f.addr.As16()
		copy(data[:16], a[:])
		binary.NativeEndian.PutUint32(data[16:20], f.ifindex)
	}
	l, space := unix.CmsgLen(n), unix.CmsgSpace(n)
	if unix.SizeofPtr == 8 {
		binary.NativeEndian.PutUint64(oob, uint64(l))
	} else {
		binary.NativeEndian.PutUint32(oob, uint32(l))
	}
	binary.NativeEndian.PutUint32(oob[unix.SizeofPtr:], uint32(level))
	binary.NativeEndian.PutUint32(oob[unix.SizeofPtr+4:], uint32(typ))
	clear(oob[l:space])
	return space
}
