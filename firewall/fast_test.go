package firewall

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/nfq"
)

// testQueue is userspace's stand-in for the fast path in its tests: the
// project's NFQUEUE client (internal/nfq) bound in the gateway's
// namespace, every queued packet sent to C.
type testQueue struct {
	conn *nfq.Conn
	C    chan queued
	done chan struct{} // Serve has returned
}

// queued is a packet the kernel queued, parsed as far as the tests need.
type queued struct {
	id, mark uint32
	syn, ack bool
	payload  int    // TCP payload bytes
	pkt      []byte // the IP packet
}

// openTestQueue binds queue num in the gateway's namespace and reads it
// until the test ends (or Close).
func (tp *topo) openTestQueue(t *testing.T, num uint16) *testQueue {
	t.Helper()
	conn, err := nfq.OpenConfig(nfq.Config{Queue: num, NetNS: tp.nsPath})
	if err != nil {
		t.Fatalf("nfqueue: %v", err)
	}
	q := &testQueue{conn: conn, C: make(chan queued, 64), done: make(chan struct{})}
	go func() {
		defer close(q.done)
		conn.Serve(context.Background(), func(pk nfq.Packet) {
			p := queued{id: pk.ID, mark: pk.Mark, pkt: bytes.Clone(pk.Data)}
			if seg, err := nfq.ParseTCP(pk.Data); err == nil {
				p.syn, p.ack, p.payload = seg.Flags&nfq.SYN != 0, seg.Flags&nfq.ACK != 0, len(seg.Payload)
			}
			select {
			case q.C <- p:
			default:
			}
		})
	}()
	t.Cleanup(q.Close)
	return q
}

// Close stops reading: the kernel drops what it holds and what it
// queues from now on (no bypass).
func (q *testQueue) Close() { q.conn.Close() }

// Verdicts, as the tests name them.
const (
	nfDrop   = nfq.Drop
	nfAccept = nfq.Accept
	nfRepeat = nfq.Repeat
)

// verdict answers packet id; mark >= 0 sets the packet mark.
func (q *testQueue) verdict(t *testing.T, id uint32, v nfq.Verdict, mark int64) {
	t.Helper()
	var err error
	if mark >= 0 {
		err = q.conn.VerdictMark(id, v, uint32(mark))
	} else {
		err = q.conn.Verdict(id, v)
	}
	if err != nil {
		t.Fatalf("verdict: %v", err)
	}
}

// next waits for the next queued packet.
func (q *testQueue) next(t *testing.T, what string) queued {
	t.Helper()
	select {
	case p := <-q.C:
		return p
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: nothing queued in 5s", what)
	}
	return queued{}
}

// none checks that nothing is queued for d.
func (q *testQueue) none(t *testing.T, d time.Duration, what string) {
	t.Helper()
	select {
	case p := <-q.C:
		t.Errorf("%s: queued %+v", what, p)
	case <-time.After(d):
	}
}

// fastServer is the server of the fast path tests on port 443: it says
// "hi", then echoes what it reads; it records what it accepted.
type fastServer struct {
	accepted atomic.Int32
	read     atomic.Int64
	remotes  chan string
}

func (tp *topo) fastServer(t *testing.T, addr string) *fastServer {
	t.Helper()
	s := &fastServer{remotes: make(chan string, 16)}
	ln, err := tp.server.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) {
		s.accepted.Add(1)
		s.remotes <- c.RemoteAddr().String()
		fmt.Fprintf(c, "hi\n")
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			s.read.Add(int64(n))
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
	return s
}

// fastTopo is the topology with the fast path installed (queue num), a
// proxy stand-in that counts its connections, the server on 443.
func fastTopo(t *testing.T, num uint16) (*topo, *Firewall, *atomic.Int32) {
	t.Helper()
	return fastTopoWith(t, Config{FastPath: true, FastPathQueue: num})
}

// fastTopoWith is fastTopo with the firewall's Config cfg.
func fastTopoWith(t *testing.T, cfg Config) (*topo, *Firewall, *atomic.Int32) {
	t.Helper()
	requireNft(t)
	tp := newTopo(t)
	var proxied atomic.Int32
	ln, err := tp.gw.Listen("tcp", fmt.Sprintf("[::]:%d", proxyPort))
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) {
		proxied.Add(1)
		od, _ := origDst(c)
		fmt.Fprintf(c, "proxy orig=%s\n", od)
	})
	fw := tp.firewall(t, cfg)
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	return tp, fw, &proxied
}

// dialAsync dials in the background (the SYN waits in the queue for a
// verdict).
func dialAsync(tp *topo, addr string) chan net.Conn {
	ch := make(chan net.Conn, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := tp.client.DialContext(ctx, "tcp", addr)
		if err != nil {
			ch <- nil
			return
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		ch <- c
	}()
	return ch
}

func connOf(t *testing.T, ch chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-ch:
		if c == nil {
			t.Fatal("dial failed")
		}
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(6 * time.Second):
		t.Fatal("dial did not return")
	}
	return nil
}

// TestFastPathAllowed: a SYN to a redirected port is queued; with
// Marks.Pending it is not redirected (the server sees the client, the
// proxy nothing), the handshake completes, the client's bare ACK is not
// queued and its first data is; released with NF_REPEAT and
// Marks.Allowed, the connection is forwarded by the kernel (nothing more
// queued) both ways, some MB each.
func TestFastPathAllowed(t *testing.T) {
	const num = 41
	tp, _, proxied := fastTopo(t, num)
	s4 := tp.fastServer(t, "198.18.2.2:443")
	s6 := tp.fastServer(t, "[2001:db8:2::2]:443")
	q := tp.openTestQueue(t, num)
	m := FastMarks(Config{})
	for _, c := range []struct {
		addr, client string
		s            *fastServer
	}{{"198.18.2.2:443", "198.18.1.2", s4}, {"[2001:db8:2::2]:443", "2001:db8:1::2", s6}} {
		t.Run(c.addr, func(t *testing.T) {
			ch := dialAsync(tp, c.addr)
			syn := q.next(t, "SYN")
			if !syn.syn || syn.ack || syn.payload != 0 {
				t.Fatalf("first queued packet %+v, want a bare SYN", syn)
			}
			q.verdict(t, syn.id, nfAccept, int64(syn.mark&^m.Mask|m.Pending))
			conn := connOf(t, ch)
			r := bufio.NewReader(conn)
			if line, err := r.ReadString('\n'); line != "hi\n" {
				t.Fatalf("first line %q, %v; want the server's hi", line, err)
			}
			select {
			case remote := <-c.s.remotes:
				if host, _, _ := net.SplitHostPort(remote); host != c.client {
					t.Errorf("server saw %s, want the client %s", remote, c.client)
				}
			case <-time.After(2 * time.Second):
				t.Fatal("the server accepted nothing")
			}
			// The ACK of the handshake and of "hi" carry no payload: not
			// queued.
			q.none(t, 300*time.Millisecond, "bare ACKs")
			if _, err := conn.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			data := q.next(t, "first data")
			if data.payload != 5 {
				t.Fatalf("queued %+v, want the 5 bytes of hello", data)
			}
			if n := c.s.read.Load(); n != 0 {
				t.Fatalf("the server read %d bytes before the verdict", n)
			}
			q.verdict(t, data.id, nfRepeat, int64(data.mark&^m.Mask|m.Allowed))
			buf := make([]byte, 5)
			if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "hello" {
				t.Fatalf("echo %q, %v", buf, err)
			}
			// Bulk, both ways.
			const size = 8 << 20
			go func() {
				chunk := bytes.Repeat([]byte("x"), 64<<10)
				for sent := 0; sent < size; sent += len(chunk) {
					if _, err := conn.Write(chunk); err != nil {
						return
					}
				}
			}()
			if n, err := io.CopyN(io.Discard, r, size); err != nil {
				t.Fatalf("bulk echo: %d bytes, %v", n, err)
			}
			q.none(t, 100*time.Millisecond, "an allowed connection")
			if n := proxied.Load(); n != 0 {
				t.Errorf("the proxy got %d connections", n)
			}
		})
	}
}

// TestFastPathRedirect: a SYN let through without a mark is redirected
// to the proxy, as without the fast path.
func TestFastPathRedirect(t *testing.T) {
	const num = 42
	tp, _, proxied := fastTopo(t, num)
	s := tp.fastServer(t, "198.18.2.2:443")
	q := tp.openTestQueue(t, num)
	ch := dialAsync(tp, "198.18.2.2:443")
	syn := q.next(t, "SYN")
	q.verdict(t, syn.id, nfAccept, -1)
	conn := connOf(t, ch)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if line != "proxy orig=198.18.2.2:443\n" {
		t.Fatalf("got %q, %v; want the proxy's line", line, err)
	}
	if n := s.accepted.Load(); n != 0 || proxied.Load() != 1 {
		t.Errorf("server accepted %d, proxy %d; want 0 and 1", n, proxied.Load())
	}
	q.none(t, 300*time.Millisecond, "a redirected connection")
}

// counterOf reads the packet counter of the forward rule with comment.
func counterOf(t *testing.T, tp *topo, comment string) int {
	t.Helper()
	out := tp.gw.MustRun("nft", "list", "chain", "inet", "egressd", "forward")
	m := regexp.MustCompile(`counter packets (\d+) bytes \d+ .*comment "` + regexp.QuoteMeta(comment) + `"`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no counter for %q in:\n%s", comment, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// pendingConn opens a pending connection and returns it with its first
// data packet, held in the queue.
func pendingConn(t *testing.T, tp *topo, q *testQueue, addr string) (net.Conn, queued) {
	t.Helper()
	m := FastMarks(Config{})
	ch := dialAsync(tp, addr)
	syn := q.next(t, "SYN")
	q.verdict(t, syn.id, nfAccept, int64(syn.mark&^m.Mask|m.Pending))
	conn := connOf(t, ch)
	if _, err := conn.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	data := q.next(t, "first data")
	if data.payload != 5 {
		t.Fatalf("queued %+v, want the 5 bytes of hello", data)
	}
	return conn, data
}

// TestFastPathDenied: NF_REPEAT with Marks.Denied marks the connection
// denied; its later packets (the client's retransmissions) are dropped
// by nftables, not queued, and nothing reaches the server.
func TestFastPathDenied(t *testing.T) {
	const num = 43
	tp, _, _ := fastTopo(t, num)
	s := tp.fastServer(t, "198.18.2.2:443")
	q := tp.openTestQueue(t, num)
	m := FastMarks(Config{})
	_, data := pendingConn(t, tp, q, "198.18.2.2:443")
	q.verdict(t, data.id, nfRepeat, int64(data.mark&^m.Mask|m.Denied))
	if n := counterOf(t, tp, "fast path: denied"); n != 1 {
		t.Errorf("denied verdicts counted %d, want 1", n)
	}
	q.none(t, 1500*time.Millisecond, "a denied connection's retransmissions")
	if n := counterOf(t, tp, "fast path: a denied connection"); n == 0 {
		t.Error("no retransmission was dropped as a denied connection's")
	}
	if n := s.read.Load(); n != 0 {
		t.Errorf("the server read %d bytes of a denied connection", n)
	}
}

// TestFastPathHeld: a pending connection's data is never forwarded
// without a verdict: not while the reader holds it, not after the reader
// is gone (the kernel drops, no bypass), and with no reader a new SYN is
// dropped too (fail closed).
func TestFastPathHeld(t *testing.T) {
	const num = 44
	tp, _, proxied := fastTopo(t, num)
	s := tp.fastServer(t, "198.18.2.2:443")
	q := tp.openTestQueue(t, num)
	pendingConn(t, tp, q, "198.18.2.2:443")
	// Held: the client retransmits, and each copy is queued again.
	time.Sleep(time.Second)
	if n := s.read.Load(); n != 0 {
		t.Fatalf("the server read %d bytes without a verdict", n)
	}
	q.Close()
	<-q.done
	time.Sleep(1500 * time.Millisecond)
	if n := s.read.Load(); n != 0 {
		t.Fatalf("the server read %d bytes with no reader", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if c, err := tp.client.DialContext(ctx, "tcp", "198.18.2.2:443"); err == nil {
		c.Close()
		t.Error("a new connection got through with no reader on the queue")
	}
	if n := s.accepted.Load(); n != 1 || proxied.Load() != 0 {
		t.Errorf("server accepted %d, proxy %d; want 1 (the pending one) and 0", n, proxied.Load())
	}
}

// TestFastPathReload: a reload keeps a fast-allowed connection while the
// rules the fast path decides by are unchanged, and cuts it when they
// change (here: its rule is removed).
func TestFastPathReload(t *testing.T) {
	const num = 45
	tp, fw, _ := fastTopo(t, num)
	tp.fastServer(t, "198.18.2.2:443")
	q := tp.openTestQueue(t, num)
	m := FastMarks(Config{})
	conn, data := pendingConn(t, tp, q, "198.18.2.2:443")
	q.verdict(t, data.id, nfRepeat, int64(data.mark&^m.Mask|m.Allowed))
	r := bufio.NewReader(conn)
	echo := func(msg string) error {
		if _, err := conn.Write([]byte(msg)); err != nil {
			return err
		}
		conn.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
		buf := make([]byte, len(msg))
		_, err := io.ReadFull(r, buf)
		return err
	}
	if line, err := r.ReadString('\n'); line != "hi\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
	if err := echo("hello"); err != nil {
		t.Fatalf("echo: %v", err)
	}
	if err := fw.Replace(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	if err := echo("after an unchanged reload"); err != nil {
		t.Fatalf("echo after an unchanged reload: %v", err)
	}
	if err := fw.Replace(compile(t, strings.Split(testPolicy, "  - name: web")[0])); err != nil {
		t.Fatal(err)
	}
	if err := echo("after its rule went away"); err == nil {
		t.Fatal("the connection still echoes after its rule was removed")
	}
}
