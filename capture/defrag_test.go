package capture

import (
	"net/netip"
	"testing"
	"time"
)

// fragFloodKey is the i-th datagram of a flood of first fragments that
// never complete.
func fragFloodKey(i int) fragKey {
	return fragKey{src: netip.MustParseAddr("198.51.100.9"), dst: netip.MustParseAddr("192.0.2.1"), id: uint32(i), proto: 17}
}

// TestDefragFullWork: a flood of first fragments of distinct datagrams
// keeps the table full of live ones, and each new datagram looked at all
// of them for expired ones. Making room now looks at a bounded number
// per new datagram, on average.
func TestDefragFullWork(t *testing.T) {
	d := newDefragger()
	now := time.Unix(1_800_000_000, 0)
	payload := make([]byte, 8)
	i := 0
	for ; i < maxDatagrams; i++ {
		d.add(fragFloodKey(i), 17, 0, true, payload, now)
	}
	before := d.examined
	const n = 10000
	for range n {
		d.add(fragFloodKey(i), 17, 0, true, payload, now)
		i++
	}
	if len(d.m) > maxDatagrams {
		t.Errorf("%d datagrams held, bound %d", len(d.m), maxDatagrams)
	}
	per := float64(d.examined-before) / n
	t.Logf("%.1f datagrams examined per new datagram", per)
	if per > 16 {
		t.Errorf("%.1f datagrams examined per new datagram into a full table, want at most 16 (it holds %d)", per, maxDatagrams)
	}
}

// TestDefragEvictsExpiredFirst: a full table makes room from datagrams
// past fragTimeout before any live one, as long as there are such.
func TestDefragEvictsExpiredFirst(t *testing.T) {
	d := newDefragger()
	t0 := time.Unix(1_800_000_000, 0)
	payload := make([]byte, 8)
	for i := range maxDatagrams {
		at := t0
		if i >= maxDatagrams/2 {
			at = t0.Add(fragTimeout) // live at now
		}
		d.add(fragFloodKey(i), 17, 0, true, payload, at)
	}
	now := t0.Add(fragTimeout + time.Second)
	for i := range maxDatagrams / 4 {
		d.add(fragFloodKey(1<<20+i), 17, 0, true, payload, now)
	}
	for i := maxDatagrams / 2; i < maxDatagrams; i++ {
		if d.m[fragFloodKey(i)] == nil {
			t.Fatalf("live datagram %d dropped while %d expired ones were there", i, maxDatagrams/2)
		}
	}
	// The live ones complete.
	if out, _ := d.add(fragFloodKey(maxDatagrams-1), 17, 8, false, payload, now); len(out) != 16 {
		t.Errorf("a live datagram's last fragment: %d bytes reassembled, want 16", len(out))
	}
}

// BenchmarkDefragFull: the first fragment of a new datagram when the table
// is full of live ones.
func BenchmarkDefragFull(b *testing.B) {
	d := newDefragger()
	now := time.Unix(1_800_000_000, 0)
	payload := make([]byte, 8)
	i := 0
	for ; i < maxDatagrams; i++ {
		d.add(fragFloodKey(i), 17, 0, true, payload, now)
	}
	for b.Loop() {
		d.add(fragFloodKey(i), 17, 0, true, payload, now)
		i++
	}
}
