package capture

// IP fragment reassembly, for UDP (DNS needs it: large answers, DNSSEC,
// THREATS E5) and TCP: a LAN client may IP-fragment the segment carrying
// its ClientHello or HTTP head, and the gateway's kernel reassembles it
// before nftables and the proxy see it, so capture must too, or it judges
// the flow by address alone. Other protocols carry no names: their first
// fragment counts as a whole packet (other.go).
//
// It follows Linux's reassembly (ip_fragment.c, and netfilter's
// nf_conntrack_reasm.c for IPv6), since enforce mode sees what the kernel
// rebuilt: a fragment wholly inside data already held is a duplicate,
// dropped (the first copy wins); one that overlaps held data partly
// discards the whole datagram (RFC 5722; Linux does the same for IPv4
// since 4.19). A last fragment that disagrees with the length known, or
// data past a last fragment, discard an IPv4 datagram and drop the one
// fragment for IPv6; a non-last IPv6 fragment not a multiple of 8 bytes
// long discards the datagram, an IPv4 one is cut to a multiple of 8.
// IPv4 datagrams are keyed by addresses, identification and protocol,
// IPv6 ones without the protocol, which the fragment at offset 0 gives.
//
// It is bounded: maxDatagrams in progress, maxFragsPer fragments and 64 KiB
// of them each, and a datagram not complete within fragTimeout is dropped.

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
	proto    uint8 // IPv4's protocol; 0 for IPv6
}

type fragment struct {
	off  int
	data []byte
}

// fragRun is a range of bytes held, as Linux's fragment runs: fragments
// that arrived each at the end of the highest one.
type fragRun struct{ start, end int }

type fragDatagram struct {
	first time.Time
	parts []fragment
	runs  []fragRun // in arrival order; runs[tail] ends highest
	tail  int
	held  int   // bytes of parts
	total int   // the highest end seen (the whole length once last)
	last  bool  // the last fragment was seen
	proto uint8 // what the fragment at offset 0 says follows
	zero  bool  // the fragment at offset 0 was seen
	// upper: the protocol, not TCP or UDP, that the IPv6 extension
	// headers of the fragment at offset 0 lead to (0: none, or not
	// known), for the later fragments' count (proc.fragment6).
	upper uint8
}

type defragger struct {
	m        map[fragKey]*fragDatagram
	dropped  uint64 // datagrams given up
	examined uint64 // datagrams looked at to make room, for tests
}

func newDefragger() *defragger { return &defragger{m: make(map[fragKey]*fragDatagram)} }

// add stores one fragment of the datagram k: data follows the IP header
// and the Fragment header at byte offset off, more says more fragments
// follow, proto is what the IPv4 or Fragment header says follows. When the
// datagram is complete it returns its payload and the protocol of the
// fragment at offset 0.
func (d *defragger) add(k fragKey, proto uint8, off int, more bool, data []byte, now time.Time) ([]byte, uint8) {
	v6 := k.src.Is6()
	end := off + len(data)
	if end > 65535 {
		d.dropped++
		return nil, 0
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
		dg = &fragDatagram{first: now}
		d.m[k] = dg
	}
	give := func() ([]byte, uint8) {
		delete(d.m, k)
		d.dropped++
		return nil, 0
	}
	// What the length says (ip_frag_queue, nf_ct_frag6_queue).
	if !more {
		if end < dg.total || (dg.last && end != dg.total) {
			if v6 {
				return nil, 0
			}
			return give()
		}
		dg.last, dg.total = true, end
	} else {
		if end&7 != 0 {
			if v6 {
				return give()
			}
			end &^= 7
			data = data[:end-off]
		}
		if end > dg.total {
			if dg.last {
				if v6 {
					return nil, 0
				}
				return give()
			}
			dg.total = end
		}
	}
	if end == off {
		if v6 {
			return nil, 0
		}
		return give()
	}
	// Where it goes among the runs (inet_frag_queue_insert).
	switch {
	case len(dg.runs) == 0:
		dg.runs = append(dg.runs, fragRun{off, end})
	case dg.runs[dg.tail].end < end:
		t := &dg.runs[dg.tail]
		switch {
		case off < t.end:
			return give()
		case off == t.end:
			t.end = end
		default:
			dg.runs = append(dg.runs, fragRun{off, end})
			dg.tail = len(dg.runs) - 1
		}
	default:
		for _, r := range dg.runs {
			if end <= r.start || off >= r.end {
				continue
			}
			if off >= r.start && end <= r.end {
				return nil, 0 // a duplicate: the first copy stays
			}
			return give()
		}
		dg.runs = append(dg.runs, fragRun{off, end})
	}
	if len(dg.parts) >= maxFragsPer || dg.held+len(data) > 65535 {
		return give()
	}
	dg.parts = append(dg.parts, fragment{off, append([]byte(nil), data...)})
	dg.held += len(data)
	if off == 0 {
		dg.zero, dg.proto = true, proto
	}
	// Complete when the first and last are in and, no fragment
	// overlapping another, the bytes held are the whole length.
	if !dg.zero || !dg.last || dg.held != dg.total {
		return nil, 0
	}
	out := make([]byte, dg.total)
	for _, p := range dg.parts {
		copy(out[p.off:], p.data)
	}
	delete(d.m, k)
	return out, dg.proto
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
