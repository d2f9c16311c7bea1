package proxy

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"regexp"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/internal/testnet"
	"egressd/policy"
)

// The fast path's answers to crafted segments on the kernel's own path
// (as TestFastPathKernel: the firewall's ruleset in the gateway, the real
// queue and injector): the client's connection is a real socket, and the
// segments it would not send are sent from the client's namespace through
// an nfq.Injector of its own, at the socket's sequence numbers (seqsOf).

// fastErrs is egress_proxy_fast_errors_total{what}.
func fastErrs(p *Proxy, what string) float64 {
	var m dto.Metric
	_ = p.met.fastErrors.WithLabelValues(what).Write(&m)
	return m.GetCounter().GetValue()
}

// TCP_REPAIR_QUEUE's queues (linux/tcp.h).
const (
	tcpRecvQueue = 1
	tcpSendQueue = 2
)

// seqsOf returns c's next sequence number to send and the next one it
// expects (TCP_REPAIR, off again without a window probe).
func seqsOf(t *testing.T, c *net.TCPConn) (snd, rcv uint32) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var errs []error
	err = raw.Control(func(fd uintptr) {
		s := int(fd)
		seq := func(queue int) uint32 {
			errs = append(errs, unix.SetsockoptInt(s, unix.SOL_TCP, unix.TCP_REPAIR_QUEUE, queue))
			v, err := unix.GetsockoptInt(s, unix.SOL_TCP, unix.TCP_QUEUE_SEQ)
			errs = append(errs, err)
			return uint32(v)
		}
		if err := unix.SetsockoptInt(s, unix.SOL_TCP, unix.TCP_REPAIR, 1); err != nil {
			errs = append(errs, err)
			return
		}
		snd, rcv = seq(tcpSendQueue), seq(tcpRecvQueue)
		errs = append(errs, unix.SetsockoptInt(s, unix.SOL_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP))
	})
	if err := errors.Join(append(errs, err)...); err != nil {
		t.Fatalf("TCP_REPAIR: %v", err)
	}
	return snd, rcv
}

// clientInjector sends crafted segments from the client's namespace.
func (tp *topo) clientInjector(t *testing.T) *nfq.Injector {
	t.Helper()
	inj, err := nfq.NewInjector("/var/run/netns/" + tp.c.Name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inj.Close() })
	return inj
}

// nftHold adds table inet egressd_hold with one chain on hook and rule
// in ns's ruleset until the test ends.
func nftHold(t *testing.T, ns *testnet.NS, hook, rule string) func() {
	t.Helper()
	ns.MustRun("nft", "add table inet egressd_hold { chain c { type filter hook "+hook+" priority 0; policy accept; "+rule+"; }; }")
	var once sync.Once
	del := func() { once.Do(func() { ns.MustRun("nft", "delete table inet egressd_hold") }) }
	t.Cleanup(del)
	return del
}

// readErr reads c until it fails (10 s at most) and returns how many
// bytes it read and why it stopped.
func readErr(c net.Conn) (int, error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n := 0
	b := make([]byte, 4096)
	for {
		m, err := c.Read(b)
		n += m
		if err != nil {
			return n, err
		}
	}
}

// TestFastPathKernelSecondSYN: a second SYN with another ISN on a pending
// fast connection (the first reached the gateway, not the server: sent
// with a TTL that ends there) is dropped and the connection refused
// stream-mismatch; the client's stream never reaches the server.
func TestFastPathKernelSecondSYN(t *testing.T) {
	client, dest := netip.AddrPortFrom(clientV4, 41001), netip.AddrPortFrom(srvV4, 443)
	syns := make(chan uint32, 4) // the client's SYNs' sequence numbers, as queued
	tp := newTopo(t, topoOpts{fastQueue: 3303, config: func(c *Config) { c.FirstByteWait = 5 * time.Second },
		fastTap: func(pk nfq.Packet) {
			seg, err := nfq.ParseTCP(pk.Data)
			if err == nil && seg.Src.Addr().Unmap() == client.Addr() && seg.Src.Port() == client.Port() && seg.Flags&(nfq.SYN|nfq.ACK) == nfq.SYN {
				select {
				case syns <- seg.Seq:
				default:
				}
			}
		}})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	inj := tp.clientInjector(t)

	// The server does not see the client's SYN until the second is sent.
	open := nftHold(t, tp.s, "input", "tcp dport 443 tcp flags & (syn|ack) == syn drop")
	dialed := make(chan net.Conn, 1)
	go func() {
		var c net.Conn
		tp.c.Do(func() (err error) {
			d := net.Dialer{Timeout: 20 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(client)}
			c, err = d.Dial("tcp", dest.String())
			return err
		})
		dialed <- c
	}()
	var isn uint32
	select {
	case isn = <-syns:
	case <-time.After(10 * time.Second):
		t.Fatal("the client's SYN was not queued")
	}
	mismatch := fastSYNs(tp.proxy, "isn-mismatch")
	// Another ISN within conntrack's window of the first (the gateway's
	// conntrack takes it as the SYN sent again, and the server's SYN-ACK
	// to the first later).
	if err := inj.Segment(client, dest, isn-1000, 0, nfq.SYN, nil); err != nil {
		t.Fatal(err)
	}
	ev := tp.ev.wait(t, "of the fast connection", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != ReasonStreamMismatch || ev.Close != closeFastDenied {
		t.Errorf("event %+v: want denied %s, close %s", ev, ReasonStreamMismatch, closeFastDenied)
	}
	if got := fastSYNs(tp.proxy, "isn-mismatch") - mismatch; got != 1 {
		t.Errorf("fast_syns_total{result=isn-mismatch} rose by %v, want 1", got)
	}

	// The client's own SYN, sent again, makes the connection; its hello
	// is dropped (the connection is denied): the server reads nothing, the
	// client gets no answer.
	read, accepted, ended := tp.tlsSrv.read.Load(), tp.tlsSrv.accepted.Load(), tp.tlsSrv.ended.Load()
	open()
	var c net.Conn
	select {
	case c = <-dialed:
	case <-time.After(25 * time.Second):
		t.Fatal("the dial did not end")
	}
	if c == nil {
		t.Fatal("the client's connection was not made after its SYN was sent again")
	}
	defer c.Close()
	if _, err := c.Write(goClientHello(t, "www.allowed.test")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for tp.tlsSrv.accepted.Load()-accepted < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the server did not accept the connection")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Refused with nothing held, the connection is answered at its
	// first segment after: the TLS alert and a reset to the client, a
	// reset to the server (before, the client waited out its timeout).
	if n, err := readErr(c); n != len(tlsAlertAccessDenied) || !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %d bytes, then %v: want the %d-byte TLS alert, then a reset", n, err, len(tlsAlertAccessDenied))
	}
	tp.tlsSrv.refused(t, deadline, ended, accepted, read, 1)
}

// endedSince waits until a connection has ended at the server since it
// counted ended ones: its accept can come after the client has seen its
// connection end, so idle alone could pass with nothing yet accepted.
func (l *countListener) endedSince(t *testing.T, deadline time.Time, ended int32) {
	t.Helper()
	for l.ended.Load()-ended < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the server's side of the connection did not end")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// refused checks the server's side of refused connections, given the
// counts before: the refused one ended by deadline, wantAccepted
// connections were accepted, and nothing was read.
func (l *countListener) refused(t *testing.T, deadline time.Time, ended, accepted int32, read int64, wantAccepted int32) {
	t.Helper()
	l.endedSince(t, deadline, ended)
	if n := l.accepted.Load() - accepted; n != wantAccepted {
		t.Errorf("server accepted %d connections, want %d", n, wantAccepted)
	}
	if n := l.read.Load() - read; n != 0 {
		t.Errorf("server read %d bytes of refused connections", n)
	}
}

// TestFastPathKernelLateSegment: a segment queued after the decision,
// before the connection's mark took hold, with other bytes than those
// decided, cuts the connection: the client and the server are reset, and
// the server read only the bytes decided. The fast path's decided hook
// sends it; the tap holds it until the held packets have their verdicts.
func TestFastPathKernelLateSegment(t *testing.T) {
	var target atomic.Pointer[netip.AddrPort]
	var other []byte
	var snd, rcv uint32
	seen, release := make(chan struct{}), make(chan struct{})
	var seenOnce sync.Once
	var inj *nfq.Injector
	hookErr := make(chan error, 1)
	tp := newTopo(t, topoOpts{fastQueue: 3304,
		config: func(c *Config) {
			c.FirstByteWait = 5 * time.Second
			// A worker decides: the hook waits for the tap, which runs
			// on the queue's goroutine.
			c.fastWorker = func(flowKey) bool { return true }
			c.fastDecided = func(k flowKey) {
				if a := target.Load(); a == nil || k.client != *a {
					return
				}
				err := inj.Segment(k.client, k.dest, snd, rcv, nfq.ACK|nfq.PSH, other)
				if err == nil {
					select {
					case <-seen:
					case <-time.After(5 * time.Second):
						err = errors.New("the late segment was not queued")
					}
				}
				hookErr <- err
			}
		},
		fastTap: func(pk nfq.Packet) {
			seg, err := nfq.ParseTCP(pk.Data)
			if a := target.Load(); err != nil || a == nil || seg.Src != *a || !bytes.Equal(seg.Payload, other) {
				return
			}
			seenOnce.Do(func() { close(seen) })
			select {
			case <-release:
			case <-time.After(10 * time.Second):
			}
		}})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	inj = tp.clientInjector(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	// The server's answer is held back, as it would be in flight when the
	// late segment comes: the client's reset is at the sequence number it
	// expects.
	nftHold(t, tp.s, "output", "tcp sport 443 ip length > 200 drop")

	read, ended := tp.tlsSrv.read.Load(), tp.tlsSrv.ended.Load()
	c := tp.dialFromClient(t, clientV4, dest)
	snd, rcv = seqsOf(t, c)
	hello := goClientHello(t, "www.allowed.test")
	other = bytes.Clone(hello[:100])
	other[50] ^= 0xff
	local := addrPortOf(c.LocalAddr())
	target.Store(&local)
	cuts := fastErrs(tp.proxy, "late-conflict")
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	ev := tp.ev.wait(t, "of the fast connection", func(ev audit.Event) bool { return ev.ClientPort == local.Port() })
	if err := <-hookErr; err != nil {
		t.Fatal(err)
	}
	if ev.Verdict != policy.Allow || ev.Close != closeFast || ev.BytesOut != uint64(len(hello)) {
		t.Errorf("event %+v: want allowed, close %s, %d bytes out", ev, closeFast, len(hello))
	}
	close(release)

	n, err := readErr(c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %d bytes, then %v: want a reset", n, err)
	}
	if got := fastErrs(tp.proxy, "late-conflict") - cuts; got != 1 {
		t.Errorf("fast_errors_total{what=late-conflict} rose by %v, want 1", got)
	}
	// The server read the hello decided, not the other bytes, and was
	// reset.
	tp.tlsSrv.endedSince(t, time.Now().Add(10*time.Second), ended)
	tp.tlsSrv.idle(t)
	if n := tp.tlsSrv.read.Load() - read; n != int64(len(hello)) {
		t.Errorf("server read %d bytes, want the %d of the hello decided", n, len(hello))
	}
}

// TestFastPathKernelPeekBudget: the reassembly buffer is charged to the
// peek budget. One byte far ahead on a pending fast connection takes the
// bytes up to it; a client past its share is refused connection-limit,
// reset both ways, and the server reads nothing.
func TestFastPathKernelPeekBudget(t *testing.T) {
	tp := newTopo(t, topoOpts{fastQueue: 3305, config: func(c *Config) {
		c.FirstByteWait = 5 * time.Second
		c.PeekBudget = 400 << 10 // a client's share: 40 KiB
	}})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	inj := tp.clientInjector(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	const far = 30000 // a byte at offset 30,000 takes some 26 KiB past peekFree: one fits, two do not
	read, accepted, ended := tp.tlsSrv.read.Load(), tp.tlsSrv.accepted.Load(), tp.tlsSrv.ended.Load()

	farByte := func(c *net.TCPConn) netip.AddrPort {
		snd, rcv := seqsOf(t, c)
		local := addrPortOf(c.LocalAddr())
		if err := inj.Segment(local, dest, snd+far, rcv, nfq.ACK|nfq.PSH, []byte{0x16}); err != nil {
			t.Fatal(err)
		}
		return local
	}
	farByte(tp.dialFromClient(t, clientV4, dest))
	deadline := time.Now().Add(10 * time.Second)
	for tp.proxy.peekMem.inUse() < far-peekFree {
		if time.Now().After(deadline) {
			t.Fatalf("a byte at offset %d: the peek budget counts %d bytes, want %d or more", far, tp.proxy.peekMem.inUse(), far-peekFree)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := tp.dialFromClient(t, clientV4, dest)
	second := farByte(c)
	ev := tp.ev.wait(t, "of the second connection", func(ev audit.Event) bool { return ev.ClientPort == second.Port() })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != ReasonLimit || ev.Close != closeFastDenied {
		t.Errorf("event %+v: want denied %s, close %s", ev, ReasonLimit, closeFastDenied)
	}
	if n, err := readErr(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %d bytes, then %v: want a reset", n, err)
	}
	// The server had both connections, read nothing of either, and the
	// refused one was reset.
	tp.tlsSrv.refused(t, deadline, ended, accepted, read, 2)
}

// TestFastPathKernelResetPayload: an RST that carries bytes, on a pending
// fast connection (the client silent so far), is dropped and the
// connection refused stream-mismatch (TestServeQueueResetWithPayload, on
// the kernel's path): the server's host gets no segment with the bytes
// (an nftables counter in its namespace counts the resets with a
// payload that reach it), its connection is reset by the fast path, and
// the client is reset.
func TestFastPathKernelResetPayload(t *testing.T) {
	tp := newTopo(t, topoOpts{fastQueue: 3306, config: func(c *Config) { c.FirstByteWait = 5 * time.Second }})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	inj := tp.clientInjector(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	// A reset with bytes is longer than the headers (40 bytes: the
	// injector's segments carry no options).
	nftHold(t, tp.s, "input", "tcp dport 443 tcp flags & rst == rst ip length > 40 counter")
	read, accepted, ended := tp.tlsSrv.read.Load(), tp.tlsSrv.accepted.Load(), tp.tlsSrv.ended.Load()
	resets := fastErrs(tp.proxy, "reset-payload")

	c := tp.dialFromClient(t, clientV4, dest)
	local := addrPortOf(c.LocalAddr())
	snd, rcv := seqsOf(t, c)
	secret := []byte("secret bytes in a reset")
	if err := inj.Segment(local, dest, snd, rcv, nfq.RST|nfq.ACK, secret); err != nil {
		t.Fatal(err)
	}
	ev := tp.ev.wait(t, "of the fast connection", func(ev audit.Event) bool { return ev.ClientPort == local.Port() })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != ReasonStreamMismatch || ev.Close != closeFastDenied {
		t.Errorf("event %+v: want denied %s, close %s", ev, ReasonStreamMismatch, closeFastDenied)
	}
	if got := fastErrs(tp.proxy, "reset-payload") - resets; got != 1 {
		t.Errorf("fast_errors_total{what=reset-payload} rose by %v, want 1", got)
	}
	if n, err := readErr(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %d bytes, then %v: want a reset", n, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	tp.tlsSrv.refused(t, deadline, ended, accepted, read, 1)
	out := tp.s.MustRun("nft", "list table inet egressd_hold")
	m := regexp.MustCompile(`counter packets (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no counter in the server's ruleset:\n%s", out)
	}
	if m[1] != "0" {
		t.Errorf("the server's host got %s resets with bytes, want none:\n%s", m[1], out)
	}
}
