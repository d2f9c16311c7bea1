package dnsfilter

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
)

// The asynchronous miss path. A fast-path query whose answer is not cached
// is sent upstream by the UDP reader that read it, and answered by the
// upstream socket's reader when the answer arrives: no goroutine, no
// channel and no singleflight call per miss. Identical concurrent misses
// join one flight. Anything out of the ordinary (no answer in time, a
// failed socket, a truncated answer, SERVFAIL or REFUSED with another
// upstream to ask, an answer the firewall must take first) goes on to the
// general path (serveMiss, exchange) in a goroutine, as every miss did
// before.

// flight is one upstream query of the asynchronous miss path and the
// misses waiting for its answer. It is the query's wait on the upstream
// socket, and lands there (one allocation for both).
type flight struct {
	s               *Server
	key             string
	u               *upstream
	start, deadline time.Time
	w               muxWait
	waiters         []*missQuery  // guarded by Server.flMu until the flight lands
	first           [1]*missQuery // waiters' first array: most flights have one
}

// land is the upstream's answer (or error) for f: counted in the
// upstream's health, then given to the waiting misses.
func (f *flight) land(r *dns.Msg, err error, aq *answerQueue) {
	f.s.ups.account(f.u, f.start, err)
	f.s.land(f, r, err, aq)
}

// missAsync sends m's question upstream, or joins the flight already
// asking it. It reports false, having done nothing, when m must take the
// general path instead. m holds a slowSem token, released once m is
// answered.
func (s *Server) missAsync(m *missQuery, sq *sendQueue) bool {
	if s.closing.Load() {
		return false
	}
	s.flMu.Lock()
	if f := s.flights[string(m.key)]; f != nil {
		f.waiters = append(f.waiters, m)
		s.flMu.Unlock()
		s.m.cacheMisses.Inc()
		s.m.shared.Inc()
		return true
	}
	select {
	case s.inflight <- struct{}{}:
	default:
		s.flMu.Unlock()
		return false // the general path answers the overload
	}
	f := &flight{s: s, key: string(m.key)}
	f.first[0] = m
	f.waiters = f.first[:]
	s.flights[f.key] = f
	s.slow.Add(1) // until the flight lands: Run waits for it
	s.flMu.Unlock()
	s.m.cacheMisses.Inc()

	f.u = s.ups.order()[0]
	f.start = s.now()
	f.deadline = f.start.Add(s.ups.timeout)
	if d := m.start.Add(s.cfg.QueryTimeout); d.Before(f.deadline) {
		f.deadline = d
	}
	f.w = muxWait{q: question{m.name, m.qtype, m.qclass}, to: f}
	if err := s.ups.exchangeAsync(f.u, f.start, f.deadline, s.upstreamWire(m.key), &f.w, sq); err != nil {
		s.land(f, nil, err, nil) // counted by exchangeAsync
	}
	return true
}

// land answers a flight's misses with the upstream's answer, or sends
// them on to the general path. It runs on the upstream socket's reader (or
// a timer's goroutine).
func (s *Server) land(f *flight, r *dns.Msg, err error, aq *answerQueue) {
	s.flMu.Lock()
	delete(s.flights, f.key)
	ws := f.waiters
	f.waiters = nil
	s.flMu.Unlock()
	u, deadline := f.u, f.deadline
	if (err == nil && r.Truncated || errors.Is(err, errAnswerTooBig)) && !s.closing.Load() {
		// Ask the same upstream over TCP (RFC 7766), off this reader; the
		// flight's inflight token and s.slow count go with it.
		go func() {
			m := ws[0]
			q := s.upstreamQuery(m.name, m.qtype, m.qclass, m.flags)
			q.Id = randomID()
			u.mTCP.Inc()
			ctx, cancel := context.WithDeadline(s.baseCtx, deadline)
			start := s.now()
			r, err := s.ups.exchangeTCP(ctx, u, q)
			cancel()
			s.ups.account(u, start, err)
			s.answerFlight(ws, u, r, err, nil)
		}()
		return
	}
	s.answerFlight(ws, u, r, err, aq)
}

// answerFlight answers a flight's misses, or sends them on to the general
// path, and ends the flight.
func (s *Server) answerFlight(ws []*missQuery, u *upstream, r *dns.Msg, err error, aq *answerQueue) {
	defer s.slow.Done()
	<-s.inflight
	var skip *upstream
	switch {
	case err != nil:
		skip = u // failed: ask the others
	case r.Truncated:
		// Closing: the general path fails it.
	case (r.Rcode == dns.RcodeServerFailure || r.Rcode == dns.RcodeRefused) && len(s.ups.list) > 1:
		skip = u
	default:
		e, err := s.entryFromSafe(ws[0], r, u)
		for _, m := range ws {
			if err != nil {
				q := m.query()
				q.err, q.path = err, "upstream"
				s.endMiss(q, nil)
				continue
			}
			s.answerMiss(m, e, aq)
		}
		return
	}
	for _, m := range ws {
		s.slow.Add(1)
		go s.serveMiss(m, m.start.Add(s.cfg.QueryTimeout), skip)
	}
}

// entryFromSafe is entryFrom with a recover: a bug there costs the
// flight's queries their answers (counted, logged), not the reader.
func (s *Server) entryFromSafe(m *missQuery, r *dns.Msg, u *upstream) (e *entry, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.m.dropped.WithLabelValues("panic").Inc()
			s.log.Error("dnsfilter: panic on an upstream answer", audit.LogName, m.name, audit.LogError, fmt.Sprint(p))
			e, err = nil, fmt.Errorf("dnsfilter: panic: %v", p)
		}
	}()
	return s.entryFrom(m.key, m.name, m.flags, r, u), nil
}

// answerMiss answers one miss with a fresh upstream entry; when the
// firewall must take the addresses first, from a goroutine of its own (a
// reader never waits for the firewall).
func (s *Server) answerMiss(m *missQuery, e *entry, aq *answerQueue) {
	q := m.query()
	// No MAC: the fast path leaves queries of a policy that names MACs
	// to the general path.
	if m.dec.Allowed() && s.needsGate(e, m.eng, m.dec, m.src.Addr(), nil, m.start) {
		s.slow.Add(1)
		go func() {
			defer s.slow.Done()
			s.sendMiss(m, q, e, nil)
		}()
		return
	}
	s.sendMiss(m, q, e, aq)
}

// sendMiss writes the answer, or queues it on aq (sendAnswers sends it).
// It ends the query: its record, its slowSem token; a panic costs the
// query its answer, not the reader.
func (s *Server) sendMiss(m *missQuery, q *query, e *entry, aq *answerQueue) {
	defer func() { s.endMiss(q, recover()) }()
	out := s.reply(q, nil, e, false)
	switch {
	case out == nil:
	case aq != nil:
		aq.items = append(aq.items, queuedAnswer{c: m.c, out: out, dst: m.src, from: m.from})
	default:
		writeAnswer(m.c, out, m.src, m.from)
	}
}

// answerQueue collects the answers an upstream socket's reader made from
// one batch of upstream answers, to send with one sendmmsg per listener.
type answerQueue struct {
	items []queuedAnswer
	out   batchMsgs
}

type queuedAnswer struct {
	c    udpConn
	out  []byte
	dst  netip.AddrPort
	from answerFrom
}

// sendAnswers sends and empties aq: with sendmmsg on listeners that
// readUDPBatch or readRaw serves, one datagram per call on the others.
func (s *Server) sendAnswers(aq *answerQueue) {
	eachRun(aq.items, func(a *queuedAnswer) udpConn { return a.c }, func(run []queuedAnswer) {
		c := run[0].c
		v, ok := s.pcs.Load(c)
		if !ok {
			for _, a := range run {
				writeAnswer(c, a.out, a.dst, a.from)
			}
			return
		}
		for _, a := range run {
			aq.out.add(a.out, a.dst, a.from)
		}
		s.sendBatch(v.(batchWriter), aq.out.ms)
		aq.out.reset()
	})
	clear(aq.items)
	aq.items = aq.items[:0]
}

// query is the record of m for the canonical line and the event. It
// lives in m (each path that ends m calls query once).
func (m *missQuery) query() *query {
	m.rec = query{start: m.start, client: m.src, proto: "udp", id: uint16(m.pkt[0])<<8 | uint16(m.pkt[1]), rd: m.pkt[2]&0x01 != 0,
		qnameW: m.pkt[12:m.qnameEnd], name: m.name, qtype: m.qtype, edns: m.edns, do: m.do, cd: m.flags&keyCD != 0,
		maxSize: m.maxSize, dec: m.dec, eng: m.eng, rcode: -1, dev: m.dev}
	return &m.rec
}

// endMiss ends a miss's query: its record (with the panic p, when not
// nil, as its error) and its slowSem token.
func (s *Server) endMiss(q *query, p any) {
	if p != nil {
		s.m.dropped.WithLabelValues("panic").Inc()
		q.err = fmt.Errorf("dnsfilter: panic: %v", p)
	}
	s.finish(q)
	<-s.slowSem
}
