package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/netutil"
)

// heapInUse is the heap in use after a collection.
func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// bigHelloStart is the first 60 KB of a ClientHello that announces a
// 60,000-byte handshake message in four records: a client that sends this
// and stops holds the proxy in its peek until HelloTimeout.
func bigHelloStart() []byte {
	const total = 60000
	hs := append([]byte{1, byte(total >> 16), byte(total >> 8), byte(total & 0xff)}, make([]byte, total)...)
	var b []byte
	for len(hs) > 0 {
		k := min(16384, len(hs))
		b = append(b, 0x16, 3, 1, byte(k>>8), byte(k))
		b = append(b, hs[:k]...)
		hs = hs[k:]
	}
	return b[:len(b)-100]
}

// bigHeadStart is the first 60 KB of a request head that never ends.
func bigHeadStart(target string) []byte {
	return append([]byte("GET "+target+" HTTP/1.1\r\nHost: www.allowed.test\r\n"), bytes.Repeat([]byte("X-Pad: "+strings.Repeat("a", 53)+"\r\n"), 1000)...)
}

// closedByPeer counts the connections the proxy has closed: a read ends
// (EOF, a reset, an alert and then the end) within the wait rather than
// timing out. The connections are read at once, with one deadline.
func closedByPeer(conns []net.Conn, wait time.Duration) int {
	deadline := time.Now().Add(wait)
	var closed atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(deadline)
			buf := make([]byte, 512)
			for {
				_, err := c.Read(buf)
				if err == nil {
					continue
				}
				var ne net.Error
				if !(errors.As(err, &ne) && ne.Timeout()) {
					closed.Add(1)
				}
				return
			}
		}()
	}
	wg.Wait()
	return int(closed.Load())
}

// TestPeekBudget: clients that send the first 60 KB of a ClientHello or of
// a request head and stop hold the transparent proxy in its peek until the
// hello deadline. Each such connection held its recording (up to
// HelloMaxBytes, 64 KiB) and crypto/tls's copies of it: some 80 KiB of heap
// each, 400 MB for one client address's 5,000 connections. The bytes past
// each connection's first 4 KiB now come from the peek budget: the heap
// the connections hold is bounded by it (and 4 KiB and a goroutine each),
// the connections that do not fit are refused (connection-limit), an
// ordinary hello from another client is served meanwhile, and the budget
// is whole again once they have gone.
func TestPeekBudget(t *testing.T) {
	const budget = 1 << 20
	tp := newTopo(t, topoOpts{config: func(c *Config) {
		c.PeekBudget = budget
		c.HelloTimeout = 30 * time.Second
		c.FirstByteWait = 2 * time.Second
	}})
	for _, c := range []struct {
		name string
		port uint16
		b    []byte
	}{
		{"hello", 443, bigHelloStart()},
		{"head", 80, bigHeadStart("/")},
	} {
		t.Run(c.name, func(t *testing.T) {
			const n = 300
			before := heapInUse()
			var conns []net.Conn
			for range n {
				cc := tp.dialFromClient(t, clientV4, netip.AddrPortFrom(srvV4, c.port))
				conns = append(conns, cc)
				cc.Write(c.b) // the proxy may already have refused it
			}
			// Every connection is either refused or held in its peek.
			refused := closedByPeer(conns, time.Second)
			grown := heapInUse() - before
			t.Logf("%d connections with %d KB each: %d refused; the budget holds %d KiB; the heap grew %d KiB (%d KiB a connection)",
				n, len(c.b)/1000, refused, tp.proxy.peekMem.inUse()>>10, grown>>10, grown/n>>10)
			if got := tp.proxy.peekMem.inUse(); got > budget {
				t.Errorf("the peek budget holds %d bytes, over its %d", got, budget)
			}
			if refused == 0 {
				t.Errorf("none of %d connections of %d KB was refused with a budget of %d KiB", n, len(c.b)/1000, budget>>10)
			}
			if limit := int64(n*24<<10 + 3*budget); grown > limit {
				t.Errorf("the heap grew %d KiB for %d connections holding big hellos or heads, over %d KiB (24 KiB each and 3 × the budget)", grown>>10, n, limit>>10)
			}
			ev := tp.ev.wait(t, "refused for the budget", func(ev audit.Event) bool {
				return ev.Client == clientV4 && ev.Reason == ReasonLimit && ev.DestPort == c.port
			})
			if !ev.Enforced || ev.Dest != srvV4 {
				t.Errorf("refused connection's event %+v", ev)
			}
			// An ordinary client is served meanwhile.
			body, err := tp.tlsGet(tp.dialAtFirstWriteFrom(t, client2V4, netip.AddrPortFrom(srvV4, 443)), "www.allowed.test", "/ok", nil)
			if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
				t.Errorf("another client during the flood of big hellos: %q %v", body, err)
			}
			for _, cc := range conns {
				cc.Close()
			}
			deadline := time.Now().Add(10 * time.Second)
			for tp.proxy.peekMem.inUse() != 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if got := tp.proxy.peekMem.inUse(); got != 0 {
				t.Errorf("the budget still holds %d bytes after every connection closed", got)
			}
			// The next case measures the heap from a proxy with no
			// connection left.
			for openConns(tp.proxy) > 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// TestExplicitPeekBudget: the explicit listener's request heads take from
// the same budget. Connections that send 60 KB of a head and stop held it
// in net/http's buffers and header map, some 90 KiB each; now the heap is
// bounded by the budget, the connections that do not fit are closed, an
// ordinary request is served meanwhile, and the budget is whole again once
// they have gone. The connections come from 30 client addresses, whose
// tenths of the budget together are three times it: the budget's total
// bounds them, not each client's tenth (from one address, as before
// session 29, the total could not be passed whether it was enforced or
// not).
func TestExplicitPeekBudget(t *testing.T) {
	const budget = 1 << 20
	addr, plainPort, p := bigHeadProxy(t, budget)
	const n, clients = 300, 30
	head := bigHeadStart(fmt.Sprintf("http://docs.paths.test:%d/", plainPort))
	before := heapInUse()
	conns := bigHeadConnsFrom(t, addr, head, n, clients)
	refused := closedByPeer(conns, time.Second)
	grown := heapInUse() - before
	t.Logf("%d connections from %d addresses with %d KB of head each: %d refused; the budget holds %d KiB; the heap grew %d KiB (%d KiB a connection)",
		n, clients, len(head)/1000, refused, p.peekMem.inUse()>>10, grown>>10, grown/n>>10)
	if got := p.peekMem.inUse(); got > budget {
		t.Errorf("the peek budget holds %d bytes, over its %d", got, budget)
	} else if got <= budget/2 {
		t.Errorf("the peek budget holds %d bytes of its %d: the clients did not fill it", got, budget)
	}
	if refused == 0 {
		t.Errorf("none of %d connections was refused with a budget of %d KiB", n, budget>>10)
	}
	if limit := int64(n*24<<10 + 3*budget); grown > limit {
		t.Errorf("the heap grew %d KiB for %d connections holding big heads, over %d KiB (24 KiB each and 3 × the budget)", grown>>10, n, limit>>10)
	}
	if code, err := explicitGet(addr, fmt.Sprintf("http://docs.paths.test:%d/x", plainPort)); code != 200 {
		t.Errorf("an ordinary request meanwhile: %d %v", code, err)
	}
	for _, c := range conns {
		c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.peekMem.inUse() != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := p.peekMem.inUse(); got != 0 {
		t.Errorf("the budget still holds %d bytes after every connection closed", got)
	}
}

// bigHeadProxy is a loopback explicit proxy (enforce mode, a rule for
// docs.paths.test on its origin's ports) with a peek budget of budget
// bytes and a hello timeout that outlasts the tests: its address, its
// origin's plain-HTTP port, the proxy.
func bigHeadProxy(t *testing.T, budget int) (string, int, *Proxy) {
	t.Helper()
	addr, plainPort, _, _, p := loopbackExplicitProxy(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.PeekBudget = budget; c.HelloTimeout = 30 * time.Second }, nil, nil)
	return addr, plainPort, p
}

// bigHeadConns opens n connections to addr (from 127.0.0.1), each of
// which writes head and nothing more; they close at the test's end.
func bigHeadConns(t *testing.T, addr string, head []byte, n int) []net.Conn {
	return bigHeadConnsFrom(t, addr, head, n, 0)
}

// bigHeadConnsFrom is bigHeadConns from clients addresses in turn,
// 127.0.0.10 and up (0: from 127.0.0.1).
func bigHeadConnsFrom(t *testing.T, addr string, head []byte, n, clients int) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for i := range n {
		d := net.Dialer{Timeout: 5 * time.Second}
		if clients > 0 {
			d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(10+i%clients))}
		}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
		c.Write(head)
	}
	return conns
}

// openConns is the number of connections holding a slot in p.
func openConns(p *Proxy) int {
	n, _, _ := p.slots.Counts()
	return n
}

// TestIdleHTTPConnMemory: a plain-HTTP keep-alive connection idle after a
// request whose head carried 60 KB of headers holds its 16 KiB buffer, a
// goroutine and its record, not the head: the record's host and path were
// cut from the head's string and kept all of it (about 100 KiB a
// connection; httpwire.Head.detach).
func TestIdleHTTPConnMemory(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	head := append(bigHeadStart("/"), "\r\n"...)
	const n = 200
	before := heapInUse()
	var conns []net.Conn
	for range n {
		c := tp.dialFromClient(t, clientV4, netip.AddrPortFrom(srvV4, 80))
		conns = append(conns, c)
		c.Write(head)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	grown := heapInUse() - before
	t.Logf("%d idle keep-alive connections after a %d-byte head: the heap grew %d KiB, %d KiB a connection", n, len(head), grown>>10, grown/n>>10)
	if limit := int64(n * 48 << 10); grown > limit {
		t.Errorf("%d idle keep-alive connections after a %d-byte head hold %d KiB of heap, over %d KiB (48 KiB each, the origin's side of the connection included)", n, len(head), grown>>10, limit>>10)
	}
	runtime.KeepAlive(conns)
}

// TestPeekBudgetPerClient: one client address that holds big request
// heads open on many connections takes no more than a tenth of the peek
// budget, as it may hold no more than a tenth of the connections: another
// client's request with an 8 KB head (a site's cookies) is still served.
// Without the share one client's few hundred connections held the whole
// budget, and every other client's head or hello past 4 KiB was refused
// for as long as it kept them.
func TestPeekBudgetPerClient(t *testing.T) {
	const budget = 1 << 20
	addr, plainPort, p := bigHeadProxy(t, budget)
	const n = 100
	head := bigHeadStart(fmt.Sprintf("http://docs.paths.test:%d/", plainPort))
	conns := bigHeadConns(t, addr, head, n)
	refused := closedByPeer(conns, time.Second)
	t.Logf("%d connections of 127.0.0.1 with %d KB of head each: %d refused; the budget holds %d KiB", n, len(head)/1000, refused, p.peekMem.inUse()>>10)
	if got := p.peekMem.inUse(); got > budget/10 {
		t.Errorf("one client holds %d KiB of the %d KiB peek budget, over a tenth", got>>10, budget>>10)
	}
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET http://docs.paths.test:%d/x HTTP/1.1\r\nHost: docs.paths.test:%d\r\nCookie: c=%s\r\nConnection: close\r\n\r\n", plainPort, plainPort, strings.Repeat("a", 8000))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("127.0.0.2's request with an 8 KB head while 127.0.0.1 holds big heads: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("127.0.0.2's request with an 8 KB head: %d", resp.StatusCode)
	}
}

// TestPeekBudgetTake: the budget bounds all clients together, and each
// client address to a tenth of it; what is given back can be taken again.
func TestPeekBudgetTake(t *testing.T) {
	b := newPeekBudget(1000)
	a := netutil.ClientKey{Addr: netip.MustParseAddr("192.0.2.1")}
	if !b.take(a, 100) || b.take(a, 1) {
		t.Fatalf("one client: took past its tenth (%d in use)", b.inUse())
	}
	took := []netutil.ClientKey{a}
	for i := 2; i < 40; i++ {
		if c := (netutil.ClientKey{Addr: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})}); b.take(c, 100) {
			took = append(took, c)
		}
	}
	if len(took) != 10 || b.inUse() != 1000 {
		t.Errorf("39 clients of 100 bytes each: %d took, %d in use; want 10 and 1000", len(took), b.inUse())
	}
	b.give(a, 100)
	if c := (netutil.ClientKey{Addr: netip.MustParseAddr("192.0.2.200")}); !b.take(c, 100) || b.inUse() != 1000 {
		t.Errorf("after a give: in use %d", b.inUse())
	} else {
		took[0] = c
	}
	for _, c := range took {
		b.give(c, 100)
	}
	if b.inUse() != 0 || len(b.byClient) != 0 {
		t.Errorf("given back: %d in use, %d clients", b.inUse(), len(b.byClient))
	}
}
