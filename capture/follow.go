package capture

import (
	"errors"
	"net/netip"
	"strings"
	"time"

	"egressd/audit"
	"egressd/internal/httpwire"
	"egressd/policy"
)

// Following a plain-HTTP connection past its first request.
//
// The transparent proxy decides a plain-HTTP connection on its first
// request head and then copies the client's bytes through a request
// follower (httpwire.ReqStream) that finds every later head and decides it
// too (THREATS.md C6): one flow event for the connection, one request event
// (audit.KindRequest) for each later request, forwarded or refused, and one
// for a stream its parser refuses, after which, in audit mode, the rest of
// the connection is spliced unparsed. Capture does the same with the bytes
// it reassembles, so that audit mode reports the later requests enforce
// mode would refuse: f.req follows the client's stream from the first
// head's end, st[0] holds only the bytes it has not consumed yet (a head or
// framing line cut between packets, segments out of order), and base[0]
// moves with it. Body bytes are consumed as they come, straight from the
// packet, and never held.
//
// What capture cannot follow, it stops following and counts
// (Stats.Unfollowed): a missing segment (at the flow's end, or when the
// out-of-order pieces pass their bound), bytes the capture cut off where
// they could hold a head or framing, the bound on all flows' buffers
// (Config.MaxStreamBytes). Later requests of such a connection are in no
// event; the connection's flow event stands.

// errHeadTimeout stands for a later head that did not complete in time.
var errHeadTimeout = errors.New("capture: http request head did not complete in time")

// closeForwarded and closeDenied are the proxy's close values of a request
// event (proxy/httpstream.go emitRequest).
const (
	closeForwarded = "forwarded"
	closeDenied    = "denied"
)

// followsRequests reports whether capture follows the requests after the
// first of plain-HTTP flows and records them: offline, and live in audit
// mode, where connections do not pass the proxy. In enforce mode every TCP
// connection from the LAN is redirected to the transparent proxy, which
// records each request itself; capture recording them too would count
// each twice (the ledger does not deduplicate requests).
func (p *proc) followsRequests() bool {
	return !p.decideAt.IsZero() || p.c.deps.Policy.Load().Mode() == policy.ModeAudit
}

// followData takes a client segment of a followed flow: seq is the
// sequence number of its first byte, and the capture cut p.cut bytes off
// its end.
func (p *proc) followData(f *flow, seq uint32, data []byte) {

	cut := p.cut
	for len(data) > 0 && f.req != nil {
		s := f.st[0]
		off := int32(seq - f.base[0])
		if off < 0 {
			// Consumed already (a retransmission), in part or whole.
			k := min(int(-off), len(data))
			seq, data = seq+uint32(k), data[k:]
			continue
		}
		if off == 0 && len(s.buf) == 0 && len(s.pending) == 0 {
			// In order with nothing held, as nearly every segment of
			// a keep-alive connection: followed from the packet.
			n := p.followOver(f, data)
			seq, data = seq+uint32(n), data[n:]
			if len(data) == 0 || f.req == nil {
				break
			}
		}
		// Held: the rest of a head or framing line, or out of order. In
		// pieces of at most a quarter of the stream's bound, so that a
		// large segment (GRO) is not cut at the bound while the body
		// bytes before the bound are consumed.
		k := min(len(data), maxStream/4)
		if !p.streamRoom(f, k) {
			return
		}
		grew := s.add(uint32(int32(seq-f.base[0])), data[:k])
		if s.conflict {
			p.request(f, nil, errConflict)
			p.stopFollow(f)
			return
		}
		if s.full {
			p.unfollow(f)
			return
		}
		if grew {
			p.follow(f)
		}
		p.charge(f)
		seq, data = seq+uint32(k), data[k:]
	}
	p.followCut(f, seq, cut)
}

// followCut skips the cut bytes that the capture cut off a segment of a
// followed flow after its byte end-1: they can be skipped only where the
// follower has consumed everything before them and they are body.
func (p *proc) followCut(f *flow, seq uint32, cut int) {
	if cut == 0 || f.req == nil {
		return
	}
	s := f.st[0]
	if len(s.buf) > 0 || s.gap() || int32(seq-f.base[0]) > 0 {
		p.unfollow(f)
		return
	}
	if miss := int32(seq + uint32(cut) - f.base[0]); miss > 0 {
		if !f.req.Skip(int64(miss)) {
			p.unfollow(f)
			return
		}
		f.base[0] += uint32(miss)
	}
}

// follow runs the bytes st[0] holds through f's request follower and
// drops what it consumed.
func (p *proc) follow(f *flow) {
	s := f.st[0]
	n := p.followOver(f, s.buf)
	if f.req == nil {
		return
	}
	s.consume(n)
	if len(s.buf) > 0 && f.req.InHead() && f.reqHead.IsZero() {
		// A head has begun: it must complete in time (slowloris).
		f.reqHead = p.now
	}
}

// followOver runs b, the client's bytes from base[0] on, through f's
// request follower, records every request it finds, and returns how many
// bytes of b it consumed; base[0] moves past them. It stops where b ends
// inside a head or a framing line. Once the stream is opaque (upgraded, or
// given up after a refusal) the flow is no longer followed.
func (p *proc) followOver(f *flow, b []byte) int {
	done := 0
	for done < len(b) {
		n, h, err := f.req.Next(b[done:])
		if errors.Is(err, httpwire.ErrNeedMore) {
			break
		}
		if err != nil {
			// The proxy refuses what its parser refuses; in audit mode
			// the rest of the connection goes through unparsed.
			p.request(f, nil, err)
			f.req.GiveUp()
			done = len(b)
			break
		}
		if h != nil {
			f.reqHead = time.Time{}
			if p.request(f, h, nil) && !p.watchHead(f, f.base[0]+uint32(done), b[done:done+n]) {
				f.base[0] += uint32(done + n) // no longer followed
				return done + n
			}
		}
		done += n
	}
	f.base[0] += uint32(done)
	if f.req.Tunnel() {
		p.stopFollow(f)
	}
	return done
}

// headWaited refuses a later request head of f begun classifyWait ago and
// still incomplete, as the proxy refuses it at its HelloTimeout, and stops
// following the flow (the proxy splices the rest in audit mode).
func (p *proc) headWaited(f *flow) {
	if f.req != nil && !f.reqHead.IsZero() && p.now.Sub(f.reqHead) >= classifyWait {
		if f.rstHeld && !f.closed {
			p.clientReset(f, f.rstSeq) // holdReset
			return
		}
		if f.srvHasMore() {
			p.unfollow(f)
			return
		}
		p.request(f, nil, errHeadTimeout)
		p.stopFollow(f)
	}
}

// stopFollow stops following f and frees its buffer.
func (p *proc) stopFollow(f *flow) {
	f.req, f.reqHead = nil, time.Time{}
	f.st = [2]*stream{}
	p.charge(f)
}

// unfollow stops following f where capture cannot (see above), and counts
// it.
func (p *proc) unfollow(f *flow) {
	p.stats.unfollowed.Add(1)
	p.stopFollow(f)
}

// request records one later request of f, as the proxy's request and
// refuse do (proxy/httpstream.go): h is its head, decided by its own Host
// (or absolute-form authority) and path; or the parser refused the stream
// with err (h nil), a deny before any rule is asked. It reports whether
// the request was allowed.
func (p *proc) request(f *flow, h *httpwire.Head, err error) bool {
	eng := p.c.deps.Policy.Load()
	ev := audit.Event{
		Kind: audit.KindRequest, Source: audit.SourceCapture, Time: p.now,
		Client: f.cli.Unmap(), ClientPort: f.cport, Dest: f.srv.Unmap(), DestPort: f.sport, Proto: "tcp",
		NameSource: audit.NameNone,
	}
	ev.ClientMAC = f.eventMAC()
	var d policy.Decision
	if h == nil {
		reason := headReason(err)
		if errors.Is(err, errHeadTimeout) {
			reason = ReasonHelloTimeout
		}
		d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: eng.Mode()}
	} else {
		// The query stays out of events, as the proxy keeps it out.
		path, _, _ := strings.Cut(h.Path, "?")
		name, src := "", audit.NameNone
		if _, err := netip.ParseAddr(h.Host); h.Host != "" && err != nil {
			name, src = h.Host, audit.NameHost
		}
		d, ev.Name, ev.NameSource, _ = p.decide(eng, f, name, src, path)
		ev.Path = path
	}
	if p.decideAt.IsZero() {
		// Live, capture follows only connections that began in audit
		// mode (followsRequests). After a reload to enforce such a
		// connection is still not the proxy's (NAT applies to a
		// connection's first packet) and the firewall judges its
		// packets by address, not request by request: nothing refuses
		// this request, so it is reported in the mode the connection
		// began in, as its flow event is.
		d.Mode = policy.ModeAudit
	}
	ev.Stamp(d)
	ev.Enforced = ev.Enforced && p.c.firewallDrops()
	ev.Close = closeForwarded
	if ev.Enforced {
		ev.Close = closeDenied
	}
	p.stats.requests.Add(1)
	p.c.deps.Sink.Emit(ev)
	p.c.logFlow(&ev) // the line says its kind
	return d.Allowed()
}
