package firewall

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/policy"
)

// fastTopoPorts is fastTopo with Config.TCPPorts 443: forward has accept
// rules of its own for TCP 443 (rule web's learned addresses), and
// 198.18.2.2 is learned for rule web, as it would be for a client the
// fast path lets out to it.
func fastTopoPorts(t *testing.T, num uint16) (*topo, *atomic.Int32) {
	t.Helper()
	tp, fw, proxied := fastTopoWith(t, Config{FastPath: true, FastPathQueue: num, TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}})
	if err := fw.LearnAll(context.Background(), []Address{{Rule: "web", Addr: netip.MustParseAddr("198.18.2.2"), TTL: time.Minute,
		Client: netip.MustParseAddr("198.18.1.2"), Name: "www.example.test"}}); err != nil {
		t.Fatal(err)
	}
	return tp, proxied
}

// csum is the Internet checksum of b, folded from sum.
func csum(sum uint32, b []byte) uint16 {
	for ; len(b) >= 2; b = b[2:] {
		sum += uint32(binary.BigEndian.Uint16(b))
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// withSACK is the IPv4 TCP segment pkt with payload instead of its own
// and a SACK option appended whose block claims bytes of the server's
// that it never sent (past the segment's ack): conntrack's window check
// ("ACK is over upper bound") finds the segment invalid, the server's TCP
// ignores the block and reads the payload.
func withSACK(t *testing.T, pkt []byte, payload []byte) []byte {
	t.Helper()
	ihl := int(pkt[0]&0xf) * 4
	tcp := pkt[ihl:]
	doff := int(tcp[12]>>4) * 4
	ack := binary.BigEndian.Uint32(tcp[8:])
	opts := append([]byte(nil), tcp[20:doff]...)
	opts = append(opts, 1, 1, 5, 10)
	opts = binary.BigEndian.AppendUint32(opts, ack+1000)
	opts = binary.BigEndian.AppendUint32(opts, ack+2000)
	if len(opts)%4 != 0 || 20+len(opts) > 60 {
		t.Fatalf("options of %d bytes", len(opts))
	}
	h := append([]byte(nil), tcp[:20]...)
	h[12] = byte((20+len(opts))/4) << 4
	h[16], h[17] = 0, 0
	seg := append(append(h, opts...), payload...)
	ip := append([]byte(nil), pkt[:20]...)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(seg)))
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], csum(0, ip))
	pseudo := append(append([]byte(nil), ip[12:20]...), 0, unix.IPPROTO_TCP, byte(len(seg)>>8), byte(len(seg)))
	var sum uint32
	for b := pseudo; len(b) >= 2; b = b[2:] {
		sum += uint32(binary.BigEndian.Uint16(b))
	}
	binary.BigEndian.PutUint16(seg[16:], csum(sum, seg))
	return append(ip, seg...)
}

// sendRaw sends the IPv4 packet pkt as it is from the client's namespace.
func (tp *topo) sendRaw(t *testing.T, pkt []byte) {
	t.Helper()
	err := tp.client.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		to := &unix.SockaddrInet4{}
		copy(to.Addr[:], pkt[16:20])
		return unix.Sendto(fd, pkt, 0, to)
	})
	if err != nil {
		t.Fatalf("raw send: %v", err)
	}
}

// TestFastPathInvalidNotForwarded: a pending connection's payload never
// reaches the server without a verdict, not even in a segment conntrack
// finds invalid (here a SACK block past what the server sent): such a
// packet has no conntrack entry, so no ct mark "pending" either, and must
// not fall through to forward's accept rules of TCP ports
// (Config.TCPPorts) that the server's address matches. (It does not:
// their masked ct mark set reads the ct mark, which without an entry
// ends the rule, and the packet meets the LAN's drop.)
func TestFastPathInvalidNotForwarded(t *testing.T) {
	const num = 46
	tp, proxied := fastTopoPorts(t, num)
	s := tp.fastServer(t, "198.18.2.2:443")
	q := tp.openTestQueue(t, num)
	_, data := pendingConn(t, tp, q, "198.18.2.2:443")
	if n := proxied.Load(); n != 0 {
		t.Fatalf("the proxy got %d connections", n)
	}
	// The held segment, its payload replaced, with a bogus SACK block.
	tp.sendRaw(t, withSACK(t, data.pkt, []byte("EVIL")))
	time.Sleep(time.Second)
	if n := s.read.Load(); n != 0 {
		t.Fatalf("the server read %d bytes of a pending connection without a verdict (an invalid segment went out)", n)
	}
}

// TestFastPathTupleReuse: a new connection on the 5-tuple of a
// fast-allowed one is decided again. After the server resets the
// connection, conntrack keeps its entry (state CLOSE, 10 s) and lets a
// new SYN from the client through it as "ignored" (it is not a new
// connection to nftables, and it keeps the ct mark fast-allowed); the
// server's SYN-ACK puts conntrack back in sync. That SYN must not reach
// the server undecided: it is queued, or dropped (the client's dial
// fails or waits for a retransmission after the entry expires).
func TestFastPathTupleReuse(t *testing.T) {
	const num = 47
	tp, _, proxied := fastTopo(t, num)
	var accepted atomic.Int32
	ln, err := tp.server.Listen("tcp", "198.18.2.2:443")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) {
		accepted.Add(1)
		buf := make([]byte, 16)
		c.Read(buf)
		// Reset: close with unread data and a zero linger.
		c.(*net.TCPConn).SetLinger(0)
	})
	q := tp.openTestQueue(t, num)
	m := FastMarks(Config{})
	dial := func() chan net.Conn {
		ch := make(chan net.Conn, 1)
		go func() {
			var c net.Conn
			tp.client.Do(func() (err error) {
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("198.18.1.2"), Port: 41000}, Timeout: 5 * time.Second}
				c, err = d.Dial("tcp", "198.18.2.2:443")
				return err
			})
			ch <- c
		}()
		return ch
	}
	ch := dial()
	syn := q.next(t, "SYN")
	q.verdict(t, syn.id, nfAccept, int64(syn.mark&^m.Mask|m.Pending))
	conn := connOf(t, ch)
	conn.Write([]byte("first"))
	data := q.next(t, "first data")
	q.verdict(t, data.id, nfRepeat, int64(data.mark&^m.Mask|m.Allowed))
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Fatal("the server did not reset the first connection")
	}
	conn.Close()
	if n := accepted.Load(); n != 1 {
		t.Fatalf("server accepted %d, want 1", n)
	}
	// The same 5-tuple at once.
	ch = dial()
	select {
	case p := <-q.C:
		if !p.syn || p.ack {
			t.Fatalf("queued %+v, want the new SYN", p)
		}
		q.verdict(t, p.id, nfDrop, -1)
	case c := <-ch:
		if c == nil && accepted.Load() == 1 {
			// Dropped, not queued: nothing went out undecided.
			if n := counterOf(t, tp, "fast path: a new SYN on a decided connection's 5-tuple"); n == 0 {
				t.Error("the SYN was not dropped by the fast path's rule")
			}
			break
		}
		if c != nil {
			c.Close()
		}
		t.Fatalf("a new connection on a fast-allowed connection's 5-tuple went out undecided (server accepted %d, proxy %d); its SYN was never queued", accepted.Load(), proxied.Load())
	case <-time.After(6 * time.Second):
		t.Fatal("neither queued nor connected")
	}
}
