package capture

import "bytes"

// stream reassembles the first bytes of one direction of a TCP connection,
// or of a QUIC CRYPTO stream, just far enough to read a ClientHello, an
// HTTP request head or a DNS message. It is bounded: at most maxStream
// bytes in order, at most maxPending out-of-order pieces; past that it
// gives up, and a gap that is never filled gives up when the flow ends.

const (
	maxStream     = 64 << 10
	maxPending    = 32
	maxPendingLen = 32 << 10
)

type piece struct {
	off  uint32
	data []byte
}

type stream struct {
	buf     []byte  // the in-order bytes from offset 0
	pending []piece // out-of-order pieces beyond len(buf), copied
	pendLen int
	full    bool // the limits were hit
	// conflict: bytes came twice, at the same offset, different (see
	// add). Set once; add goes on as before.
	conflict bool
}

// A stream keeps the first copy of each byte; a receiver may keep
// another: Linux keeps the first copy of bytes received in order, but an
// out-of-order piece that begins where one it holds begins and ends past
// it replaces that one (tcp_data_queue_ofo), and a copy capture read may
// never have reached the receiver at all (dropped past the gateway: a bad
// TCP checksum). Where two copies of a byte differ, which the receiver
// read is not known (Ptacek & Newsham's overlap; Suricata's "reassembly
// overlap with different data"): add sets conflict, and the caller
// decides the flow by it (ReasonStreamConflict). A retransmission of the
// same bytes, as every TCP stack sends, is no conflict. Comparing costs
// only where copies overlap; bytes in order are appended as before.

// add places data at offset off. It reports whether the in-order prefix
// grew.
func (s *stream) add(off uint32, data []byte) bool {
	if s.full || len(data) == 0 {
		return false
	}
	end := uint64(off) + uint64(len(data))
	have := uint64(len(s.buf))
	if end <= have {
		s.compare(0, s.buf, off, data) // a retransmission
		return false
	}
	if end > maxStream {
		if uint64(off) >= maxStream {
			return false
		}
		data = data[:maxStream-off]
		end = maxStream
	}
	if uint64(off) > have {
		for _, p := range s.pending {
			s.compare(p.off, p.data, off, data)
		}
		if len(s.pending) >= maxPending || s.pendLen+len(data) > maxPendingLen {
			s.full = true
			s.pending, s.pendLen = nil, 0
			return false
		}
		s.pending = append(s.pending, piece{off, append([]byte(nil), data...)})
		s.pendLen += len(data)
		return false
	}
	s.compare(0, s.buf, off, data)
	s.buf = append(s.buf, data[have-uint64(off):]...)
	// Pull in pending pieces that now touch the prefix.
	for moved := true; moved && len(s.pending) > 0; {
		moved = false
		for i := 0; i < len(s.pending); i++ {
			p := s.pending[i]
			pend := uint64(p.off) + uint64(len(p.data))
			have = uint64(len(s.buf))
			if uint64(p.off) > have {
				continue
			}
			s.compare(0, s.buf, p.off, p.data)
			if pend > have {
				s.buf = append(s.buf, p.data[have-uint64(p.off):]...)
			}
			s.pendLen -= len(p.data)
			s.pending[i] = s.pending[len(s.pending)-1]
			s.pending = s.pending[:len(s.pending)-1]
			i--
			moved = true
		}
	}
	return true
}

// compare sets conflict where data, at offset off, and pdata, at offset
// poff, overlap and differ.
func (s *stream) compare(poff uint32, pdata []byte, off uint32, data []byte) {
	lo := max(uint64(off), uint64(poff))
	hi := min(uint64(off)+uint64(len(data)), uint64(poff)+uint64(len(pdata)))
	if !s.conflict && lo < hi && !bytes.Equal(pdata[lo-uint64(poff):hi-uint64(poff)], data[lo-uint64(off):hi-uint64(off)]) {
		s.conflict = true
	}
}

// gap reports whether bytes are missing before data that arrived.
func (s *stream) gap() bool { return len(s.pending) > 0 }

// consume drops the first k bytes of buf (a followed HTTP request stream
// consumed them), so that offset 0 is the first byte not yet consumed:
// the caller moves its base sequence number by k. An empty buf is freed,
// and a rest is copied out, so that a followed flow holds only the bytes
// it waits on (and is charged for no more).
func (s *stream) consume(k int) {
	if k <= 0 {
		return
	}
	if k >= len(s.buf) {
		s.buf = nil
	} else {
		s.buf = append([]byte(nil), s.buf[k:]...)
	}
	for i := range s.pending {
		s.pending[i].off -= uint32(k)
	}
}
