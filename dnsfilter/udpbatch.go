package dnsfilter

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/net/ipv4"
)

// udpBatch is how many datagrams one recvmmsg may return and one sendmmsg
// may carry. Under load a reader takes up to this many queries per system
// call and sends the fast path's answers to them in one more; when idle a
// batch is one query, answered as soon as it is read.
const udpBatch = 16

// queryBufSize is the room a batch gives each datagram it reads: a query
// is a few hundred bytes (a name is at most 255, EDNS options such as
// cookies add tens), and dnsmasq's receive buffer is this size too. A
// longer datagram is cut by the kernel (MSG_TRUNC) and dropped, counted as
// malformed: no client sends such queries over UDP. The buffers were 64
// KiB each, 1 MiB a reader, 4 MiB of egressd run's 5.5 MiB of heap at rest
// on two processors (TestUDPReadersMemory).
const queryBufSize = 4096

// readUDPBatch is readUDP for a socket batchConnFor accepts (Linux):
// recvmmsg in, the fast path's answers and the misses' upstream queries
// out with sendmmsg once the batch is handled. General-path queries answer
// from their goroutines as before.
func (s *Server) readUDPBatch(c *net.UDPConn, pc batchConn) error {
	rms := make([]ipv4.Message, udpBatch)
	for i := range rms {
		rms[i].Buffers = [][]byte{make([]byte, queryBufSize)}
		rms[i].OOB = make([]byte, oobCap)
	}
	wms := make([]ipv4.Message, udpBatch)
	wbufs := make([][]byte, udpBatch)
	woobs := make([][oobCap]byte, udpBatch)
	for i := range wms {
		wms[i].Buffers = make([][]byte, 1)
		wbufs[i] = make([]byte, 0, int(s.cfg.UDPSize))
	}
	s.pcs.Store(udpConn(c), batchWriter(pc))
	sc := newScratch()
	sc.batch, sc.sq = true, new(sendQueue)
	for {
		n, err := pc.ReadBatch(rms, 0)
		if err != nil {
			if s.closing.Load() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("dnsfilter: read udp: %w", err)
		}
		nw := 0
		for i := range rms[:n] {
			m := &rms[i]
			ua, ok := m.Addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			if m.Flags&msgTrunc != 0 {
				s.m.dropped.WithLabelValues("malformed").Inc()
				continue
			}
			src := ua.AddrPort()
			pkt := m.Buffers[0][:m.N]
			sc.out, sc.pending, sc.from = wbufs[nw][:0], nil, parseAnswerFrom(m.OOB[:m.NN])
			done := s.fastSafe(sc, c, pkt, src)
			if sc.pending != nil {
				wms[nw].Buffers[0], wms[nw].Addr = sc.pending, ua
				wms[nw].OOB = woobs[nw][:sc.from.put(woobs[nw][:])]
				nw++
				sc.pending = nil
			}
			if !done {
				s.slowUDP(c, pkt, src, sc.from)
			}
		}
		sc.sq.flush()
		s.sendBatch(pc, wms[:nw])
		for i := range wms[:nw] {
			wms[i].Buffers[0], wms[i].Addr, wms[i].OOB = nil, nil, nil
		}
	}
}

// eachRun calls fn with each run of consecutive items of the same key.
func eachRun[T any, K comparable](items []T, key func(*T) K, fn func(run []T)) {
	for len(items) > 0 {
		k, n := key(&items[0]), 1
		for n < len(items) && key(&items[n]) == k {
			n++
		}
		fn(items[:n])
		items = items[n:]
	}
}

// sendBatch writes ms with as few sendmmsg calls as the kernel allows; a
// message the kernel refuses (its error is for that one datagram) is
// skipped, as a failed sendto would be. One refused with a source
// (answerFrom: the address may have been removed since its query came)
// goes again without, from the kernel's choice, as writeAnswer does.
func (s *Server) sendBatch(pc batchWriter, ms []ipv4.Message) {
	for len(ms) > 0 {
		n, err := pc.WriteBatch(ms, 0)
		if err != nil {
			if s.closing.Load() {
				return
			}
			n = max(n, 0) // x/net's is -1 for an error on the first
			if n < len(ms) && len(ms[n].OOB) > 0 {
				ms[n].OOB = nil
				ms = ms[n:]
				continue
			}
			n++ // ms[n] failed
		}
		if n <= 0 {
			n = 1
		}
		ms = ms[min(n, len(ms)):]
	}
}

// sendFast sends a fast-path answer: at once, or, on a batching reader,
// with the rest of its batch. out lives in sc.out's memory until then.
func (s *Server) sendFast(sc *scratch, c udpConn, out []byte, dst netip.AddrPort) {
	if sc.batch {
		sc.pending = out
		return
	}
	writeAnswer(c, out, dst, sc.from)
}

// answerFrom is the address a UDP answer leaves from: the one its query
// was sent to, and for an IPv6 link-local one the interface it came in
// on, as a wildcard listener's control data told its reader
// (pktinfo_linux.go). The zero answerFrom leaves the source to the
// kernel: a listener bound to one address (it sends from that one), a
// query whose control data was missing or odd.
type answerFrom struct {
	addr    netip.Addr
	ifindex uint32
}

// writeAnswer sends one answer to dst from f. Should the kernel refuse
// the source (the address was removed meanwhile), the answer goes again
// from the kernel's choice.
// The control data stays on the stack: the calls are on the concrete
// types (through the interface, oob would escape, an allocation an
// answer).
func writeAnswer(c udpConn, b []byte, dst netip.AddrPort, f answerFrom) {
	if f.addr.IsValid() {
		var oob [oobCap]byte
		n := f.put(oob[:])
		var err error
		switch c := c.(type) {
		case *net.UDPConn:
			_, _, err = c.WriteMsgUDPAddrPort(b, oob[:n], dst)
		case *rawUDP:
			_, _, err = c.WriteMsgUDPAddrPort(b, oob[:n], dst)
		default:
			_, _, err = c.WriteMsgUDPAddrPort(b, append([]byte(nil), oob[:n]...), dst)
		}
		if err == nil {
			return
		}
	}
	_, _ = c.WriteToUDPAddrPort(b, dst)
}

// batchMsgs builds sendmmsg batches in reusable memory: each slot keeps
// its one-buffer slice and its address, so adding a datagram allocates
// nothing once the slots exist (x/net's Message wants a [][]byte and a
// net.Addr per datagram).
type batchMsgs struct {
	ms    []ipv4.Message
	slots []*msgSlot
}

type msgSlot struct {
	bufs [1][]byte
	addr net.UDPAddr
	ip   [16]byte
	oob  [oobCap]byte
}

// add appends b, to dst when dst is valid (a connected socket's batch has
// none), from f.
func (bm *batchMsgs) add(b []byte, dst netip.AddrPort, f answerFrom) {
	i := len(bm.ms)
	if i == len(bm.slots) {
		bm.slots = append(bm.slots, new(msgSlot))
	}
	sl := bm.slots[i]
	sl.bufs[0] = b
	m := ipv4.Message{Buffers: sl.bufs[:], OOB: sl.oob[:f.put(sl.oob[:])]}
	if dst.IsValid() {
		a := dst.Addr()
		if a.Is4() { // as net.UDPAddrFromAddrPort: 4 bytes for IPv4, 16 else
			a4 := a.As4()
			sl.addr.IP = append(sl.ip[:0], a4[:]...)
		} else {
			a16 := a.As16()
			sl.addr.IP = append(sl.ip[:0], a16[:]...)
		}
		sl.addr.Port, sl.addr.Zone = int(dst.Port()), a.Zone()
		m.Addr = &sl.addr
	}
	bm.ms = append(bm.ms, m)
}

// reset empties the batch, keeping its memory but not the datagrams.
func (bm *batchMsgs) reset() {
	for _, sl := range bm.slots[:len(bm.ms)] {
		sl.bufs[0] = nil
	}
	clear(bm.ms)
	bm.ms = bm.ms[:0]
}
