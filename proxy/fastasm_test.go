package proxy

import (
	"bytes"
	"errors"
	"testing"
)

func TestReassembler(t *testing.T) {
	const isn = 0xfffffff0 // the stream's first bytes wrap the sequence space
	data := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	seq := func(off int) uint32 { return uint32(isn + 1 + off) }
	type seg struct {
		off  int
		b    []byte
		want error
	}
	for _, c := range []struct {
		name  string
		segs  []seg
		ready string
		max   int
	}{
		{"in order", []seg{{0, data[:10], nil}, {10, data[10:20], nil}, {20, data[20:], nil}}, string(data), 0},
		{"one byte a segment", func() []seg {
			var s []seg
			for i := range data {
				s = append(s, seg{i, data[i : i+1], nil})
			}
			return s
		}(), string(data), 0},
		{"out of order", []seg{{20, data[20:], nil}, {10, data[10:20], nil}, {0, data[:10], nil}}, string(data), 0},
		{"hole", []seg{{0, data[:10], nil}, {20, data[20:], nil}}, string(data[:10]), 0},
		{"retransmit", []seg{{0, data[:10], nil}, {0, data[:10], nil}, {5, data[5:15], nil}, {10, data[10:], nil}}, string(data), 0},
		{"retransmit of a waiting segment", []seg{{20, data[20:], nil}, {20, data[20:25], nil}, {0, data[:20], nil}}, string(data), 0},
		{"overlap with other bytes", []seg{{0, data[:10], nil}, {5, []byte("XXXXXXXXXX"), errSegConflict}, {10, data[10:], nil}}, string(data), 0},
		{"overlap with a waiting segment", []seg{{20, data[20:], nil}, {15, []byte("XXXXXXXXXX"), errSegConflict}}, "", 0},
		{"before the ISN", []seg{{-1, data[:5], errSegBeforeISN}, {0, data, nil}}, string(data), 0},
		{"past the window", []seg{{0, data[:10], nil}, {10, data[10:], errSegBeyondCap}}, string(data[:10]), 20},
		{"far past the window", []seg{{1 << 30, data, errSegBeyondCap}}, "", 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			max := c.max
			if max == 0 {
				max = 1 << 16
			}
			r := newReassembler(isn, max)
			for i, s := range c.segs {
				if err := r.add(seq(s.off), s.b); !errors.Is(err, s.want) {
					t.Fatalf("segment %d at %d: %v, want %v", i, s.off, err, s.want)
				}
			}
			if got := string(r.ready(0)); got != c.ready {
				t.Errorf("ready %q, want %q", got, c.ready)
			}
			if got := r.ready(3); len(c.ready) > 3 && string(got) != c.ready[3:] {
				t.Errorf("ready from 3 %q, want %q", got, c.ready[3:])
			}
		})
	}
}

// FuzzReassembler: whatever segments come, add never panics, a segment
// of the stream within the window is always taken, and what is ready is
// the stream's bytes (then those of segments past it), within the window.
func FuzzReassembler(f *testing.F) {
	f.Add([]byte("hello, world"), []byte{0, 5, 3, 7, 200, 2})
	f.Add(bytes.Repeat([]byte{0x16}, 100), []byte{10, 10, 0, 10, 50, 60})
	f.Fuzz(func(t *testing.T, stream, cuts []byte) {
		if len(stream) == 0 {
			return
		}
		r := newReassembler(1000, 64)
		for i := 0; i+1 < len(cuts); i += 2 {
			off, n := int(cuts[i])-8, int(cuts[i+1])%32
			var b []byte
			if off >= 0 && off < len(stream) {
				b = stream[off:min(off+n, len(stream))]
			} else {
				b = bytes.Repeat([]byte{'x'}, n)
			}
			err := r.add(uint32(1001+off), b)
			if off >= 0 && off < len(stream) && off+len(b) <= 64 && err != nil {
				t.Fatalf("segment of the stream at %d (%d bytes) refused: %v", off, len(b), err)
			}
		}
		// Segments of the stream never conflict ('x' segments start past
		// it, or before the ISN): what is ready is the stream, then 'x's.
		got := r.ready(0)
		k := min(len(got), len(stream))
		if !bytes.Equal(got[:k], stream[:k]) || bytes.Trim(got[k:], "x") != nil && len(bytes.Trim(got[k:], "x")) > 0 {
			t.Fatalf("ready %q, stream %q", got, stream)
		}
		if r.contig > 64 || len(r.buf) > 64 {
			t.Fatalf("past the window: contig %d, buf %d", r.contig, len(r.buf))
		}
		// check (segments after the decision): the stream's bytes again
		// agree, wherever they start and however long; one byte other
		// than a byte taken conflicts.
		for i := 0; i+1 < len(cuts); i += 2 {
			off, n := int(cuts[i])%len(stream), int(cuts[i+1])
			b := stream[off:min(off+n, len(stream))]
			if err := r.check(uint32(1001+off), b); err != nil {
				t.Fatalf("the stream's bytes at %d (%d) after: %v", off, len(b), err)
			}
			if off < k && len(b) > 0 && r.has(off) {
				c := bytes.Clone(b)
				c[0] ^= 1
				if err := r.check(uint32(1001+off), c); err != errSegConflict {
					t.Fatalf("another byte at %d: check %v, want a conflict", off, err)
				}
			}
		}
	})
}

// TestReassemblerHolds: holds is true only for bytes every one of which
// was taken (a retransmission the fast path drops rather than holds).
func TestReassemblerHolds(t *testing.T) {
	var isn uint32 = 0xfffffffa // across the wrap
	r := newReassembler(isn, 1024)
	if err := r.add(isn+1, []byte("abcd")); err != nil {
		t.Fatal(err)
	}
	if err := r.add(isn+1+8, []byte("ij")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, n int
		want   bool
	}{{0, 4, true}, {1, 2, true}, {0, 5, false}, {3, 6, false}, {8, 2, true}, {9, 2, false}, {0, 0, false}, {-1, 2, false}} {
		if got := r.holds(isn+1+uint32(c.off), c.n); got != c.want {
			t.Errorf("holds(off %d, %d bytes) = %v, want %v", c.off, c.n, got, c.want)
		}
	}
}
