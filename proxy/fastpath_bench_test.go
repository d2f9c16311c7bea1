package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/internal/tlshello/hellotest"
	"egressd/policy"
)

// benchQueue is a Queue that keeps the last verdict (the benchmarks
// call the fast path's packet directly: no Serve).
type benchQueue struct {
	id   uint32
	v    nfq.Verdict
	mark uint32
}

func (q *benchQueue) Serve(ctx context.Context, fn func(nfq.Packet)) error {
	return nil
}

func (q *benchQueue) Verdict(id uint32, v nfq.Verdict) error {
	q.id, q.v, q.mark = id, v, 0
	return nil
}

func (q *benchQueue) VerdictMark(id uint32, v nfq.Verdict, mark uint32) error {
	q.id, q.v, q.mark = id, v, mark
	return nil
}

// discardEvents is a Sink that keeps nothing.
type discardEvents struct{}

func (discardEvents) Emit(audit.Event) {}

// benchFast is a fast path's queue as ServeQueue makes it, without its
// goroutines, and the packets of n flows of one client to srvV4:443:
// each its SYN and a one-segment ClientHello for www.allowed.test.
type benchFast struct {
	s         *fastQueue
	q         *benchQueue
	syn, data [][]byte
	keys      []flowKey
}

func newBenchFast(b testing.TB, n int) *benchFast {
	b.Helper()
	return newBenchFastTo(b, n, discardEvents{}, nil)
}

// newBenchFastTo is newBenchFast with the events going to sink, and opt
// (if any) changing the proxy's Config.
func newBenchFastTo(b testing.TB, n int, sink audit.Sink, opt func(*Config)) *benchFast {
	b.Helper()
	eng, err := policy.Compile("p", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		b.Fatal(err)
	}
	f := &facts{}
	f.add(clientV4, srvV4, "www.allowed.test")
	cfg := Config{FastMarks: fastMarks, OwnAddrs: []netip.Addr{gwLanV4}}
	if opt != nil {
		opt(&cfg)
	}
	p, err := New(cfg, Deps{Policy: policy.NewStore(eng), DNS: f, Sink: sink,
		Logger: slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelError + 1}))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	q := &benchQueue{}
	s := &fastQueue{p: p, q: q, marks: p.cfg.FastMarks, max: p.cfg.FastFlows, keep: p.cfg.fastKeep, keepSilent: p.cfg.fastKeepSilent,
		flows: map[flowKey]*fastFlow{}, byClient: map[netip.Addr]int{}, heldBy: map[netip.Addr]int{}}
	hello := hellotest.GoHello(b, "www.allowed.test", &tls.Config{})
	bf := &benchFast{s: s, q: q}
	dest := netip.AddrPortFrom(srvV4, 443)
	for i := range n {
		client := netip.AddrPortFrom(clientV4, uint16(1024+i))
		isn := uint32(0x10000 * i)
		bf.syn = append(bf.syn, tcpPacket(client, dest, isn, 0, nfq.SYN, nil))
		bf.data = append(bf.data, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, hello))
		bf.keys = append(bf.keys, flowKey{client, dest})
	}
	return bf
}

// flow has the fast path take flow i and decide it (allowed on its
// hello, on the caller's goroutine: quick).
func (bf *benchFast) flow(b testing.TB, i int) {
	bf.s.packet(nfq.Packet{ID: 1, Mark: operatorBit, Hook: hookPrerouting, InIf: lanIf, HWAddr: clientHW, HWAddrLen: 6, Data: bf.syn[i]})
	if bf.q.id != 1 || bf.q.mark != fastMarks.Pending|operatorBit {
		b.Fatalf("flow %d: SYN verdict %+v, want accept-pending", i, *bf.q)
	}
	bf.s.packet(nfq.Packet{ID: 2, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: bf.data[i]})
	if bf.q.id != 2 || bf.q.v != nfq.Repeat || bf.q.mark != fastMarks.Allowed|operatorBit {
		b.Fatalf("flow %d: hello verdict %+v, want repeat-allowed", i, *bf.q)
	}
}

// BenchmarkFastPathFlow: one fast connection's queued packets answered
// (its SYN, its one-segment ClientHello, decided on the queue's
// goroutine), then the flow taken out of the table as the sweep does.
func BenchmarkFastPathFlow(b *testing.B) {
	const n = 4096
	bf := newBenchFast(b, n)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		bf.flow(b, i)
		s := bf.s
		s.mu.Lock()
		fl := s.flows[bf.keys[i]]
		fl.mu.Lock()
		fl.share.release()
		fl.mu.Unlock()
		s.remove(bf.keys[i])
		s.mu.Unlock()
		i = (i + 1) % n
	}
}

// BenchmarkFastVerdict: one verdict given and counted
// (fast_verdicts_total), of the kinds a fast connection's packets get in
// turn.
func BenchmarkFastVerdict(b *testing.B) {
	bf := newBenchFast(b, 1)
	s := bf.s
	b.ReportAllocs()
	i := uint32(0)
	for b.Loop() {
		i++
		switch i % 3 {
		case 0:
			s.verdict(i, nfq.Accept, s.withMark(operatorBit, fastMarks.Pending), true)
		case 1:
			s.verdict(i, nfq.Repeat, s.withMark(operatorBit, fastMarks.Allowed), true)
		default:
			s.verdict(i, nfq.Accept, 0, false)
		}
	}
}
