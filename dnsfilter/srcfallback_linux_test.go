package dnsfilter

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// TestAnswerFromRefusedSource: an answer whose source the kernel refuses
// (an address no interface has: the one its query was sent to, removed
// since) goes again from the kernel's choice of source, on every way an
// answer leaves: one at a time (writeAnswer), in a sendmmsg batch of an
// x/net socket or of a raw one (sendBatch: the asynchronous misses'
// answers), and in a raw reader's own batch (rawOut.sendAll: the fast
// path's answers). The batches carry a good answer before and after the
// refused one. Real sockets in a namespace of the test's own.
func TestAnswerFromRefusedSource(t *testing.T) {
	ns := testnet.New(t, "srcref")
	s := new(Server)
	for _, fam := range []struct {
		network, lo string
		gone        netip.Addr
	}{{"udp4", "127.0.0.1:0", netip.MustParseAddr("192.0.2.99")}, {"udp6", "[::1]:0", netip.MustParseAddr("2001:db8::99")}} {
		listen := func() *net.UDPConn {
			var c *net.UDPConn
			if err := ns.Do(func() error {
				pc, err := net.ListenPacket(fam.network, fam.lo)
				if err == nil {
					c = pc.(*net.UDPConn)
				}
				return err
			}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
		rc := listen()
		dst := rc.LocalAddr().(*net.UDPAddr).AddrPort()
		from := answerFrom{addr: fam.gone}
		paths := map[string]func(c *net.UDPConn, bs [][]byte){
			"writeAnswer": func(c *net.UDPConn, bs [][]byte) {
				for _, b := range bs {
					writeAnswer(c, b, dst, from)
				}
			},
			"sendBatch": func(c *net.UDPConn, bs [][]byte) {
				var bm batchMsgs
				for i, b := range bs {
					bm.add(b, dst, fromFor(i, from))
				}
				s.sendBatch(batchConnFor(c), bm.ms)
			},
		}
		if fam.network == "udp4" && rawSupported {
			raw := func(c *net.UDPConn) *rawUDP {
				r, err := rawFrom(c)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = r.Close() })
				return r
			}
			paths["raw writeAnswer"] = func(c *net.UDPConn, bs [][]byte) {
				r := raw(c)
				for _, b := range bs {
					writeAnswer(r, b, dst, from)
				}
			}
			paths["raw sendBatch"] = func(c *net.UDPConn, bs [][]byte) {
				var bm batchMsgs
				for i, b := range bs {
					bm.add(b, dst, fromFor(i, from))
				}
				s.sendBatch(raw(c), bm.ms)
			}
			paths["raw sendAll"] = func(c *net.UDPConn, bs [][]byte) {
				r := raw(c)
				o := new(rawOut)
				name := sockaddr4(dst)
				for i, b := range bs {
					o.set(i, b, (*byte)(unsafe.Pointer(&name)), unix.SizeofSockaddrInet4, fromFor(i, from).put(o.ctl[i][:]))
				}
				o.sendAll(r, len(bs))
			}
		}
		for name, send := range paths {
			t.Run(fam.network+"/"+name, func(t *testing.T) {
				c := listen()
				want := c.LocalAddr().(*net.UDPAddr).AddrPort()
				var bs [][]byte
				for i := range 3 {
					bs = append(bs, fmt.Appendf(nil, "%s %s %d", fam.network, name, i))
				}
				send(c, bs)
				buf := make([]byte, 512)
				for _, b := range bs {
					_ = rc.SetReadDeadline(time.Now().Add(3 * time.Second))
					n, src, err := rc.ReadFromUDPAddrPort(buf)
					if err != nil {
						t.Fatalf("%q: not received: %v", b, err)
					}
					if !bytes.Equal(buf[:n], b) || src != want {
						t.Fatalf("received %q from %v, want %q from %v", buf[:n], src, b, want)
					}
				}
			})
		}
	}
}

// fromFor is the source of the i-th datagram of a test batch: the
// refused f for the middle one, the kernel's choice for the others.
func fromFor(i int, f answerFrom) answerFrom {
	if i == 1 {
		return f
	}
	return answerFrom{}
}

// TestWriteAnswerAllocs: an answer sent on its own from the address asked
// (one-per-call readers, the general path, misses on listeners without
// sendmmsg) allocates nothing, on a netpoller socket and on a raw one:
// the control data lives on the stack.
func TestWriteAnswerAllocs(t *testing.T) {
	ns := testnet.New(t, "srcalloc")
	var rc, c, c2 *net.UDPConn
	if err := ns.Do(func() error {
		for _, p := range []**net.UDPConn{&rc, &c, &c2} {
			pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				return err
			}
			*p = pc.(*net.UDPConn)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	defer c.Close()
	conns := map[string]udpConn{"netpoller": c}
	if rawSupported {
		r, err := rawFrom(c2)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		conns["raw"] = r
	} else {
		defer c2.Close()
	}
	dst := rc.LocalAddr().(*net.UDPAddr).AddrPort()
	from := answerFrom{addr: netip.MustParseAddr("127.0.0.1")}
	b := []byte("answer")
	for name, conn := range conns {
		if n := testing.AllocsPerRun(100, func() { writeAnswer(conn, b, dst, from) }); n != 0 {
			t.Errorf("%s: writeAnswer allocates %v times an answer, want 0", name, n)
		}
	}
}

// TestAnswerAfterAddressRemoved: a query to a LAN address that is removed
// while the upstream is asked (the asynchronous miss path: its answers
// leave together, with sendmmsg on batching readers) is still answered,
// from the address the kernel picks, on every kind of reader.
func TestAnswerAfterAddressRemoved(t *testing.T) {
	gw := testnet.New(t, "rmgw")
	cl := testnet.New(t, "rmcl")
	testnet.Link(t, gw, "lan0", []string{"192.0.2.1/24", "fd00:19::1/64"}, cl, "eth0", []string{"192.0.2.10/24", "fd00:19::10/64"})
	procsAtLeast(t, 2)
	up := newFakeUpstream(t, "v4.allowed.test. 300 IN A 192.0.2.10\nv6.allowed.test. 300 IN A 192.0.2.11")
	var gone atomic.Pointer[string] // the address to remove before answering ("ip addr del" arguments)
	removeFirst := func(*dns.Msg, string) {
		if a := gone.Swap(nil); a != nil {
			_, _ = gw.Run("ip", "addr", "del", *a, "dev", "lan0") // the answer tells whether it went
		}
	}
	up.mangle.Store(&removeFirst)
	for _, tc := range []struct {
		name    string
		raw     bool
		noBatch bool
	}{{"raw", true, false}, {"batch", false, false}, {"one-per-call", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(Config{Listen: []string{"[::]:0"}, Upstreams: []string{up.Addr}, UDPReaders: 1, UDPRawReads: tc.raw, noBatch: tc.noBatch, ClientRate: -1},
				Deps{Policy: compile(t, enforcePolicy), Sink: &recSink{}})
			if err != nil {
				t.Fatal(err)
			}
			runServer(t, s, gw)
			port := s.Addrs()[0].Port()
			var pc net.PacketConn
			if err := cl.Do(func() (err error) { pc, err = net.ListenPacket("udp", "[::]:0"); return }); err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			uc := pc.(*net.UDPConn)
			for _, a := range []struct{ name, asked, prefix, left string }{
				{"v4.allowed.test.", "192.0.2.2", "192.0.2.2/24", "192.0.2.1"},
				{"v6.allowed.test.", "fd00:19::2", "fd00:19::2/64", "fd00:19::1"},
			} {
				_, _ = gw.Run("ip", "addr", "del", a.prefix, "dev", "lan0")
				gw.MustRun("ip", "addr", "add", a.prefix, "dev", "lan0", "nodad")
				gw.WaitAddr(t, a.asked)
				gone.Store(&a.prefix)
				t.Cleanup(func() { gone.Store(nil) })
				m := new(dns.Msg).SetQuestion(a.name, dns.TypeA) // not in this server's cache: the miss path
				wire, _ := m.Pack()
				if _, err := uc.WriteToUDPAddrPort(wire, netip.AddrPortFrom(netip.MustParseAddr(a.asked), port)); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 1500)
				_ = uc.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, from, err := uc.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("query to %s, removed meanwhile: no answer: %v", a.asked, err)
				}
				r := new(dns.Msg)
				if err := r.Unpack(buf[:n]); err != nil || r.Id != m.Id {
					t.Fatalf("answer %v (%v), want id %d", r, err, m.Id)
				}
				if got := from.Addr().Unmap(); got.String() != a.left {
					t.Errorf("answered from %v, want %s (the address left)", got, a.left)
				}
				if gone.Load() != nil {
					t.Errorf("answered before the upstream was asked: not the miss path")
				}
			}
		})
	}
}
