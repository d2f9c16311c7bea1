package nfq

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// topo is two namespaces joined by a veth pair: cli (192.0.2.1,
// fd00:33::1 on c0) and srv (192.0.2.2, fd00:33::2 on s0), srv with an
// inet table "nnfq" whose chain "in" (hook input) the tests fill.
type topo struct {
	cli, srv *testnet.NS
}

func newTopo(t testing.TB) *topo {
	t.Helper()
	if _, err := os.Stat("/usr/sbin/nft"); err != nil {
		t.Fatalf("nft (package nftables) is not installed: %v", err)
	}
	cli := testnet.New(t, "nnfqcli")
	srv := testnet.New(t, "nnfqsrv")
	testnet.Link(t, cli, "c0", []string{"192.0.2.1/24", "fd00:33::1/64"}, srv, "s0", []string{"192.0.2.2/24", "fd00:33::2/64"})
	srv.MustRun("nft", "add table inet nnfq")
	srv.MustRun("nft", "add chain inet nnfq in { type filter hook input priority 0; policy accept; }")
	return &topo{cli: cli, srv: srv}
}

// queueRule appends to srv's chain "in" a rule queueing proto packets to
// port (any port when 0) to queue q, with Target.
func (tp *topo) queueRule(t testing.TB, proto byte, port uint16, q uint16) {
	t.Helper()
	f, err := os.Open("/var/run/netns/" + tp.srv.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	tab := &nftables.Table{Family: nftables.TableFamilyINet, Name: "nnfq"}
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
	if port != 0 {
		exprs = append(exprs,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)})
	}
	exprs = append(exprs, Target(q))
	c.AddRule(&nftables.Rule{Table: tab, Chain: &nftables.Chain{Name: "in", Table: tab}, Exprs: exprs})
	if err := c.Flush(); err != nil {
		t.Fatalf("queue rule: %v", err)
	}
}

// open opens a queue in srv, closed at cleanup.
func (tp *topo) open(t testing.TB, cfg Config) *Conn {
	t.Helper()
	cfg.NetNS = "/var/run/netns/" + tp.srv.Name
	c, err := OpenConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// serve runs c.Serve on a goroutine; the channel gets its result.
func serve(c *Conn, fn func(Packet)) <-chan error {
	done := make(chan error, 1)
	go func() { done <- c.Serve(context.Background(), fn) }()
	return done
}

// seen collects copies of queued packets.
type seen struct {
	mu   sync.Mutex
	pkts []Packet
}

func (s *seen) add(p Packet) {
	p.Data = append([]byte(nil), p.Data...)
	s.mu.Lock()
	s.pkts = append(s.pkts, p)
	s.mu.Unlock()
}

func (s *seen) all() []Packet {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Packet(nil), s.pkts...)
}

func (tp *topo) echoServer(t testing.TB, addr string) {
	t.Helper()
	ln, err := tp.srv.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 512)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					c.Write(buf[:n])
				}
			}()
		}
	}()
}

// udp listens on srv's 192.0.2.2:7002 and dials it from cli; both are
// closed at cleanup.
func (tp *topo) udp(t testing.TB) (net.PacketConn, net.Conn) {
	t.Helper()
	pc, err := tp.srv.ListenPacket("udp", "192.0.2.2:7002")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	uc, err := tp.cli.DialContext(context.Background(), "udp", "192.0.2.2:7002")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	return pc, uc
}

// roundTrip dials addr from cli and echoes a line through it.
func (tp *topo) roundTrip(addr string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := tp.cli.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		return err
	}
	buf := make([]byte, 6)
	_, err = c.Read(buf)
	if err == nil && string(buf) != "hello\n" {
		err = errors.New("echo: " + strconv.Quote(string(buf)))
	}
	return err
}

// TestServeAccept: a TCP connection (IPv4 and IPv6) and a UDP datagram
// are queued; Serve sees them with their fields, and Accept lets them
// through.
func TestServeAccept(t *testing.T) {
	tp := newTopo(t)
	tp.queueRule(t, unix.IPPROTO_TCP, 7001, 3)
	tp.queueRule(t, unix.IPPROTO_UDP, 7002, 3)
	c := tp.open(t, Config{Queue: 3})
	var s seen
	done := serve(c, func(p Packet) {
		s.add(p)
		if err := c.Verdict(p.ID, Accept); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("verdict: %v", err)
		}
	})
	tp.echoServer(t, ":7001")
	for _, addr := range []string{"192.0.2.2:7001", "[fd00:33::2]:7001"} {
		if err := tp.roundTrip(addr, 5*time.Second); err != nil {
			t.Fatalf("%s through the queue: %v", addr, err)
		}
	}
	pc, uc := tp.udp(t)
	uc.Write([]byte("datagram"))
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	if n, _, err := pc.ReadFrom(buf); err != nil || string(buf[:n]) != "datagram" {
		t.Fatalf("udp through the queue: %q %v", buf[:n], err)
	}

	ifidx, _ := strconv.Atoi(tp.srv.IfIndex(t, "s0"))
	var syn4, syn6, udp, data bool
	for _, p := range s.all() {
		if p.Hook != 1 || p.InIf != uint32(ifidx) || p.OutIf != 0 {
			t.Errorf("packet %d: hook %d in %d out %d, want 1 %d 0", p.ID, p.Hook, p.InIf, p.OutIf, ifidx)
		}
		if p.Data[0]>>4 == 4 && p.Data[9] == unix.IPPROTO_UDP {
			udp = p.Proto == unix.ETH_P_IP && string(p.Data[28:]) == "datagram" && binary.BigEndian.Uint16(p.Data[22:]) == 7002
			continue
		}
		seg, err := ParseTCP(p.Data)
		if err != nil {
			t.Fatalf("packet %d: %v", p.ID, err)
		}
		if seg.Dst.Port() != 7001 {
			t.Errorf("packet %d to %v", p.ID, seg.Dst)
		}
		if seg.Flags&(SYN|ACK) == SYN {
			switch seg.Src.Addr() {
			case netip.MustParseAddr("192.0.2.1"):
				syn4 = p.Proto == unix.ETH_P_IP && seg.Dst.Addr() == netip.MustParseAddr("192.0.2.2")
			case netip.MustParseAddr("fd00:33::1"):
				syn6 = p.Proto == unix.ETH_P_IPV6 && seg.Dst.Addr() == netip.MustParseAddr("fd00:33::2")
			}
		}
		data = data || string(seg.Payload) == "hello\n"
	}
	if !syn4 || !syn6 || !udp || !data {
		t.Errorf("seen: ipv4 syn %v, ipv6 syn %v, udp %v, data %v", syn4, syn6, udp, data)
	}
	if st := c.Stats(); st != (Stats{}) {
		t.Errorf("stats %+v", st)
	}
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("serve after close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("close did not end serve")
	}
}

// TestDrop: a dropped SYN never connects.
func TestDrop(t *testing.T) {
	tp := newTopo(t)
	tp.queueRule(t, unix.IPPROTO_TCP, 7001, 4)
	c := tp.open(t, Config{Queue: 4})
	var s seen
	serve(c, func(p Packet) { s.add(p); c.Verdict(p.ID, Drop) })
	tp.echoServer(t, ":7001")
	err := tp.roundTrip("192.0.2.2:7001", 1500*time.Millisecond)
	if err == nil {
		t.Fatal("connected through a queue that drops")
	}
	if n := len(s.all()); n == 0 {
		t.Fatalf("nothing queued (dial: %v)", err)
	}
}

// TestNoReader: a queue nobody reads drops (no bypass): fail closed.
func TestNoReader(t *testing.T) {
	tp := newTopo(t)
	tp.queueRule(t, unix.IPPROTO_TCP, 7001, 5)
	tp.echoServer(t, ":7001")
	if err := tp.roundTrip("192.0.2.2:7001", time.Second); err == nil {
		t.Fatal("connected through a queue without a reader")
	}
}

// TestVerdictMarkRepeat: the SYN gets mark 0x42 and NF_REPEAT; the chain's
// first rule copies the mark into the ct mark, and the connection's later
// packets match "ct mark 0x42" and are never queued.
func TestVerdictMarkRepeat(t *testing.T) {
	tp := newTopo(t)
	tp.srv.MustRun("nft", "add rule inet nnfq in ct mark 0x42 counter accept")
	tp.srv.MustRun("nft", "add rule inet nnfq in meta mark & 0xff == 0x42 ct mark set meta mark & 0xff counter accept")
	tp.queueRule(t, unix.IPPROTO_TCP, 7001, 6)
	c := tp.open(t, Config{Queue: 6})
	var s seen
	serve(c, func(p Packet) {
		s.add(p)
		if err := c.VerdictMark(p.ID, Repeat, p.Mark&^0xff|0x42); err != nil {
			t.Errorf("verdict: %v", err)
		}
	})
	tp.echoServer(t, ":7001")
	if err := tp.roundTrip("192.0.2.2:7001", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if n := len(s.all()); n != 1 {
		t.Errorf("%d packets queued, want only the SYN", n)
	}
	out := tp.srv.MustRun("nft", "list chain inet nnfq in")
	lines := strings.Split(out, "\n")
	var ctRule, markRule string
	for _, l := range lines {
		switch {
		case strings.Contains(l, "ct mark 0x00000042 counter"):
			ctRule = l
		case strings.Contains(l, "ct mark set"):
			markRule = l
		}
	}
	if !strings.Contains(markRule, "packets 1 ") {
		t.Errorf("mark rule: %q, want the SYN once\n%s", markRule, out)
	}
	if ctRule == "" || strings.Contains(ctRule, "packets 0 ") {
		t.Errorf("ct mark rule: %q, want the connection's later packets\n%s", ctRule, out)
	}
}

// TestOutOfOrder: verdicts given in the reverse order of the packets
// release them in that order.
func TestOutOfOrder(t *testing.T) {
	tp := newTopo(t)
	tp.queueRule(t, unix.IPPROTO_UDP, 7002, 7)
	c := tp.open(t, Config{Queue: 7})
	const n = 8
	ids := make(chan uint32, n)
	serve(c, func(p Packet) { ids <- p.ID })
	pc, uc := tp.udp(t)
	var held []uint32
	for i := range n {
		uc.Write([]byte{byte(i)})
		select {
		case id := <-ids:
			held = append(held, id)
		case <-time.After(5 * time.Second):
			t.Fatalf("packet %d not queued", i)
		}
	}
	for i := n - 1; i >= 0; i-- {
		if err := c.Verdict(held[i], Accept); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 8)
	for i := n - 1; i >= 0; i-- {
		pc.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		if m != 1 || buf[0] != byte(i) {
			t.Errorf("got datagram %v, want %d", buf[:m], i)
		}
	}
	// A verdict for an ID the kernel no longer holds is refused, on the
	// read side.
	c.Verdict(held[0], Accept)
	deadline := time.Now().Add(5 * time.Second)
	for c.Stats().VerdictErrors == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if c.Stats().VerdictErrors != 1 {
		t.Errorf("stats %+v, want one verdict error", c.Stats())
	}
}

// TestServeStops: a context's end and Close each end Serve; Serve waiting
// on an idle queue wakes for both.
func TestServeStops(t *testing.T) {
	tp := newTopo(t)
	c := tp.open(t, Config{Queue: 8})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Serve(ctx, func(Packet) {}) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("serve after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end serve")
	}

	c2 := tp.open(t, Config{Queue: 9})
	done2 := serve(c2, func(Packet) {})
	time.Sleep(50 * time.Millisecond)
	c2.Close()
	select {
	case err := <-done2:
		if err != nil {
			t.Errorf("serve after close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("close did not end serve")
	}
	if err := c2.Verdict(1, Accept); err == nil || !strings.HasPrefix(err.Error(), "nfq: ") {
		t.Errorf("verdict after close: %v", err)
	}
}

// TestBusy: binding a queue another socket holds is refused, with an
// error saying so.
func TestBusy(t *testing.T) {
	tp := newTopo(t)
	tp.open(t, Config{Queue: 10})
	err := tp.srv.Do(func() error {
		c, err := Open(10)
		if err == nil {
			c.Close()
		}
		return err
	})
	if !errors.Is(err, unix.EPERM) || !strings.HasPrefix(err.Error(), "nfq: bind queue 10: another socket holds it") {
		t.Fatalf("second bind: %v", err)
	}
	// The holder's queue is still its own: a socket that closes frees it.
	c := tp.open(t, Config{Queue: 11, MaxLen: 16})
	c.Close()
	tp.open(t, Config{Queue: 11})
}

// TestQueueFull: beyond Config.MaxLen packets awaiting a verdict the
// kernel drops (fail closed), and Stats says how many.
func TestQueueFull(t *testing.T) {
	tp := newTopo(t)
	tp.queueRule(t, unix.IPPROTO_UDP, 7002, 13)
	c := tp.open(t, Config{Queue: 13, MaxLen: 4})
	held := make(chan uint32, 16)
	serve(c, func(p Packet) { held <- p.ID })
	_, uc := tp.udp(t)
	for range 10 {
		uc.Write([]byte("x"))
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(held) < 4 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if len(held) != 4 {
		t.Errorf("%d packets queued, want 4", len(held))
	}
	if st := c.Stats(); st.QueueDropped != 6 || st.UserDropped != 0 {
		t.Errorf("stats %+v, want 6 dropped for a full queue", st)
	}
}
