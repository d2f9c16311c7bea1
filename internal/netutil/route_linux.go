package netutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// RouteAsker asks the kernel's routing table about single addresses
// over a netlink socket of its own, in the network namespace of the
// thread that opened it (OpenRouteAsker), whichever thread asks. One
// goroutine at a time may use it.
type RouteAsker struct {
	fd  int
	seq uint32
	buf []byte
}

// OpenRouteAsker opens a RouteAsker. Asking needs no privilege.
func OpenRouteAsker() (*RouteAsker, error) {
	fd, err := openNeighSocket()
	if err != nil {
		return nil, err
	}
	return &RouteAsker{fd: fd, buf: make([]byte, 4096)}, nil
}

// Close closes r's socket.
func (r *RouteAsker) Close() error { return unix.Close(r.fd) }

// RoutesBack reports whether the kernel routes addr out of the interface
// with index ifindex: the strict reverse-path check of nftables' `fib
// saddr . iif oif missing`, asked for one address (RTM_GETROUTE with
// RTM_F_FIB_MATCH, `ip route get ADDR fibmatch`). As nft_fib does, it
// takes the gateway's best route for addr, not restricted to the
// interface, and asks whether one of its next hops is on it: a source
// whose best route leaves by another interface (another LAN's subnet, a
// subnet routed via the WAN inside a broader one routed via the LAN, the
// default route via the WAN) does not route back, even where a less
// specific route via the interface covers it. Only for an IPv6
// link-local address is the lookup restricted to the interface (RTA_OIF),
// as nft_fib's is. RTM_F_FIB_MATCH makes the kernel answer with the
// route it matched, or an error when there is none. A local route (one
// of the gateway's own addresses), and in IPv6 an anycast one, does not
// route back, as for nft_fib; neither does a blackhole, unreachable or
// prohibit route (the kernel answers those with an error). nft_fib's
// lookup also carries the packet's destination as source, its TOS and,
// in IPv6, its protocol: policy routing rules that select on those, and
// IPv6 source-specific routes, can make the two differ.
// An error says the kernel did not answer: the caller knows nothing.
func (r *RouteAsker) RoutesBack(ifindex int, addr netip.Addr) (bool, error) {
	const what = "route lookup"
	addr, family, err := neighAddr(what, addr)
	if err != nil {
		return false, err
	}
	r.seq++
	seq := r.seq
	b := make([]byte, unix.SizeofNlMsghdr, 64)
	binary.NativeEndian.PutUint16(b[4:6], unix.RTM_GETROUTE)
	binary.NativeEndian.PutUint16(b[6:8], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	var rtm [unix.SizeofRtMsg]byte
	rtm[0] = family
	rtm[1] = byte(addr.BitLen()) // rtm_dst_len
	binary.NativeEndian.PutUint32(rtm[8:12], unix.RTM_F_FIB_MATCH)
	b = append(b, rtm[:]...)
	putAttr(&b, unix.RTA_DST, addr.AsSlice())
	if addr.Is6() && (addr.IsLinkLocalUnicast() || addr.IsLinkLocalMulticast()) {
		putAttr(&b, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(ifindex)))
	}
	binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
	if err := unix.Sendto(r.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return false, fmt.Errorf("netutil: %s: %w", what, err)
	}
	back := false
	// At most four receives: answers to earlier requests that timed out
	// (another sequence number) are skipped.
	for range 4 {
		k, _, err := unix.Recvfrom(r.fd, r.buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("netutil: %s: %w", what, err)
		}
		answered := false
		_, err = eachMsgNotFound(r.buf[:k], seq, what, errNoRoute, func(typ uint16, body []byte) (bool, error) {
			answered = true
			if typ == unix.RTM_NEWROUTE {
				back = routeVia(body, ifindex)
			}
			return true, nil
		})
		var errno unix.Errno
		switch {
		case err == nil && answered:
			return back, nil
		case err == nil:
			continue
		case errors.Is(err, errNoRoute), errors.As(err, &errno) && (errno == unix.ENETUNREACH || errno == unix.EHOSTUNREACH ||
			errno == unix.EINVAL || errno == unix.EACCES || errno == unix.EPERM):
			// No route via the interface (EACCES, EPERM: a prohibit
			// route; EINVAL: what the kernel will not route at all).
			return false, nil
		}
		return false, err
	}
	return false, fmt.Errorf("netutil: %s: no answer", what)
}

var errNoRoute = errors.New("netutil: no route")

// routeVia reports whether an RTM_NEWROUTE message's route has a next
// hop on ifindex (its RTA_OIF, or one of its RTA_MULTIPATH next hops) and
// is of a type nft_fib counts: not local, nor an IPv6 anycast route (an
// IPv4 broadcast route of the interface's subnet counts, as there).
func routeVia(body []byte, ifindex int) bool {
	if len(body) < unix.SizeofRtMsg {
		return false
	}
	switch body[7] {
	case unix.RTN_LOCAL, unix.RTN_UNSPEC, unix.RTN_BLACKHOLE, unix.RTN_UNREACHABLE, unix.RTN_PROHIBIT, unix.RTN_THROW:
		return false
	case unix.RTN_ANYCAST:
		if body[0] == unix.AF_INET6 {
			return false
		}
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
