package proxy

import (
	"errors"
	"math/bits"
)

// Errors of the fast path's reassembly: each denies the connection
// (ReasonFastStream), since the stream the server would read could differ
// from the one decided.
var (
	errSegBeforeISN = errors.New("proxy: fast path: segment before the stream's first byte")
	errSegConflict  = errors.New("proxy: fast path: segment overlaps bytes already held with other bytes")
	errSegBeyondCap = errors.New("proxy: fast path: segment beyond the reassembly window")
)

// reassembler rebuilds a client's byte stream from its queued TCP
// segments, from ISN+1 on (fastpath.go). Every byte it takes is kept at
// its offset, with a bit saying it is there, so that a segment that
// arrives again (a retransmission, whole or in part) is compared with
// what was taken: the same bytes are nothing new, other bytes are a
// conflict (errSegConflict) and deny the flow, because the server could
// read either copy and the proxy decided one. A segment that starts before
// ISN+1 (errSegBeforeISN) or ends past the window (errSegBeyondCap, the
// most the peek reads: Config.HelloMaxBytes) is refused likewise; so is
// one whose offset would grow the buffer past what the peek budget gives
// (errPeekBudget: a byte at offset 60,000 takes 60,000).
// Out-of-order segments wait at their offset; contig is the length of
// the prefix with no hole, all the reader may read.
type reassembler struct {
	first  uint32   // sequence number of the stream's first byte: ISN+1
	max    int      // window: no byte at offset max or beyond
	buf    []byte   // bytes at their offset; len is the highest end seen
	have   []uint64 // bit i: buf[i] was received
	contig int      // buf[:contig] has no hole
	// share, when set, is charged for buf's capacity (the peek budget):
	// a growth that does not fit refuses the segment (errPeekBudget).
	share *peekShare
}

func newReassembler(isn uint32, max int) *reassembler {
	return &reassembler{first: isn + 1, max: max}
}

// add takes the segment of payload starting at sequence number seq. It
// returns an error, and takes nothing, when the segment is refused.
func (r *reassembler) add(seq uint32, payload []byte) error {
	if len(payload) == 0 {
		return nil
	}
	if err := r.check(seq, payload); err != nil {
		return err
	}
	off := r.offset(seq)
	end := off + int64(len(payload))
	if end > int64(r.max) {
		return errSegBeyondCap
	}
	o, e := int(off), int(end)
	if e > len(r.buf) {
		if e > cap(r.buf) {
			c := min(max(e, 2*cap(r.buf), 512), r.max)
			if r.share != nil && r.share.fit(cap(r.buf), c-cap(r.buf)) < c-cap(r.buf) {
				return errPeekBudget
			}
			nb := make([]byte, e, c)
			copy(nb, r.buf)
			r.buf = nb
		} else {
			r.buf = r.buf[:e]
		}
		for len(r.have)*64 < e {
			r.have = append(r.have, 0)
		}
	}
	copy(r.buf[o:e], payload)
	for i := o; i < e; i++ {
		r.have[i/64] |= 1 << (i % 64)
	}
	for r.contig < len(r.buf) {
		w := r.have[r.contig/64] >> (r.contig % 64)
		if w&1 == 0 { // a hole at contig
			break
		}
		// The run of ones from contig on, within this word.
		r.contig += min(bits.TrailingZeros64(^w), 64-r.contig%64)
	}
	r.contig = min(r.contig, len(r.buf))
	return nil
}

// offset is seq's distance from the stream's first byte (sequence space
// wraps: the signed distance).
func (r *reassembler) offset(seq uint32) int64 { return int64(int32(seq - r.first)) }

// check compares the segment of payload at seq with the bytes taken: a
// segment before the stream's first byte (errSegBeforeISN) or with other
// bytes where bytes were taken (errSegConflict) is refused. It takes
// nothing, and sets no window: past the bytes taken there is nothing to
// compare (the fast path's look at segments queued after its decision).
func (r *reassembler) check(seq uint32, payload []byte) error {
	if len(payload) == 0 {
		return nil
	}
	off := r.offset(seq)
	if off < 0 {
		return errSegBeforeISN
	}
	if off >= int64(len(r.buf)) {
		return nil
	}
	o := int(off)
	for i := o; i < min(o+len(payload), len(r.buf)); i++ {
		if r.has(i) && r.buf[i] != payload[i-o] {
			return errSegConflict
		}
	}
	return nil
}

// holds says every byte of the n at seq was taken already (a
// retransmission; add says whether they are the same bytes).
func (r *reassembler) holds(seq uint32, n int) bool {
	off := r.offset(seq)
	if n == 0 || off < 0 || off+int64(n) > int64(len(r.buf)) {
		return false
	}
	for i := int(off); i < int(off)+n; i++ {
		if !r.has(i) {
			return false
		}
	}
	return true
}

func (r *reassembler) has(i int) bool { return r.have[i/64]&(1<<(i%64)) != 0 }

// ready returns the bytes from offset from up to the first hole.
func (r *reassembler) ready(from int) []byte {
	if from >= r.contig {
		return nil
	}
	return r.buf[from:r.contig]
}
