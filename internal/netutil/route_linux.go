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
//
// An IPv4-mapped address (::ffff:198.18.1.77) is an IPv6 packet's source,
// looked up in the IPv6 table as nft_fib does (Linux passes such packets
// to netfilter; where no IPv6 route covers ::ffff:0:0/96 the default
// route's interface answers), not unmapped. For 0.0.0.0 nft_fib looks up
// the address 0.0.0.0 itself, whose best route is the default one (but
// for the broadcast and local multicast destinations it lets pass before
// the lookup, which its caller handles); the kernel will not say which
// route that is when asked (it answers a lookup of 0.0.0.0 with the
// loopback), so RoutesBack reads the routes and takes the most specific
// that covers 0.0.0.0, in the local, main and default tables in that
// order (the default rules), the lowest metric among equals
// (zeroRoutesBack).
// An error says the kernel did not answer: the caller knows nothing.
func (r *RouteAsker) RoutesBack(ifindex int, addr netip.Addr) (bool, error) {
	const what = "route lookup"
	if !addr.IsValid() || addr.Zone() != "" {
		return false, fmt.Errorf("netutil: %s: bad address %v", what, addr)
	}
	family := byte(unix.AF_INET6)
	if addr.Is4() {
		family = unix.AF_INET
		if addr.IsUnspecified() {
			return r.zeroRoutesBack(ifindex)
		}
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

// zeroRoutesMaxReads bounds the datagrams zeroRoutesBack reads of one
// dump of the IPv4 routes (each up to len(buf), 32 KiB).
const zeroRoutesMaxReads = 4096

// zeroRoutesBack is RoutesBack for 0.0.0.0: it dumps the IPv4 routes and
// takes, in the first of the local, main and default tables that has one,
// the most specific route covering 0.0.0.0 (a default route, 0.0.0.0/8),
// the lowest metric among equals, and reports whether it routes via
// ifindex (routeVia).
func (r *RouteAsker) zeroRoutesBack(ifindex int) (bool, error) {
	const what = "route dump"
	r.seq++
	seq := r.seq
	b := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+unix.SizeofRtMsg)
	binary.NativeEndian.PutUint16(b[4:6], unix.RTM_GETROUTE)
	binary.NativeEndian.PutUint16(b[6:8], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	var rtm [unix.SizeofRtMsg]byte
	rtm[0] = unix.AF_INET
	b = append(b, rtm[:]...)
	binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
	if err := unix.Sendto(r.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return false, fmt.Errorf("netutil: %s: %w", what, err)
	}
	type best struct {
		found  bool
		bits   int
		metric uint32
		back   bool
	}
	var tables [3]best // local, main, default
	buf := make([]byte, 32<<10)
	for range zeroRoutesMaxReads {
		k, _, err := unix.Recvfrom(r.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("netutil: %s: %w", what, err)
		}
		done, err := eachMsgNotFound(buf[:k], seq, what, errNoRoute, func(typ uint16, body []byte) (bool, error) {
			if typ == unix.NLMSG_DONE {
				return true, nil
			}
			if typ != unix.RTM_NEWROUTE || len(body) < unix.SizeofRtMsg || body[0] != unix.AF_INET {
				return false, nil
			}
			attrs := body[unix.SizeofRtMsg:]
			table := uint32(body[4])
			if v, ok := findAttr(attrs, unix.RTA_TABLE); ok && len(v) == 4 {
				table = binary.NativeEndian.Uint32(v)
			}
			i := 0
			switch table {
			case unix.RT_TABLE_LOCAL:
			case unix.RT_TABLE_MAIN:
				i = 1
			case unix.RT_TABLE_DEFAULT:
				i = 2
			default:
				return false, nil
			}
			if dst, ok := findAttr(attrs, unix.RTA_DST); ok && (len(dst) != 4 || [4]byte(dst) != [4]byte{}) {
				return false, nil // a prefix that does not cover 0.0.0.0
			}
			var metric uint32
			if v, ok := findAttr(attrs, unix.RTA_PRIORITY); ok && len(v) == 4 {
				metric = binary.NativeEndian.Uint32(v)
			}
			bits, t := int(body[1]), &tables[i]
			if !t.found || bits > t.bits || bits == t.bits && metric < t.metric {
				*t = best{found: true, bits: bits, metric: metric, back: routeVia(body, ifindex)}
			}
			return false, nil
		})
		if err != nil {
			return false, err
		}
		if done {
			for _, t := range tables {
				if t.found {
					return t.back, nil
				}
			}
			return false, nil
		}
	}
	return false, fmt.Errorf("netutil: %s: more than %d reads", what, zeroRoutesMaxReads)
}

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
