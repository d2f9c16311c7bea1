package netutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// neighTimeout bounds each wait for the kernel's answer (it answers a
// neighbour request at once: a guard, not a budget); neighDumpTimeout
// bounds a whole dump.
const (
	neighTimeout     = 200 * time.Millisecond
	neighDumpTimeout = time.Second
)

// userHZ is the kernel's clock tick as it reports times to user space
// (USER_HZ: nda_cacheinfo counts in it), 100 on the architectures Go
// runs egressd on.
const userHZ = 100

// NeighbourDump calls fn for each entry of the neighbour table on the
// interface with index ifindex, both families (RTM_GETNEIGH with
// NLM_F_DUMP, NETLINK_ROUTE), in the network namespace of the calling
// thread, as the dump is read. It reads at most max entries of the
// interface (the rest of the dump is read and dropped) and reports
// whether there were more. Asking needs no privilege.
func NeighbourDump(ifindex, max int, fn func(Neighbour)) (more bool, err error) {
	fd, err := openNeighSocket()
	if err != nil {
		return false, err
	}
	defer unix.Close(fd)
	const seq = 1
	b := neighRequest(unix.AF_UNSPEC, 0, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, seq)
	// The kernel filters a dump by NDA_IFINDEX; the entries are checked
	// again here.
	putAttr(&b, unix.NDA_IFINDEX, binary.NativeEndian.AppendUint32(nil, uint32(ifindex)))
	binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
	if err := unix.Sendto(fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return false, fmt.Errorf("netutil: neighbour dump: %w", err)
	}
	// A datagram of a dump is at most 32 KiB; as the conntrack dump's.
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(neighDumpTimeout)
	n := 0
	for time.Now().Before(deadline) {
		k, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return more, fmt.Errorf("netutil: neighbour dump: %w", err)
		}
		done, err := parseNeighMsgs(buf[:k], seq, "neighbour dump", func(nb Neighbour, ifi int) {
			if ifi != ifindex {
				return
			}
			if n >= max {
				more = true
				return
			}
			n++
			fn(nb)
		})
		if err != nil || done {
			return more, err
		}
	}
	return more, errors.New("netutil: neighbour dump: no end within " + neighDumpTimeout.String())
}

// NeighbourGet returns the neighbour table's entry for addr on the
// interface with index ifindex (RTM_GETNEIGH for one address, Linux 4.20
// and later), in the network namespace of the calling thread;
// ErrNoNeighbour when there is none.
func NeighbourGet(ifindex int, addr netip.Addr) (Neighbour, error) {
	const what = "neighbour get"
	addr, family, err := neighAddr(what, addr)
	if err != nil {
		return Neighbour{}, err
	}
	b := neighRequest(family, ifindex, unix.NLM_F_REQUEST, neighSeq)
	putAttr(&b, unix.NDA_DST, addr.AsSlice())
	var got Neighbour
	err = neighAsk(what, b, func(msgs []byte) (bool, error) {
		found := false
		done, err := parseNeighMsgs(msgs, neighSeq, what, func(nb Neighbour, ifi int) {
			if ifi == ifindex && nb.Addr == addr {
				got, found = nb, true
			}
		})
		switch {
		case err != nil:
			return true, err
		case found:
			return true, nil
		case done:
			return true, ErrNoNeighbour
		}
		return false, nil
	})
	if err != nil {
		return Neighbour{}, err
	}
	return got, nil
}

// NeighbourResolve asks the kernel to resolve addr on the interface with
// index ifindex (RTM_NEWNEIGH with NTF_USE, as `ip neigh replace ADDR dev
// DEV use`): an entry is made if there is none (not a permanent one, so
// the kernel's garbage collection keeps its table bounded) and the kernel
// sends ARP or a neighbour solicitation, as for a packet to addr. It
// returns once the kernel has taken the request, not when addr answers:
// a host that holds addr answers and its entry becomes reachable; for a
// source nobody holds the entry fails. Needs CAP_NET_ADMIN.
func NeighbourResolve(ifindex int, addr netip.Addr) error {
	const what = "neighbour resolve"
	addr, family, err := neighAddr(what, addr)
	if err != nil {
		return err
	}
	b := neighRequest(family, ifindex, unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_REPLACE, neighSeq)
	binary.NativeEndian.PutUint16(b[4:6], unix.RTM_NEWNEIGH)
	b[unix.SizeofNlMsghdr+10] = unix.NTF_USE // ndm_flags; ndm_state stays 0 (not permanent)
	putAttr(&b, unix.NDA_DST, addr.AsSlice())
	return neighAsk(what, b, func(msgs []byte) (bool, error) {
		return eachMsgNotFound(msgs, neighSeq, what, ErrNoNeighbour, func(typ uint16, body []byte) (bool, error) {
			return typ == unix.NLMSG_ERROR, nil
		})
	})
}

// neighSeq is the sequence number of neighAsk's requests, each on a
// socket of its own.
const neighSeq = 1

// neighAddr checks addr for a request about one address (what names the
// request in errors) and returns it unmapped, with its family.
func neighAddr(what string, addr netip.Addr) (netip.Addr, byte, error) {
	addr = addr.Unmap()
	if !addr.IsValid() || addr.Zone() != "" {
		return addr, 0, fmt.Errorf("netutil: %s: bad address %v", what, addr)
	}
	if addr.Is4() {
		return addr, unix.AF_INET, nil
	}
	return addr, unix.AF_INET6, nil
}

// neighAsk sends the request b (its length set here) about one address
// on a neighbour socket of its own and passes each datagram of the
// answer to take until take says it is done or fails (returning take's
// error), in at most four receives (an interrupted one among them): the
// kernel answers such a request in one or two datagrams.
func neighAsk(what string, b []byte, take func(msgs []byte) (done bool, err error)) error {
	fd, err := openNeighSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
	if err := unix.Sendto(fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netutil: %s: %w", what, err)
	}
	buf := make([]byte, 4096)
	for range 4 {
		k, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("netutil: %s: %w", what, err)
		}
		if done, err := take(buf[:k]); done || err != nil {
			return err
		}
	}
	return fmt.Errorf("netutil: %s: no answer", what)
}

func openNeighSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return -1, fmt.Errorf("netutil: neighbour socket: %w", err)
	}
	tv := unix.NsecToTimeval(int64(neighTimeout))
	for _, opt := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("netutil: neighbour socket timeout: %w", err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("netutil: neighbour bind: %w", err)
	}
	return fd, nil
}

// neighRequest starts an RTM_GETNEIGH message: the netlink header (its
// length written by the caller once the attributes are in) and an ndmsg.
func neighRequest(family byte, ifindex int, flags uint16, seq uint32) []byte {
	b := make([]byte, unix.SizeofNlMsghdr, 64)
	binary.NativeEndian.PutUint16(b[4:6], unix.RTM_GETNEIGH)
	binary.NativeEndian.PutUint16(b[6:8], flags)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	var ndm [unix.SizeofNdMsg]byte
	ndm[0] = family
	binary.NativeEndian.PutUint32(ndm[4:8], uint32(int32(ifindex)))
	return append(b, ndm[:]...)
}

// parseNeighMsgs reads the messages of one datagram answering seq: fn gets
// every RTM_NEWNEIGH entry that parses, with its interface index; done
// reports the end of a dump (NLMSG_DONE) or an acknowledgement.
func parseNeighMsgs(b []byte, seq uint32, what string, fn func(Neighbour, int)) (done bool, err error) {
	return eachMsgNotFound(b, seq, what, ErrNoNeighbour, func(typ uint16, body []byte) (bool, error) {
		switch typ {
		case unix.NLMSG_DONE, unix.NLMSG_ERROR:
			return true, nil
		case unix.RTM_NEWNEIGH:
			if nb, ifi, ok := parseNeighbour(body); ok {
				fn(nb, ifi)
			}
		}
		return false, nil
	})
}

// parseNeighbour reads an ndmsg and its attributes. An entry without a
// destination address is skipped; one without an Ethernet address (an
// incomplete or failed entry, or a link without one) has a zero MAC.
func parseNeighbour(body []byte) (Neighbour, int, bool) {
	var nb Neighbour
	if len(body) < unix.SizeofNdMsg {
		return nb, 0, false
	}
	ifi := int(int32(binary.NativeEndian.Uint32(body[4:8])))
	nb.State = binary.NativeEndian.Uint16(body[8:10])
	attrs := body[unix.SizeofNdMsg:]
	dst, ok := findAttr(attrs, unix.NDA_DST)
	switch {
	case ok && len(dst) == 4:
		nb.Addr = netip.AddrFrom4([4]byte(dst))
	case ok && len(dst) == 16:
		nb.Addr = netip.AddrFrom16([16]byte(dst)).Unmap()
	default:
		return nb, 0, false
	}
	if ll, ok := findAttr(attrs, unix.NDA_LLADDR); ok && len(ll) == 6 {
		nb.MAC = MAC(ll)
	}
	if nb.State&NUDPermanent == 0 {
		if ci, ok := findAttr(attrs, unix.NDA_CACHEINFO); ok && len(ci) >= 12 {
			idle := min(binary.NativeEndian.Uint32(ci[0:4]), binary.NativeEndian.Uint32(ci[4:8]), binary.NativeEndian.Uint32(ci[8:12]))
			nb.Idle = time.Duration(idle) * time.Second / userHZ
		}
	}
	return nb, ifi, true
}

// netlinkNeigh is the kernel's neighbour table on the interface named
// iface (its index looked up at each dump: an interface made again gets a
// new one).
type netlinkNeigh struct {
	iface string

	mu      sync.Mutex // guards ifindex
	ifindex int
}

func (n *netlinkNeigh) index(fresh bool) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if fresh || n.ifindex == 0 {
		ifi, err := net.InterfaceByName(n.iface)
		if err != nil {
			return 0, err
		}
		n.ifindex = ifi.Index
	}
	return n.ifindex, nil
}

func (n *netlinkNeigh) dump(max int, fn func(Neighbour)) (bool, error) {
	ifi, err := n.index(true)
	if err != nil {
		return false, err
	}
	return NeighbourDump(ifi, max, fn)
}

func (n *netlinkNeigh) get(addr netip.Addr) (Neighbour, error) {
	ifi, err := n.index(false)
	if err != nil {
		return Neighbour{}, err
	}
	return NeighbourGet(ifi, addr)
}

func (n *netlinkNeigh) prefixes() ([]netip.Prefix, error) {
	ifi, err := net.InterfaceByName(n.iface)
	if err != nil {
		return nil, err
	}
	if ok, err := resolvesNeighbours(ifi); !ok || err != nil {
		// A link without ARP and NDP (WireGuard, tun, PPP, ARP off)
		// has no usable entry for any address: none is one the
		// gateway failed to resolve.
		return nil, err
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

func (n *netlinkNeigh) resolve(addr netip.Addr) error {
	ifi, err := n.index(false)
	if err != nil {
		return err
	}
	return NeighbourResolve(ifi, addr)
}

// resolvesNeighbours reports whether the interface resolves its
// neighbours' Ethernet addresses (ARP, NDP): an Ethernet address of its
// own, not point-to-point, not IFF_NOARP (`ip link set DEV arp off`,
// which net.Interface does not tell; SIOCGIFFLAGS in the calling
// thread's network namespace).
func resolvesNeighbours(ifi *net.Interface) (bool, error) {
	if len(ifi.HardwareAddr) != 6 || ifi.Flags&net.FlagPointToPoint != 0 {
		return false, nil
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("netutil: interface flags: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(ifi.Name)
	if err != nil {
		return false, fmt.Errorf("netutil: interface flags: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return false, fmt.Errorf("netutil: interface flags of %s: %w", ifi.Name, err)
	}
	return ifr.Uint16()&unix.IFF_NOARP == 0, nil
}
