package firewall

import (
	"net/netip"
	"time"
)

// expiryQueue orders the addresses of a full learned set by expiry, so
// that making room finds the expired ones without looking at all of them:
// a set full of live addresses, under a flood of new ones, cost a scan of
// up to Config.MaxLearned addresses per new address, under f.mu.
//
// It is lazy: every write of an address's expiry pushes a record (noted),
// and a record whose address no longer has that expiry comes out as stale
// and is dropped. A set gets one when it is first full; it is dropped when
// stale records outnumber the set, and made again at the next full.
type expiryQueue struct {
	h []expiryRec // min-heap by exp
}

type expiryRec struct {
	exp  int64 // unix nanoseconds
	addr netip.Addr
}

// noted records that set's address a now expires at exp: every write of
// an expiry into f.learned must call it. f.mu must be held.
func (f *Firewall) noted(set string, a netip.Addr, exp time.Time) {
	q := f.expq[set]
	if q == nil {
		return
	}
	if len(q.h) > 2*len(f.learned[set])+64 {
		delete(f.expq, set)
		return
	}
	q.push(expiryRec{exp.UnixNano(), a})
}

// dropExpired removes the set's addresses that expired by now and are not
// being written. f.mu must be held.
func (f *Firewall) dropExpired(set string, m map[netip.Addr]learnedAddr, now time.Time) {
	q := f.expq[set]
	if q == nil {
		q = &expiryQueue{h: make([]expiryRec, 0, len(m))}
		for a, v := range m {
			f.examined++
			q.h = append(q.h, expiryRec{v.exp.UnixNano(), a})
		}
		for i := len(q.h)/2 - 1; i >= 0; i-- {
			q.down(i)
		}
		f.expq[set] = q
	}
	t := now.UnixNano()
	var busy []expiryRec
	for len(q.h) > 0 && q.h[0].exp <= t {
		r := q.pop()
		f.examined++
		v, ok := m[r.addr]
		switch {
		case !ok || v.exp.UnixNano() != r.exp: // stale
		case v.b != nil: // being written: removable once written
			busy = append(busy, r)
		default:
			delete(m, r.addr)
		}
	}
	for _, r := range busy {
		q.push(r)
	}
}

func (q *expiryQueue) push(r expiryRec) {
	q.h = append(q.h, r)
	for i := len(q.h) - 1; i > 0; {
		p := (i - 1) / 2
		if q.h[p].exp <= q.h[i].exp {
			break
		}
		q.h[p], q.h[i] = q.h[i], q.h[p]
		i = p
	}
}

func (q *expiryQueue) pop() expiryRec {
	r := q.h[0]
	last := len(q.h) - 1
	q.h[0] = q.h[last]
	q.h = q.h[:last]
	q.down(0)
	return r
}

func (q *expiryQueue) down(i int) {
	for {
		m := 2*i + 1
		if m >= len(q.h) {
			return
		}
		if r := m + 1; r < len(q.h) && q.h[r].exp < q.h[m].exp {
			m = r
		}
		if q.h[i].exp <= q.h[m].exp {
			return
		}
		q.h[i], q.h[m] = q.h[m], q.h[i]
		i = m
	}
}
