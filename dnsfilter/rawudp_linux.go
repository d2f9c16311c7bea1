package dnsfilter

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/netutil"
)

// rawUDP is an IPv4 listener socket that Go's netpoller does not watch:
// its reader waits in recvmmsg itself (the socket in blocking mode,
// MSG_WAITFORONE) and is woken by the kernel when a query arrives. A
// socket the netpoller watches wakes the runtime's epoll thread on every
// datagram as well, and the hand-off from that thread to the reader was
// most of the forwarder's latency tail at a light, steady rate (README,
// "DNS forwarder"). Writes never block (MSG_DONTWAIT: a full send buffer
// drops the answer, as UDP may).
type rawUDP struct {
	fd     int
	laddr  *net.UDPAddr
	mu     sync.RWMutex // held for reading around each system call on fd; Close takes it to close fd
	closed atomic.Bool
	out    sync.Pool // *rawOut for WriteBatch
}

// rawFrom turns c, an IPv4 socket, into a rawUDP: a duplicate of its
// descriptor in blocking mode, after c is closed (Go's close takes the
// socket out of the netpoller; the duplicate keeps it bound, with its
// options and its place in a SO_REUSEPORT group).
func rawFrom(c *net.UDPConn) (*rawUDP, error) {
	la, _ := c.LocalAddr().(*net.UDPAddr)
	if la == nil || la.IP.To4() == nil {
		return nil, errors.New("dnsfilter: raw socket: not IPv4")
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dnsfilter: raw socket: %w", derr)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("dnsfilter: raw socket: %w", err)
	}
	_ = c.Close()
	return &rawUDP{fd: fd, laddr: la}, nil
}

func (r *rawUDP) LocalAddr() net.Addr { return r.laddr }

// setDropFrom attaches the socket filter of SetDropFrom (a closed socket:
// nothing to do).
func (r *rawUDP) setDropFrom(ifindex int) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.closed.Load() {
		return nil
	}
	if err := netutil.DropFromInterfaceFD(r.fd, ifindex); err != nil {
		return fmt.Errorf("dnsfilter: %w", err)
	}
	return nil
}

// Close wakes a reader blocked in recvmmsg (shutdown of the reading side
// makes every read return at once; on an unconnected UDP socket it
// reports ENOTCONN but does it), waits for the system calls in progress
// and closes the descriptor. Idempotent.
func (r *rawUDP) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	_ = unix.Shutdown(r.fd, unix.SHUT_RD)
	r.mu.Lock()
	defer r.mu.Unlock()
	return unix.Close(r.fd)
}

// sockaddr4 is dst as recvmmsg and sendmmsg carry it.
func sockaddr4(dst netip.AddrPort) (sa unix.RawSockaddrInet4) {
	sa.Family = unix.AF_INET
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p[0], p[1] = byte(dst.Port()>>8), byte(dst.Port())
	sa.Addr = dst.Addr().Unmap().As4()
	return sa
}

func addrPort4(sa *unix.RawSockaddrInet4) netip.AddrPort {
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
}

var errRawClosed = errors.New("dnsfilter: raw socket closed")

// WriteToUDPAddrPort sends one datagram to an IPv4 dst.
func (r *rawUDP) WriteToUDPAddrPort(b []byte, dst netip.AddrPort) (int, error) {
	n, _, err := r.WriteMsgUDPAddrPort(b, nil, dst)
	return n, err
}

// WriteMsgUDPAddrPort sends one datagram to an IPv4 dst with the control
// data oob (at most oobCap bytes).
func (r *rawUDP) WriteMsgUDPAddrPort(b, oob []byte, dst netip.AddrPort) (int, int, error) {
	if !dst.Addr().Unmap().Is4() {
		return 0, 0, errors.New("dnsfilter: raw socket: not an IPv4 destination")
	}
	if len(oob) > oobCap {
		return 0, 0, errors.New("dnsfilter: raw socket: control data too long")
	}
	// Filled in here, not with set: its stores through a pointer would
	// move o to the heap, an allocation a datagram.
	var o rawOut
	o.iov[0].Base = unsafe.SliceData(b)
	o.iov[0].SetLen(len(b))
	o.names[0] = sockaddr4(dst)
	o.hdr[0].Hdr.Name = (*byte)(unsafe.Pointer(&o.names[0]))
	o.hdr[0].Hdr.Namelen = unix.SizeofSockaddrInet4
	o.hdr[0].Hdr.Iov = &o.iov[0]
	o.hdr[0].Hdr.SetIovlen(1)
	if n := copy(o.ctl[0][:], oob); n > 0 {
		o.hdr[0].Hdr.Control = &o.ctl[0][0]
		o.hdr[0].Hdr.SetControllen(n)
	}
	n, err := r.send(o.hdr[:1])
	if n == 0 && err == nil {
		err = unix.EAGAIN
	}
	if err != nil {
		return 0, 0, err
	}
	return len(b), len(oob), nil
}

// rawOut is the memory of one sendmmsg.
type rawOut struct {
	hdr   [udpBatch]unix.Mmsghdr
	iov   [udpBatch]unix.Iovec
	names [udpBatch]unix.RawSockaddrInet4
	ctl   [udpBatch][oobCap]byte
}

// set makes message k the datagram b to the sockaddr name (namelen
// long), with the first n bytes of ctl[k] as its control data (the source
// address: answerFrom), none when n is zero.
func (o *rawOut) set(k int, b []byte, name *byte, namelen uint32, n int) {
	o.iov[k].Base = unsafe.SliceData(b)
	o.iov[k].SetLen(len(b))
	o.hdr[k].Hdr = unix.Msghdr{Name: name, Namelen: namelen, Iov: &o.iov[k]}
	o.hdr[k].Hdr.SetIovlen(1)
	if n > 0 {
		o.hdr[k].Hdr.Control = &o.ctl[k][0]
		o.hdr[k].Hdr.SetControllen(n)
	}
}

// WriteBatch sends ms (each one buffer, an IPv4 *net.UDPAddr) with
// sendmmsg, as x/net's PacketConn does: it returns how many were sent,
// and an error for the first one that was not.
func (r *rawUDP) WriteBatch(ms []ipv4.Message, _ int) (int, error) {
	o, _ := r.out.Get().(*rawOut)
	if o == nil {
		o = new(rawOut)
	}
	defer r.out.Put(o)
	sent := 0
	for sent < len(ms) {
		k := 0
		for k < udpBatch && sent+k < len(ms) {
			m := &ms[sent+k]
			ua, _ := m.Addr.(*net.UDPAddr)
			if ua == nil || len(m.Buffers) != 1 || len(m.OOB) > oobCap {
				if k == 0 {
					return sent, errors.New("dnsfilter: raw socket: a message without one buffer and an address, or with too much control data")
				}
				break
			}
			o.names[k] = sockaddr4(ua.AddrPort())
			o.set(k, m.Buffers[0], (*byte)(unsafe.Pointer(&o.names[k])), unix.SizeofSockaddrInet4, copy(o.ctl[k][:], m.OOB))
			k++
		}
		n, err := r.send(o.hdr[:k])
		sent += n
		if err != nil {
			clear(o.iov[:k])
			return sent, err
		}
		if n < k {
			clear(o.iov[:k])
			return sent, unix.EAGAIN
		}
	}
	clear(o.iov[:])
	return sent, nil
}

// send is one sendmmsg of hs, never blocking.
func (r *rawUDP) send(hs []unix.Mmsghdr) (int, error) {
	return r.mmsg(unix.SYS_SENDMMSG, hs, unix.MSG_DONTWAIT)
}

// mmsg makes one sendmmsg or recvmmsg (trap) with hs, again after EINTR,
// under the read lock that Close waits for; errRawClosed once Close has
// begun.
func (r *rawUDP) mmsg(trap uintptr, hs []unix.Mmsghdr, flags int) (int, error) {
	if len(hs) == 0 {
		return 0, nil
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	for !r.closed.Load() {
		n, _, errno := unix.Syscall6(trap, uintptr(r.fd), uintptr(unsafe.Pointer(&hs[0])), uintptr(len(hs)), uintptr(flags), 0, 0)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		default:
			return 0, errno
		}
	}
	return 0, errRawClosed
}

// rawIn is a raw reader's memory: its recvmmsg batch and the answers it
// sends back with one sendmmsg.
type rawIn struct {
	hdr   [udpBatch]unix.Mmsghdr
	iov   [udpBatch]unix.Iovec
	names [udpBatch]unix.RawSockaddrInet4
	ctl   [udpBatch][oobCap]byte // each datagram's control data: its destination (IP_PKTINFO)
	bufs  [udpBatch][]byte
	out   rawOut
}

func newRawIn() *rawIn {
	in := new(rawIn)
	for i := range in.hdr {
		in.bufs[i] = make([]byte, queryBufSize)
		in.iov[i].Base = &in.bufs[i][0]
		in.iov[i].SetLen(len(in.bufs[i]))
		in.hdr[i].Hdr.Iov = &in.iov[i]
		in.hdr[i].Hdr.SetIovlen(1)
		in.hdr[i].Hdr.Name = (*byte)(unsafe.Pointer(&in.names[i]))
		in.hdr[i].Hdr.Control = &in.ctl[i][0]
	}
	return in
}

// read waits for at least one datagram and takes up to udpBatch.
func (r *rawUDP) read(in *rawIn) (int, error) {
	for i := range in.hdr {
		in.hdr[i].Hdr.Namelen = unix.SizeofSockaddrInet4
		in.hdr[i].Hdr.SetControllen(oobCap)
		in.hdr[i].Hdr.Flags = 0
	}
	return r.mmsg(unix.SYS_RECVMMSG, in.hdr[:], unix.MSG_WAITFORONE)
}

// readRaw is readUDPBatch for a rawUDP: the same fast path and batching,
// the answers addressed with the sockaddrs recvmmsg filled in.
func (s *Server) readRaw(r *rawUDP) error {
	in := newRawIn()
	wbufs := make([][]byte, udpBatch)
	for i := range wbufs {
		wbufs[i] = make([]byte, 0, int(s.cfg.UDPSize))
	}
	s.pcs.Store(udpConn(r), batchWriter(r))
	sc := newScratch()
	sc.batch, sc.sq = true, new(sendQueue)
	for {
		n, err := r.read(in)
		if s.closing.Load() || r.closed.Load() {
			return nil
		}
		if err != nil {
			return fmt.Errorf("dnsfilter: read udp: %w", err)
		}
		out := &in.out
		k := 0
		for i := range n {
			h := &in.hdr[i]
			if h.Hdr.Namelen != unix.SizeofSockaddrInet4 {
				continue
			}
			if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
				s.m.dropped.WithLabelValues("malformed").Inc()
				continue
			}
			src := addrPort4(&in.names[i])
			pkt := in.bufs[i][:h.Len]
			sc.out, sc.pending, sc.from = wbufs[k][:0], nil, parseAnswerFrom(in.ctl[i][:min(int(h.Hdr.Controllen), oobCap)])
			done := s.fastSafe(sc, r, pkt, src)
			if sc.pending != nil {
				out.set(k, sc.pending, h.Hdr.Name, h.Hdr.Namelen, sc.from.put(out.ctl[k][:]))
				k++
				sc.pending = nil
			}
			if !done {
				s.slowUDP(r, pkt, src, sc.from)
			}
		}
		sc.sq.flush()
		out.sendAll(r, k)
	}
}

// sendAll sends o's first k datagrams with as few sendmmsg calls as the
// kernel allows, and forgets their buffers. A datagram the kernel refuses
// is skipped; one with a source (answerFrom: the address may have been
// removed since its query came) goes again without, from the kernel's
// choice, as writeAnswer does.
func (o *rawOut) sendAll(r *rawUDP, k int) {
	for sent := 0; sent < k; {
		m, err := r.send(o.hdr[sent:k])
		if err != nil {
			if h := &o.hdr[sent].Hdr; h.Control != nil {
				h.Control = nil
				h.SetControllen(0)
				continue
			}
			m = 1 // skip the datagram the kernel refused
		}
		sent += max(m, 1)
	}
	clear(o.iov[:k])
}

// toRaw gives the IPv4 listener sockets their raw form (the sockets c
// stands for are closed and live on in the result); a socket that cannot
// be turned keeps its netpoller form, and so does one whose readers would
// exceed s.rawLeft (rawReaders). Repeated entries (readers sharing one
// socket) map to one rawUDP.
func (s *Server) toRaw(conns []*net.UDPConn) []udpConn {
	readers := map[*net.UDPConn]int{}
	for _, c := range conns {
		readers[c]++
	}
	out := make([]udpConn, len(conns))
	done := map[*net.UDPConn]udpConn{}
	for i, c := range conns {
		if u, ok := done[c]; ok {
			out[i] = u
			continue
		}
		out[i] = udpConn(c)
		if la, _ := c.LocalAddr().(*net.UDPAddr); la != nil && la.IP.To4() != nil && s.cfg.UDPRawReads && !s.cfg.noBatch {
			switch r, err := s.rawFor(c, readers[c]); {
			case err != nil:
				s.log.Warn("dnsfilter: listener stays on the netpoller", "addr", la.String(), audit.LogError, err.Error())
			case r == nil:
				s.log.Info("dnsfilter: listener stays on the netpoller: a reader waiting outside it would hold one of too few processors",
					"addr", la.String(), "gomaxprocs", runtime.GOMAXPROCS(0))
			default:
				out[i] = r
			}
		}
		done[c] = out[i]
	}
	return out
}

// rawFor turns c, read by n readers, into a rawUDP if the processors
// allow n more readers outside the netpoller; nil otherwise.
func (s *Server) rawFor(c *net.UDPConn, n int) (*rawUDP, error) {
	if n > s.rawLeft {
		return nil, nil
	}
	r, err := rawFrom(c)
	if err == nil {
		s.rawLeft -= n
	}
	return r, err
}

// readRawConn serves c when it is a rawUDP.
func (s *Server) readRawConn(c udpConn) (bool, error) {
	r, ok := c.(*rawUDP)
	if !ok {
		return false, nil
	}
	return true, s.readRaw(r)
}

// isRawUDP reports whether c is a rawUDP (tests).
func isRawUDP(c udpConn) bool { _, ok := c.(*rawUDP); return ok }

// rawSupported: listeners can leave the netpoller here.
const rawSupported = true
