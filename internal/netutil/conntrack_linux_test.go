package netutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

const redirectPort = 15001

// redirectTopo is a client namespace and a gateway namespace whose
// nftables REDIRECT sends every TCP connection from the client to a
// listener on :15001. accepted carries each accepted connection.
type redirectTopo struct {
	c, g     *testnet.NS
	accepted chan *net.TCPConn
}

func newRedirectTopo(t testing.TB) *redirectTopo {
	t.Helper()
	testnet.RequireRoot(t)
	tp := &redirectTopo{c: testnet.New(t, "ctc"), g: testnet.New(t, "ctg"), accepted: make(chan *net.TCPConn, 16)}
	testnet.Link(t, tp.c, "c0", []string{"198.18.1.2/24", "2001:db8:1::2/64"},
		tp.g, "gwc", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	tp.c.MustRun("ip", "route", "add", "default", "via", "198.18.1.1")
	tp.c.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
	rules := filepath.Join(t.TempDir(), "redirect.nft")
	os.WriteFile(rules, []byte(fmt.Sprintf(`table inet netutil_test {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "gwc" meta l4proto tcp redirect to :%d
	}
}
`, redirectPort)), 0o644)
	tp.g.MustRun("nft", "-f", rules)
	ln, err := tp.g.Listen("tcp", fmt.Sprintf("[::]:%d", redirectPort))
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
			tp.accepted <- c.(*net.TCPConn)
		}
	}()
	return tp
}

// dialFrom connects from the client namespace, from a fixed local address
// and port (SO_REUSEADDR: the port's previous connection may be in
// TIME_WAIT).
func (tp *redirectTopo) dialFrom(t testing.TB, local, dest netip.AddrPort) *net.TCPConn {
	t.Helper()
	var c net.Conn
	err := tp.c.Do(func() error {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(local),
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
				return serr
			}}
		var err error
		c, err = d.DialContext(context.Background(), "tcp", dest.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dest, local, err)
	}
	return c.(*net.TCPConn)
}

func (tp *redirectTopo) accept(t testing.TB) *net.TCPConn {
	t.Helper()
	select {
	case c := <-tp.accepted:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no connection reached the listener")
		return nil
	}
}

func openConntrackIn(t testing.TB, ns *testnet.NS) *Conntrack {
	t.Helper()
	var ct *Conntrack
	if err := ns.Do(func() (err error) { ct, err = OpenConntrack(); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ct.Close() })
	return ct
}

// TestConntrackOriginalSource reproduces the NAT source-port clash: a
// client connects from one fixed port to destination A, the connection
// closes (its conntrack entry lingers in TIME_WAIT), then from the same
// port to destination B. After the REDIRECT both have the reply tuple
// listener -> client:port, so the kernel remaps the second one's source
// port and the accepted socket shows a port the client never used;
// OriginalSource must give back the client's port. IPv4 and IPv6.
func TestConntrackOriginalSource(t *testing.T) {
	tp := newRedirectTopo(t)
	ct := openConntrackIn(t, tp.g)
	for _, c := range []struct {
		name        string
		client      netip.Addr
		destA, dstB netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddr("198.18.1.2"), netip.MustParseAddrPort("198.18.2.10:443"), netip.MustParseAddrPort("198.18.2.11:443")},
		{"ipv6", netip.MustParseAddr("2001:db8:1::2"), netip.MustParseAddrPort("[2001:db8:2::10]:443"), netip.MustParseAddrPort("[2001:db8:2::11]:443")},
	} {
		t.Run(c.name, func(t *testing.T) {
			local := netip.AddrPortFrom(c.client, 40123)

			// First connection: no clash, the socket shows the real port.
			cl := tp.dialFrom(t, local, c.destA)
			sv := tp.accept(t)
			if got := sv.RemoteAddr().(*net.TCPAddr).AddrPort(); got.Port() != local.Port() {
				t.Fatalf("first connection already remapped: %s", got)
			}
			src, err := ct.OriginalSource(sv.LocalAddr().(*net.TCPAddr).AddrPort(), sv.RemoteAddr().(*net.TCPAddr).AddrPort())
			if err != nil || src != local {
				t.Fatalf("first connection: original source %s, %v; want %s", src, err, local)
			}
			// The server closes first, then the client: the entry goes to
			// TIME_WAIT and stays in the table.
			sv.Close()
			cl.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := cl.Read(make([]byte, 1)); err == nil {
				t.Fatal("read after the server closed: want EOF")
			}
			cl.Close()

			// Second connection from the same port to another destination.
			cl = tp.dialFrom(t, local, c.dstB)
			defer cl.Close()
			sv = tp.accept(t)
			defer sv.Close()
			seen := sv.RemoteAddr().(*net.TCPAddr).AddrPort()
			t.Logf("client used %s, the accepted socket shows %s", local, seen)
			if seen.Port() == local.Port() {
				t.Fatalf("the kernel did not remap the clashing source port (socket shows %s): the clash was not reproduced", seen)
			}
			src, err = ct.OriginalSource(sv.LocalAddr().(*net.TCPAddr).AddrPort(), seen)
			if err != nil || src != local {
				t.Fatalf("remapped connection: original source %s, %v; want %s (socket shows %s)", src, err, local, seen)
			}
		})
	}

	t.Run("no-entry", func(t *testing.T) {
		_, err := ct.OriginalSource(netip.MustParseAddrPort("198.18.1.1:15001"), netip.MustParseAddrPort("198.18.1.2:1"))
		if !errors.Is(err, ErrNoConntrack) {
			t.Errorf("got %v, want ErrNoConntrack", err)
		}
	})
	t.Run("mixed-families", func(t *testing.T) {
		if _, err := ct.OriginalSource(netip.MustParseAddrPort("198.18.1.1:15001"), netip.MustParseAddrPort("[2001:db8:1::2]:1")); err == nil {
			t.Error("mixed families: no error")
		}
	})
	t.Run("closed", func(t *testing.T) {
		ct2 := openConntrackIn(t, tp.g)
		ct2.Close()
		if err := ct2.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := ct2.OriginalSource(netip.MustParseAddrPort("198.18.1.1:15001"), netip.MustParseAddrPort("198.18.1.2:1")); err == nil {
			t.Error("lookup after Close: no error")
		}
	})
}

// TestConntrackConcurrent: lookups from many goroutines at once (more than
// ConntrackSockets) each get their own connection's answer, and a Close
// in the middle of them lets the ones in flight finish: every lookup
// returns its right source or an error, never another's.
func TestConntrackConcurrent(t *testing.T) {
	tp := newRedirectTopo(t)
	ct := openConntrackIn(t, tp.g)
	const n = 3 * ConntrackSockets
	type pair struct{ local, remote, want netip.AddrPort }
	var pairs []pair
	for i := range n {
		want := netip.AddrPortFrom(netip.MustParseAddr("198.18.1.2"), uint16(40300+i))
		cl := tp.dialFrom(t, want, netip.MustParseAddrPort("198.18.2.10:443"))
		defer cl.Close()
		sv := tp.accept(t)
		defer sv.Close()
		pairs = append(pairs, pair{sv.LocalAddr().(*net.TCPAddr).AddrPort(), sv.RemoteAddr().(*net.TCPAddr).AddrPort(), cl.LocalAddr().(*net.TCPAddr).AddrPort()})
	}
	run := func(rounds int, closeAfter int) (ok, failed int) {
		type res struct{ ok, failed int }
		results := make(chan res, n)
		start := make(chan struct{})
		for i := range n {
			go func() {
				<-start
				var r res
				for j := range rounds {
					pr := pairs[(i+j)%n]
					src, err := ct.OriginalSource(pr.local, netip.AddrPortFrom(pr.remote.Addr(), pr.remote.Port()))
					switch {
					case err != nil:
						r.failed++
					case src.Addr().Unmap() != pr.want.Addr() || src.Port() != pr.want.Port():
						t.Errorf("lookup of %s: got %s, want %s", pr.remote, src, pr.want)
					default:
						r.ok++
					}
				}
				results <- r
			}()
		}
		close(start)
		if closeAfter > 0 {
			time.Sleep(time.Duration(closeAfter) * time.Millisecond)
			if err := ct.Close(); err != nil {
				t.Errorf("Close during lookups: %v", err)
			}
		}
		for range n {
			r := <-results
			ok += r.ok
			failed += r.failed
		}
		return ok, failed
	}
	if ok, failed := run(50, 0); failed != 0 || ok != 50*n {
		t.Fatalf("concurrent lookups: %d right, %d failed; want %d right", ok, failed, 50*n)
	}
	// Then Close while lookups run: the ones before it are right, the
	// ones after it fail.
	ok, failed := run(2000, 5)
	t.Logf("with Close after 5 ms: %d right, %d failed", ok, failed)
	if failed == 0 {
		t.Error("no lookup failed after Close")
	}
}

// BenchmarkConntrack measures the lookup the transparent proxy does per
// accepted connection, next to the getsockopt(SO_ORIGINAL_DST) it already
// does (the peer), and to opening a netlink socket per lookup (the design
// not chosen).
func BenchmarkConntrack(b *testing.B) {
	tp := newRedirectTopo(b)
	ct := openConntrackIn(b, tp.g)
	cl := tp.dialFrom(b, netip.MustParseAddrPort("198.18.1.2:40200"), netip.MustParseAddrPort("198.18.2.10:443"))
	defer cl.Close()
	sv := tp.accept(b)
	defer sv.Close()
	local, remote := sv.LocalAddr().(*net.TCPAddr).AddrPort(), sv.RemoteAddr().(*net.TCPAddr).AddrPort()
	want := cl.LocalAddr().(*net.TCPAddr).AddrPort()

	b.Run("original-source", func(b *testing.B) {
		for b.Loop() {
			if src, err := ct.OriginalSource(local, remote); err != nil || src.Port() != want.Port() {
				b.Fatalf("%s %v", src, err)
			}
		}
	})
	b.Run("original-source-parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := ct.OriginalSource(local, remote); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("original-source-miss", func(b *testing.B) {
		miss := netip.AddrPortFrom(remote.Addr(), remote.Port()+1)
		for b.Loop() {
			if _, err := ct.OriginalSource(local, miss); !errors.Is(err, ErrNoConntrack) {
				b.Fatal(err)
			}
		}
	})
	b.Run("socket-per-lookup", func(b *testing.B) {
		tp.g.Do(func() error {
			for b.Loop() {
				c, err := OpenConntrack()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.OriginalSource(local, remote); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			return nil
		})
	})
	b.Run("peer-original-dst", func(b *testing.B) {
		for b.Loop() {
			if _, err := OriginalDst(sv); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestConntrackBusyBounded: a lookup that finds every socket in use (a
// burst of connections, or sockets held by lookups the kernel does not
// answer) gives up within its deadline with ErrConntrackTimeout, so the
// connection waiting on it is still decided (with the socket's port).
// Before, it waited for a free socket without bound: here, with every
// socket held, for ever.
func TestConntrackBusyBounded(t *testing.T) {
	tp := newRedirectTopo(t)
	ct := openConntrackIn(t, tp.g)
	var held []*ctSocket
	for range ConntrackSockets {
		held = append(held, <-ct.free)
	}
	if err := lookupWithin(t, ct, "with every socket busy"); !errors.Is(err, ErrConntrackTimeout) {
		t.Errorf("lookup with every socket busy: %v, want ErrConntrackTimeout", err)
	}
	for _, s := range held {
		ct.free <- s
	}
	// The sockets back: lookups work again.
	if _, err := ct.OriginalSource(netip.MustParseAddrPort("198.18.1.1:15001"), netip.MustParseAddrPort("198.18.1.2:1")); !errors.Is(err, ErrNoConntrack) {
		t.Errorf("lookup after the sockets came back: %v, want ErrNoConntrack", err)
	}
}

// TestConntrackNoAnswerBounded: a socket that never answers (here one end
// of a socketpair whose other end is never written, without the netlink
// sockets' SO_RCVTIMEO) fails the lookup within its deadline, with
// ErrConntrackTimeout, and puts the socket back for the next lookup.
func TestConntrackNoAnswerBounded(t *testing.T) {
	tp := newRedirectTopo(t)
	ct := openConntrackIn(t, tp.g)
	for _, s := range ct.all {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(s.fd)
		s.fd = fds[0]
		t.Cleanup(func() { unix.Close(fds[1]) })
	}
	for i := range 2 * ConntrackSockets {
		if err := lookupWithin(t, ct, fmt.Sprintf("%d on a socket that never answers", i)); !errors.Is(err, ErrConntrackTimeout) {
			t.Errorf("lookup %d on a socket that never answers: %v, want ErrConntrackTimeout", i, err)
		}
	}
}

// lookupWithin makes a lookup with no entry and returns its error; a
// lookup still waiting after 10 s fails the test (what names it).
func lookupWithin(t *testing.T, ct *Conntrack, what string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := ct.OriginalSource(netip.MustParseAddrPort("198.18.1.1:15001"), netip.MustParseAddrPort("198.18.1.2:1"))
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("a lookup %s still waits after 10 s", what)
		return nil
	}
}
