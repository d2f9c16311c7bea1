package netutil

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"golang.org/x/sys/unix"
)

// RoutesBack reports whether the kernel routes addr out of the interface
// with index ifindex: the strict reverse-path check of nftables' `fib
// saddr . iif oif missing`, asked for one address (RTM_GETROUTE with
// RTA_OIF and RTM_F_FIB_MATCH, `ip route get ADDR oif DEV fibmatch`), in
// the network namespace of the calling thread. Restricted to an
// interface, the kernel's lookup skips routes whose next hop is another
// (the default route via the WAN), as nft_fib's does; RTM_F_FIB_MATCH
// makes it answer with the route it matched, or an error when there is
// none (without it, IPv4 assumes an address with no route on that
// interface is on its link and answers anyway). A route of another type
// than unicast (local: one of the gateway's own addresses; blackhole,
// unreachable) does not route back, as for nft_fib. An error says the
// kernel did not answer: the caller knows nothing. Asking needs no
// privilege.
func RoutesBack(ifindex int, addr netip.Addr) (bool, error) {
	const what = "route lookup"
	addr, family, err := neighAddr(what, addr)
	if err != nil {
		return false, err
	}
	b := make([]byte, unix.SizeofNlMsghdr, 64)
	binary.NativeEndian.PutUint16(b[4:6], unix.RTM_GETROUTE)
	binary.NativeEndian.PutUint16(b[6:8], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(b[8:12], neighSeq)
	var rtm [unix.SizeofRtMsg]byte
	rtm[0] = family
	rtm[1] = byte(addr.BitLen()) // rtm_dst_len
	binary.NativeEndian.PutUint32(rtm[8:12], unix.RTM_F_FIB_MATCH)
	b = append(b, rtm[:]...)
	putAttr(&b, unix.RTA_DST, addr.AsSlice())
	putAttr(&b, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(ifindex)))
	back := false
	err = neighAsk(what, b, func(msgs []byte) (bool, error) {
		return eachMsgNotFound(msgs, neighSeq, what, errNoRoute, func(typ uint16, body []byte) (bool, error) {
			if typ == unix.RTM_NEWROUTE {
				back = routeVia(body, ifindex)
				return true, nil
			}
			return typ == unix.NLMSG_ERROR || typ == unix.NLMSG_DONE, nil
		})
	})
	var errno unix.Errno
	switch {
	case err == nil:
		return back, nil
	case errors.Is(err, errNoRoute), errors.As(err, &errno) && (errno == unix.ENETUNREACH || errno == unix.EHOSTUNREACH ||
		errno == unix.EINVAL || errno == unix.EACCES || errno == unix.EPERM):
		// No route via the interface (EACCES, EPERM: a prohibit
		// route; EINVAL: what the kernel will not route at all).
		return false, nil
	}
	return false, err
}

var errNoRoute = errors.New("netutil: no route")

// routeVia reports whether an RTM_NEWROUTE message's route is a unicast
// route with a next hop on ifindex: its RTA_OIF, or one of its
// RTA_MULTIPATH next hops.
func routeVia(body []byte, ifindex int) bool {
	if len(body) < unix.SizeofRtMsg || body[7] != unix.RTN_UNICAST {
		return false
	}
	attrs := body[unix.SizeofRtMsg:]
	if oif, ok := findAttr(attrs, unix.RTA_OIF); ok && len(oif) == 4 {
		if int(int32(binary.NativeEndian.Uint32(oif))) == ifindex {
			return true
		}
	}
	mp, ok := findAttr(attrs, unix.RTA_MULTIPATH)
	for ok && len(mp) >= unix.SizeofRtNexthop {
		l := int(binary.NativeEndian.Uint16(mp[0:2]))
		if int(int32(binary.NativeEndian.Uint32(mp[4:8]))) == ifindex {
			return true
		}
		if l < unix.SizeofRtNexthop || l > len(mp) {
			break
		}
		mp = mp[min((l+3)&^3, len(mp)):]
	}
	return false
}
