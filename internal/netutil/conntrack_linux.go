package netutil

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Conntrack asks the kernel's connection tracking table, over a
// NETLINK_NETFILTER socket (ctnetlink, IPCTNL_MSG_CT_GET), which source
// address and port a client really used for a connection that nftables
// redirected to a local listener.
//
// Why: after a REDIRECT every destination becomes the same listener
// address. A client that reuses one source port toward two destinations
// (Linux does) makes the second connection's reply tuple
// (listener -> client:port) clash with the first one's conntrack entry
// while that entry lingers (TIME_WAIT, CLOSE); the kernel's NAT then
// remaps the source port, and the accepted socket shows a port the client
// never used. SO_ORIGINAL_DST only gives back the original destination;
// the original source is in the entry's CTA_TUPLE_ORIG, which this reads.
//
// One Conntrack holds a few netlink sockets (ConntrackSockets), all opened
// in the network namespace of the thread that called OpenConntrack; a
// lookup takes one for its request and answer (a few microseconds), so
// concurrent lookups do not queue behind one another's system calls (a
// single socket under one lock did, and a lock holder descheduled on a
// busy machine held up every connection being accepted). It is safe for
// concurrent use. Asking needs CAP_NET_ADMIN in that namespace.
type Conntrack struct {
	mu     sync.RWMutex // read-held by lookups, write-held by Close
	closed bool
	free   chan *ctSocket // sockets not in use
	all    []*ctSocket
}

// ConntrackSockets is how many netlink sockets a Conntrack opens: how many
// lookups run at once; more wait for a free socket.
const ConntrackSockets = 4

// ctSocket is one netlink socket and its buffers; one lookup at a time.
type ctSocket struct {
	fd  int
	seq uint32
	buf []byte
}

// ctnetlink numbers (linux/netfilter/nfnetlink_conntrack.h); x/sys/unix
// does not carry them.
const (
	ipctnlMsgCtNew = 0
	ipctnlMsgCtGet = 1

	ctaTupleOrig  = 1
	ctaTupleReply = 2

	ctaTupleIP    = 1
	ctaTupleProto = 2

	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3

	nlaTypeMask = 0x3fff // strips NLA_F_NESTED and NLA_F_NET_BYTEORDER
)

// conntrackTimeout bounds one lookup, from its call to its answer: the
// wait for a free socket (a burst of connections, or sockets held by
// lookups the kernel does not answer) and for the kernel's answer
// together. The kernel answers a GET synchronously, within the send, so
// this is a guard, not a budget: the proxy makes the lookup before it
// decides a connection, and a lookup out of time leaves the socket's port.
const conntrackTimeout = 200 * time.Millisecond

// ErrNoConntrack means conntrack has no entry for the asked tuple.
var ErrNoConntrack = errors.New("netutil: no conntrack entry")

// ErrConntrackTimeout means a lookup ran out of its time (conntrackTimeout)
// waiting for a free socket or for the kernel's answer.
var ErrConntrackTimeout = errors.New("netutil: conntrack: no answer in time")

// errConntrackClosed is returned by lookups after Close.
var errConntrackClosed = errors.New("netutil: conntrack: closed")

// OpenConntrack opens the netlink sockets, in the network namespace of
// the calling thread.
func OpenConntrack() (*Conntrack, error) {
	ct := &Conntrack{free: make(chan *ctSocket, ConntrackSockets)}
	for i := range ConntrackSockets {
		fd, err := openCtSocket()
		if err != nil {
			for _, s := range ct.all {
				unix.Close(s.fd)
			}
			return nil, err
		}
		// Distinct sequence ranges, so that a stale answer on one socket
		// can never carry another socket's current number.
		s := &ctSocket{fd: fd, seq: uint32(i) << 28, buf: make([]byte, 8192)}
		ct.all = append(ct.all, s)
		ct.free <- s
	}
	return ct, nil
}

func openCtSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return -1, fmt.Errorf("netutil: conntrack socket: %w", err)
	}
	tv := unix.NsecToTimeval(int64(conntrackTimeout))
	for _, opt := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("netutil: conntrack socket timeout: %w", err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("netutil: conntrack bind: %w", err)
	}
	return fd, nil
}

// Close closes the sockets, after the lookups in flight. It is
// idempotent; lookups after it fail.
func (ct *Conntrack) Close() error {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	if ct.closed {
		return nil
	}
	ct.closed = true
	var err error
	for _, s := range ct.all {
		if e := unix.Close(s.fd); e != nil && err == nil {
			err = e
		}
		s.fd = -1
	}
	return err
}

// OriginalSource returns the source address and port of the connection's
// original direction, for an accepted TCP connection whose local end is
// local (the listener's address and port) and whose remote end is remote
// (the socket's peer): conntrack's reply tuple is local -> remote. Without
// NAT on the source, the result equals remote. IPv4-mapped addresses are
// unmapped; local and remote must then be of one family.
func (ct *Conntrack) OriginalSource(local, remote netip.AddrPort) (netip.AddrPort, error) {
	la, ra := local.Addr().Unmap(), remote.Addr().Unmap()
	if !la.IsValid() || !ra.IsValid() || la.Is4() != ra.Is4() {
		return netip.AddrPort{}, fmt.Errorf("netutil: conntrack: bad tuple %s -> %s", local, remote)
	}
	ct.mu.RLock()
	defer ct.mu.RUnlock()
	if ct.closed {
		return netip.AddrPort{}, errConntrackClosed
	}
	deadline := time.Now().Add(conntrackTimeout)
	var s *ctSocket
	select {
	case s = <-ct.free: // Close waits for this lookup, so the socket stays open
	default:
		t := time.NewTimer(conntrackTimeout)
		select {
		case s = <-ct.free:
			t.Stop()
		case <-t.C:
			return netip.AddrPort{}, fmt.Errorf("%w: every socket busy", ErrConntrackTimeout)
		}
	}
	defer func() { ct.free <- s }()
	s.seq++
	seq := s.seq
	req := buildCtGet(seq, netip.AddrPortFrom(la, local.Port()), netip.AddrPortFrom(ra, remote.Port()))
	// write(2), not sendto(2) with the kernel's address: an unconnected
	// netlink socket sends to the kernel (port 0) by default.
	if _, err := unix.Write(s.fd, req); err != nil {
		return netip.AddrPort{}, fmt.Errorf("netutil: conntrack send: %w", err)
	}
	// Answers to earlier requests that timed out may still be queued: skip
	// them by sequence number. Bounded: a handful of reads, all within the
	// deadline. The answer is normally queued by the time the send
	// returns, so the first read does not wait; only a missing answer
	// waits, in poll(2), for what is left of the deadline (not for the
	// socket's SO_RCVTIMEO, which each read would restart).
	for range 16 {
		n, _, err := unix.Recvfrom(s.fd, s.buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			if err := waitReadable(s.fd, deadline); err != nil {
				return netip.AddrPort{}, err
			}
			continue
		}
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("netutil: conntrack receive: %w", err)
		}
		src, done, err := parseCtAnswer(s.buf[:n], seq)
		if done {
			return src, err
		}
	}
	return netip.AddrPort{}, errors.New("netutil: conntrack: no answer")
}

// waitReadable waits until fd has a datagram to read or deadline passes
// (ErrConntrackTimeout).
func waitReadable(fd int, deadline time.Time) error {
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%w: no answer from the kernel", ErrConntrackTimeout)
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, int((left+time.Millisecond-1)/time.Millisecond))
		switch {
		case errors.Is(err, unix.EINTR):
			continue // a signal (Go's preemption) during the wait
		case err != nil:
			return fmt.Errorf("netutil: conntrack poll: %w", err)
		case n > 0:
			return nil
		}
	}
}

// buildCtGet builds an IPCTNL_MSG_CT_GET request for the reply tuple
// src -> dst, TCP.
func buildCtGet(seq uint32, src, dst netip.AddrPort) []byte {
	family, srcType, dstType := byte(unix.AF_INET), uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if src.Addr().Is6() {
		family, srcType, dstType = unix.AF_INET6, ctaIPv6Src, ctaIPv6Dst
	}
	b := make([]byte, unix.SizeofNlMsghdr, 128)
	b = append(b, family, unix.NFNETLINK_V0, 0, 0) // nfgenmsg, res_id 0
	reply := beginAttr(&b, ctaTupleReply|unix.NLA_F_NESTED)
	ip := beginAttr(&b, ctaTupleIP|unix.NLA_F_NESTED)
	putAttr(&b, srcType, src.Addr().AsSlice())
	putAttr(&b, dstType, dst.Addr().AsSlice())
	endAttr(b, ip)
	proto := beginAttr(&b, ctaTupleProto|unix.NLA_F_NESTED)
	putAttr(&b, ctaProtoNum, []byte{unix.IPPROTO_TCP})
	putAttr(&b, ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, src.Port()))
	putAttr(&b, ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, dst.Port()))
	endAttr(b, proto)
	endAttr(b, reply)
	binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:6], unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtGet)
	binary.NativeEndian.PutUint16(b[6:8], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	binary.NativeEndian.PutUint32(b[12:16], 0)
	return b
}

// beginAttr starts a nested attribute and returns its offset for endAttr.
func beginAttr(b *[]byte, typ uint16) int {
	off := len(*b)
	*b = binary.NativeEndian.AppendUint16(*b, 0)
	*b = binary.NativeEndian.AppendUint16(*b, typ)
	return off
}

// endAttr writes the length of the nested attribute started at off.
func endAttr(b []byte, off int) {
	binary.NativeEndian.PutUint16(b[off:], uint16(len(b)-off))
}

// putAttr appends one attribute, padded to 4 bytes.
func putAttr(b *[]byte, typ uint16, v []byte) {
	*b = binary.NativeEndian.AppendUint16(*b, uint16(unix.SizeofNlAttr+len(v)))
	*b = binary.NativeEndian.AppendUint16(*b, typ)
	*b = append(*b, v...)
	for len(*b)%unix.NLA_ALIGNTO != 0 {
		*b = append(*b, 0)
	}
}

// eachMsg walks the netlink messages of one datagram and calls fn with
// the type and body of each that answers seq (others are skipped: answers
// to earlier requests that timed out); fn's done ends the walk. An error
// message that is not an acknowledgement ends it with the error (ENOENT:
// ErrNoConntrack); an acknowledgement reaches fn as NLMSG_ERROR with a
// nil body. A malformed datagram ends it with an error. what names the
// request in errors.
func eachMsg(b []byte, seq uint32, what string, fn func(typ uint16, body []byte) (done bool, err error)) (done bool, err error) {
	return eachMsgNotFound(b, seq, what, ErrNoConntrack, fn)
}

// eachMsgNotFound is eachMsg with notFound as the error for ENOENT.
func eachMsgNotFound(b []byte, seq uint32, what string, notFound error, fn func(typ uint16, body []byte) (done bool, err error)) (done bool, err error) {
	for len(b) >= unix.SizeofNlMsghdr {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < unix.SizeofNlMsghdr || l > len(b) {
			return true, fmt.Errorf("netutil: %s: malformed answer", what)
		}
		typ := binary.NativeEndian.Uint16(b[4:6])
		mseq := binary.NativeEndian.Uint32(b[8:12])
		body := b[unix.SizeofNlMsghdr:l]
		b = b[min(nlAlign(l), len(b)):]
		if mseq != seq {
			continue
		}
		if typ == unix.NLMSG_ERROR {
			if len(body) < 4 {
				return true, fmt.Errorf("netutil: %s: malformed error", what)
			}
			switch code := int32(binary.NativeEndian.Uint32(body[0:4])); {
			case code == 0:
				body = nil
			case unix.Errno(-code) == unix.ENOENT:
				return true, notFound
			default:
				return true, fmt.Errorf("netutil: %s: %w", what, unix.Errno(-code))
			}
		}
		if done, err := fn(typ, body); done || err != nil {
			return true, err
		}
	}
	return false, nil
}

// parseCtAnswer reads the netlink messages of one datagram. done reports
// that the answer to seq was among them (then src or err is it).
func parseCtAnswer(b []byte, seq uint32) (src netip.AddrPort, done bool, err error) {
	done, err = eachMsg(b, seq, "conntrack", func(typ uint16, body []byte) (bool, error) {
		if typ != unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtNew {
			return false, nil // an acknowledgement, or another message
		}
		var err error
		src, err = parseOrigSource(body)
		return true, err
	})
	if err != nil {
		src = netip.AddrPort{}
	}
	return src, done, err
}

// parseOrigSource reads CTA_TUPLE_ORIG's source address and port out of
// a conntrack message body (nfgenmsg and attributes).
func parseOrigSource(body []byte) (netip.AddrPort, error) {
	bad := errors.New("netutil: conntrack: answer without an original source")
	if len(body) < 4 {
		return netip.AddrPort{}, bad
	}
	orig, ok := findAttr(body[4:], ctaTupleOrig)
	if !ok {
		return netip.AddrPort{}, bad
	}
	ip, ok1 := findAttr(orig, ctaTupleIP)
	proto, ok2 := findAttr(orig, ctaTupleProto)
	if !ok1 || !ok2 {
		return netip.AddrPort{}, bad
	}
	var addr netip.Addr
	if v, ok := findAttr(ip, ctaIPv4Src); ok && len(v) == 4 {
		addr = netip.AddrFrom4([4]byte(v))
	} else if v, ok := findAttr(ip, ctaIPv6Src); ok && len(v) == 16 {
		addr = netip.AddrFrom16([16]byte(v))
	} else {
		return netip.AddrPort{}, bad
	}
	port, ok := findAttr(proto, ctaProtoSrcPort)
	if !ok || len(port) != 2 {
		return netip.AddrPort{}, bad
	}
	return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(port)), nil
}

// findAttr returns the payload of the first attribute of type typ in b
// (nested and byte-order flags ignored). A malformed list ends the search.
func findAttr(b []byte, typ uint16) ([]byte, bool) {
	for len(b) >= unix.SizeofNlAttr {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		t := binary.NativeEndian.Uint16(b[2:4]) & nlaTypeMask
		if l < unix.SizeofNlAttr || l > len(b) {
			return nil, false
		}
		if t == typ {
			return b[unix.SizeofNlAttr:l], true
		}
		b = b[min(nlAlign(l), len(b)):]
	}
	return nil, false
}

func nlAlign(n int) int { return (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }
