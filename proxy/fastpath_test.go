package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/internal/tlshello"
	"egressd/internal/tlshello/hellotest"
	"egressd/policy"
)

// fakeQueue is a Queue the test feeds: the one fake of the fast path's
// tests (the kernel's queue is the e2e test's, with internal/nfq and the
// firewall's rules).
type fakeQueue struct {
	in chan nfq.Packet
	// fail ends Serve with the error sent, as a read error of the
	// kernel's queue does.
	fail chan error

	mu       sync.Mutex
	verdicts map[uint32]gotVerdict
	order    []uint32 // ids in the order of their verdicts
}

type gotVerdict struct {
	v       nfq.Verdict
	mark    uint32
	setMark bool
}

func newFakeQueue() *fakeQueue {
	return &fakeQueue{in: make(chan nfq.Packet), fail: make(chan error), verdicts: map[uint32]gotVerdict{}}
}

func (q *fakeQueue) Serve(ctx context.Context, fn func(nfq.Packet)) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-q.fail:
			return err
		case pk := <-q.in:
			fn(pk)
		}
	}
}

func (q *fakeQueue) set(id uint32, g gotVerdict) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, ok := q.verdicts[id]; ok {
		return fmt.Errorf("packet %d: a second verdict", id)
	}
	q.verdicts[id] = g
	q.order = append(q.order, id)
	return nil
}

func (q *fakeQueue) Verdict(id uint32, v nfq.Verdict) error {
	return q.set(id, gotVerdict{v: v})
}

func (q *fakeQueue) VerdictMark(id uint32, v nfq.Verdict, mark uint32) error {
	return q.set(id, gotVerdict{v: v, mark: mark, setMark: true})
}

// wait returns the verdicts of ids once each has one (10 s at most).
func (q *fakeQueue) wait(t *testing.T, ids []uint32) []gotVerdict {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		q.mu.Lock()
		var out []gotVerdict
		for _, id := range ids {
			if g, ok := q.verdicts[id]; ok {
				out = append(out, g)
			}
		}
		q.mu.Unlock()
		if len(out) == len(ids) {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d packets have a verdict", len(out), len(ids))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inOrder fails t unless ids got their verdicts in that order.
func (q *fakeQueue) inOrder(t *testing.T, ids []uint32) {
	t.Helper()
	q.mu.Lock()
	defer q.mu.Unlock()
	at := map[uint32]int{}
	for i, id := range q.order {
		at[id] = i
	}
	for i := 1; i < len(ids); i++ {
		if at[ids[i]] < at[ids[i-1]] {
			t.Fatalf("packet %d (the %dth in sequence) had its verdict before packet %d", ids[i], i, ids[i-1])
		}
	}
}

// fakeInjector records what the fast path would send.
type fakeInjector struct {
	mu   sync.Mutex
	sent []injected
}

type injected struct {
	l2       nfq.L2 // zero: through the IP layer
	from, to netip.AddrPort
	seq, ack uint32
	flags    uint8
	payload  []byte
}

func (i *fakeInjector) Reset(from, to netip.AddrPort, seq, ack uint32) error {
	return i.SegmentL2(nfq.L2{}, from, to, seq, ack, nfq.RST|nfq.ACK, nil)
}

func (i *fakeInjector) ResetL2(l2 nfq.L2, from, to netip.AddrPort, seq, ack uint32) error {
	return i.SegmentL2(l2, from, to, seq, ack, nfq.RST|nfq.ACK, nil)
}

func (i *fakeInjector) SegmentL2(l2 nfq.L2, from, to netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) error {
	i.mu.Lock()
	i.sent = append(i.sent, injected{l2, from, to, seq, ack, flags, append([]byte(nil), payload...)})
	i.mu.Unlock()
	return nil
}

// sentTo is what was sent to to, in order.
func (i *fakeInjector) sentTo(to netip.AddrPort) []injected {
	i.mu.Lock()
	defer i.mu.Unlock()
	var out []injected
	for _, s := range i.sent {
		if s.to == to {
			out = append(out, s)
		}
	}
	return out
}

// tcpPacket builds an IPv4 or IPv6 TCP packet (nfq.BuildTCP).
func tcpPacket(src, dst netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) []byte {
	b, err := nfq.BuildTCP(src, dst, seq, ack, flags, payload)
	if err != nil {
		panic(err)
	}
	return b
}

// goClientHello is the ClientHello record crypto/tls's client writes for
// name ("": none).
func goClientHello(t *testing.T, name string) []byte {
	if name == "" {
		// crypto/tls sends no SNI for an IP address.
		name = srvV4.String()
	}
	return hellotest.GoHello(t, name, &tls.Config{})
}

// fastMarks are the test's marks: owned bits 0x00fff000, an operator bit
// 0x1 on every packet.
var fastMarks = FastMarks{Mask: 0x00fff000, Pending: 0x00101000, Allowed: 0x00102000, Denied: 0x00103000}

const operatorBit = 0x1

// lanIf and clientHW are where the rig's queued packets came from.
const lanIf = 7

var clientHW = [8]byte{0x02, 0, 0, 0, 0, 0x42}

type fastRig struct {
	p   *Proxy
	q   *fakeQueue
	inj *fakeInjector
	evs *events
	id  uint32
	// decided is what the proxy's Config.fastDecided hook calls (nil:
	// nothing): a subtest sets it while the rig's proxy runs.
	decided atomic.Pointer[func(flowKey)]
	// worker is the client whose flows a worker decides
	// (Config.fastWorker), if any.
	worker atomic.Pointer[netip.AddrPort]
	// stop ends ServeQueue (a shutdown) and returns what it returned;
	// the test's cleanup calls it too.
	stop func() error
	// done has what ServeQueue returned.
	done chan error
}

// failQueue ends the queue's Serve with err, as a read error of the
// kernel's queue does, and returns what ServeQueue returned; stop then
// returns nil.
func (r *fastRig) failQueue(err error) error {
	r.q.fail <- err
	got := <-r.done
	r.done <- nil
	return got
}

// newFastRig starts ServeQueue on a fake queue; opts change the proxy's
// Config.
func newFastRig(t *testing.T, opts ...func(*Config)) *fastRig {
	eng, err := policy.Compile("p", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	f := &facts{}
	f.add(clientV4, srvV4, "www.allowed.test")
	f.add(clientV6, srvV6, "www.allowed.test")
	f.add(clientV4, spoofV4, "www.allowed.test")
	r := &fastRig{q: newFakeQueue(), inj: &fakeInjector{}, evs: &events{}}
	decided := func(k flowKey) {
		if h := r.decided.Load(); h != nil {
			(*h)(k)
		}
	}
	worker := func(k flowKey) bool {
		w := r.worker.Load()
		return w != nil && *w == k.client
	}
	cfg := Config{FastMarks: fastMarks, OwnAddrs: []netip.Addr{gwLanV4}, FirstByteWait: 5 * time.Second, HelloTimeout: 8 * time.Second, fastDecided: decided, fastWorker: worker}
	for _, o := range opts {
		o(&cfg)
	}
	r.p, err = New(cfg,
		Deps{Policy: policy.NewStore(eng), DNS: f, Sink: r.evs, Inject: r.inj, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			// A fresh lookup vouches for one server name of another rule
			// toward spoofV4 (given out for www.allowed.test).
			Resolver: startDNS(t, map[string][]netip.Addr{"ech-front.allowed-ech.test": {spoofV4}})})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.done = make(chan error, 1)
	go func() { r.done <- r.p.ServeQueue(ctx, r.q) }()
	r.stop = sync.OnceValue(func() error {
		cancel()
		return <-r.done
	})
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Errorf("ServeQueue: %v", err)
		}
		r.p.Close()
	})
	return r
}

// send queues one packet and returns its id.
func (r *fastRig) send(hook uint8, data []byte) uint32 {
	r.id++
	pk := nfq.Packet{ID: r.id, Mark: operatorBit, Hook: hook, InIf: lanIf, Data: data}
	if hook == hookPrerouting {
		// As the kernel queued them behind egressd's ruleset
		// (TestFastPathKernel): the SYN at prerouting with the client's
		// link-layer address, the held segments at forward without.
		pk.HWAddr, pk.HWAddrLen = clientHW, 6
	}
	r.q.in <- pk
	return r.id
}

// connect queues client's SYN to dest and returns its verdict and the
// ISN.
func (r *fastRig) connect(t *testing.T, client, dest netip.AddrPort) (gotVerdict, uint32) {
	t.Helper()
	isn := uint32(0xfffff000) + uint32(client.Port()) // the stream wraps the sequence space
	id := r.send(hookPrerouting, tcpPacket(client, dest, isn, 0, nfq.SYN, nil))
	return r.q.wait(t, []uint32{id})[0], isn
}

// stream queues the client's bytes in segments of seg bytes (in reverse
// order when backwards: all but the first; the first last) and returns
// their ids in sequence order.
func (r *fastRig) stream(client, dest netip.AddrPort, isn uint32, b []byte, seg int, backwards bool) []uint32 {
	type s struct {
		off int
		b   []byte
	}
	var segs []s
	for off := 0; off < len(b); off += seg {
		segs = append(segs, s{off, b[off:min(off+seg, len(b))]})
	}
	if backwards && len(segs) > 2 {
		rest := segs[1:]
		for i, j := 0, len(rest)-1; i < j; i, j = i+1, j-1 {
			rest[i], rest[j] = rest[j], rest[i]
		}
		segs = append(rest, segs[0])
	}
	ids := make([]uint32, len(segs))
	for _, x := range segs {
		ids[x.off/seg] = r.send(hookForward, tcpPacket(client, dest, isn+1+uint32(x.off), 5000, nfq.ACK|nfq.PSH, x.b))
	}
	return ids
}

// counterValue is c's value.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

// fastSYNs is egress_proxy_fast_syns_total{result}.
func fastSYNs(p *Proxy, result string) float64 {
	var m dto.Metric
	_ = p.met.fastSYNs.WithLabelValues(result).Write(&m)
	return m.GetCounter().GetValue()
}

// checkAllowed: every held packet accepted, the last NF_REPEAT with the
// Allowed mark and the operator's bit kept.
func checkAllowed(t *testing.T, got []gotVerdict) {
	t.Helper()
	for i, g := range got {
		want := gotVerdict{v: nfq.Accept}
		if i == len(got)-1 {
			want = gotVerdict{v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit, setMark: true}
		}
		if g != want {
			t.Fatalf("packet %d of %d: verdict %+v, want %+v", i, len(got), g, want)
		}
	}
}

// checkDenied: no held packet accepted, one NF_REPEAT with the Denied
// mark.
func checkDenied(t *testing.T, got []gotVerdict) {
	t.Helper()
	repeats := 0
	for i, g := range got {
		switch {
		case g == gotVerdict{v: nfq.Drop}:
		case g == gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}:
			repeats++
		default:
			t.Fatalf("packet %d of %d: verdict %+v on a denied flow", i, len(got), g)
		}
	}
	if repeats != 1 {
		t.Fatalf("%d packets marked denied, want 1", repeats)
	}
}

func TestServeQueue(t *testing.T) {
	r := newFastRig(t)
	port := uint16(40000)
	next := func(client netip.Addr) netip.AddrPort { port++; return netip.AddrPortFrom(client, port) }
	pending := gotVerdict{v: nfq.Accept, mark: fastMarks.Pending | operatorBit, setMark: true}
	large := hellotest.Build(hellotest.SNIExt("www.allowed.test"), hellotest.Ext(0x0015, make([]byte, 11<<10)))
	for _, c := range []struct {
		name      string
		client    netip.Addr
		dest      netip.AddrPort
		bytes     []byte
		seg       int
		backwards bool
		allowed   bool
		reason    string
		nameWant  string
		answer    []byte // the deny answer sent to the client
		// worker: a worker decides (else the queue's goroutine, on the
		// segment that completes the ClientHello: fast_decisions).
		worker bool
	}{
		{name: "tls 8 bytes a segment", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: goClientHello(t, "www.allowed.test"), seg: 8, allowed: true, nameWant: "www.allowed.test"},
		// A byte a segment, a hello is more packets than one client may
		// hold in the kernel's queue (fastHeldPerClient): refused, limit.
		{name: "tls one byte a segment", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: goClientHello(t, "www.allowed.test"), seg: 1, reason: ReasonLimit, answer: tlsAlertAccessDenied},
		{name: "tls several records", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: hellotest.Refragment(goClientHello(t, "www.allowed.test"), 100), seg: 77, allowed: true, nameWant: "www.allowed.test"},
		{name: "tls 11 KB out of order", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: large, seg: 1000, backwards: true, allowed: true, nameWant: "www.allowed.test"},
		{name: "tls ipv6", client: clientV6, dest: netip.AddrPortFrom(srvV6, 443), bytes: goClientHello(t, "www.allowed.test"), seg: 300, allowed: true, nameWant: "www.allowed.test"},
		{name: "no sni", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: goClientHello(t, ""), seg: 500, allowed: true, nameWant: "www.allowed.test"},
		// Plain HTTP has no fast path: the kernel would forward the
		// connection's later requests unread (C6). A request the proxy
		// would allow is refused fast-path-http; one it would deny keeps
		// its reason.
		{name: "http-allowed-host", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: []byte("GET /x HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n"), seg: 3, reason: ReasonFastPathHTTP, nameWant: "www.allowed.test", answer: []byte("HTTP/1.1 403 Forbidden\r\n"), worker: true},
		// Neither TLS nor HTTP (a device's VPN over 443): by the address,
		// as the proxy decides it.
		{name: "other-bytes", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: []byte("\x00\x38vpn handshake, not tls, not http"), seg: 100, allowed: true, nameWant: "www.allowed.test", worker: true},
		{name: "duplicate sni", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: hellotest.Build(hellotest.SNIExt("www.allowed.test", "evil.example")), seg: 40, reason: ReasonDuplicateSNI, answer: tlsAlertAccessDenied},
		{name: "sni of another rule", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: goClientHello(t, "ech-front.allowed-ech.test"), seg: 600, reason: ReasonSNIMismatch, nameWant: "ech-front.allowed-ech.test", answer: tlsAlertAccessDenied, worker: true},
		{name: "sni denied", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: goClientHello(t, "evil.example"), seg: 600, reason: policy.ReasonNoRule, nameWant: "evil.example", answer: tlsAlertAccessDenied},
		{name: "http-denied-host", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: []byte("GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"), seg: 10, reason: policy.ReasonNoRule, nameWant: "evil.example", answer: []byte("HTTP/1.1 403 Forbidden\r\n"), worker: true},
		// A server name of another rule than the name given out: local
		// facts do not vouch for it, so a worker asks a fresh lookup
		// (the queue's goroutine does not wait on one), which vouches
		// toward spoofV4 (above: refused toward srvV4).
		{name: "sni vouched by a lookup", client: clientV4, dest: netip.AddrPortFrom(spoofV4, 443), bytes: goClientHello(t, "ech-front.allowed-ech.test"), seg: 600, allowed: true, nameWant: "ech-front.allowed-ech.test", worker: true},
		// Another name of the same rule: vouched by the name given out.
		{name: "sni of the same rule", client: clientV4, dest: netip.AddrPortFrom(srvV4, 443), bytes: goClientHello(t, "api.allowed.test"), seg: 2000, allowed: true, nameWant: "api.allowed.test"},
	} {
		t.Run(c.name, func(t *testing.T) {
			client := next(c.client)
			syn, isn := r.connect(t, client, c.dest)
			if syn != pending {
				t.Fatalf("SYN: verdict %+v, want %+v", syn, pending)
			}
			onQueue, onWorker := counterValue(r.p.met.fastOnQueue), counterValue(r.p.met.fastOnWorker)
			ids := r.stream(client, c.dest, isn, c.bytes, c.seg, c.backwards)
			ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
			got := r.q.wait(t, ids)
			if c.reason != ReasonLimit { // refused while the hello came: a worker, or the queue
				q, w := counterValue(r.p.met.fastOnQueue)-onQueue, counterValue(r.p.met.fastOnWorker)-onWorker
				if want := [2]float64{1, 0}; c.worker && [2]float64{q, w} != [2]float64{0, 1} || !c.worker && [2]float64{q, w} != want {
					t.Errorf("decided on the queue %v times, on a worker %v, want worker %v", q, w, c.worker)
				}
			}
			if c.allowed {
				// Released in sequence order, the last one marked: an
				// out-of-order segment reaching the server first could be
				// replaced by a later one covering it.
				checkAllowed(t, got)
				r.q.inOrder(t, ids)
				if ev.Verdict != policy.Allow || ev.Close != closeFast || ev.Name != c.nameWant || ev.BytesOut != uint64(len(c.bytes)) {
					t.Errorf("event %+v: want allowed, close %s, name %s, %d bytes out", ev, closeFast, c.nameWant, len(c.bytes))
				}
				return
			}
			checkDenied(t, got)
			if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != c.reason || ev.Close != closeFastDenied || ev.Name != c.nameWant {
				t.Errorf("event %+v: want denied %s, close %s, name %q", ev, c.reason, closeFastDenied, c.nameWant)
			}
			r.inj.mu.Lock()
			sent := r.inj.sent
			r.inj.sent = nil
			r.inj.mu.Unlock()
			// The answer and a reset to the client on the link layer, back
			// where its packets came from; a reset to the server through
			// the IP layer.
			toClient := nfq.L2{IfIndex: lanIf, Addr: clientHW, AddrLen: 6}
			if len(sent) != 3 || !bytes.HasPrefix(sent[0].payload, c.answer) || sent[0].to != client || sent[0].seq != 5000 || sent[0].l2 != toClient ||
				sent[1].flags&nfq.RST == 0 || sent[1].to != client || sent[1].seq != 5000+uint32(len(sent[0].payload)) || sent[1].l2 != toClient ||
				sent[2].flags&nfq.RST == 0 || sent[2].to != c.dest || sent[2].seq != isn+1 || sent[2].l2 != (nfq.L2{}) {
				t.Errorf("injected %+v", sent)
			}
		})
	}

	t.Run("not given out", func(t *testing.T) {
		// Toward an address our DNS gave out to another client only (or
		// to none): the proxy's, whatever SNI follows.
		client := next(client2V4)
		syn, _ := r.connect(t, client, netip.AddrPortFrom(srvV4, 443))
		if syn != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("SYN: verdict %+v, want accept unmarked", syn)
		}
		syn, _ = r.connect(t, next(clientV4), netip.AddrPortFrom(deniedV4, 443))
		if syn != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("SYN: verdict %+v, want accept unmarked", syn)
		}
	})
	t.Run("port-80", func(t *testing.T) {
		// Not a fast port (443 only by default): the proxy's, where
		// every request head of the connection is decided.
		before := fastSYNs(r.p, "port")
		syn, _ := r.connect(t, next(clientV4), netip.AddrPortFrom(srvV4, 80))
		if syn != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("SYN to port 80: verdict %+v, want accept unmarked", syn)
		}
		if got := fastSYNs(r.p, "port") - before; got != 1 {
			t.Errorf("fast_syns_total{result=port} rose by %v, want 1", got)
		}
	})
	t.Run("fast open", func(t *testing.T) {
		client := next(clientV4)
		id := r.send(hookPrerouting, tcpPacket(client, netip.AddrPortFrom(srvV4, 443), 1, 0, nfq.SYN, []byte("GET")))
		if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("SYN with data: verdict %+v, want accept unmarked", g)
		}
	})
	t.Run("overlap with other bytes", func(t *testing.T) {
		client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
		_, isn := r.connect(t, client, dest)
		hello := goClientHello(t, "www.allowed.test")
		ids := r.stream(client, dest, isn, hello[:100], 100, false)
		other := bytes.Clone(hello[50:150])
		other[0] ^= 0xff
		ids = append(ids, r.send(hookForward, tcpPacket(client, dest, isn+1+50, 5000, nfq.ACK, other)))
		ids = append(ids, r.stream(client, dest, isn+100, hello[100:], 1000, false)...)
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		checkDenied(t, r.q.wait(t, ids))
		if ev.Reason != ReasonStreamMismatch {
			t.Errorf("reason %q, want %q", ev.Reason, ReasonStreamMismatch)
		}
	})
	t.Run("before the ISN", func(t *testing.T) {
		client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
		_, isn := r.connect(t, client, dest)
		hello := goClientHello(t, "www.allowed.test")
		ids := []uint32{r.send(hookForward, tcpPacket(client, dest, isn, 5000, nfq.ACK, hello))}
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		checkDenied(t, r.q.wait(t, ids))
		if ev.Reason != ReasonStreamMismatch {
			t.Errorf("reason %q, want %q", ev.Reason, ReasonStreamMismatch)
		}
	})
	t.Run("retransmission dropped", func(t *testing.T) {
		// A segment of bytes held already is dropped, not held (the held
		// copy goes to the server): retransmissions do not fill the queue.
		client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
		_, isn := r.connect(t, client, dest)
		hello := goClientHello(t, "www.allowed.test")
		first := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK, hello[:100]))
		again := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK, hello[:100]))
		if g := r.q.wait(t, []uint32{again})[0]; g != (gotVerdict{v: nfq.Drop}) {
			t.Fatalf("retransmission: verdict %+v, want drop", g)
		}
		rest := r.send(hookForward, tcpPacket(client, dest, isn+101, 5000, nfq.ACK, hello[100:]))
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		checkAllowed(t, r.q.wait(t, []uint32{first, rest}))
		if ev.Verdict != policy.Allow || ev.BytesOut != uint64(len(hello)) {
			t.Errorf("event %+v: want allowed, %d bytes out", ev, len(hello))
		}
	})
	t.Run("second SYN with another ISN", func(t *testing.T) {
		// The client sends its SYN again with another sequence number
		// (with a TTL that reaches the gateway, not the server, or out of
		// the server's window): the server keeps the first ISN. Deciding
		// on bytes from the second would decide another stream than the
		// server reads: the second SYN is dropped and the connection
		// refused. A SYN sent again with the same ISN keeps its answer.
		client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
		_, isn := r.connect(t, client, dest)
		same := r.send(hookPrerouting, tcpPacket(client, dest, isn, 0, nfq.SYN, nil))
		if g := r.q.wait(t, []uint32{same})[0]; g != pending {
			t.Fatalf("the SYN sent again, same ISN: verdict %+v, want %+v", g, pending)
		}
		other := isn + 100000
		id := r.send(hookPrerouting, tcpPacket(client, dest, other, 0, nfq.SYN, nil))
		if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Drop}) {
			t.Fatalf("a SYN with another ISN: verdict %+v, want drop", g)
		}
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		if ev.Verdict != policy.Deny || ev.Reason != ReasonStreamMismatch {
			t.Errorf("event %+v: want denied %s", ev, ReasonStreamMismatch)
		}
		// The SYN with the other ISN, again: still dropped (the
		// connection's mark has not landed: no new flow on it).
		id = r.send(hookPrerouting, tcpPacket(client, dest, other, 0, nfq.SYN, nil))
		if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Drop}) {
			t.Fatalf("the SYN with another ISN, again: verdict %+v, want drop", g)
		}
		// The bytes of the other stream are not let out, and the first
		// of them is answered (nothing was held at the decision to say
		// where the server is): a reset to the client on the link layer,
		// at the server's sequence number its ack gives, and one to the
		// server at the first ISN's stream.
		r.inj.mu.Lock()
		r.inj.sent = nil
		r.inj.mu.Unlock()
		checkDenied(t, r.q.wait(t, r.stream(client, dest, other, goClientHello(t, "www.allowed.test"), 500, false)))
		r.inj.mu.Lock()
		sent := r.inj.sent
		r.inj.sent = nil
		r.inj.mu.Unlock()
		toClient := nfq.L2{IfIndex: lanIf, Addr: clientHW, AddrLen: 6}
		if len(sent) != 2 || sent[0].flags&nfq.RST == 0 || sent[0].to != client || sent[0].seq != 5000 || sent[0].l2 != toClient ||
			sent[1].flags&nfq.RST == 0 || sent[1].to != dest || sent[1].seq != isn+1 {
			t.Errorf("injected %+v, want a reset to the client at 5000 and one to the server at %d", sent, isn+1)
		}
	})
	t.Run("segment while deciding", func(t *testing.T) {
		// A segment with other bytes queued while the decision is being
		// made (after the peek, before the held packets' verdicts) must
		// not be released with them as allowed: the connection is refused.
		// A worker decides (the queue's goroutine, deciding a complete
		// hello itself, takes no segment meanwhile).
		client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
		r.worker.Store(&client)
		t.Cleanup(func() { r.worker.Store(nil) })
		_, isn := r.connect(t, client, dest)
		hello := goClientHello(t, "www.allowed.test")
		other := bytes.Clone(hello[:50])
		other[10] ^= 0xff
		const late, sentinel = 1 << 30, 1<<30 + 1
		idle := next(clientV4)
		hook := func(k flowKey) {
			if k.client != client {
				return
			}
			r.q.in <- nfq.Packet{ID: late, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(client, dest, isn+1, 5000, nfq.ACK, other)}
			// The queue's goroutine takes this one once done with late.
			r.q.in <- nfq.Packet{ID: sentinel, Hook: hookForward, InIf: lanIf, Data: tcpPacket(idle, dest, 1, 1, nfq.ACK, nil)}
		}
		r.decided.Store(&hook)
		t.Cleanup(func() { r.decided.Store(nil) })
		ids := r.stream(client, dest, isn, hello, 400, false)
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		checkDenied(t, r.q.wait(t, append(ids, late)))
		if ev.Verdict != policy.Deny || ev.Reason != ReasonStreamMismatch {
			t.Errorf("event %+v: want denied %s", ev, ReasonStreamMismatch)
		}
	})
	t.Run("segment after the decision", func(t *testing.T) {
		// Segments queued after the decision, before the connection's
		// mark lands, are compared with the bytes decided: the same bytes
		// pass, other bytes are dropped and the connection cut (the
		// denied mark, resets both ways).
		client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
		_, isn := r.connect(t, client, dest)
		hello := goClientHello(t, "www.allowed.test")
		ids := r.stream(client, dest, isn, hello, 300, false)
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		checkAllowed(t, r.q.wait(t, ids))
		if ev.Verdict != policy.Allow {
			t.Fatalf("event %+v: want allowed", ev)
		}
		same := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK, hello[:100]))
		if g := r.q.wait(t, []uint32{same})[0]; g != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("the same bytes again: verdict %+v, want accept", g)
		}
		r.inj.mu.Lock()
		r.inj.sent = nil
		r.inj.mu.Unlock()
		other := bytes.Clone(hello[:100])
		other[50] ^= 0xff
		id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK, other))
		if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}) {
			t.Fatalf("other bytes after the decision: verdict %+v, want repeat denied", g)
		}
		id = r.send(hookForward, tcpPacket(client, dest, isn+1+uint32(len(hello)), 5000, nfq.ACK, []byte("more")))
		if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Drop}) {
			t.Fatalf("a segment of the cut connection: verdict %+v, want drop", g)
		}
		r.inj.mu.Lock()
		sent := r.inj.sent
		r.inj.mu.Unlock()
		if len(sent) != 2 || sent[0].flags&nfq.RST == 0 || sent[0].to != client || sent[0].seq != 5000 ||
			sent[1].flags&nfq.RST == 0 || sent[1].to != dest || sent[1].seq != isn+1+uint32(len(hello)) || sent[1].ack != 5000 {
			t.Errorf("injected %+v, want resets to the client and the server", sent)
		}
	})
	t.Run("reassembly charged to the peek budget", func(t *testing.T) {
		// One byte at offset 60,000 makes the reassembler hold 60,000
		// bytes: the peek budget counts them, and a client past its share
		// of it (a tenth: 1.6 MB) has its pending connections refused
		// connection-limit, as the proxy refuses a peek that does not fit.
		before := r.p.peekMem.inUse()
		var ports []uint16
		for range 40 {
			client, dest := next(clientV4), netip.AddrPortFrom(srvV4, 443)
			_, isn := r.connect(t, client, dest)
			r.send(hookForward, tcpPacket(client, dest, isn+1+60000, 5000, nfq.ACK, []byte{0x16}))
			ports = append(ports, client.Port())
			if n := r.p.peekMem.inUse() - before; len(ports) == 1 && n < 60000-peekFree {
				// The queue's goroutine has taken the segment (the channel
				// is unbuffered) but may not be done with it: wait.
				deadline := time.Now().Add(2 * time.Second)
				for r.p.peekMem.inUse()-before < 60000-peekFree && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				if n := r.p.peekMem.inUse() - before; n < 60000-peekFree {
					t.Fatalf("a byte at offset 60,000: the peek budget counts %d bytes, want %d or more", n, 60000-peekFree)
				}
			}
		}
		ev := r.evs.wait(t, "refused for the budget", func(ev audit.Event) bool {
			return slices.Contains(ports, ev.ClientPort) && ev.Reason == ReasonLimit
		})
		if ev.Verdict != policy.Deny || ev.Close != closeFastDenied {
			t.Errorf("event %+v: want denied, close %s", ev, closeFastDenied)
		}
	})
	t.Run("unknown flow", func(t *testing.T) {
		client := next(clientV4)
		id := r.send(hookForward, tcpPacket(client, netip.AddrPortFrom(srvV4, 443), 7, 9, nfq.ACK, []byte("x")))
		if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}) {
			t.Fatalf("segment of no flow: verdict %+v, want repeat denied", g)
		}
	})
}

// A ClientHello dribbled in many segments (here in records of a byte,
// a few records a segment) is looked at once by the queue's goroutine,
// which reads every connection's packets: each segment's kick walks the
// records it completes, not the stream from its start again (that made a
// hello of n segments cost n parses there, quadratic in its length).
func TestServeQueueDribbledHelloScannedOnce(t *testing.T) {
	r := newFastRig(t)
	client, dest := netip.AddrPortFrom(clientV4, 41000), netip.AddrPortFrom(srvV4, 443)
	hello := hellotest.Refragment(goClientHello(t, "www.allowed.test"), 1)
	seg := len(hello)/200 + 1 // 200 segments: fewer than a client may hold (fastHeldPerClient)
	syn, isn := r.connect(t, client, dest)
	if syn.mark != fastMarks.Pending|operatorBit {
		t.Fatalf("SYN: verdict %+v, want pending", syn)
	}
	onQueue := counterValue(r.p.met.fastOnQueue)
	ids := r.stream(client, dest, isn, hello, seg, false)
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	checkAllowed(t, r.q.wait(t, ids))
	if ev.Verdict != policy.Allow || ev.Name != "www.allowed.test" {
		t.Errorf("event %+v: want allowed, www.allowed.test", ev)
	}
	if got := counterValue(r.p.met.fastOnQueue) - onQueue; got != 1 {
		t.Errorf("fast_decisions_total{on=queue} rose by %v, want 1", got)
	}
	// Each record walked once, then one parse of the whole hello.
	if got, most := r.p.fastScanned.Load(), int64(3*len(hello)); got > most {
		t.Errorf("the queue's goroutine looked at %d bytes for a hello of %d in %d segments, want at most %d", got, len(hello), len(ids), most)
	}
}

// FuzzHelloScan: kick's walk, given a stream that grows by cuts, says
// short exactly where tlshello.Read says ErrShort.
func FuzzHelloScan(f *testing.F) {
	hello := hellotest.Build(hellotest.SNIExt("www.allowed.test"))
	f.Add(hello, []byte{3, 40})
	f.Add(hellotest.Refragment(hello, 1), []byte{7, 7, 7})
	f.Add(hellotest.Refragment(hello, 10), []byte{1, 0, 200})
	f.Add(hellotest.Build(hellotest.SNIExt("a.test"), hellotest.Ext(0x0015, make([]byte, 20<<10))), []byte{255, 255})
	f.Add([]byte("\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), []byte{5})
	f.Add([]byte("GET / HTTP/1.1\r\n"), []byte{1})
	f.Fuzz(func(t *testing.T, stream, cuts []byte) {
		var h helloScan
		at := 0
		for i := 0; ; i++ {
			step := len(stream) - at
			if i < len(cuts) {
				step = min(step, int(cuts[i])*8+1)
			}
			at += step
			b := stream[:at]
			short := h.short(b)
			_, err := tlshello.Read(b, nil)
			if short != (err == tlshello.ErrShort) {
				t.Fatalf("%d bytes (cut %d): short %v, tlshello.Read %v", at, i, short, err)
			}
			if !short || at == len(stream) {
				return
			}
		}
	})
}
