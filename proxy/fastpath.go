package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/internal/tlshello"
	"egressd/policy"
)

// The fast path (egressd run --fast-path, enforce mode; /tmp design:
// FASTPATH.md of session 33). The firewall queues (NFQUEUE) the SYN of
// each LAN connection to a port it would redirect to the proxy, and,
// for a connection the fast path took, the client's packets that carry
// bytes until it is decided. ServeQueue answers them:
//
//   - a SYN is fast when its port is one of Config.FastPorts (443 unless
//     set), the destination is one our DNS gave out to this
//     client for a name that a rule allowing the port covers, and that
//     rule needs no inspection (decideAddr: by address, then the names
//     given out; the special-range guard and the gateway's own addresses
//     included), the mode is enforce, it carries no data (TCP Fast Open)
//     and the client is within its connection limits (a slot is held
//     until the decision). Fast: ACCEPT with the packet mark
//     FastMarks.Pending (the firewall then skips the redirect and queues
//     the client's bytes); otherwise ACCEPT unchanged (the redirect to the
//     proxy, as without the fast path). The SYN's sequence number (ISN)
//     starts the flow;
//   - the client's segments of a fast flow are held (no verdict) and
//     reassembled from ISN+1 (reassembler); the transparent proxy's own
//     peek and decision (peek, through flowStream) run on that stream,
//     within the same first-byte wait and hello deadline: on the queue's
//     goroutine when a segment completes the ClientHello (kick, quick),
//     else on a worker (a silent client, other bytes, a stream ended or
//     refused, a server name only a fresh lookup vouches for). A
//     segment the reassembler refuses (before ISN+1, other bytes where
//     bytes were held, past HelloMaxBytes) denies the flow,
//     ReasonStreamMismatch;
//   - allowed: the held packets are accepted in sequence order, the
//     last one NF_REPEAT with FastMarks.Allowed (the firewall makes it the
//     connection's mark: the kernel forwards the rest). A segment queued
//     before the mark took hold is compared with the bytes decided: other
//     bytes cut the connection (cut: the denied mark, resets both ways).
//     Denied: they are dropped, one NF_REPEAT with FastMarks.Denied (later
//     packets are dropped by the firewall), and the proxy's deny answer (a
//     TLS alert, the 403 page, nothing otherwise) then a reset are sent to
//     the client, a reset to the server (Deps.Inject). A second SYN with
//     another ISN is dropped, and refuses a pending flow (syn);
//   - a plain HTTP request on a fast connection is refused,
//     ReasonFastPathHTTP (the kernel would forward the connection's later
//     requests unread); bytes that are neither TLS nor HTTP are decided
//     by the address, as the proxy does;
//   - one event and canonical line per fast connection, written at the
//     decision (close fast-path, fast-path-denied, client-closed-early, or
//     shutdown: a flow pending when ServeQueue ends is refused,
//     ReasonShutdown; fast-path-failed, ReasonFastPathFailed, when it
//     ends because the queue's reader failed), with the bytes the client
//     sent before it (BytesOut): the proxy does not see the rest of a
//     connection the kernel forwards. A connection allowed with nothing marked whose
//     first segment's new decision (below) denies it gets a second event
//     (written after the first), with its start and the new decision (redecided: cut, close
//     policy-revoked; audit mode, a deny not enforced), which the report
//     counts in place of the first; one recorded a would-be deny (a
//     decision across a reload to audit mode) that it allows gets a
//     second event allowed under its rule (the report credits the rule).
//
// A decided flow stays in the table for fastKeep, so that a packet queued
// before its mark took hold is answered the same way; one allowed with
// nothing held (a client silent at first, decided on the address) has no
// mark until its first segment, which gives it: it stays until then, up
// to fastKeepSilent, then fastKeep more; that first segment decides it
// again under the policy running then (fastQueue.again: a reload since
// that no longer allows it cuts it; in audit mode it goes on, recorded
// as a deny not enforced), as does a decision made after a reload that
// came since the flow's SYN. A queued segment of a flow the
// table does not know (gone, or from before a restart) is denied
// (NF_REPEAT with Denied, and resets both ways). An RST that carries
// bytes, on a pending flow, is dropped and refuses it (its bytes would
// go out unread); one without passes (the server forgets the
// connection) and ends the flow's stream.

// Queue is the NFQUEUE the fast path reads: *nfq.Conn.
type Queue interface {
	// Serve calls fn for each queued packet, on one goroutine, until ctx
	// ends or the queue is closed.
	Serve(ctx context.Context, fn func(nfq.Packet)) error
	Verdict(id uint32, v nfq.Verdict) error
	VerdictMark(id uint32, v nfq.Verdict, mark uint32) error
}

// FastMarks are the packet-mark values the fast path's verdicts set, in
// egressd's owned bits (firewall.FastMarks): a verdict's mark is the
// packet's with Mask cleared, then the value set.
type FastMarks struct {
	Mask, Pending, Allowed, Denied uint32
}

// Injector sends the fast path's deny answers and resets: *nfq.Injector.
// What goes to the client goes on the link layer (SegmentL2, ResetL2: out
// of the interface the held packet came in on, to the address it came
// from), since under masquerade a segment to the client through the IP
// layer starts a conntrack entry of its own whose NAT changes its port;
// the reset to the server goes through the IP layer (Reset), where it
// takes the connection's NAT.
type Injector interface {
	Reset(from, to netip.AddrPort, seq, ack uint32) error
	SegmentL2(l2 nfq.L2, from, to netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) error
	ResetL2(l2 nfq.L2, from, to netip.AddrPort, seq, ack uint32) error
}

// Close reasons of fast connections.
const (
	closeFast       = "fast-path"        // allowed: handed to the kernel
	closeFastDenied = "fast-path-denied" // denied on the fast path: dropped, answered, reset
	closeFastFailed = ReasonFastPathFailed
)

// ReasonFastPathFailed: the connection was pending a decision when the
// fast path's queue reader failed (ServeQueue's QueueError): refused as
// at a shutdown (its packets went to a reader that is gone), though the
// proxy runs on and egressd goes on without the fast path.
const ReasonFastPathFailed = "fast-path-failed"

// errQueueFailed ends the stream of a flow pending when the queue's
// reader failed: a net.ErrClosed, as at a shutdown, that says why.
var errQueueFailed = fmt.Errorf("proxy: fast path: the queue reader failed: %w", net.ErrClosed)

// ReasonStreamMismatch: the client's queued segments do not make one
// stream (a segment before its first byte, other bytes where bytes were
// held, or past the window): the server could read another stream than
// the one decided.
const ReasonStreamMismatch = "stream-mismatch"

// ReasonFastPathHTTP: a plain HTTP request on a fast connection, which the
// proxy would have allowed. The kernel forwards a fast connection's later
// requests unread, so the proxy could not decide each request head of a
// keep-alive connection as it does (THREATS.md C6): the connection is
// refused rather than let out on its first request's decision.
const ReasonFastPathHTTP = "fast-path-http"

// defaultFastPorts are the ports whose SYNs may be fast (Config.FastPorts).
var defaultFastPorts = []uint16{443}

// fastKeep is how long a decided flow stays in the table (from its
// decision, or from its first segment after: fastKeepSilent).
const fastKeep = 30 * time.Second

// fastKeepSilent is how long a flow allowed with no packet marked (its
// client silent until the decision, on the address: a protocol where
// the server speaks first) stays in the table waiting for its client's
// first segment, which gives the connection its mark; without the flow,
// that segment would be unknown and cut a connection that was allowed.
// What bounds it: such a flow holds no bytes (nothing was held) and of
// its decision keeps only the verdict and a copy of its event (for the
// second event, should its first segment's new decision change it), so it
// costs its entry and that copy: about 2.1 KB live (1.5 KB without the
// copy; session 35, 2,000 silent flows in the test rig, the heap after a
// collection), with a long name up to 250 B more, 35 MB at the table's
// bound;
// but the table's cap (Config.FastFlows) counts it, and a full table
// sends new connections to the proxy (slower, none cut), while a client
// that never speaks (a connection opened and closed unused: its FIN,
// without bytes, passes the firewall unqueued) leaves its flow until
// this bound: 10 minutes keeps the table for 27 such connections a
// second. conntrack's bound for the connection, its established timeout
// (5 days by default), is no guide: a client of a server-first protocol
// (SMTP, IMAP, POP3) answers the server within seconds. One that stays
// silent for longer than this, then speaks, is cut (its segment is
// unknown: the denied mark, resets both ways). A flow whose client reset
// it before the decision is not kept so.
const fastKeepSilent = 10 * time.Minute

// defaultFastFlows bounds the flow table (Config.FastFlows).
const defaultFastFlows = 16384

// fastFlowsShare: one client's flows not marked yet (being decided, or
// kept for their silent client's first segment: fastKeepSilent) take at
// most 1/fastFlowsShare of the table (Config.FastFlows), so that one
// client's connections kept so, opened faster than the bound lets them
// go, do not send every other client's new connections to the proxy;
// past it, its own new connections go there (fast_syns table-full).
// Flows whose connection has its mark (the kernel's now, kept fastKeep
// for stragglers queued before it) do not count: a client opening
// connections at a high rate (a site behind a router is one client)
// keeps the fast path.
const fastFlowsShare = 8

// Bounds of the packets the fast path holds (no verdict yet) in the
// kernel's queue, which drops every packet past its length
// (nfq.DefaultMaxLen), new connections' SYNs included: all clients' at
// most half of it, the rest for SYNs and the packets answered at once;
// one client's at most an eighth of that. A client over its bound (or
// all over theirs) gets no new fast connection (the proxy takes them,
// fast_syns "held"), and a pending connection of it that sends another
// new segment is refused, ReasonLimit. A retransmission of bytes held
// already is dropped, not held: the held copy goes to the server.
const (
	fastHeldMax       = nfq.DefaultMaxLen / 2
	fastHeldPerClient = fastHeldMax / 8
)

// errFastHeld: the client (or all clients) hold as many queued packets
// as the fast path allows.
var errFastHeld = errors.New("proxy: fast path: too many held packets")

// errResetPayload: the client's RST on a pending flow carries bytes,
// which the server's host would get unread (the flow is refused,
// ReasonStreamMismatch).
var errResetPayload = errors.New("proxy: fast path: a reset with bytes")

// flowKey is a TCP flow, from the client's side.
type flowKey struct{ client, dest netip.AddrPort }

type fastState uint8

const (
	fastPending fastState = iota
	fastAllowed
	fastDenied
)

// heldPacket is a queued packet the fast path holds; off is its
// sequence number's offset in the client's stream (the release order).
type heldPacket struct {
	id, mark uint32
	off      int64
}

// fastFlow is one connection the fast path took.
type fastFlow struct {
	key   flowKey
	start time.Time
	at    policyAt
	in    policy.Input
	f     *flowRecord

	wake chan struct{} // a byte came, the deadline changed, the stream ended

	mu       sync.Mutex // guards following
	asm      *reassembler
	share    peekShare // what asm's buffer takes of the peek budget, until the flow leaves the table
	read     int       // bytes the peek has read
	fin      bool
	finOff   int
	end      error // the stream ended otherwise: the client's reset, the proxy's shutdown
	refused  error // a segment the reassembler refused
	deadline time.Time
	held     []heldPacket
	srvNext  uint32 // the server's next sequence number (a held segment's ack)
	// l2 is where the client's packets come from: the SYN's interface and
	// link-layer source, or a held packet's when the kernel gave one (at
	// the forward hook it may not: queued behind egressd's ruleset, the
	// held segments came without NFQA_HWADDR, TestFastPathKernel).
	l2      nfq.L2
	haveSrv bool
	state   fastState
	marked  bool // the connection's lasting mark was given (a NF_REPEAT)
	// unmarked: let through in audit mode, a deny not enforced (or an
	// allow) that no enforce policy it can be marked under allowed
	// (conclude): never given the fast-allowed mark in audit mode.
	unmarked bool
	counted  bool // in its client's count of flows not marked (byClient)
	decided  time.Time
	// expires: the sweep takes the decided flow out past it. Set by
	// keepFor only (fl.mu and fastQueue.emu held).
	expires time.Time
	// The flow's place in its expiry list (fastQueue.kept, keptSilent),
	// guarded by fastQueue.emu: nil elist once out of it.
	elist        *expiryList
	eprev, enext *fastFlow
	// gone: the flow left the table (remove; fastQueue.emu held), so no
	// keepFor lists it again. The queue's goroutine may hold it from a
	// look-up made before (packet), and keep it then.
	gone bool
	// v is what an allowed flow with no packet marked yet was decided on:
	// its first segment has it decided again under the policy running
	// then (a reload since: its pending conntrack mark is not what the
	// firewall's sweep reads).
	v verdict
	// rec is the event of an allowed flow with no packet marked yet, as
	// written at its decision: when its first segment's new decision
	// denies it, a second event of the connection (its start, the new
	// decision) says so (fastQueue.redecided).
	rec *audit.Event
	// recorded: the decision's event went out (conclude, after
	// Proxy.finish). conclude publishes rec before it writes the event
	// (its unlock): a revised event of the flow (redecided) written in
	// between would reach the ledger before the first, which drops it (a
	// revised event of a flow it does not hold). It waits for recordedC
	// (made by the first to wait, closed at recorded).
	recorded  bool
	recordedC chan struct{}
	// shut: the decision's read of the stream met the end of ServeQueue
	// while the flow was pending: it is refused, the reason why
	// (ReasonShutdown; ReasonFastPathFailed, the queue's reader failed).
	// "" while ServeQueue runs.
	shut string
	// runner is who decides the flow: nobody yet (its hello is not
	// complete), the queue's goroutine (quick), or a worker (kick).
	runner fastRunner
	// quickWait: the quick decision's peek would have waited for bytes
	// (errQuickWait); its result is not used.
	quickWait bool
	timer     *time.Timer // the first-byte wait: then a worker decides
	scan      helloScan   // kick's walk of the hello's records
}

// helloScan is kick's walk of a pending flow's stream for a complete
// ClientHello: the records it has walked are not walked again, so that a
// hello cut into many segments costs the queue's goroutine (which reads
// every connection's packets) each byte once, not a parse of the stream
// from its start per segment (quadratic in the segments).
type helloScan struct {
	off     int     // the stream's offset of the next record's header
	headers int     // bytes of the record headers walked
	body    int     // handshake bytes of the records walked
	hdr     [4]byte // the handshake message's header, as far as walked
	nhdr    int
}

// short reports whether b, the stream from its start (longer at each
// call, the same bytes before), is the start of a ClientHello that more
// bytes can complete: what tlshello.Read says with ErrShort, whose checks
// it mirrors. false: the hello is whole, or not one (tlshello.Read then
// says which).
func (h *helloScan) short(b []byte) bool {
	const recordHandshake, typeClientHello = 0x16, 1
	for {
		rest := b[h.off:]
		if len(rest) < 5 {
			if len(rest) >= 1 && rest[0] != recordHandshake || len(rest) >= 2 && rest[1] >= 0x10 {
				return false
			}
			return h.headers+h.body+5+1 <= tlshello.MaxBytes
		}
		if rest[0] != recordHandshake || rest[1] >= 0x10 {
			return false
		}
		n := int(rest[3])<<8 | int(rest[4])
		if n == 0 || n > tlshello.MaxRecord {
			return false
		}
		headers, body := h.headers+5, h.body+n
		frag := rest[5:min(len(rest), 5+n)]
		hdr, nhdr := h.hdr, h.nhdr
		for i := 0; nhdr < len(hdr) && i < len(frag); i++ {
			hdr[nhdr] = frag[i]
			nhdr++
		}
		if nhdr >= 1 && hdr[0] != typeClientHello {
			return false
		}
		m := 4 + (int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3]))
		if nhdr == len(hdr) {
			if more := m - body; more > 0 && headers+5*((more+tlshello.MaxRecord-1)/tlshello.MaxRecord)+m > tlshello.MaxBytes {
				return false
			}
		}
		if headers+body > tlshello.MaxBytes || len(frag) < n {
			return headers+body <= tlshello.MaxBytes // a partial record: short
		}
		h.off += 5 + n
		h.headers, h.body, h.hdr, h.nhdr = headers, body, hdr, nhdr
		if nhdr == len(hdr) && body >= m {
			return false
		}
	}
}

// fastRunner is who decides a pending flow (fastFlow.runner).
type fastRunner uint8

const (
	runNone   fastRunner = iota // nobody yet: the hello is not complete
	runQuick                    // the queue's goroutine, on a complete hello
	runWorker                   // a worker, which waits for bytes as the proxy does
)

// fastQueue serves one queue.
type fastQueue struct {
	p     *Proxy
	q     Queue
	marks FastMarks
	max   int
	keep  time.Duration // Config.fastKeep
	// keepSilent is Config.fastKeepSilent.
	keepSilent time.Duration

	mu    sync.Mutex
	flows map[flowKey]*fastFlow
	wg    sync.WaitGroup

	hmu     sync.Mutex // guards following; taken under a flow's mu, takes none
	heldAll int
	heldBy  map[netip.Addr]int // by client
	// byClient: flows in the table not marked yet (fastFlow.counted), by
	// client (unmapped).
	byClient map[netip.Addr]int

	emu sync.Mutex // guards following; taken under a flow's mu, takes none
	// The decided flows in the table in the order they expire, so that a
	// sweep visits the flows due rather than the table (a full scan of
	// 16,384 flows under s.mu took about 4 ms, once a second): kept
	// holds those kept s.keep, keptSilent those kept s.keepSilent (a
	// silent client's, keepFor). Each list's deadlines are its duration
	// past times read in order (under emu), so in order too.
	kept, keptSilent expiryList
}

// expiryList is a list of flows in the order of their expires (fastFlow
// elist, eprev, enext; fastQueue.emu held).
type expiryList struct{ head, tail *fastFlow }

// push puts fl, in no list, at l's back.
func (l *expiryList) push(fl *fastFlow) {
	fl.elist, fl.eprev, fl.enext = l, l.tail, nil
	if l.tail != nil {
		l.tail.enext = fl
	} else {
		l.head = fl
	}
	l.tail = fl
}

// unlist takes fl out of its expiry list, if it is in one.
func (fl *fastFlow) unlist() {
	l := fl.elist
	if l == nil {
		return
	}
	if fl.eprev != nil {
		fl.eprev.enext = fl.enext
	} else {
		l.head = fl.enext
	}
	if fl.enext != nil {
		fl.enext.eprev = fl.eprev
	} else {
		l.tail = fl.eprev
	}
	fl.elist, fl.eprev, fl.enext = nil, nil, nil
}

// keepFor has the sweep take fl (decided, fl.mu held) out of the table
// s.keep from now, or s.keepSilent (silent): it sets fl.expires and
// moves fl to the back of that duration's list. It returns now. A flow
// out of the table already (gone: the sweep took it out after the
// caller found it there) is in no list and stays so: listed, it would
// wait out its keep there, skipped by each sweep.
func (s *fastQueue) keepFor(fl *fastFlow, silent bool) time.Time {
	l, d := &s.kept, s.keep
	if silent {
		l, d = &s.keptSilent, s.keepSilent
	}
	s.emu.Lock()
	now := time.Now()
	fl.expires = now.Add(d)
	if !fl.gone {
		fl.unlist()
		l.push(fl)
	}
	s.emu.Unlock()
	return now
}

// lapsed says fl (allowed with nothing marked, fl.mu held) is kept no
// longer at now: out of the table (the sweep took it out after the
// caller found it there) or past its keep (fastKeepSilent), which the
// sweep, once a second, has not acted on yet. Its client's first
// segment is then a flow's the table does not know (unknown: cut), as
// the README says of a client silent for longer, whether or not the
// sweep has run.
func (fl *fastFlow) lapsed(now time.Time) bool {
	return fl.gone || now.After(fl.expires)
}

// holdOne counts a packet of client's as held, if within the bounds.
func (s *fastQueue) holdOne(client netip.Addr) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if s.heldAll >= fastHeldMax || s.heldBy[client] >= fastHeldPerClient {
		return false
	}
	s.heldAll++
	s.heldBy[client]++
	return true
}

// unhold gives back n held packets of client's.
func (s *fastQueue) unhold(client netip.Addr, n int) {
	if n == 0 {
		return
	}
	s.hmu.Lock()
	s.heldAll -= n
	if s.heldBy[client] -= n; s.heldBy[client] <= 0 {
		delete(s.heldBy, client)
	}
	s.hmu.Unlock()
}

// overHeld says client may hold no more packets.
func (s *fastQueue) overHeld(client netip.Addr) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	return s.heldAll >= fastHeldMax || s.heldBy[client] >= fastHeldPerClient
}

// SetFast sets the fast path's side of Config (FastMarks, FastPorts; nil
// ports: 443) and Deps (Inject), for a ServeQueue started after it: a
// proxy made before its queue was opened (egressd opens it when a reload
// turns the policy to enforce). Not while ServeQueue runs.
func (p *Proxy) SetFast(marks FastMarks, ports []uint16, inj Injector) {
	if ports == nil {
		ports = defaultFastPorts
	}
	p.cfg.FastMarks, p.cfg.FastPorts, p.deps.Inject = marks, ports, inj
}

// ServeQueue answers the fast path's queued packets from q until ctx
// ends or q fails (a *QueueError); it returns once every flow it was
// deciding is decided.
func (p *Proxy) ServeQueue(ctx context.Context, q Queue) error {
	s := &fastQueue{p: p, q: q, marks: p.cfg.FastMarks, max: p.cfg.FastFlows, keep: p.cfg.fastKeep, keepSilent: p.cfg.fastKeepSilent, flows: map[flowKey]*fastFlow{}, byClient: map[netip.Addr]int{}, heldBy: map[netip.Addr]int{}}
	sweepCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); s.sweep(sweepCtx) }()
	err := q.Serve(ctx, s.packet)
	failed := err != nil && !errors.Is(err, context.Canceled) && ctx.Err() == nil
	stop()
	<-done
	// What is still undecided ends: its peek reads net.ErrClosed (a
	// shutdown), errQueueFailed when the queue's reader failed.
	end := net.ErrClosed
	if failed {
		end = errQueueFailed
	}
	pending := 0
	s.mu.Lock()
	for _, fl := range s.flows {
		fl.mu.Lock()
		if fl.state == fastPending {
			pending++
			if fl.end == nil {
				fl.end = end
			}
		}
		fl.mu.Unlock()
		s.kick(fl)
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.mu.Lock()
	for _, fl := range s.flows {
		fl.mu.Lock()
		fl.share.release()
		fl.mu.Unlock()
	}
	s.mu.Unlock()
	if failed {
		p.met.fastErrOf[feServe].Inc()
		return &QueueError{Err: err, Pending: pending}
	}
	return nil
}

// QueueError is ServeQueue's error when its queue fails: Pending
// connections were waiting for a decision then (their packets queued to
// a reader that is gone: lost, fail closed).
type QueueError struct {
	Err     error
	Pending int
}

func (e *QueueError) Error() string { return e.Err.Error() }
func (e *QueueError) Unwrap() error { return e.Err }

// sweep takes decided flows out of the table once kept fastKeep: it
// looks every second, or four times a keep when that is shorter (a
// test's).
func (s *fastQueue) sweep(ctx context.Context) {
	t := time.NewTicker(min(time.Second, s.keep/4))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			s.sweepOnce(now)
		}
	}
}

// sweepOnce takes out the decided flows whose keep ended before now: the
// fronts of the expiry lists, up to the first flow not due.
func (s *fastQueue) sweepOnce(now time.Time) {
	var due []*fastFlow
	s.emu.Lock()
	for _, l := range []*expiryList{&s.kept, &s.keptSilent} {
		for fl := l.head; fl != nil && now.After(fl.expires); fl = l.head {
			fl.unlist()
			due = append(due, fl)
		}
	}
	s.emu.Unlock()
	s.mu.Lock()
	for _, fl := range due {
		if s.flows[fl.key] != fl {
			continue // out of the table already: a new connection on its ports (syn)
		}
		fl.mu.Lock()
		// Kept again since it was listed due (keepFor: its first
		// segment, a cut), it is in a list again, not due.
		old := fl.state != fastPending && now.After(fl.expires)
		if old {
			fl.share.release()
		}
		fl.mu.Unlock()
		if old {
			s.remove(fl.key)
		}
	}
	s.p.met.fastFlows.Set(float64(len(s.flows)))
	s.mu.Unlock()
}

// remove takes k's flow out of the table (s.mu held).
func (s *fastQueue) remove(k flowKey) {
	fl, ok := s.flows[k]
	if !ok {
		return
	}
	fl.mu.Lock()
	s.uncount(fl)
	s.emu.Lock()
	fl.unlist()
	fl.gone = true
	s.emu.Unlock()
	fl.mu.Unlock()
	delete(s.flows, k)
}

// uncount takes fl out of its client's count of flows not marked yet
// (byClient), if it is in it (fl.mu held): its connection got its mark,
// or it leaves the table.
func (s *fastQueue) uncount(fl *fastFlow) {
	if !fl.counted {
		return
	}
	fl.counted = false
	c := fl.key.client.Addr().Unmap()
	s.hmu.Lock()
	if s.byClient[c]--; s.byClient[c] <= 0 {
		delete(s.byClient, c)
	}
	s.hmu.Unlock()
}

// unmarked is how many flows of client's not marked yet the table holds.
func (s *fastQueue) unmarked(client netip.Addr) int {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	return s.byClient[client]
}

// verdict gives v (with mark, when set) and counts it.
func (s *fastQueue) verdict(id uint32, v nfq.Verdict, mark uint32, setMark bool) {
	var err error
	kind := fvAccept
	switch {
	case setMark:
		err = s.q.VerdictMark(id, v, mark)
		switch mark & s.marks.Mask {
		case s.marks.Pending:
			kind = fvAcceptPending
		case s.marks.Allowed:
			kind = fvRepeatAllowed
		default:
			kind = fvRepeatDenied
		}
	default:
		err = s.q.Verdict(id, v)
		if v == nfq.Drop {
			kind = fvDrop
		}
	}
	s.p.met.fastVerdictOf[kind].Inc()
	if err != nil {
		s.p.met.fastErrOf[feVerdict].Inc()
		s.p.log.Debug("proxy: fast path: verdict", audit.LogError, err.Error())
	}
}

// withMark is orig with the owned bits set to m.
func (s *fastQueue) withMark(orig, m uint32) uint32 { return orig&^s.marks.Mask | m }

// packet answers one queued packet (the queue's goroutine).
func (s *fastQueue) packet(pk nfq.Packet) {
	seg, err := nfq.ParseTCP(pk.Data)
	if err != nil {
		// Not a TCP packet the fast path reads: a SYN goes to the proxy
		// (accepted unchanged: the redirect), anything else of a pending
		// flow is dropped (fail closed).
		s.p.met.fastErrOf[feParse].Inc()
		if pk.Hook == hookPrerouting {
			s.p.met.fastSYNOf[synMalformed].Inc()
			s.verdict(pk.ID, nfq.Accept, 0, false)
			return
		}
		s.verdict(pk.ID, nfq.Drop, 0, false)
		return
	}
	if seg.Flags&(nfq.SYN|nfq.ACK) == nfq.SYN {
		switch s.syn(seg, nfq.L2Of(pk)) {
		case synFast:
			s.verdict(pk.ID, nfq.Accept, s.withMark(pk.Mark, s.marks.Pending), true)
		case synProxy:
			s.verdict(pk.ID, nfq.Accept, 0, false)
		default:
			s.verdict(pk.ID, nfq.Drop, 0, false)
		}
		return
	}
	key := flowKey{seg.Src, seg.Dst}
	s.mu.Lock()
	fl := s.flows[key]
	s.mu.Unlock()
	if fl == nil {
		s.unknown(pk, seg)
		return
	}
	fl.mu.Lock()
	switch fl.state {
	case fastAllowed, fastDenied:
		// The record, and the new decision, of a connection going on
		// whose first segment's decision is news: a would-be deny of
		// audit mode, or an allow of one recorded so.
		var news *audit.Event
		var redecision policy.Decision
		var recorded <-chan struct{} // closed once the first event is written, if news comes before it
		if fl.state == fastAllowed && !fl.marked && fl.lapsed(time.Now()) {
			fl.mu.Unlock()
			s.unknown(pk, seg)
			return
		}
		if fl.state == fastAllowed && fl.asm.check(seg.Seq, seg.Payload) != nil {
			s.cut(fl, pk, seg, nil)
			return
		}
		if fl.state == fastAllowed && !fl.marked {
			// Its first segment gives the connection its mark: decided
			// again under the policy running now (s.again), which a
			// reload since may have changed.
			v := fl.v
			fl.mu.Unlock()
			d := s.again(s.p.deps.Policy.Load(), v)
			deny := !d.Allowed() && d.Mode == policy.ModeEnforce
			fl.mu.Lock()
			if fl.gone {
				// The sweep took it out meanwhile (its keep ended as
				// the segment came): unknown, as it is a moment later.
				fl.mu.Unlock()
				s.unknown(pk, seg)
				return
			}
			if deny && fl.state == fastAllowed && !fl.marked {
				s.cut(fl, pk, seg, &d)
				return
			}
			if fl.unmarked && fl.state == fastAllowed && !fl.marked && !(d.Allowed() && d.Mode == policy.ModeEnforce) {
				// Let through in audit mode, which no enforce policy
				// allowed (conclude): still without the fast-allowed
				// mark, decided again at its next segment queued.
				fl.mu.Unlock()
				s.verdict(pk.ID, nfq.Accept, 0, false)
				return
			}
			if fl.state == fastAllowed && !fl.marked && fl.rec != nil && d.Allowed() != (fl.rec.Verdict == policy.Allow) {
				// It goes on. Audit mode, denied: its record says the
				// new policy would deny it (once: a record that says so
				// already, a decision across a reload, is not
				// repeated). Allowed, its record a would-be deny (a
				// decision across a reload to audit mode): the rule's
				// now, as Redecide credits the proxy's own.
				news = fl.rec
				redecision = d
				recorded = fl.firstOut()
			}
		}
		v, m := nfq.Accept, s.marks.Allowed
		if fl.state == fastDenied {
			v, m = nfq.Drop, s.marks.Denied
		}
		first := !fl.marked
		fl.marked = true
		fl.rec = nil
		s.uncount(fl)
		if first && fl.state == fastAllowed {
			// Kept for a silent client until now: what is queued before
			// the mark takes hold is answered for fastKeep more.
			s.keepFor(fl, false)
		}
		// A flow refused with nothing held (a second SYN with another
		// ISN, a segment past the held bound) had no segment whose ack
		// says where the server is, so nobody was answered at the
		// decision: its first segment after is (else the client waits
		// out its own timeout).
		answer := first && fl.state == fastDenied && seg.Flags&(nfq.ACK|nfq.RST) == nfq.ACK
		l2, cliSeq := fl.l2, fl.asm.first
		if pk.HWAddrLen > 0 {
			l2 = nfq.L2Of(pk)
		}
		fl.mu.Unlock()
		if news != nil {
			// Recorded before the verdict, as a cut is: a reader that
			// sees the segment answered sees the record and its count.
			s.redecided(news, redecision, recorded)
		}
		if first {
			s.verdict(pk.ID, nfq.Repeat, s.withMark(pk.Mark, m), true)
		} else {
			s.verdict(pk.ID, v, 0, false)
		}
		if answer {
			var alert []byte
			if seg.Seq == cliSeq && len(seg.Payload) > 0 && seg.Payload[0] == 0x16 {
				alert = tlsAlertAccessDenied // the start of a TLS stream
			}
			s.resets(l2, fl.key.client, fl.key.dest, cliSeq, seg.Ack, seg.Seq+uint32(len(seg.Payload)), alert)
		}
		return
	}
	// Pending.
	if seg.Flags&nfq.RST != 0 && len(seg.Payload) > 0 {
		// An RST with bytes: passed, it would take them to the server's
		// host unread (and end the stream, then allowed on the address
		// with nothing read). Dropped, and the flow refused; the server
		// gets a reset without bytes at the decision, where its ack says.
		if fl.refused == nil {
			fl.refused = errResetPayload
		}
		if seg.Flags&nfq.ACK != 0 {
			fl.srvNext, fl.haveSrv = seg.Ack, true
		}
		fl.mu.Unlock()
		s.p.met.fastErrOf[feResetPayload].Inc() // before the decision's event (isn-mismatch)
		s.kick(fl)
		s.verdict(pk.ID, nfq.Drop, 0, false)
		return
	}
	if seg.Flags&nfq.RST != 0 {
		if fl.end == nil {
			fl.end = syscall.ECONNRESET
		}
		fl.mu.Unlock()
		s.kick(fl)
		s.verdict(pk.ID, nfq.Accept, 0, false) // the server may forget the connection
		return
	}
	if len(seg.Payload) == 0 && seg.Flags&nfq.FIN == 0 {
		fl.mu.Unlock()
		s.verdict(pk.ID, nfq.Accept, 0, false) // an ACK the firewall could not prove empty
		return
	}
	if fl.refused != nil && len(fl.held) > 0 {
		// Refused: every held packet is dropped at the decision, and one
		// of them gives the denied mark.
		fl.mu.Unlock()
		s.verdict(pk.ID, nfq.Drop, 0, false)
		return
	}
	if fl.refused == nil {
		again := fl.asm.holds(seg.Seq, len(seg.Payload)) && (seg.Flags&nfq.FIN == 0 || fl.fin)
		if err := fl.asm.add(seg.Seq, seg.Payload); err != nil {
			fl.refused = err
		} else if again {
			// A retransmission of held bytes: the held copy goes.
			fl.mu.Unlock()
			s.verdict(pk.ID, nfq.Drop, 0, false)
			return
		} else if seg.Flags&nfq.FIN != 0 && !fl.fin {
			fl.fin = true
			fl.finOff = int(int32(seg.Seq-fl.asm.first)) + len(seg.Payload)
		}
	}
	if !s.holdOne(fl.key.client.Addr().Unmap()) {
		if fl.refused == nil {
			fl.refused = errFastHeld
		}
		fl.mu.Unlock()
		s.kick(fl)
		s.verdict(pk.ID, nfq.Drop, 0, false)
		return
	}
	fl.held = append(fl.held, heldPacket{pk.ID, pk.Mark, fl.asm.offset(seg.Seq)})
	if seg.Flags&nfq.ACK != 0 {
		fl.srvNext, fl.haveSrv = seg.Ack, true
	}
	if pk.HWAddrLen > 0 {
		fl.l2 = nfq.L2Of(pk)
	}
	fl.mu.Unlock()
	s.kick(fl)
}

// cut answers pk, a segment of fl (allowed, fl.mu held; cut unlocks it)
// queued after the decision, before the connection's mark took hold
// (nothing is queued after), whose bytes differ from those decided or
// start before them, or (revoked, the new decision) the first segment of
// a flow allowed with nothing marked that the policy running now denies:
// dropped with the denied mark, which replaces the allowed one, and
// resets both ways (the server has read the stream up to its first
// hole).
func (s *fastQueue) cut(fl *fastFlow, pk nfq.Packet, seg nfq.TCPSegment, revoked *policy.Decision) {
	fl.state = fastDenied
	fl.marked = true
	s.uncount(fl)
	fl.v = verdict{}
	rec := fl.rec
	fl.rec = nil
	var recorded <-chan struct{}
	if revoked != nil && rec != nil {
		recorded = fl.firstOut()
	}
	s.keepFor(fl, false)
	l2 := fl.l2
	if pk.HWAddrLen > 0 {
		l2 = nfq.L2Of(pk)
	}
	cliNext := fl.asm.first + uint32(fl.asm.contig)
	fl.mu.Unlock()
	if revoked != nil && rec != nil {
		s.redecided(rec, *revoked, recorded)
	} else {
		s.p.met.fastErrOf[feLateConflict].Inc()
		s.p.log.Warn("proxy: fast path: other bytes after the decision, connection cut",
			audit.LogClient, seg.Src.Addr().Unmap().String(), audit.LogClientPort, seg.Src.Port(),
			audit.LogDest, seg.Dst.Addr().Unmap().String(), audit.LogDestPort, seg.Dst.Port())
	}
	s.verdict(pk.ID, nfq.Repeat, s.withMark(pk.Mark, s.marks.Denied), true)
	if seg.Flags&nfq.ACK != 0 {
		s.resets(l2, seg.Src, seg.Dst, cliNext, seg.Ack, cliNext, nil)
	}
}

// redecided records the new decision d of a connection allowed with no
// packet marked whose first segment had it decided again (rec: its
// event, written at its decision), when it is news: an allow of a
// would-be deny (a second event, allowed under its rule, which the ledger
// credits to it in place of the deny: recredited, as a reload credits
// the proxy's own), or a deny: a second event of the connection,
// with its start and the new decision (enforce: enforced, close
// policy-revoked, the connection cut; audit mode: a deny not enforced,
// the connection going on), a line and reload_revoked_total{mode}, as a
// reload records the proxy's own connections (Proxy.redecideOne). The
// ledger moves the flow from its rule to the dropped list (audit:
// redecided), as it does a flow a component decided again. The second
// event is marked revised (audit.Event.Revised): where the ledger no
// longer holds the first (it may come 10 minutes later), the first's
// count stands and the connection counts once. It is written after the
// first: recorded (fastFlow.firstOut; nil: the first went out) is closed
// once the decision wrote it. The queue's goroutine may wait here for a
// worker's conclude between its unlock and its event: nothing there
// waits on the queue's goroutine (a flow with a rec held no packet).
func (s *fastQueue) redecided(rec *audit.Event, d policy.Decision, recorded <-chan struct{}) {
	if recorded != nil {
		<-recorded
	}
	ev := *rec
	ev.Stamp(d)
	ev.Duration = time.Since(ev.Time).Seconds()
	// Up to fastKeepSilent after the first: the ledger may hold the
	// first no more, and must not count this one as a flow of its own.
	ev.Revised = true
	if d.Allowed() {
		// A would-be deny the policy running now allows: credited to
		// its rule (the ledger: recredited), no revocation.
		s.p.deps.Sink.Emit(ev)
		s.p.log.LogAttrs(context.Background(), slog.LevelInfo, "proxy: fast path: policy reload: the new policy allows this connection (a would-be deny until now)", ev.AppendFlowAttrs(nil)...)
		return
	}
	if ev.Enforced {
		ev.Close = closeRevoked
	}
	s.p.met.revokedIn(d.Mode).Inc()
	s.p.deps.Sink.Emit(ev)
	attrs := ev.AppendFlowAttrs(nil)
	if ev.Enforced {
		s.p.log.LogAttrs(context.Background(), slog.LevelWarn, "proxy: fast path: policy reload: connection cut at its first segment, the new policy denies it", attrs...)
		return
	}
	s.p.log.LogAttrs(context.Background(), slog.LevelInfo, "proxy: fast path: policy reload: the new policy would deny this connection (audit mode: kept)", attrs...)
}

// Netfilter hooks (Packet.Hook).
const (
	hookPrerouting = 0
	hookForward    = 2
)

// unknown answers a queued segment of a flow the table does not know:
// denied, with resets both ways when it carries data (a connection the
// firewall holds pending that no decision can release).
func (s *fastQueue) unknown(pk nfq.Packet, seg nfq.TCPSegment) {
	s.p.met.fastErrOf[feUnknownFlow].Inc()
	if len(seg.Payload) == 0 && seg.Flags&(nfq.FIN|nfq.SYN) == 0 {
		s.verdict(pk.ID, nfq.Accept, 0, false)
		return
	}
	s.verdict(pk.ID, nfq.Repeat, s.withMark(pk.Mark, s.marks.Denied), true)
	if seg.Flags&nfq.ACK == 0 {
		return
	}
	l2 := nfq.L2Of(pk)
	if l2.AddrLen > 0 || s.p.deps.Inject == nil {
		s.resets(l2, seg.Src, seg.Dst, seg.Seq, seg.Ack, 0, nil)
		return
	}
	// A segment held at the forward hook comes without the client's
	// link-layer address (a known flow's answer goes to its SYN's): the
	// neighbour table's, asked off the queue's goroutine (it may wait for
	// the kernel). Without one (a client behind a router) the client's
	// reset goes through the IP layer, which reaches it where the gateway
	// does not masquerade. Before, it went to no address: after a restart
	// the client of a connection held pending waited out its own timeout.
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		var mac net.HardwareAddr
		if s.p.deps.MACs != nil {
			mac = s.p.deps.MACs.ClientMAC(seg.Src.Addr())
		}
		if len(mac) > 0 && len(mac) <= len(l2.Addr) {
			l2.AddrLen = uint8(copy(l2.Addr[:], mac))
			s.resets(l2, seg.Src, seg.Dst, seg.Seq, seg.Ack, 0, nil)
			return
		}
		inj := s.p.deps.Inject
		if err := errors.Join(inj.Reset(seg.Dst, seg.Src, seg.Ack, seg.Seq), inj.Reset(seg.Src, seg.Dst, seg.Seq, seg.Ack)); err != nil {
			s.p.met.fastErrOf[feInject].Inc()
			s.p.log.Debug("proxy: fast path: inject", audit.LogError, err.Error())
		}
	}()
}

// What syn says of a SYN.
type synAnswer uint8

const (
	synFast  synAnswer = iota // accepted with the Pending mark
	synProxy                  // accepted unchanged: the redirect to the proxy
	synDrop                   // dropped: another ISN on a flow whose mark has not landed
)

// syn decides whether seg, a SYN, is fast, and if so starts its flow. A
// SYN on a flow of the table whose lasting mark has not landed (pending,
// or decided with no packet marked yet) is the same connection to the
// firewall (its conntrack entry, marked pending, is not redirected
// again): sent again with the flow's ISN it gets the same answer; with
// another ISN it is dropped and a pending flow refused
// (ReasonStreamMismatch), since the server may keep the first ISN (the
// second SYN sent with a TTL that ends at the gateway, or outside the
// server's window) while the fast path would read the stream from the
// second.
func (s *fastQueue) syn(seg nfq.TCPSegment, l2 nfq.L2) synAnswer {
	p := s.p
	key := flowKey{seg.Src, seg.Dst}
	s.mu.Lock()
	if fl := s.flows[key]; fl != nil {
		fl.mu.Lock()
		// Past fastKeep, a flow kept for its silent client's first
		// segment is not the live connection to a SYN: one sent then is
		// a new connection on its ports, as if the flow were gone.
		live := fl.state == fastPending || !fl.marked && time.Since(fl.decided) < s.keep
		same := seg.Seq+1 == fl.asm.first
		if live && !same && fl.state == fastPending && fl.refused == nil {
			fl.refused = errSegConflict
		}
		fl.mu.Unlock()
		if live {
			s.mu.Unlock()
			if !same {
				// Counted before the kick: the decision it may start
				// writes the connection's event, which a reader may
				// take as the SYN's outcome.
				p.met.fastSYNOf[synISNMismatch].Inc()
				s.kick(fl)
				return synDrop
			}
			return synFast
		}
		fl.mu.Lock()
		fl.share.release()
		fl.mu.Unlock()
		s.remove(key) // a new connection on a decided flow's ports
	}
	full := len(s.flows) >= s.max || s.unmarked(seg.Src.Addr().Unmap()) >= max(1, s.max/fastFlowsShare)
	s.mu.Unlock()
	why := s.declines(seg, full, l2)
	if why != synNone {
		p.met.fastSYNOf[why].Inc()
		return synProxy
	}
	return synFast
}

// declines returns why seg's connection is not fast (synNone when it is,
// then its flow is in the table, decided when kick or its first-byte
// wait says).
func (s *fastQueue) declines(seg nfq.TCPSegment, full bool, l2 nfq.L2) synResult {
	p := s.p
	switch {
	case len(seg.Payload) > 0:
		return synFastOpen
	case !slices.Contains(p.cfg.FastPorts, seg.Dst.Port()):
		return synPort
	case full:
		return synTableFull
	case s.overHeld(seg.Src.Addr().Unmap()):
		return synHeld
	}
	start := time.Now()
	at := p.policyNow()
	eng := at.eng
	if eng.Mode() != policy.ModeEnforce {
		return synAuditMode
	}
	client, dest := seg.Src.Addr().Unmap(), seg.Dst.Addr().Unmap()
	if _, ok := lanLoopback(dest); ok {
		return synGuard
	}
	in := policy.Input{Client: client, Dest: dest, Port: seg.Dst.Port(), Proto: policy.TCP, Now: start}
	in.ClientMAC = p.clientMAC(eng, client)
	v := p.decideAddr(eng, in, audit.NameNone)
	switch {
	case v.d.Reason == ReasonSpecialRange:
		return synGuard
	case !v.d.Allowed() || v.src != audit.NameDNSLearned:
		return synNotLearned
	case v.inspect:
		return synInspect
	}
	ok, dev, _ := p.slots.AcquireDevice(client)
	if !ok {
		return synLimit // the proxy refuses it, and counts it
	}
	p.met.active.Inc()
	p.met.fastSYNOf[synResFast].Inc()
	f := &flowRecord{listener: "transparent", ev: audit.Event{
		Kind: audit.KindFlow, Source: audit.SourceProxy, Time: start,
		Client: audit.ClientAddr(client), ClientPort: seg.Src.Port(), Proto: "tcp",
		Dest: dest, DestPort: seg.Dst.Port(), ClientMAC: dev,
	}, portDone: true}
	if in.ClientMAC != nil {
		f.ev.ClientMAC = in.ClientMAC.String()
	}
	if p.deps.Accepted != nil {
		f.lined = p.deps.Accepted(seg.Src, netip.AddrPortFrom(dest, seg.Dst.Port()), func() bool { return false })
	}
	fl := &fastFlow{key: flowKey{seg.Src, seg.Dst}, start: start, at: at, in: in, f: f,
		wake: make(chan struct{}, 1), asm: newReassembler(seg.Seq, p.cfg.HelloMaxBytes), l2: l2,
		share: peekShare{b: p.peekMem, client: client, keyOf: p.keyOf}}
	fl.asm.share = &fl.share
	s.wg.Add(1) // until concluded
	s.mu.Lock()
	s.flows[fl.key] = fl
	fl.counted = true // not marked yet
	s.hmu.Lock()
	s.byClient[client]++
	s.hmu.Unlock()
	p.met.fastFlows.Set(float64(len(s.flows)))
	s.mu.Unlock()
	// Nobody waits for the client's first bytes: the segment that
	// completes its hello has the queue's goroutine decide (kick, quick);
	// a client silent for the first-byte wait has a worker decide (on
	// the address, as the proxy does), and so has a flow whose bytes
	// need waiting for (not TLS, a stream that ended or was refused).
	fl.mu.Lock()
	fl.timer = time.AfterFunc(p.fastFirstByteWait(), func() { s.toWorker(fl) })
	fl.mu.Unlock()
	return synNone
}

// fastFirstByteWait is the fast path's first-byte wait, from the SYN:
// the proxy's counted from the same point. The proxy waits FirstByteWait
// from the completed handshake (accept), and the handshake takes up to
// the SYN-ACK's initial RTO more when the client's ACK waits for its
// bytes under TCP_DEFER_ACCEPT, or a SYN or SYN-ACK is lost and resent
// after the RTO (deferAcceptWait, 1 s, which is that RTO). Waiting
// FirstByteWait from the SYN, the fast path read a client whose first
// byte came later than that (a busy client, a resent SYN) as silent and
// allowed it on the address, its hello never read. Still bounded by
// HelloTimeout, as the whole hello is. Server-first protocols are not
// slowed: the server's packets are replies, never queued, and the
// client's first segment (its answer) ends the wait.
func (p *Proxy) fastFirstByteWait() time.Duration {
	return min(p.cfg.FirstByteWait+p.cfg.fastHandshake, p.cfg.HelloTimeout)
}

// kick has fl decided when it can be: a worker that runs already is
// woken; with nobody deciding yet, a complete ClientHello is decided at
// once on the caller's goroutine (quick), and a stream that needs waiting
// for (other bytes than TLS, ended, refused) gets a worker. A hello not
// complete yet waits for its next segment, or the first-byte wait.
func (s *fastQueue) kick(fl *fastFlow) {
	fl.mu.Lock()
	switch fl.runner {
	case runWorker:
		fl.mu.Unlock()
		fl.poke()
		return
	case runQuick:
		fl.mu.Unlock()
		return
	}
	if fl.state != fastPending {
		fl.mu.Unlock()
		return
	}
	b := fl.asm.ready(0)
	switch {
	case fl.refused != nil || fl.end != nil || fl.fin || len(b) > 0 && b[0] != 0x16:
		fl.runner = runWorker
	case len(b) == 0:
		fl.mu.Unlock()
		return
	default:
		if fl.scan.short(b) {
			fl.mu.Unlock()
			return
		}
		s.p.fastScanned.Add(int64(fl.scan.headers + fl.scan.body + len(b)))
		// Should the walk and tlshello disagree (not expected: short
		// mirrors it), quick's peek reads for more (errQuickWait) and
		// hands the flow to a worker.
		fl.runner = runQuick
		if h := s.p.cfg.fastWorker; h != nil && h(fl.key) {
			fl.runner = runWorker
		}
	}
	quick := fl.runner == runQuick
	fl.mu.Unlock()
	if quick {
		s.quick(fl)
		return
	}
	s.p.work.run(func() { s.decide(fl) })
}

// toWorker has a worker decide fl, unless someone decides it already:
// the first-byte wait ended.
func (s *fastQueue) toWorker(fl *fastFlow) {
	fl.mu.Lock()
	switch fl.runner {
	case runQuick, runWorker:
		fl.mu.Unlock()
		return // quick hands the flow to a worker if it must wait
	}
	fl.runner = runWorker
	fl.mu.Unlock()
	s.p.work.run(func() { s.decide(fl) })
}

// errQuickWait: the quick decision's stream has no more bytes now, and a
// worker must wait for them. It is not expected (quick starts on a hello
// tlshello has whole), but if the peek reads further the decision is
// left to a worker, from the stream's start.
var errQuickWait = errors.New("proxy: fast path: the stream needs waiting for")

// quick decides fl on the queue's goroutine, whose segment completed its
// ClientHello: no worker is woken. The server name is vouched for by
// local facts only (our DNS's answers, CIDR rules); where only a fresh
// lookup could vouch for it, a worker looks up, as the proxy would.
func (s *fastQueue) quick(fl *fastFlow) {
	p := s.p
	kind, v, head := p.peek(flowStream{fl, true}, fl.at.eng, fl.in, fl.start, false, vouchLocal)
	fl.mu.Lock()
	waits := fl.quickWait
	if waits {
		// Undone: the worker reads the stream from its start.
		fl.quickWait, fl.read = false, 0
		fl.runner = runWorker
	}
	fl.mu.Unlock()
	if waits {
		head.rec.share.release()
		p.work.run(func() { s.decide(fl) })
		return
	}
	if kind == kindTLS && v.how == byName && v.d.Reason == ReasonSNIMismatch && p.deps.Resolver != nil {
		fl.mu.Lock()
		fl.runner = runWorker
		fl.mu.Unlock()
		p.work.run(func() {
			v := p.decideNameVouched(context.Background(), fl.at.eng, v.in, v.src, vouchLookup)
			s.conclude(fl, kind, v, head, false)
		})
		return
	}
	s.conclude(fl, kind, v, head, true)
}

// decide runs the transparent proxy's peek and decision on fl's stream
// (a worker), then gives the held packets their verdicts.
func (s *fastQueue) decide(fl *fastFlow) {
	kind, v, head := s.p.peek(flowStream{fl, false}, fl.at.eng, fl.in, fl.start, false, vouchLookup)
	s.conclude(fl, kind, v, head, false)
}

// conclude gives fl's held packets their verdicts on what the peek read
// and decided, and records the connection.
func (s *fastQueue) conclude(fl *fastFlow, kind streamKind, v verdict, head peekResult, onQueue bool) {
	p := s.p
	// The policy running at the decision, loaded once: the decision made
	// again across a reload and every refusal below take it (its mode),
	// so that they agree. Across a reload to audit mode, a refusal of the
	// fast path's own (a limit, a stream mismatch, plain HTTP) lets the
	// connection go on, recorded as a deny not enforced, as its allow
	// would be decided.
	eng := p.deps.Policy.Load()
	defer s.wg.Done()
	if onQueue {
		p.met.fastOnQueue.Inc()
	} else {
		p.met.fastOnWorker.Inc()
	}
	defer head.rec.share.release()
	p.met.peek.Observe(time.Since(fl.start).Seconds())

	if h := p.cfg.fastDecided; h != nil {
		h(fl.key)
	}
	revoked := false
	synAllowed := v.d.Allowed() // by the SYN's policy, of enforce mode (declines)
	if fl.at.eng != eng {
		// A reload went in since the SYN: the firewall's sweep after it
		// did not read this connection (pending, its conntrack mark has
		// no enforced bit), so it is decided under the policy running
		// now, as the proxy decides one it registers after a reload
		// began (addLive): denied in enforce mode, refused; in audit
		// mode it goes on, recorded as a deny not enforced. An allow
		// so denied is counted revoked below, unless a refusal of its
		// own (a stream mismatch, a limit, the shutdown) decides it
		// instead. A deny of the SYN's policy (a rule's, or a refusal
		// the peek made on the bytes: Proxy.again keeps its reason) is
		// decided so too: a new connection would be.
		d := s.again(eng, v)
		if !v.d.Allowed() || !d.Allowed() {
			revoked = v.d.Allowed()
			v.d = d
		}
	}
	// One critical section from the refusal read to the state set: a
	// segment queued in between would otherwise be held after the look
	// at the refusal its bytes cause, and released with the others.
	fl.mu.Lock()
	refused := fl.refused
	own := refused != nil || fl.shut != "" // a refusal of the fast path's own
	if own {
		revoked = false
	}
	if errors.Is(refused, errFastHeld) {
		v = verdict{d: denyDecision(eng, ReasonLimit), src: audit.NameNone, how: byBytes}
	} else if errors.Is(refused, errPeekBudget) {
		p.peekRefused(fl.in.Client)
		v = verdict{d: denyDecision(eng, ReasonLimit), src: audit.NameNone, how: byBytes}
	} else if refused != nil {
		v = verdict{d: denyDecision(eng, ReasonStreamMismatch), src: audit.NameNone, how: byBytes}
	} else if fl.shut != "" {
		// The shutdown (or the queue's failure) ended the stream before
		// the decision: never allowed, as the transparent proxy refuses a
		// connection its Close cut during the peek.
		v = verdict{d: denyDecision(eng, fl.shut), src: audit.NameNone, how: byBytes}
	} else if kind == kindHTTP && v.d.Allowed() {
		// Plain HTTP: the proxy decides every request head of the
		// connection; the kernel would forward the later ones unread.
		// (On its bytes: decided again, by packet, it stays refused.)
		v.d = denyDecision(eng, ReasonFastPathHTTP)
		v.how, own = byBytes, true
	} else if v.inspect && v.d.Allowed() {
		// Host/path rules decide this host, and the fast path sees no
		// request after the first: the proxy would inspect it. Refused,
		// as a reload refuses a spliced connection allowed only so.
		v.d = denyDecision(eng, policy.ReasonPathUnseen)
		v.how, own = byBytes, true
	}
	f := fl.f
	f.ev.Stamp(v.d)
	f.ev.Name, f.ev.NameSource = v.name, v.src
	f.ev.NoPath = kind == kindOther
	if kind == kindHTTP && head.Path != "" {
		f.ev.Path = head.Path
	}
	// Refused at the shutdown (or the queue's failure) in either mode,
	// as the transparent proxy refuses a connection at its shutdown
	// (refuseAtShutdown).
	deny := v.enforced() || fl.shut != ""
	f.ev.Enforced = deny
	switch {
	case deny:
		f.ev.Close = closeFastDenied
	case head.early && refused == nil:
		// (A refused stream reads as ended to the peek; let through, in
		// audit mode, its client did not close it.)
		f.ev.Close = closeEarly
	default:
		f.ev.Close = closeFast
	}
	if fl.shut == ReasonShutdown && refused == nil {
		f.ev.Close = closeShutdown
	} else if fl.shut == ReasonFastPathFailed && refused == nil {
		f.ev.Close = closeFastFailed
	}
	held := fl.held
	fl.held = nil
	// Released in sequence order: the server's kernel replaces
	// out-of-order bytes a later segment covers, so a segment reaching it
	// before the ones in front could be another stream's.
	slices.SortStableFunc(held, func(a, b heldPacket) int { return cmp.Compare(a.off, b.off) })
	fl.state = fastAllowed
	if deny {
		fl.state = fastDenied
	}
	// The fast-allowed mark is kept by a reload's firewall sweep while
	// the rules (not the mode) are those of the enforce policies it can
	// come from (firewall's fastFingerprint): it is given to a
	// connection an enforce policy allowed, the running one or its
	// SYN's (then, across a reload to audit mode, allowed or revoked
	// there). One let through in audit mode otherwise (denied by the
	// SYN's policy too, or refused for a reason of the fast path's own)
	// has its held packets accepted without it: its conntrack entry
	// stays pending, and its next segment queued under an enforce
	// ruleset is decided again (packet), as the proxy's own connection
	// let through in audit mode is at the switch back.
	fl.unmarked = !deny && !(v.d.Allowed() && v.d.Mode == policy.ModeEnforce) && !(synAllowed && !own)
	fl.marked = len(held) > 0 && !fl.unmarked
	if fl.marked {
		s.uncount(fl)
	}
	if !deny && !fl.marked {
		fl.v = v // its first segment decides it again (packet)
	}
	// Kept s.keep from now; s.keepSilent, allowed with nothing marked,
	// until its first segment marks it.
	fl.decided = s.keepFor(fl, !deny && !fl.marked && fl.end == nil)
	f.ev.BytesOut = uint64(fl.asm.contig)
	if !deny && !fl.marked {
		rec := f.ev // its first segment's new decision may deny it (redecided)
		fl.rec = &rec
	}
	cliSeq := fl.asm.first
	cliNext := cliSeq + uint32(len(fl.asm.buf))
	if kind == kindOther && refused != nil && len(fl.asm.ready(0)) > 0 && fl.asm.buf[0] == 0x16 {
		// Refused before the peek read the first byte (held segments
		// came faster than it woke): a TLS record's first byte still
		// gets the TLS alert.
		kind = kindTLS
	}
	srvNext, haveSrv, l2 := fl.srvNext, fl.haveSrv, fl.l2
	fl.timer.Stop()
	fl.mu.Unlock()
	if h := p.cfg.fastRecording; h != nil {
		h(fl.key)
	}
	s.unhold(fl.key.client.Addr().Unmap(), len(held))

	if deny {
		for i, h := range held {
			if i == len(held)-1 {
				s.verdict(h.id, nfq.Repeat, s.withMark(h.mark, s.marks.Denied), true)
			} else {
				s.verdict(h.id, nfq.Drop, 0, false)
			}
		}
		if haveSrv {
			var answer []byte
			switch kind {
			case kindTLS:
				answer = tlsAlertAccessDenied
			case kindHTTP:
				host := v.name
				if host == "" {
					host = fl.key.dest.Addr().String()
				}
				answer = p.httpDeny(DenyInfo{Host: host, Path: head.Path, Client: fl.key.client.Addr().String(), Rule: v.d.Rule, Reason: v.d.Reason})
			}
			s.resets(l2, fl.key.client, fl.key.dest, cliSeq, srvNext, cliNext, answer)
		}
	} else {
		for i, h := range held {
			if i == len(held)-1 && !fl.unmarked {
				s.verdict(h.id, nfq.Repeat, s.withMark(h.mark, s.marks.Allowed), true)
			} else {
				s.verdict(h.id, nfq.Accept, 0, false)
			}
		}
	}
	if revoked {
		p.met.revokedIn(v.d.Mode).Inc()
	}
	p.release(fl.key.client.Addr().Unmap())
	p.finish(f)
	// The flow may stay in the table for up to fastKeepSilent: what only
	// the decision read (the policy engine, the record) is let go.
	fl.mu.Lock()
	fl.at, fl.f, fl.in = policyAt{}, nil, policy.Input{}
	fl.recorded = true
	if fl.recordedC != nil {
		close(fl.recordedC) // a revised event of the flow waits (redecided)
	}
	fl.mu.Unlock()
}

// firstOut returns what a revised event of fl (redecided) waits for
// before it is written: nil once the decision's event went out, else a
// channel closed then. fl.mu held.
func (fl *fastFlow) firstOut() <-chan struct{} {
	if fl.recorded {
		return nil
	}
	if fl.recordedC == nil {
		fl.recordedC = make(chan struct{})
	}
	return fl.recordedC
}

// again decides a flow allowed on v again under eng, the policy running
// now, as a reload decides the proxy's own connections (Proxy.again:
// local facts only, no lookup). A reload
// cuts the fast-allowed connections whose rules changed (the firewall's
// sweep), but one allowed with nothing marked yet carries the pending
// conntrack mark, which the sweep does not read: its first segment,
// which would give it the allowed mark, is decided so.
func (s *fastQueue) again(eng *policy.Engine, v verdict) policy.Decision {
	return s.p.again(eng, v)
}

// resets answers a refused connection: answer (if any) then a reset to
// the client, from the server's address, on the link layer toward l2 (the
// client's packets came from there); a reset to the server, from the
// client's, through the IP layer. cliSeq is the client's sequence number
// the server expects (nothing held reached it), srvNext the server's next
// one (a held segment's ack), cliNext past the client's highest byte seen
// (0: cliSeq is it).
func (s *fastQueue) resets(l2 nfq.L2, client, dest netip.AddrPort, cliSeq, srvNext, cliNext uint32, answer []byte) {
	inj := s.p.deps.Inject
	if inj == nil {
		return // no injector (a test's): the client waits out its own timeout
	}
	if cliNext == 0 {
		cliNext = cliSeq
	}
	var errs []error
	if len(answer) > 0 {
		errs = append(errs, inj.SegmentL2(l2, dest, client, srvNext, cliNext, nfq.PSH|nfq.ACK, answer))
	}
	errs = append(errs,
		inj.ResetL2(l2, dest, client, srvNext+uint32(len(answer)), cliNext),
		inj.Reset(client, dest, cliSeq, srvNext))
	if err := errors.Join(errs...); err != nil {
		s.p.met.fastErrOf[feInject].Inc()
		s.p.log.Debug("proxy: fast path: inject", audit.LogError, err.Error())
	}
}

// poke wakes fl's reader.
func (fl *fastFlow) poke() {
	select {
	case fl.wake <- struct{}{}:
	default:
	}
}

// flowStream is the peek's view of a fast flow: the client's bytes as
// reassembled (peekSource).
type flowStream struct {
	fl    *fastFlow
	quick bool // the queue's goroutine reads: it must not wait (errQuickWait)
}

func (s flowStream) Read(b []byte) (int, error) {
	fl := s.fl
	for {
		fl.mu.Lock()
		if r := fl.asm.ready(fl.read); len(r) > 0 && fl.refused == nil {
			n := copy(b, r)
			fl.read += n
			fl.mu.Unlock()
			return n, nil
		}
		switch {
		case fl.refused != nil:
			fl.mu.Unlock()
			return 0, fl.refused
		case fl.end != nil:
			err := fl.end
			if errors.Is(err, errQueueFailed) {
				fl.shut = ReasonFastPathFailed
			} else if errors.Is(err, net.ErrClosed) {
				fl.shut = ReasonShutdown
			}
			fl.mu.Unlock()
			return 0, err
		case fl.fin && fl.read >= fl.finOff:
			fl.mu.Unlock()
			return 0, io.EOF
		}
		if s.quick {
			fl.quickWait = true
			fl.mu.Unlock()
			return 0, errQuickWait
		}
		dl := fl.deadline
		fl.mu.Unlock()
		var timeout <-chan time.Time
		var t *time.Timer
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			t = time.NewTimer(d)
			timeout = t.C
		}
		select {
		case <-fl.wake:
		case <-timeout:
		}
		if t != nil {
			t.Stop()
		}
	}
}

func (s flowStream) SetReadDeadline(t time.Time) error {
	s.fl.mu.Lock()
	s.fl.deadline = t
	s.fl.mu.Unlock()
	s.fl.poke()
	return nil
}
