package dnsfilter

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// upstream is one resolver we forward to, with its health.
type upstream struct {
	addr netip.AddrPort
	name string // addr.String(), the metric label

	mu        sync.Mutex // guards following
	fails     int        // consecutive failures
	downUntil time.Time  // skipped until then, when others are healthy
	backoff   time.Duration

	mux *udpMux // always non-nil

	// metric children, resolved once
	mDur              prometheus.Observer
	mFail, mUDP, mTCP prometheus.Counter
	mUp               prometheus.Gauge
}

func newUpstream(ap netip.AddrPort, m *metrics, udpSize uint16) *upstream {
	u := &upstream{addr: ap, name: ap.String()}
	u.mux = newUDPMux(u, udpSize)
	u.mDur = m.upstreamDuration.WithLabelValues(u.name)
	u.mFail = m.upstreamFailures.WithLabelValues(u.name)
	u.mUDP = m.upstreamRequests.WithLabelValues(u.name, "udp")
	u.mTCP = m.upstreamRequests.WithLabelValues(u.name, "tcp")
	u.mUp = m.upstreamUp.WithLabelValues(u.name)
	u.mUp.Set(1)
	return u
}

// upstreams forwards queries with failover: healthy upstreams in configured
// order, then down ones (soonest retry first) as a last resort.
type upstreams struct {
	list      []*upstream
	timeout   time.Duration // one attempt
	downAfter int
	downFor   time.Duration
	udpSize   uint16
	m         *metrics
	now       func() time.Time
	dialer    net.Dialer // TCP
}

func (u *upstream) healthy(now time.Time) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return !now.Before(u.downUntil)
}

// result records an attempt's outcome; it reports whether the health
// changed (went down on a failure, came back on a success).
func (u *upstream) result(ok bool, now time.Time, downAfter int, downFor time.Duration) (changed bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if ok {
		changed = u.fails >= downAfter
		u.fails, u.backoff, u.downUntil = 0, 0, time.Time{}
		return changed
	}
	u.fails++
	if u.fails < downAfter {
		return false
	}
	switch {
	case u.backoff == 0:
		u.backoff = downFor
	case u.backoff < 16*downFor:
		u.backoff *= 2
	}
	u.downUntil = now.Add(u.backoff)
	return u.fails == downAfter
}

// order returns the upstreams to try, healthy first.
func (p *upstreams) order() []*upstream {
	now := p.now()
	all := true
	for _, u := range p.list {
		if !u.healthy(now) {
			all = false
			break
		}
	}
	if all {
		return p.list // callers do not modify it
	}
	out := make([]*upstream, 0, len(p.list))
	var down []*upstream
	for _, u := range p.list {
		if u.healthy(now) {
			out = append(out, u)
		} else {
			down = append(down, u)
		}
	}
	if len(down) > 1 {
		// Soonest retry first.
		for i := 1; i < len(down); i++ {
			for j := i; j > 0; j-- {
				down[j-1].mu.Lock()
				a := down[j-1].downUntil
				down[j-1].mu.Unlock()
				down[j].mu.Lock()
				b := down[j].downUntil
				down[j].mu.Unlock()
				if !b.Before(a) {
					break
				}
				down[j-1], down[j] = down[j], down[j-1]
			}
		}
	}
	return append(out, down...)
}

// Errors of the forwarding path.
var (
	// ErrUpstream means no upstream gave a usable answer in time.
	ErrUpstream = errors.New("dnsfilter: no upstream answered")
	// ErrNotFound means the name does not exist (NXDOMAIN) or has no
	// address.
	ErrNotFound = errors.New("dnsfilter: name not found")
	// ErrInvalidName means the name is not an ASCII hostname.
	ErrInvalidName = errors.New("dnsfilter: invalid hostname")
	// ErrOverload means too many queries wait for upstreams already.
	ErrOverload = errors.New("dnsfilter: too many queries in flight")
)

// exchange sends q (one question) upstream with failover until deadline
// or ctx is done. q.Id is replaced by a fresh random ID for every attempt. A
// SERVFAIL or REFUSED answer makes it try the next upstream; if all answer
// so, the last such answer is returned. skip, if not nil, is not asked.
func (p *upstreams) exchange(ctx context.Context, deadline time.Time, q *dns.Msg, skip *upstream) (*dns.Msg, *upstream, error) {
	var last *dns.Msg
	var lastUp *upstream
	var errs []error
	for _, u := range p.order() {
		if u == skip {
			continue
		}
		start := p.now()
		if ctx.Err() != nil || !start.Before(deadline) {
			break
		}
		dl := start.Add(p.timeout)
		if deadline.Before(dl) {
			dl = deadline
		}
		r, err := p.exchangeOne(ctx, dl, u, q)
		p.account(u, start, err)
		if err != nil {
			errs = append(errs, fmt.Errorf("dnsfilter: upstream %s: %w", u.name, err))
			continue
		}
		if r.Rcode == dns.RcodeServerFailure || r.Rcode == dns.RcodeRefused {
			last, lastUp = r, u
			continue
		}
		return r, u, nil
	}
	if last != nil {
		return last, lastUp, nil
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, err)
	} else if len(errs) == 0 {
		errs = append(errs, context.DeadlineExceeded)
	}
	return nil, nil, fmt.Errorf("%w: %w", ErrUpstream, errors.Join(errs...))
}

// exchangeAsync sends the packed query wire (one question) for w to u over
// UDP and returns at once; w.to lands with the answer or the error, once,
// and must then account for it (account with start, as exchange does).
// When exchangeAsync returns an error (u's socket could not send), w.to
// never lands and the failure is counted. No failover and no TCP retry:
// the caller falls back to exchange for those.
func (p *upstreams) exchangeAsync(u *upstream, start, deadline time.Time, wire []byte, w *muxWait, sq *sendQueue) error {
	u.mUDP.Inc()
	err := u.mux.exchangeAsync(deadline, wire, w, sq)
	if err != nil {
		p.account(u, start, err)
	}
	return err
}

// account records one attempt's outcome in u's health and metrics.
func (p *upstreams) account(u *upstream, start time.Time, err error) {
	end := p.now()
	u.mDur.Observe(end.Sub(start).Seconds())
	if err != nil {
		u.mFail.Inc()
		if u.result(false, end, p.downAfter, p.downFor) {
			u.mUp.Set(0)
		}
		return
	}
	if u.result(true, end, p.downAfter, p.downFor) {
		u.mUp.Set(1)
	}
}

// randomID returns a DNS message ID from the operating system's CSPRNG
// (THREATS.md E6: predictable IDs make answers forgeable).
func randomID() uint16 {
	var b [2]byte
	_, _ = rand.Read(b[:]) // never fails (Go 1.24+)
	return binary.BigEndian.Uint16(b[:])
}

func (p *upstreams) exchangeOne(ctx context.Context, deadline time.Time, u *upstream, q *dns.Msg) (*dns.Msg, error) {
	u.mUDP.Inc()
	r, err := u.mux.exchange(ctx, deadline, q) // sets a random ID
	if err != nil && !errors.Is(err, errAnswerTooBig) {
		return nil, err
	}
	if err == nil && !r.Truncated {
		return r, nil
	}
	// Truncated: ask the same upstream again over TCP (RFC 7766).
	q.Id = randomID()
	u.mTCP.Inc()
	tctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return p.exchangeTCP(tctx, u, q)
}

func (p *upstreams) exchangeTCP(ctx context.Context, u *upstream, q *dns.Msg) (*dns.Msg, error) {
	c, err := p.dialer.DialContext(ctx, "tcp", u.name)
	if err != nil {
		return nil, err
	}
	co := &dns.Conn{Conn: c}
	defer co.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := co.WriteMsg(q); err != nil {
		return nil, err
	}
	r, err := co.ReadMsg()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	if !isAnswerTo(r, q) {
		return nil, errors.New("answer does not match the query")
	}
	// A TC bit over TCP cannot mean the answer was cut to fit: TCP carries
	// up to 64 KiB and there is no bigger transport to retry on. RFC 7766
	// lets a client use such an answer, so we do, on both the general and
	// the asynchronous miss path (both come here), but without the bit:
	// passed on, it would send our clients' stub resolvers to retry over
	// TCP for an answer that cannot get any more complete, or fail them.
	r.Truncated = false
	return r, nil
}

func isAnswerTo(r, q *dns.Msg) bool {
	if r.Id != q.Id || !r.Response || len(r.Question) != 1 || len(q.Question) != 1 || !optWellFormed(r) {
		return false
	}
	a, b := r.Question[0], q.Question[0]
	return a.Qtype == b.Qtype && a.Qclass == b.Qclass && strings.EqualFold(a.Name, b.Name)
}

// optWellFormed reports whether r's OPT records are as RFC 6891 §6.1.1
// and §6.1.2 want them: at most one, in the additional section, owned by
// the root. An upstream answer otherwise is malformed, as a client's
// query is (FORMERR): it is not taken for the answer (over UDP it could
// be a forgery; the attempt waits for the real one, then fails, and the
// next upstream is asked; SERVFAIL when none is left).
func optWellFormed(r *dns.Msg) bool {
	for _, sec := range [][]dns.RR{r.Answer, r.Ns} {
		for _, rr := range sec {
			if rr.Header().Rrtype == dns.TypeOPT {
				return false
			}
		}
	}
	n := 0
	for _, rr := range r.Extra {
		if h := rr.Header(); h.Rrtype == dns.TypeOPT {
			if n++; n > 1 || h.Name != "." {
				return false
			}
		}
	}
	return true
}
