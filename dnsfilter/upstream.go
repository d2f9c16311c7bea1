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
)

// upstream is one resolver we forward to, with its health.
type upstream struct {
	addr netip.AddrPort
	name string // addr.String(), the metric label

	mu        sync.Mutex // guards following
	fails     int        // consecutive failures
	downUntil time.Time  // skipped until then, when others are healthy
	backoff   time.Duration
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
	// dialUDP opens the socket for one UDP attempt; a fresh socket per
	// attempt gives every upstream query its own random source port
	// (THREATS.md E6).
	dialer net.Dialer
}

func (u *upstream) healthy(now time.Time) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return !now.Before(u.downUntil)
}

func (u *upstream) result(ok bool, now time.Time, downAfter int, downFor time.Duration) (wentDown bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if ok {
		u.fails, u.backoff, u.downUntil = 0, 0, time.Time{}
		return false
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

// exchange sends q (one question) upstream with failover until ctx is done.
// q.Id is replaced by a fresh random ID for every attempt. A SERVFAIL or
// REFUSED answer makes it try the next upstream; if all answer so, the last
// such answer is returned.
func (p *upstreams) exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, *upstream, error) {
	var last *dns.Msg
	var lastUp *upstream
	var errs []error
	for _, u := range p.order() {
		if ctx.Err() != nil {
			break
		}
		actx, cancel := context.WithTimeout(ctx, p.timeout)
		start := p.now()
		r, err := p.exchangeOne(actx, u, q)
		cancel()
		p.m.upstreamDuration.WithLabelValues(u.name).Observe(p.now().Sub(start).Seconds())
		if err != nil {
			p.m.upstreamFailures.WithLabelValues(u.name).Inc()
			if u.result(false, p.now(), p.downAfter, p.downFor) {
				p.m.upstreamUp.WithLabelValues(u.name).Set(0)
			}
			errs = append(errs, fmt.Errorf("dnsfilter: upstream %s: %w", u.name, err))
			continue
		}
		u.result(true, p.now(), p.downAfter, p.downFor)
		p.m.upstreamUp.WithLabelValues(u.name).Set(1)
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
	}
	return nil, nil, fmt.Errorf("%w: %w", ErrUpstream, errors.Join(errs...))
}

// randomID returns a DNS message ID from the operating system's CSPRNG
// (THREATS.md E6: predictable IDs make answers forgeable).
func randomID() uint16 {
	var b [2]byte
	_, _ = rand.Read(b[:]) // never fails (Go 1.24+)
	return binary.BigEndian.Uint16(b[:])
}

func (p *upstreams) exchangeOne(ctx context.Context, u *upstream, q *dns.Msg) (*dns.Msg, error) {
	q.Id = randomID()
	p.m.upstreamRequests.WithLabelValues(u.name, "udp").Inc()
	r, err := p.exchangeUDP(ctx, u, q)
	if err != nil {
		return nil, err
	}
	if !r.Truncated {
		return r, nil
	}
	// Truncated: ask the same upstream again over TCP (RFC 7766).
	q.Id = randomID()
	p.m.upstreamRequests.WithLabelValues(u.name, "tcp").Inc()
	return p.exchangeTCP(ctx, u, q)
}

var udpBufPool = sync.Pool{New: func() any { b := make([]byte, 65535); return &b }}

func (p *upstreams) exchangeUDP(ctx context.Context, u *upstream, q *dns.Msg) (*dns.Msg, error) {
	wire, err := q.Pack()
	if err != nil {
		return nil, err
	}
	c, err := p.dialer.DialContext(ctx, "udp", u.name)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.Write(wire); err != nil {
		return nil, err
	}
	bp := udpBufPool.Get().(*[]byte)
	defer udpBufPool.Put(bp)
	buf := *bp
	for {
		n, err := c.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil, context.DeadlineExceeded
			}
			return nil, err
		}
		r := new(dns.Msg)
		if err := r.Unpack(buf[:n]); err != nil {
			continue // junk on our port: keep waiting for the real answer
		}
		if !isAnswerTo(r, q) {
			continue // wrong ID or question: spoofed or stale, ignore it
		}
		return r, nil
	}
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
	return r, nil
}

func isAnswerTo(r, q *dns.Msg) bool {
	if r.Id != q.Id || !r.Response || len(r.Question) != 1 || len(q.Question) != 1 {
		return false
	}
	a, b := r.Question[0], q.Question[0]
	return a.Qtype == b.Qtype && a.Qclass == b.Qclass && strings.EqualFold(a.Name, b.Name)
}
