package capture

// IP fragment reassembly for UDP, which is where DNS needs it (large
// answers, DNSSEC: THREATS E5). TCP segments are never fragmented in
// practice and other protocols carry no names, so only UDP is reassembled.
// It is bounded: maxDatagrams in progress, maxFragsPer fragments and 64 KiB
// of them each (overlapping fragments count every time), and a datagram not
// complete within fragTimeout is dropped.

import (
	"net/netip"
	"time"
)

const (
	maxDatagrams = 256
	maxFragsPer  = 64
	fragTimeout  = 30 * time.Second
)

type fragKey struct {
	src, dst netip.Addr
	id       uint32
	proto    uint8
}

type fragment struct {
	off  int
	data []byte
}

type fragDatagram struct {
	first time.Time
	parts []fragment
	held  int // bytes of parts
	total int // length of the whole payload, -1 until the last fragment is seen
}

type defragger struct {
	m        map[fragKey]*fragDatagram
	dropped  uint64 // datagrams given up
	examined uint64 // datagrams looked at to make room, for tests
}

func newDefragger() *defragger { return &defragger{m: make(map[fragKey]*fragDatagram)} }

// add stores one fragment (the payload after the IP and fragment headers,
// at byte offset off; more says more fragments follow). It returns the
// reassembled payload when the datagram is complete.
func (d *defragger) add(k fragKey, off int, more bool, data []byte, now time.Time) []byte {
	if off+len(data) > 65535 {
		d.dropped++
		return nil
	}
	dg := d.m[k]
	if dg == nil {
		if len(d.m) >= maxDatagrams {
			// Expired datagrams first, then arbitrary ones (map
			// order) until an eighth of the table is free: under a
			// flood of first fragments the scan runs once per batch
			// of new datagrams, not for each.
			d.expire(now)
			for kk := range d.m {
				if len(d.m) <= maxDatagrams-maxDatagrams/8 {
					break
				}
				d.examined++
				delete(d.m, kk)
				d.dropped++
			}
		}
		dg = &fragDatagram{first: now, total: -1}
		d.m[k] = dg
	}
	if len(dg.parts) >= maxFragsPer || dg.held+len(data) > 65535 {
		// Past what a datagram can hold: overlapping fragments, not
		// a datagram to rebuild.
		delete(d.m, k)
		d.dropped++
		return nil
	}
	dg.parts = append(dg.parts, fragment{off, append([]byte(nil), data...)})
	dg.held += len(data)
	if !more {
		dg.total = off + len(data)
	}
	if dg.total < 0 {
		return nil
	}
	// Complete when the pieces cover [0, total).
	out := make([]byte, dg.total)
	have := 0
	for progress := true; progress && have < dg.total; {
		progress = false
		for _, p := range dg.parts {
			if p.off <= have && p.off+len(p.data) > have {
				end := p.off + len(p.data)
				if end > dg.total {
					end = dg.total
				}
				copy(out[p.off:end], p.data[:end-p.off])
				have = end
				progress = true
			}
		}
	}
	if have < dg.total {
		return nil
	}
	delete(d.m, k)
	return out
}

// expire drops datagrams older than fragTimeout.
func (d *defragger) expire(now time.Time) {
	for k, dg := range d.m {
		d.examined++
		if now.Sub(dg.first) > fragTimeout {
			delete(d.m, k)
			d.dropped++
		}
	}
}
