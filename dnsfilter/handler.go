package dnsfilter

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/internal/logjson"
	"egressd/policy"
)

// canaryName is Firefox's DoH canary: NXDOMAIN keeps the browser's DNS on
// this forwarder (THREATS.md B3).
const canaryName = "use-application-dns.net"

// Reasons of local answers that are not policy decisions.
const (
	ReasonCanary       = "doh-canary"    // use-application-dns.net
	ReasonRateLimited  = "rate-limited"  // the client exceeded its rate
	ReasonQType        = "qtype-refused" // ANY, AXFR, IXFR, meta types (metaType)
	ReasonClass        = "class-refused" // not class IN
	ReasonOpcode       = "opcode"        // not a standard query
	ReasonFormat       = "format-error"  // not exactly one question, bad EDNS
	ReasonUpstreamFail = "upstream-failed"
)

// query is one query on its way through the chain, and what the canonical
// line and the audit event say about it.
type query struct {
	start    time.Time
	client   netip.AddrPort
	proto    string // "udp" or "tcp"
	id       uint16
	rd       bool
	qnameW   []byte // question name in wire form, as the client spelled it
	name     string // normalised name; the raw name when invalid
	qtype    uint16
	edns     bool
	do, cd   bool
	maxSize  int
	dec      policy.Decision
	eng      *policy.Engine   // the engine dec came from
	mac      net.HardwareAddr // the client's MAC dec was made with; nil: none (or the policy names no MAC)
	dev      string           // the MAC of the client's device as text, as the rate limiter found it; "": none known
	enforced bool             // answered locally by hardening, whatever the mode, or addresses withheld (enforce mode)
	rcode    int              // -1: not answered (dropped)
	path     string
	hit      bool
	upstream string
	filtered string
	quiet    bool   // a repeated rate-limit drop: count only
	fwErr    string // Deps.Firewall did not take the addresses in time: why
	// quietFull: the firewall's error is full sets' refusals only, and
	// they were warned of in the last fullRecheck (Server.warnFull): the
	// line is at info level.
	quietFull bool
	// withheld are the answer's addresses left out because full learned
	// sets refused them (Unreachable), fullSets those sets; servfail:
	// no address was left.
	withheld []netip.Addr
	fullSets []string
	servfail bool
	err      error
}

// metaType reports whether a question's type is no data type a resolver
// may be asked for (RFC 6895 §3.1): the reserved 0, OPT, TSIG, TKEY and
// the meta and question types 128-255 (MAILB, MAILA among them; AXFR,
// IXFR and ANY have answers of their own before). unbound and BIND answer FORMERR; a
// forwarder that passed them on would ask the upstream for them in its
// own name (and cache what came back).
func metaType(t uint16) bool {
	return t == dns.TypeNone || t == dns.TypeOPT || t == dns.TypeTSIG || t == dns.TypeTKEY || t >= 128 && t <= 255
}

// serveWire answers one packed query (UDP general path, fuzzing). It
// returns the packed answer, or nil to send nothing.
func (s *Server) serveWire(ctx context.Context, pkt []byte, src netip.AddrPort, proto string) (out []byte) {
	defer func() {
		if r := recover(); r != nil {
			s.m.dropped.WithLabelValues("panic").Inc()
			s.log.Error("dnsfilter: panic answering a query", audit.LogClient, src.Addr(), audit.LogError, fmt.Sprint(r))
			out = nil
		}
	}()
	if len(pkt) < 12 || pkt[2]&0x80 != 0 {
		// Too short to answer, or a response: answering would amplify or
		// loop.
		s.m.dropped.WithLabelValues("malformed").Inc()
		return nil
	}
	// The same header checks as miekg applies for TCP (acceptQuery).
	formErr := func(rcode byte) []byte {
		s.m.dropped.WithLabelValues("malformed").Inc()
		if s.rl != nil && proto == "udp" {
			// Within the client's rate only, as every UDP answer
			// (answer): else a reflector at a forged source.
			// Its drop is recorded as any other's: the first of an
			// episode once (a flood writes one line), else the
			// client's dropped queries after it would go unrecorded.
			now := s.now()
			if ok, first, dev := s.rl.allowDevice(src.Addr(), now.UnixNano()); !ok {
				q := query{start: now, client: src, proto: proto, id: binary.BigEndian.Uint16(pkt), rcode: -1, dev: dev}
				s.finishLimited(&q, s.pol.Load().Mode(), first)
				return nil
			}
		}
		// The client's ID and opcode, no sections.
		out := make([]byte, 12)
		copy(out, pkt[:2])
		out[2] = 0x80 | pkt[2]&0x78 // QR, opcode
		out[3] = rcode
		return out
	}
	switch acceptQuery(dns.Header{
		Bits: binary.BigEndian.Uint16(pkt[2:]), Qdcount: binary.BigEndian.Uint16(pkt[4:]), Ancount: binary.BigEndian.Uint16(pkt[6:]),
		Nscount: binary.BigEndian.Uint16(pkt[8:]), Arcount: binary.BigEndian.Uint16(pkt[10:]),
	}) {
	case dns.MsgReject:
		return formErr(dns.RcodeFormatError)
	case dns.MsgRejectNotImplemented:
		return formErr(dns.RcodeNotImplemented)
	}
	req := new(dns.Msg)
	if err := req.Unpack(pkt); err != nil {
		return formErr(dns.RcodeFormatError)
	}
	return s.serveMsg(ctx, req, src, proto)
}

// serveMsg answers one unpacked query and logs it.
func (s *Server) serveMsg(ctx context.Context, req *dns.Msg, src netip.AddrPort, proto string) (out []byte) {
	q := &query{start: s.now(), client: src, proto: proto, id: req.Id, rd: req.RecursionDesired, rcode: -1}
	defer func() {
		if r := recover(); r != nil {
			s.m.dropped.WithLabelValues("panic").Inc()
			q.err = fmt.Errorf("dnsfilter: panic: %v", r)
			out = nil
		}
		s.finish(q)
	}()
	out = s.answer(ctx, q, req)
	return out
}

// answer is the chain. Each link may answer; the order matters:
//  1. shape (opcode, one question, EDNS version): cheap, and protects the
//     links below from odd messages; its error answer waits for 2;
//  2. per-client rate limit, before any work a flood could multiply and
//     before any answer (a malformed query's too) a forged source could
//     have bounced at it;
//  3. hostname validity: tunnels (iodine) use bytes no hostname has;
//  4. class, the DoH canaries (Firefox's; iCloud Private Relay's unless
//     a rule naming them exactly allows the client), zone transfers,
//     ANY and the meta types (metaType): local answers that do not depend on the policy's
//     verdict;
//  5. the policy, per client: in enforce mode a denied name is answered
//     here and never goes further (THREATS.md E1);
//  6. cache, then upstream (one exchange for identical concurrent
//     queries), with the answer filter (rebinding, ECH) applied before
//     caching;
//  7. for allowed answers, the firewall (Deps.Firewall) before the answer
//     is written, so the client's first packet finds the addresses open
//     (reply → gate);
//  8. the learned-address table, for allowed answers, and in audit mode
//     for the answers of names no rule allows too (with no rule).
func (s *Server) answer(ctx context.Context, q *query, req *dns.Msg) []byte {
	eng := s.pol.Load()
	q.eng = eng
	q.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Mode: eng.Mode()}
	// The shape is judged first, but a query of the wrong shape is
	// answered only within the client's rate: its error answer is as
	// large as the query, and unlimited it let a LAN host bounce any
	// number of datagrams off the gateway at a forged source.
	shape, shapeReason := -1, ""
	opts, optOwner := 0, true
	for _, rr := range req.Extra {
		if h := rr.Header(); h.Rrtype == dns.TypeOPT {
			opts++
			optOwner = optOwner && h.Name == "."
		}
	}
	switch {
	case req.Opcode != dns.OpcodeQuery:
		shape, shapeReason = dns.RcodeNotImplemented, ReasonOpcode
	case len(req.Question) != 1, opts > 1, !optOwner: // RFC 6891 §6.1.1, §6.1.2: one OPT, owned by the root
		shape, shapeReason = dns.RcodeFormatError, ReasonFormat
	}
	var qs dns.Question
	if shape < 0 {
		qs = req.Question[0]
		q.qtype, q.name, q.cd = qs.Qtype, qs.Name, req.CheckingDisabled
		q.maxSize = 512
		if opt := req.IsEdns0(); opt != nil {
			q.edns, q.do = true, opt.Do()
			q.maxSize = int(max(512, min(opt.UDPSize(), s.cfg.UDPSize)))
			if opt.Version() != 0 {
				shape, shapeReason = dns.RcodeBadVers, ReasonFormat
			}
		}
		if q.proto == "tcp" {
			q.maxSize = dns.MaxMsgSize
		}
	}
	if s.rl != nil {
		ok, first, dev := s.rl.allowDevice(q.client.Addr(), q.start.UnixNano())
		q.dev = dev
		if !ok {
			s.m.rateLimited.Inc()
			q.dec.Reason, q.enforced, q.quiet = ReasonRateLimited, true, !first
			if q.proto == "udp" {
				return nil // dropping costs the flood its reflection too
			}
			return s.local(q, req, dns.RcodeRefused, dns.ExtendedErrorCodeOther, "egressd: rate limit exceeded")
		}
	}
	if shape >= 0 {
		q.dec.Reason, q.enforced = shapeReason, true
		return s.local(q, req, shape, 0, "")
	}
	name, ok := policy.NormalizeName(qs.Name)
	if !ok {
		q.dec.Reason, q.enforced = policy.ReasonInvalidName, true
		return s.local(q, req, dns.RcodeRefused, dns.ExtendedErrorCodeOther, "egressd: not a valid hostname")
	}
	q.name = name
	if qs.Qclass != dns.ClassINET {
		q.dec.Reason, q.enforced = ReasonClass, true
		return s.local(q, req, dns.RcodeRefused, dns.ExtendedErrorCodeNotSupported, "egressd: only class IN")
	}
	if name == canaryName {
		q.dec.Reason, q.enforced = ReasonCanary, true
		return s.local(q, req, dns.RcodeNameError, 0, "")
	}
	if policy.IsPrivateRelay(name) {
		// iCloud Private Relay's canaries: NXDOMAIN, whatever the type,
		// in both modes, so that Apple devices turn the relay off for
		// this network at once (Apple's guidance; a REFUSED or a drop
		// only delays them) unless a rule naming the name exactly
		// allows the client (policy's relay.go). A client such a rule
		// does not allow (its clients, its expiry) is where it would be
		// without the rule: NXDOMAIN too.
		q.mac = s.clientMAC(eng, q.client.Addr())
		if d := eng.DecideName(policy.Input{Client: q.client.Addr().Unmap(), ClientMAC: q.mac, Name: name, Now: q.start}); !d.Allowed() {
			q.dec, q.enforced = d, true
			return s.local(q, req, dns.RcodeNameError, 0, "")
		}
	}
	switch q.qtype {
	case dns.TypeAXFR, dns.TypeIXFR:
		q.dec.Reason, q.enforced = ReasonQType, true
		return s.local(q, req, dns.RcodeRefused, dns.ExtendedErrorCodeNotSupported, "egressd: no zone transfers")
	case dns.TypeANY:
		q.dec.Reason, q.enforced = ReasonQType, true
		return s.local(q, req, dns.RcodeNotImplemented, dns.ExtendedErrorCodeNotSupported, "egressd: no ANY queries (RFC 8482)")
	default:
		if metaType(q.qtype) {
			q.dec.Reason, q.enforced = ReasonQType, true
			return s.local(q, req, dns.RcodeFormatError, dns.ExtendedErrorCodeNotSupported, "egressd: not a data type")
		}
	}
	if q.mac == nil {
		q.mac = s.clientMAC(eng, q.client.Addr())
	}
	q.dec = eng.DecideName(policy.Input{Client: q.client.Addr().Unmap(), ClientMAC: q.mac, Name: name, Now: q.start})
	if !q.dec.Allowed() && q.dec.Mode == policy.ModeEnforce {
		return s.deny(q, req, eng)
	}

	q.qnameW = packName(qs.Name)
	flags := byte(0)
	if q.do {
		flags |= keyDO
	}
	if q.cd {
		flags |= keyCD
	}
	key := appendKey(make([]byte, 0, 64), name, q.qtype, qs.Qclass, flags)
	e, hit, err := s.resolve(ctx, key, name, q.qtype, qs.Qclass, flags, time.Time{}, nil)
	if err != nil {
		q.err = err
		q.path = "upstream"
		return s.local(q, req, dns.RcodeServerFailure, dns.ExtendedErrorCodeNoReachableAuthority, "egressd: upstreams failed")
	}
	return s.reply(q, req, e, hit)
}

// reply renders an entry for the query's client, truncated to what the
// client can take over UDP, and, when the name is allowed, waits until
// Deps.Firewall has its addresses (gate) and credits them to the client.
// req may be nil when the query was not unpacked.
func (s *Server) reply(q *query, req *dns.Msg, e *entry, hit bool) []byte {
	q.path, q.hit, q.upstream, q.filtered, q.rcode = "upstream", hit, e.upstream, e.filtered, e.rcode
	if hit {
		q.path = "cache"
	}
	now := s.now().UnixNano()
	out := e.render(nil, q.id, q.rd, q.qnameW, q.edns, now)
	if out == nil {
		q.err = fmt.Errorf("dnsfilter: answer for %s does not pack", q.name)
		if req == nil {
			q.rcode = -1
			return nil
		}
		return s.local(q, req, dns.RcodeServerFailure, 0, "")
	}
	if q.dec.Allowed() {
		// The firewall before the answer goes: the client may use the
		// addresses as soon as it reads it. The table first: a firewall
		// going in while the gate still sees none seeds its sets from
		// the table after it is in (firewall/seed.go), so an answer the
		// gate passes over is there by then.
		s.learn(q.client.Addr(), e, q.dec.Rule, now)
		s.gate(q, e, now)
		if len(q.withheld) > 0 {
			out = s.withholdAnswer(q, req, out)
		}
	} else if rule, ok := learnedRule(q.dec); ok {
		// Audit mode answers a name no rule allows: the table keeps it
		// too, with no rule, so that the switch to enforce lets the
		// client go on where the new policy covers it (firewall/seed.go).
		// The firewall is not asked: no set of this policy takes it.
		s.learn(q.client.Addr(), e, rule, now)
	}
	if len(out) > q.maxSize {
		out = s.truncateAnswer(q, req, out)
	}
	return out
}

// truncateAnswer cuts the rendered answer wire to what the client takes
// over UDP (q.maxSize), or answers SERVFAIL when wire does not unpack or
// the cut one does not pack: nothing at all would leave the client
// waiting out its timeout, the line saying NOERROR; q.err says why. req
// may be nil (query.request).
func (s *Server) truncateAnswer(q *query, req *dns.Msg, wire []byte) []byte {
	if s.truncatedWire != nil {
		wire = s.truncatedWire(wire)
	}
	out, err := truncate(wire, q.maxSize)
	if err != nil {
		q.err = fmt.Errorf("dnsfilter: answer for %s cannot be truncated to %d bytes: %w", q.name, q.maxSize, err)
		if req == nil {
			req = q.request()
		}
		return s.local(q, req, dns.RcodeServerFailure, dns.ExtendedErrorCodeOther, "egressd: answer cannot be truncated")
	}
	return out
}

// learnedRule returns the rule the learned-address table keeps an answer
// decided by d with, and whether it keeps the answer at all: an allowed
// answer with the rule that allowed it; in audit mode, which answers
// every name, one no rule allows with none (""), so that a reader
// deciding the name again under another policy (the reload to enforce)
// finds it. In enforce mode such a name is not answered from upstream.
func learnedRule(d policy.Decision) (string, bool) {
	switch {
	case d.Allowed():
		return d.Rule, true
	case d.Mode == policy.ModeAudit:
		return "", true
	}
	return "", false
}

// truncate cuts a packed answer to size for UDP, setting TC (RFC 2181 §9).
func truncate(wire []byte, size int) ([]byte, error) {
	m := new(dns.Msg)
	if err := m.Unpack(wire); err != nil {
		return nil, err
	}
	m.Truncate(size)
	return m.Pack()
}

func packName(name string) []byte {
	b := make([]byte, 256)
	n, err := dns.PackDomainName(dns.Fqdn(name), b, 0, nil, false)
	if err != nil {
		return nil
	}
	return b[:n]
}

func (s *Server) learn(client netip.Addr, e *entry, rule string, now int64) {
	client = client.Unmap()
	for _, a := range e.addrs {
		if a.expires > now {
			s.table.Learn(Learned{Client: client, Name: e.name, Addr: a.addr, Rule: rule, Expires: time.Unix(0, a.expires)})
		}
	}
}

// resolve returns the answer for a question, from the cache or upstream.
func (s *Server) resolve(ctx context.Context, key []byte, name string, qtype, qclass uint16, flags byte, deadline time.Time, skip *upstream) (*entry, bool, error) {
	if s.cache != nil {
		if e := s.cache.get(key, s.now().UnixNano()); e != nil {
			s.m.cacheHits.Inc()
			return e, true, nil
		}
	}
	s.m.cacheMisses.Inc()
	fetch := func() (any, error) { return s.fetch(key, name, qtype, qclass, flags, deadline, skip) }
	if ctx == s.baseCtx {
		// Queries from clients: fetch is bounded by QueryTimeout, so wait
		// in this goroutine rather than start another.
		v, err, shared := s.sf.Do(string(key), fetch)
		if err != nil {
			return nil, false, err
		}
		if shared {
			s.m.shared.Inc()
		}
		return v.(*entry), false, nil
	}
	ch := s.sf.DoChan(string(key), fetch)
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, false, r.Err
		}
		if r.Shared {
			s.m.shared.Inc()
		}
		return r.Val.(*entry), false, nil
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

// fetch asks the upstreams (once for all identical concurrent queries),
// filters the answer and caches it.
//
// A query the asynchronous miss path (missAsync) gave up on comes here
// with its own deadline and the upstream that failed it (skip), which is
// not asked again; otherwise deadline is zero and skip nil.
func (s *Server) fetch(key []byte, name string, qtype, qclass uint16, flags byte, deadline time.Time, skip *upstream) (*entry, error) {
	select {
	case s.inflight <- struct{}{}:
		defer func() { <-s.inflight }()
	default:
		return nil, ErrOverload
	}
	// The exchange outlives any one waiter: its own deadline, cancelled
	// only by Close.
	if deadline.IsZero() {
		deadline = s.now().Add(s.cfg.QueryTimeout)
	}
	m := s.upstreamQuery(name, qtype, qclass, flags)
	r, up, err := s.ups.exchange(s.baseCtx, deadline, m, skip)
	if err != nil {
		return nil, err
	}
	return s.entryFrom(key, name, flags, r, up), nil
}

// entryFrom filters an upstream answer, builds its entry and caches it.
// r becomes the entry's.
func (s *Server) entryFrom(key []byte, name string, flags byte, r *dns.Msg, up *upstream) *entry {
	// The NAT64 prefixes are the flag's, the same under every policy.
	filtered := filterAnswer(name, r, s.cfg.rebinds(name), s.cfg.KeepECH, s.pol.Load().NAT64())
	switch filtered {
	case "rebinding+ech":
		s.m.filtered.WithLabelValues("rebinding").Inc()
		s.m.filtered.WithLabelValues("ech").Inc()
	case "rebinding", "ech":
		s.m.filtered.WithLabelValues(filtered).Inc()
	}
	now := s.now()
	e := newEntry(name, r, flags&keyDO != 0, s.cfg.UDPSize, now, s.cfg.MaxTTL, s.cfg.MaxNegativeTTL, up.name, filtered)
	if e.capped > 0 {
		s.table.refused.Add(uint64(e.capped))
	}
	if s.cache != nil && e.expires > 0 && (e.rcode == dns.RcodeSuccess || e.rcode == dns.RcodeNameError) {
		s.cache.put(key, e, now.UnixNano())
	}
	return e
}

// upstreamQuery is the question we send upstream for a key: our EDNS
// buffer size, the client's DO and CD bits.
func (s *Server) upstreamQuery(name string, qtype, qclass uint16, flags byte) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.Question[0].Qclass = qclass
	m.CheckingDisabled = flags&keyCD != 0
	m.SetEdns0(s.cfg.UDPSize, flags&keyDO != 0)
	return m
}

// upstreamWire is upstreamQuery packed, with ID 0, made from a fast-path
// cache key (lower-case wire name, type, class, flags) without a dns.Msg:
// the asynchronous miss path's one allocation for its upstream query.
func (s *Server) upstreamWire(key []byte) []byte {
	flags, q := key[len(key)-1], key[:len(key)-1]
	w := make([]byte, 12, 12+len(q)+11)
	w[2] = 0x01 // RD
	if flags&keyCD != 0 {
		w[3] = 0x10
	}
	w[5], w[11] = 1, 1 // one question, one additional (the OPT)
	w = append(w, q...)
	do := byte(0)
	if flags&keyDO != 0 {
		do = 0x80
	}
	// OPT: root owner, type 41, class our UDP size, TTL extended rcode 0,
	// version 0 and the DO bit, no options.
	return append(w, 0, 0, byte(dns.TypeOPT), byte(s.cfg.UDPSize>>8), byte(s.cfg.UDPSize), 0, 0, do, 0, 0, 0)
}

// deny answers a denied name in enforce mode, as configured, with an RFC
// 8914 Extended DNS Error naming the policy.
func (s *Server) deny(q *query, req *dns.Msg, eng *policy.Engine) []byte {
	text := denyText(eng, q.dec)
	switch s.cfg.Deny {
	case DenyNXDomain:
		return s.local(q, req, dns.RcodeNameError, dns.ExtendedErrorCodeBlocked, text)
	case DenyNull:
		return s.local(q, req, dns.RcodeSuccess, dns.ExtendedErrorCodeBlocked, text)
	}
	return s.local(q, req, dns.RcodeRefused, dns.ExtendedErrorCodeBlocked, text)
}

func denyText(eng *policy.Engine, d policy.Decision) string {
	file := "policy"
	if p := eng.Policy(); p != nil && p.File != "" {
		file = p.File
	}
	if d.Rule != "" {
		return fmt.Sprintf("egressd policy %s: %s (rule %s)", file, d.Reason, d.Rule)
	}
	return fmt.Sprintf("egressd policy %s: %s", file, d.Reason)
}

// local builds an answer here: rcode, for NXDOMAIN and NODATA a
// synthesised SOA (so caches keep it, RFC 2308), for a null denial the
// unspecified address, and an Extended DNS Error when the client speaks
// EDNS (ede 0 with no text: none).
func (s *Server) local(q *query, req *dns.Msg, rcode int, ede uint16, text string) []byte {
	q.rcode, q.path = rcode, "local"
	m := new(dns.Msg)
	m.SetRcode(req, rcode)
	m.RecursionAvailable = true
	m.Compress = true
	if len(req.Question) > 1 {
		m.Question = req.Question[:1]
	}
	ttl := uint32(s.cfg.DenyTTL / time.Second)
	if len(m.Question) == 1 {
		qn := m.Question[0].Name
		switch {
		case rcode == dns.RcodeNameError:
			m.Ns = []dns.RR{s.soa(qn, ttl)}
		case rcode == dns.RcodeSuccess && q.qtype == dns.TypeA:
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: qn, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: netip.IPv4Unspecified().AsSlice()}}
		case rcode == dns.RcodeSuccess && q.qtype == dns.TypeAAAA:
			m.Answer = []dns.RR{&dns.AAAA{Hdr: dns.RR_Header{Name: qn, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: ttl}, AAAA: netip.IPv6Unspecified().AsSlice()}}
		case rcode == dns.RcodeSuccess:
			m.Ns = []dns.RR{s.soa(qn, ttl)}
		}
	}
	if q.edns || rcode == dns.RcodeBadVers {
		opt := newOPT(s.cfg.UDPSize, q.do)
		if rcode > 0xF {
			opt.SetExtendedRcode(uint16(rcode))
		}
		if text != "" || ede != 0 {
			opt.Option = append(opt.Option, &dns.EDNS0_EDE{InfoCode: ede, ExtraText: text})
		}
		m.Extra = append(m.Extra, opt)
	}
	out, err := m.Pack()
	if err == nil && len(out) > q.maxSize && q.maxSize > 0 {
		out, err = truncate(out, q.maxSize)
	}
	if err != nil {
		// A name miekg unpacked but cannot pack back: answer with the
		// header only.
		out = make([]byte, 12)
		binary.BigEndian.PutUint16(out, req.Id)
		out[2] = 0x80 | byte(req.Opcode&0xF)<<3
		out[3] = byte(rcode & 0xF)
	}
	return out
}

func (s *Server) soa(zone string, ttl uint32) *dns.SOA {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
		Ns:      "egressd.invalid.",
		Mbox:    "hostmaster.egressd.invalid.",
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  ttl,
	}
}

// finishLimited counts and records q, a UDP query dropped past its
// client's rate before it was decided: logged only when first (the first
// dropped after an allowed one), so a flood writes one line.
func (s *Server) finishLimited(q *query, mode policy.Mode, first bool) {
	s.m.rateLimited.Inc()
	q.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Mode: mode, Reason: ReasonRateLimited}
	q.enforced, q.path, q.quiet = true, "local", !first
	s.finish(q)
}

// finish counts, logs and records one query: one canonical line, one
// audit event.
func (s *Server) finish(q *query) {
	lat := s.now().Sub(q.start)
	d := q.dec
	s.m.countQuery(d.Verdict, d.Mode, q.rcode)
	switch q.path {
	case "cache":
		s.durCache.Observe(lat.Seconds())
	case "upstream":
		s.durUpstream.Observe(lat.Seconds())
	default:
		s.durLocal.Observe(lat.Seconds())
	}
	if s.tun != nil && q.path == "upstream" && !q.hit && q.dec.Allowed() && q.eng != nil {
		s.watchTunnel(q)
	}
	if q.quiet {
		return
	}
	enforced := q.enforced || (d.Verdict == policy.Deny && d.Mode == policy.ModeEnforce)
	ev := audit.Event{
		Kind:       audit.KindDNS,
		Source:     audit.SourceDNS,
		Time:       q.start,
		Client:     audit.ClientAddr(q.client.Addr()),
		ClientPort: q.client.Port(),
		Proto:      q.proto,
		Name:       q.name,
		QType:      dns.Type(q.qtype).String(),
		QueryID:    q.id,
		RCode:      rcodeName(q.rcode),
		CacheHit:   q.hit,
		Upstream:   q.upstream,
		Latency:    lat.Seconds(),
		Filtered:   q.filtered,
	}
	ev.ClientMAC = q.eventMAC()
	ev.Stamp(d)
	ev.Enforced = enforced
	level := slog.LevelInfo
	switch {
	case q.err != nil:
		level = slog.LevelError
	case d.Verdict == policy.Deny, q.fwErr != "" && !q.quietFull:
		level = slog.LevelWarn
	}
	ctx := context.Background()
	if s.log.Enabled(ctx, level) && !audit.QuietLine(s.sink, &ev) {
		// An invalid name reads as up to 1,004 bytes (\DDD): cut as the
		// event log cuts it (Event.Bound).
		name := audit.Event{Name: q.name}
		name.Bound()
		attrs := []slog.Attr{
			slog.String(audit.LogKind, string(audit.KindDNS)),
			slog.String(audit.LogClient, ev.Client.String()),
		}
		if mac := q.eventMAC(); mac != "" {
			attrs = append(attrs, slog.String(audit.LogClientMAC, mac))
		}
		attrs = append(attrs,
			slog.String(audit.LogProto, q.proto),
			slog.String(audit.LogName, name.Name),
		)
		if name.NameLen != 0 {
			attrs = append(attrs, slog.Int(audit.LogNameLen, name.NameLen))
		}
		attrs = append(attrs,
			slog.String(audit.LogQType, dns.Type(q.qtype).String()),
			slog.String(audit.LogVerdict, string(d.Verdict)),
			slog.String(audit.LogRule, d.Rule),
			slog.String(audit.LogMode, string(d.Mode)),
			slog.String(audit.LogReason, d.Reason),
			slog.Bool(audit.LogEnforced, enforced),
			slog.String(audit.LogRCode, rcodeName(q.rcode)),
			slog.Bool(audit.LogCacheHit, q.hit),
			slog.String(audit.LogUpstream, q.upstream),
			slog.Float64(audit.LogLatency, lat.Seconds()),
		)
		if q.filtered != "" {
			attrs = append(attrs, slog.String(audit.LogFiltered, q.filtered))
		}
		if q.fwErr != "" {
			attrs = append(attrs, slog.String("firewall_learn", q.fwErr))
		}
		if len(q.fullSets) > 0 {
			attrs = append(attrs, slog.String("set_full", strings.Join(q.fullSets, ",")), slog.String("withheld", joinAddrs(q.withheld)))
		}
		if q.err != nil {
			attrs = append(attrs, slog.String(audit.LogError, q.err.Error()))
		}
		logjson.Log(ctx, s.log, level, audit.CanonicalMessage, attrs...)
	}
	s.sink.Emit(ev)
}

// watchTunnel counts a name an allowed query sent upstream under a
// wildcard rule's zone (tunnelZone) and raises an alarm when the
// client's distinct names of the zone cross the threshold in the window
// (dns-tunnel), when all clients' do past twice it (dns-tunnel-zone),
// when the client's cross ten times it in the long window
// (dns-tunnel-slow), or when all clients' do past twenty times it there
// (dns-tunnel-zone-slow): for each, one Warn line, one audit event (KindAlarm),
// one count of egress_dnsfilter_tunnel_alarms_total. Only misses count: a
// name answered from the cache told no authoritative server anything.
func (s *Server) watchTunnel(q *query) {
	zone, ok := tunnelZone(q.eng, q.dec, q.name)
	if !ok {
		return
	}
	// The client as events name it (audit.ClientAddr: no zone), which the
	// zone-wide alarm's top clients repeat; the rate limiter knows the
	// socket's address.
	src := q.client.Addr().Unmap()
	client := audit.ClientAddr(src)
	mac := q.eventMAC()
	key := mac
	switch {
	case key != "":
	case s.rl != nil && s.rl.unresolvedSource(src):
		// The rate limit's shared client: forged sources of the LAN
		// would each be a client of their own, and a one-way tunnel
		// (the attacker's server needs no answer) spread over enough
		// of them never alarm. The alarm names the source that took
		// the count over the threshold.
		key = unresolvedTunnelKey
	default:
		key = client.String()
	}
	now := s.now()
	hits := s.tun.observe(key, zone, q.name, now.UnixNano())
	w, th := s.cfg.TunnelWindow, s.cfg.TunnelThreshold
	if hits.pair > 0 {
		s.tunnelAlarm(q, now, client, mac, zone, hits.pair, ReasonTunnel, w, th, nil)
	}
	if hits.slow > 0 {
		s.tunnelAlarm(q, now, client, mac, zone, hits.slow, ReasonTunnelSlow, tunnelSlowWindows*w, tunnelSlowFactor*th, nil)
	}
	// Zone-wide: no one client; the line and the event name those that
	// added the most names (a MAC, an address, or "unresolved").
	if hits.zone > 0 {
		s.tunnelAlarm(q, now, netip.Addr{}, "", zone, hits.zone, ReasonTunnelZone, w, tunnelZoneFactor*th, topClients(&hits.top))
	}
	if hits.zoneSlow > 0 {
		s.tunnelAlarm(q, now, netip.Addr{}, "", zone, hits.zoneSlow, ReasonTunnelZoneSlow, tunnelSlowWindows*w,
			tunnelZoneFactor*tunnelSlowFactor*th, topClients(&hits.topSlow))
	}
}

// topClients is the clients of a zone-wide alarm, most names first.
func topClients(top *[tunnelTop]string) []string {
	var out []string
	for _, c := range top {
		if c != "" {
			out = append(out, c)
		}
	}
	return out
}

// tunnelAlarm raises one alarm of watchTunnel.
func (s *Server) tunnelAlarm(q *query, now time.Time, client netip.Addr, mac, zone string, n int, reason string, window time.Duration, threshold int, top []string) {
	s.m.tunnelAlarms.Inc()
	ev := audit.Event{Kind: audit.KindAlarm, Source: audit.SourceDNS, Time: now, Client: client, ClientMAC: mac, Proto: q.proto,
		Name: zone, Count: uint64(n), Verdict: policy.Allow, Rule: q.dec.Rule, Mode: q.dec.Mode, Reason: reason, TopClients: top}
	attrs := []slog.Attr{slog.String(audit.LogKind, string(audit.KindAlarm))}
	if client.IsValid() {
		attrs = append(attrs, slog.String(audit.LogClient, client.String()))
	}
	if mac != "" {
		attrs = append(attrs, slog.String(audit.LogClientMAC, mac))
	}
	if top != nil {
		attrs = append(attrs, slog.Any("top_clients", top))
	}
	attrs = append(attrs,
		slog.String(audit.LogName, zone),
		slog.Int("distinct_names", n),
		slog.Duration("window", window),
		slog.Int("threshold", threshold),
		slog.String(audit.LogRule, q.dec.Rule),
		slog.String(audit.LogMode, string(q.dec.Mode)),
		slog.String(audit.LogReason, reason),
		slog.Bool(audit.LogEnforced, false),
	)
	logjson.Log(context.Background(), s.log, slog.LevelWarn, audit.CanonicalMessage, attrs...)
	s.sink.Emit(ev)
}

// eventMAC is the client's MAC as the event and the log line say it:
// the one the decision was made with, else its device's as the rate
// limiter found it (no lookup of its own), else "".
func (q *query) eventMAC() string {
	if q.mac != nil {
		return q.mac.String()
	}
	return q.dev
}

func rcodeName(rc int) string {
	if rc < 0 {
		return "DROPPED"
	}
	return rcodeString(rc)
}
