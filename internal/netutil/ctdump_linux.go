package netutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"egressd/internal/netns"
)

// ConntrackTable dumps and deletes conntrack entries over one ctnetlink
// socket (IPCTNL_MSG_CT_GET with NLM_F_DUMP, IPCTNL_MSG_CT_DELETE), as
// the firewall does on a reload to find the connections a narrowed policy
// no longer allows. It is not safe for concurrent use. It needs
// CAP_NET_ADMIN in the socket's network namespace.
type ConntrackTable struct {
	fd  int
	seq uint32
	buf []byte
}

// ConntrackEntry is one connection as conntrack dumps it. Orig is the
// tuple of the direction that opened it (the client's addresses before any
// NAT), Reply the direction back (its source is the destination the
// connection reached after destination NAT, the one the forward hook
// sees). Ports are zero for protocols without them (ICMP).
type ConntrackEntry struct {
	Family uint8 // AF_INET or AF_INET6
	Proto  uint8 // IPPROTO_TCP, IPPROTO_UDP, ...
	Orig   ConntrackTuple
	Reply  ConntrackTuple
	Mark   uint32
	ID     uint32

	// The attributes a delete sends back as they came: the original
	// tuple whole (ICMP ids, SCTP, ... included) and the zone.
	rawOrig []byte
	rawZone []byte
}

// ConntrackTuple is one direction of a connection.
type ConntrackTuple struct {
	Src, Dst netip.AddrPort
}

// More ctnetlink numbers (linux/netfilter/nfnetlink_conntrack.h).
const (
	ipctnlMsgCtDelete = 2

	ctaMark     = 8
	ctaID       = 12
	ctaZone     = 18
	ctaMarkMask = 21
)

// OpenConntrackTable opens a ctnetlink socket in the network namespace
// at nsPath (a path such as /var/run/netns/NAME), or in the process's
// own when nsPath is empty.
func OpenConntrackTable(nsPath string) (*ConntrackTable, error) {
	var fd int
	open := func() error {
		var err error
		fd, err = openCtSocket()
		return err
	}
	var err error
	if nsPath == "" {
		err = open()
	} else {
		err = netns.Do(nsPath, open)
	}
	if err != nil {
		return nil, err
	}
	// A dump of a large table arrives in many datagrams; a larger buffer
	// keeps the kernel from waiting on each read (best effort).
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20)
	return &ConntrackTable{fd: fd, buf: make([]byte, 64<<10)}, nil
}

// Close closes the socket.
func (t *ConntrackTable) Close() error {
	if t.fd < 0 {
		return nil
	}
	err := unix.Close(t.fd)
	t.fd = -1
	return err
}

// Marked calls fn for every entry, of either family, whose mark has the
// bits of want under mask (mark&mask == want), as the dump is read: the
// entries are not collected, so a table of any size costs one datagram's
// buffer. fn must not use t (the dump is still being read). The kernel
// filters by mark; the entries are checked again here.
//
// A dump walks the kernel's hash table in buckets, a datagram at a time,
// while connections come and go: an entry the kernel moves during the
// walk (a resize of the table) can come twice, and is passed to fn once
// (by its id); one can also be missed (a rehash moved it into a bucket
// already read), and nothing here can tell. The count is a count of the
// entries seen.
func (t *ConntrackTable) Marked(want, mask uint32, fn func(ConntrackEntry)) error {
	t.seq++
	seq := t.seq
	b := make([]byte, unix.SizeofNlMsghdr, 64)
	b = append(b, unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0)
	putAttr(&b, ctaMark|unix.NLA_F_NET_BYTEORDER, binary.BigEndian.AppendUint32(nil, want))
	putAttr(&b, ctaMarkMask|unix.NLA_F_NET_BYTEORDER, binary.BigEndian.AppendUint32(nil, mask))
	finishMsg(b, ipctnlMsgCtGet, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, seq)
	if err := unix.Sendto(t.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netutil: conntrack dump: %w", err)
	}
	pass := markedOnce(want, mask, fn)
	for {
		n, _, err := unix.Recvfrom(t.fd, t.buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("netutil: conntrack dump: %w", err)
		}
		done, err := parseDump(t.buf[:n], seq, pass)
		if err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

// markedOnce wraps fn for a dump: entries whose mark&mask is not want,
// and entries whose id was seen already, do not reach it. It keeps the
// ids seen (4 bytes and a map slot each, not the entries).
func markedOnce(want, mask uint32, fn func(ConntrackEntry)) func(ConntrackEntry) {
	seen := map[uint32]struct{}{}
	return func(e ConntrackEntry) {
		if e.Mark&mask != want {
			return
		}
		if e.ID != 0 {
			if _, dup := seen[e.ID]; dup {
				return
			}
			seen[e.ID] = struct{}{}
		}
		fn(e)
	}
}

// Delete removes the entry, if it is still the same connection (its id).
// An entry already gone is ErrNoConntrack.
func (t *ConntrackTable) Delete(e ConntrackEntry) error {
	if len(e.rawOrig) == 0 {
		return errors.New("netutil: conntrack delete: an entry without its tuple")
	}
	t.seq++
	seq := t.seq
	b := make([]byte, unix.SizeofNlMsghdr, 128)
	b = append(b, e.Family, unix.NFNETLINK_V0, 0, 0)
	putAttr(&b, ctaTupleOrig|unix.NLA_F_NESTED, e.rawOrig)
	if len(e.rawZone) > 0 {
		putAttr(&b, ctaZone|unix.NLA_F_NET_BYTEORDER, e.rawZone)
	}
	putAttr(&b, ctaID|unix.NLA_F_NET_BYTEORDER, binary.BigEndian.AppendUint32(nil, e.ID))
	finishMsg(b, ipctnlMsgCtDelete, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
	return t.request(b, seq, "conntrack delete")
}

// SetMark sets the bits of mask in the entry's mark to value's (the
// other bits stay as they are: CTA_MARK with CTA_MARK_MASK, which the
// kernel applies as mark&^mask | value). value must have no bit outside
// mask. An entry already gone is ErrNoConntrack.
//
// ctnetlink updates by tuple, not by id: if the connection ended and
// another with the same original tuple (and zone) took its place since
// the dump, that one's mark is set.
func (t *ConntrackTable) SetMark(e ConntrackEntry, value, mask uint32) error {
	if len(e.rawOrig) == 0 {
		return errors.New("netutil: conntrack mark: an entry without its tuple")
	}
	if value&^mask != 0 {
		return fmt.Errorf("netutil: conntrack mark: value 0x%08x outside mask 0x%08x", value, mask)
	}
	t.seq++
	seq := t.seq
	b := make([]byte, unix.SizeofNlMsghdr, 128)
	b = append(b, e.Family, unix.NFNETLINK_V0, 0, 0)
	putAttr(&b, ctaTupleOrig|unix.NLA_F_NESTED, e.rawOrig)
	if len(e.rawZone) > 0 {
		putAttr(&b, ctaZone|unix.NLA_F_NET_BYTEORDER, e.rawZone)
	}
	putAttr(&b, ctaMark|unix.NLA_F_NET_BYTEORDER, binary.BigEndian.AppendUint32(nil, value))
	putAttr(&b, ctaMarkMask|unix.NLA_F_NET_BYTEORDER, binary.BigEndian.AppendUint32(nil, mask))
	// IPCTNL_MSG_CT_NEW without NLM_F_CREATE: an update of an existing
	// entry, ENOENT if there is none.
	finishMsg(b, ipctnlMsgCtNew, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
	return t.request(b, seq, "conntrack mark")
}

// request sends one message and waits for its acknowledgement.
func (t *ConntrackTable) request(b []byte, seq uint32, what string) error {
	if err := unix.Sendto(t.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netutil: %s: %w", what, err)
	}
	for range 16 {
		n, _, err := unix.Recvfrom(t.fd, t.buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("netutil: %s: %w", what, err)
		}
		if done, err := parseAck(t.buf[:n], seq); done {
			return err
		}
	}
	return fmt.Errorf("netutil: %s: no answer", what)
}

// finishMsg writes the netlink header of a ctnetlink message.
func finishMsg(b []byte, msg uint16, flags uint16, seq uint32) {
	binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:6], unix.NFNL_SUBSYS_CTNETLINK<<8|msg)
	binary.NativeEndian.PutUint16(b[6:8], flags)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	binary.NativeEndian.PutUint32(b[12:16], 0)
}

// parseAck reads the acknowledgement (or error) of request seq.
func parseAck(b []byte, seq uint32) (done bool, err error) {
	return eachMsg(b, seq, "conntrack", func(typ uint16, _ []byte) (bool, error) {
		return typ == unix.NLMSG_ERROR, nil
	})
}

// parseDump reads one datagram of a dump answering seq, calling fn for
// each entry; done reports its end (NLMSG_DONE).
func parseDump(b []byte, seq uint32, fn func(ConntrackEntry)) (done bool, err error) {
	return eachMsg(b, seq, "conntrack dump", func(typ uint16, body []byte) (bool, error) {
		switch typ {
		case unix.NLMSG_DONE:
			return true, nil
		case unix.NFNL_SUBSYS_CTNETLINK<<8 | ipctnlMsgCtNew:
			if e, ok := parseEntry(body); ok {
				fn(e)
			}
		}
		return false, nil
	})
}

// parseEntry reads a dumped entry (nfgenmsg and attributes). An entry
// without both tuples is skipped.
func parseEntry(body []byte) (ConntrackEntry, bool) {
	var e ConntrackEntry
	if len(body) < 4 {
		return e, false
	}
	e.Family = body[0]
	attrs := body[4:]
	orig, ok1 := findAttr(attrs, ctaTupleOrig)
	reply, ok2 := findAttr(attrs, ctaTupleReply)
	if !ok1 || !ok2 {
		return e, false
	}
	var ok bool
	if e.Orig, e.Proto, ok = parseTuple(orig); !ok {
		return e, false
	}
	if e.Reply, _, ok = parseTuple(reply); !ok {
		return e, false
	}
	e.rawOrig = append([]byte(nil), orig...)
	if v, ok := findAttr(attrs, ctaMark); ok && len(v) == 4 {
		e.Mark = binary.BigEndian.Uint32(v)
	}
	if v, ok := findAttr(attrs, ctaID); ok && len(v) == 4 {
		e.ID = binary.BigEndian.Uint32(v)
	}
	if v, ok := findAttr(attrs, ctaZone); ok && len(v) == 2 {
		e.rawZone = append([]byte(nil), v...)
	}
	return e, true
}

// parseTuple reads a CTA_TUPLE_* payload: addresses, protocol and, for
// protocols with them, ports.
func parseTuple(b []byte) (ConntrackTuple, uint8, bool) {
	var tu ConntrackTuple
	ip, ok1 := findAttr(b, ctaTupleIP)
	proto, ok2 := findAttr(b, ctaTupleProto)
	if !ok1 || !ok2 {
		return tu, 0, false
	}
	var src, dst netip.Addr
	if s, ok := findAttr(ip, ctaIPv4Src); ok && len(s) == 4 {
		d, ok := findAttr(ip, ctaIPv4Dst)
		if !ok || len(d) != 4 {
			return tu, 0, false
		}
		src, dst = netip.AddrFrom4([4]byte(s)), netip.AddrFrom4([4]byte(d))
	} else if s, ok := findAttr(ip, ctaIPv6Src); ok && len(s) == 16 {
		d, ok := findAttr(ip, ctaIPv6Dst)
		if !ok || len(d) != 16 {
			return tu, 0, false
		}
		src, dst = netip.AddrFrom16([16]byte(s)), netip.AddrFrom16([16]byte(d))
	} else {
		return tu, 0, false
	}
	num, ok := findAttr(proto, ctaProtoNum)
	if !ok || len(num) != 1 {
		return tu, 0, false
	}
	var sp, dp uint16
	if v, ok := findAttr(proto, ctaProtoSrcPort); ok && len(v) == 2 {
		sp = binary.BigEndian.Uint16(v)
	}
	if v, ok := findAttr(proto, ctaProtoDstPort); ok && len(v) == 2 {
		dp = binary.BigEndian.Uint16(v)
	}
	tu.Src, tu.Dst = netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp)
	return tu, num[0], true
}
