package dnsfilter

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
	"unsafe"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/policy"
)

// scratch is one UDP reader's reusable memory for the fast path.
type scratch struct {
	key  []byte // cache key: lower-case wire name, type, class, flags
	name []byte // lower-case dotted name
	out  []byte // the answer

	from    answerFrom // where the query being served was sent: its answers leave from it
	batch   bool       // answers wait in pending for the reader's sendmmsg
	pending []byte     // the answer to send, when batch
	sq      *sendQueue // when batch: upstream queries of misses, sent after the batch

	// denial texts of the engine they were made for, by rule and reason
	textEng *policy.Engine
	texts   map[[2]string]string
}

func newScratch() *scratch {
	return &scratch{key: make([]byte, 0, 272), name: make([]byte, 0, 256), out: make([]byte, 0, 65536)}
}

// fast answers the common UDP queries without unpacking them into a
// dns.Msg: one question of class IN for a valid hostname, no or one OPT,
// and either a cached answer the client may have (and whose addresses
// Deps.Firewall, if it wants them, already holds: else the answer waits for
// it on the miss path's goroutine), or a denial in enforce mode with the
// default REFUSED. It reports false, having done nothing
// visible, when the query needs the general path. Everything the general
// path would check first (shape, rate, hostname, canary, type, policy) is
// checked here in the same order.
func (s *Server) fast(sc *scratch, c udpConn, pkt []byte, src netip.AddrPort) bool {
	if len(pkt) < 17 || pkt[2]&0xF8 != 0 { // QR or an opcode: general path
		return false
	}
	if binary.BigEndian.Uint16(pkt[4:]) != 1 || binary.BigEndian.Uint16(pkt[6:]) != 0 ||
		binary.BigEndian.Uint16(pkt[8:]) != 0 || binary.BigEndian.Uint16(pkt[10:]) > 1 {
		return false
	}
	key, name := sc.key[:0], sc.name[:0]
	off := 12
	for {
		if off >= len(pkt) {
			return false
		}
		l := int(pkt[off])
		if l == 0 {
			key = append(key, 0)
			off++
			break
		}
		if l > 63 || off+1+l > len(pkt) || len(key)+1+l > 254 {
			return false // compression, oversize: general path
		}
		key = append(key, byte(l))
		if len(name) > 0 {
			name = append(name, '.')
		}
		for _, ch := range pkt[off+1 : off+1+l] {
			switch {
			case ch >= 'a' && ch <= 'z', ch >= '0' && ch <= '9', ch == '-', ch == '_':
			case ch >= 'A' && ch <= 'Z':
				ch += 'a' - 'A'
			default:
				return false // not a hostname: the general path refuses it
			}
			key = append(key, ch)
			name = append(name, ch)
		}
		off += 1 + l
	}
	if len(name) == 0 || off+4 > len(pkt) {
		return false
	}
	qnameW := pkt[12:off]
	qtype := binary.BigEndian.Uint16(pkt[off:])
	qclass := binary.BigEndian.Uint16(pkt[off+2:])
	qend := off + 4
	off = qend
	if qclass != dns.ClassINET {
		return false
	}
	if metaType(qtype) { // AXFR, IXFR, ANY among them: the general path answers
		return false
	}
	edns, do, maxSize := false, false, 512
	if pkt[11] == 1 {
		if off+11 > len(pkt) || pkt[off] != 0 || binary.BigEndian.Uint16(pkt[off+1:]) != dns.TypeOPT || pkt[off+6] != 0 {
			return false
		}
		size := binary.BigEndian.Uint16(pkt[off+3:])
		do = pkt[off+7]&0x80 != 0
		off += 11 + int(binary.BigEndian.Uint16(pkt[off+9:]))
		edns, maxSize = true, int(max(512, min(size, s.cfg.UDPSize)))
	}
	if off != len(pkt) {
		return false
	}
	eng := s.pol.Load()
	if s.macs != nil && eng.HasMACs() {
		// The policy names clients by MAC: the client's is looked up
		// (Deps.MACs), which may wait for the kernel; not on a reader.
		return false
	}
	now := s.now()
	nowNs := now.UnixNano()
	nameStr := unsafe.String(unsafe.SliceData(name), len(name)) // only for lookups below, never kept
	if nameStr == canaryName || policy.IsPrivateRelay(nameStr) {
		return false // the general path answers the canaries
	}
	var dev string // the client's device's MAC, as the limiter found it
	if s.rl != nil {
		var ok, first bool
		if ok, first, dev = s.rl.allowDevice(src.Addr(), nowNs); !ok {
			q := query{start: now, client: src, proto: "udp", id: binary.BigEndian.Uint16(pkt), qtype: qtype, name: string(name), rcode: -1, dev: dev}
			s.finishLimited(&q, eng.Mode(), first)
			return true
		}
	}
	dec := eng.DecideName(policy.Input{Client: src.Addr().Unmap(), Name: nameStr, Now: now})
	if !dec.Allowed() && dec.Mode == policy.ModeEnforce {
		if s.cfg.Deny != DenyRefused {
			return false
		}
		out := s.refused(sc, eng, dec, pkt[:qend], edns, do)
		s.sendFast(sc, c, out, src)
		q := query{start: now, client: src, proto: "udp", id: binary.BigEndian.Uint16(pkt), qtype: qtype, name: string(name), rcode: dns.RcodeRefused, dec: dec, path: "local", edns: edns, dev: dev}
		s.finish(&q)
		return true
	}
	flags := byte(0)
	if do {
		flags |= keyDO
	}
	if pkt[3]&0x10 != 0 {
		flags |= keyCD
	}
	key = binary.BigEndian.AppendUint16(key, qtype)
	key = binary.BigEndian.AppendUint16(key, qclass)
	key = append(key, flags)
	sc.key, sc.name = key[:0], name[:0]
	var e *entry
	if s.cache != nil {
		e = s.cache.get(key, nowNs)
	}
	if rule, ok := learnedRule(dec); e != nil && ok {
		// The table before the gate is asked, as reply does: a firewall
		// going in meanwhile seeds its sets from the table once the
		// gate sees it (firewall/seed.go). In audit mode a name no rule
		// allows is learned too, with no rule.
		s.learn(src.Addr(), e, rule, nowNs)
	}
	if e == nil || dec.Allowed() && s.needsGate(e, eng, dec, src.Addr(), nil, now) {
		// A miss: resolve in a goroutine with what was parsed here. So
		// too a hit whose addresses the firewall must take before the
		// answer goes out (after a policy reload, or a failed wait):
		// that wait must not hold up this reader.
		select {
		case s.slowSem <- struct{}{}:
		default:
			s.m.dropped.WithLabelValues("overload").Inc()
			return true
		}
		b := append(append(make([]byte, 0, len(pkt)+len(key)), pkt...), key...) // one allocation for both
		m := &missQuery{pkt: b[:len(pkt):len(pkt)], key: b[len(pkt):], qnameEnd: len(qnameW) + 12,
			name: string(name), qtype: qtype, qclass: qclass, flags: flags, edns: edns, do: do, maxSize: maxSize, dec: dec, eng: eng, src: src, start: now, c: c, from: sc.from, dev: dev}
		if e == nil && s.missAsync(m, sc.sq) {
			return true
		}
		s.slow.Add(1)
		go s.serveMiss(m, time.Time{}, nil)
		return true
	}
	out := e.render(sc.out, binary.BigEndian.Uint16(pkt), pkt[2]&0x01 != 0, qnameW, edns, nowNs)
	if out == nil || len(out) > maxSize {
		return false // truncation: general path
	}
	s.sendFast(sc, c, out, src)
	s.m.cacheHits.Inc()
	q := query{start: now, client: src, proto: "udp", id: binary.BigEndian.Uint16(pkt), qtype: qtype, name: e.name, rcode: e.rcode, dec: dec,
		path: "cache", hit: true, upstream: e.upstream, filtered: e.filtered, edns: edns, dev: dev}
	s.finish(&q)
	return true
}

// missQuery is a UDP query parsed by the fast path whose answer is not
// cached.
type missQuery struct {
	pkt      []byte // the query
	key      []byte
	qnameEnd int // pkt[12:qnameEnd] is the question name as spelled
	name     string
	qtype    uint16
	qclass   uint16
	flags    byte
	edns, do bool
	maxSize  int
	dec      policy.Decision
	eng      *policy.Engine
	src      netip.AddrPort
	start    time.Time
	dev      string     // query.dev
	c        udpConn    // the listener it came in on
	from     answerFrom // the address it was sent to
	rec      query      // the record query() fills: no allocation of its own
}

// serveMiss resolves a fast-path miss and answers it, on the general path
// (deadline and skip as for fetch); the query is unpacked only if a local
// answer (SERVFAIL) is needed. It runs in a goroutine of its own, counted
// in s.slow, and releases m's slowSem token.
func (s *Server) serveMiss(m *missQuery, deadline time.Time, skip *upstream) {
	q := m.query()
	defer func() {
		s.endMiss(q, recover())
		s.slow.Done()
	}()
	e, hit, err := s.resolve(s.baseCtx, m.key, m.name, m.qtype, m.qclass, m.flags, deadline, skip)
	var out []byte
	if err != nil {
		q.err, q.path = err, "upstream"
		req := new(dns.Msg)
		if req.Unpack(m.pkt) != nil {
			return
		}
		out = s.local(q, req, dns.RcodeServerFailure, dns.ExtendedErrorCodeNoReachableAuthority, "egressd: upstreams failed")
	} else {
		out = s.reply(q, nil, e, hit)
	}
	if out != nil {
		writeAnswer(m.c, out, m.src, m.from)
	}
}

// refused writes a REFUSED answer to the question in qpkt (header and
// question of the query) with an OPT carrying the Extended DNS Error when
// the client sent one.
func (s *Server) refused(sc *scratch, eng *policy.Engine, dec policy.Decision, qpkt []byte, edns, do bool) []byte {
	out := append(sc.out[:0], qpkt...)
	out[2] = 0x80 | out[2]&0x79 // QR, keep opcode and RD; clear AA, TC
	out[3] = 0x80 | dns.RcodeRefused
	binary.BigEndian.PutUint16(out[6:], 0)
	binary.BigEndian.PutUint16(out[8:], 0)
	binary.BigEndian.PutUint16(out[10:], 0)
	if !edns {
		return out
	}
	if sc.textEng != eng {
		sc.textEng, sc.texts = eng, map[[2]string]string{}
	}
	k := [2]string{dec.Rule, dec.Reason}
	text, ok := sc.texts[k]
	if !ok {
		text = denyText(eng, dec)
		if len(sc.texts) < 256 {
			sc.texts[k] = text
		}
	}
	binary.BigEndian.PutUint16(out[10:], 1)
	out = append(out, 0)                                    // root
	out = binary.BigEndian.AppendUint16(out, dns.TypeOPT)   // type
	out = binary.BigEndian.AppendUint16(out, s.cfg.UDPSize) // class: UDP size
	flags := uint16(0)
	if do {
		flags = 0x8000
	}
	out = append(out, 0, 0)                                         // extended rcode, version
	out = binary.BigEndian.AppendUint16(out, flags)                 // DO
	out = binary.BigEndian.AppendUint16(out, uint16(4+2+len(text))) // rdlen
	out = binary.BigEndian.AppendUint16(out, dns.EDNS0EDE)          // option code 15
	out = binary.BigEndian.AppendUint16(out, uint16(2+len(text)))   // option length
	out = binary.BigEndian.AppendUint16(out, dns.ExtendedErrorCodeBlocked)
	return append(out, text...)
}

// fastSafe is fast with a recover: a bug on the fast path costs one query,
// not the reader.
func (s *Server) fastSafe(sc *scratch, c udpConn, pkt []byte, src netip.AddrPort) (done bool) {
	defer func() {
		if r := recover(); r != nil {
			s.m.dropped.WithLabelValues("panic").Inc()
			s.log.Error("dnsfilter: panic on the fast path", audit.LogClient, src.Addr(), audit.LogError, fmt.Sprint(r))
			done = true
		}
	}()
	return s.fast(sc, c, pkt, src)
}
