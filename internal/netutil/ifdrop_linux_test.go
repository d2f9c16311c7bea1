package netutil

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// TestDropFromInterface: a UDP socket and a TCP listener with the filter
// for one interface (wan) get nothing that arrives on it, whatever the
// address it was sent to (here the other interface's: the host answers
// for every address on every interface), and everything that arrives on
// the other interface (lan) or on loopback; IPv4 and IPv6.
func TestDropFromInterface(t *testing.T) {
	peer := testnet.New(t, "ifdp")
	host := testnet.New(t, "ifdh")
	testnet.Link(t, peer, "eth0", []string{"198.18.10.1/24", "2001:db8:10::1/64"}, host, "lan", []string{"198.18.10.2/24", "198.18.10.3/24", "2001:db8:10::2/64", "2001:db8:12::3/64"})
	testnet.Link(t, peer, "eth1", []string{"198.18.11.1/24", "2001:db8:11::1/64"}, host, "wan", []string{"198.18.11.2/24", "2001:db8:11::2/64"})
	// The peer reaches the host's second LAN addresses over the WAN link
	// (the IPv6 one in a prefix of its own, so that the host does not pick
	// it as the source of its answers to the peer's LAN address).
	peer.MustRun("ip", "route", "add", "198.18.10.3/32", "dev", "eth1")
	peer.MustRun("ip", "-6", "route", "add", "2001:db8:12::3/128", "dev", "eth1")
	host.MustRun("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
	host.MustRun("sysctl", "-qw", "net.ipv4.conf.wan.rp_filter=0")

	for _, fam := range []struct{ network, wild, lan, wan, lanViaWAN, lo string }{
		{"4", "0.0.0.0", "198.18.10.2", "198.18.11.2", "198.18.10.3", "127.0.0.1"},
		{"6", "::", "2001:db8:10::2", "2001:db8:11::2", "2001:db8:12::3", "::1"},
	} {
		t.Run("ipv"+fam.network, func(t *testing.T) {
			var pc net.PacketConn
			var ln net.Listener
			err := host.Do(func() error {
				wan, err := net.InterfaceByName("wan")
				if err != nil {
					return err
				}
				lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error { return DropFromInterface(rc, wan.Index) }}
				if pc, err = lc.ListenPacket(context.Background(), "udp"+fam.network, net.JoinHostPort(fam.wild, "5353")); err != nil {
					return err
				}
				ln, err = lc.Listen(context.Background(), "tcp"+fam.network, net.JoinHostPort(fam.wild, "5353"))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			defer ln.Close()
			go func() {
				buf := make([]byte, 512)
				for {
					n, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(buf[:n], from)
				}
			}()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Write([]byte("hi"))
					c.Close()
				}
			}()
			for _, c := range []struct {
				ns   *testnet.NS
				to   string
				want bool
			}{
				{peer, fam.lan, true},
				{peer, fam.wan, false},
				{peer, fam.lanViaWAN, false},
				{host, fam.lo, true},
				{host, fam.wan, true}, // from the host itself: over loopback
			} {
				to := net.JoinHostPort(c.to, "5353")
				if got := udpAnswered(t, c.ns, to); got != c.want {
					t.Errorf("udp from %s to %s: answered %v, want %v", c.ns.Name, to, got, c.want)
				}
				if got := tcpAnswered(t, c.ns, to); got != c.want {
					t.Errorf("tcp from %s to %s: answered %v, want %v", c.ns.Name, to, got, c.want)
				}
			}
		})
	}
}

// udpAnswered sends a datagram (three tries) and reports whether the echo
// came back within 300ms of one.
func udpAnswered(t *testing.T, ns *testnet.NS, to string) bool {
	t.Helper()
	c, err := ns.DialContext(context.Background(), "udp", to)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 16)
	for range 3 {
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == "ping" {
			return true
		} else if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("udp to %s: %v", to, err)
		}
	}
	return false
}

// tcpAnswered connects (1.5s at most: a SYN the filter drops gets no
// SYN-ACK, and the connect times out) and reports whether the greeting
// came.
func tcpAnswered(t *testing.T, ns *testnet.NS, to string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", to)
	if err != nil {
		if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
			t.Fatalf("tcp to %s: %v (want an answer or a timeout)", to, err)
		}
		return false
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 2)
	n, _ := c.Read(buf)
	return n == 2
}

// TestDropFromInterfaceDetach: index zero takes the filter off (and is
// no error on a socket without one); a negative index is an error.
func TestDropFromInterfaceDetach(t *testing.T) {
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, _ := c.(*net.UDPConn).SyscallConn()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := DropFromInterface(rc, 0); err != nil {
		t.Errorf("detach without a filter: %v", err)
	}
	if err := DropFromInterface(rc, -3); err == nil {
		t.Error("index -3: no error")
	}
	echoed := func() bool {
		if _, err := c.WriteTo([]byte("x"), c.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, _, err := c.ReadFrom(make([]byte, 4))
		return err == nil
	}
	if err := DropFromInterface(rc, lo.Index); err != nil {
		t.Fatal(err)
	}
	if echoed() {
		t.Error("a datagram to itself over loopback got through the loopback filter")
	}
	if err := DropFromInterface(rc, 0); err != nil {
		t.Fatal(err)
	}
	if !echoed() {
		t.Error("no datagram got through once the filter was taken off")
	}
}

// TestDropFromInterfaceTCPListener: a plain TCP listener takes the filter
// once listening (egressd run attaches it when the WAN interface appears
// or changes); an MPTCP one, Go's default where the kernel has MPTCP,
// refuses it, which the error says.
func TestDropFromInterfaceTCPListener(t *testing.T) {
	for _, mptcp := range []bool{false, true} {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(mptcp)
		ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		rc, _ := ln.(*net.TCPListener).SyscallConn()
		err = DropFromInterface(rc, 1<<20)
		var proto int
		rc.Control(func(fd uintptr) { proto, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) })
		isMPTCP := proto == unix.IPPROTO_MPTCP
		switch {
		case !isMPTCP && err != nil:
			t.Errorf("plain TCP listener: %v", err)
		case isMPTCP && (err == nil || !strings.Contains(err.Error(), "MPTCP")):
			t.Errorf("MPTCP listener: %v, want an error naming MPTCP", err)
		}
		t.Logf("mptcp asked %v, got %v: %v", mptcp, isMPTCP, err)
	}
}

// TestDropFromInterfaceErrSocketFilter: a filter the kernel refuses is
// ErrSocketFilter, with the kernel's errno still inside, so that egressd
// run can tell a refused filter from a refused bind (a kernel that asks
// CAP_NET_ADMIN for SO_ATTACH_FILTER fails the listen of a high port with
// EPERM, which run took for a port below 1024).
func TestDropFromInterfaceErrSocketFilter(t *testing.T) {
	err := DropFromInterfaceFD(-1, 1)
	if !errors.Is(err, ErrSocketFilter) || !errors.Is(err, unix.EBADF) {
		t.Fatalf("DropFromInterfaceFD(-1, 1) = %v; want ErrSocketFilter wrapping EBADF", err)
	}
	if got, want := err.Error(), "netutil: socket filter: bad file descriptor"; got != want {
		t.Errorf("error %q, want %q (the wording run's lines quote)", got, want)
	}
}
