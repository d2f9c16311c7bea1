package nfq

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// flowWatch records, from the queue at the gateway's forward hook, the
// last segment of the client's to port 7001.
type flowWatch struct {
	mu   sync.Mutex
	last TCPSegment // without its payload
	l2   L2         // where it came from
}

func (w *flowWatch) get() (TCPSegment, L2) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last, w.l2
}

// TestInject: in a client - gateway - server topology, the gateway
// masquerading, the gateway injects a segment with payload that the client
// reads, then RSTs that reset the server's and the client's sockets, IPv4
// and IPv6; the sequence numbers and the client's link-layer address come
// from the queued segments, as the fast path takes them. To the client on
// the link layer (SegmentL2), to the server through the IP layer (its RST
// gets the connection's NAT).
func TestInject(t *testing.T) {
	cli := testnet.New(t, "nnfqcli")
	gw := testnet.New(t, "nnfqgw")
	srv := testnet.New(t, "nnfqsrv")
	testnet.Link(t, cli, "c0", []string{"192.0.2.1/24", "fd00:33::1/64"}, gw, "g0", []string{"192.0.2.254/24", "fd00:33::fe/64"})
	testnet.Link(t, gw, "g1", []string{"198.51.100.254/24", "fd00:34::fe/64"}, srv, "s0", []string{"198.51.100.2/24", "fd00:34::2/64"})
	cli.MustRun("ip", "route", "add", "default", "via", "192.0.2.254")
	cli.MustRun("ip", "-6", "route", "add", "default", "via", "fd00:33::fe")
	srv.MustRun("ip", "route", "add", "default", "via", "198.51.100.254")
	srv.MustRun("ip", "-6", "route", "add", "default", "via", "fd00:34::fe")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	gw.MustRun("nft", "add table inet nnfq")
	gw.MustRun("nft", "add chain inet nnfq in { type filter hook forward priority 0; policy accept; }")
	// The gateway masquerades, as egressd --masquerade does: the server
	// knows the client by the gateway's WAN address.
	gw.MustRun("nft", "add table inet nnfqnat")
	gw.MustRun("nft", "add chain inet nnfqnat post { type nat hook postrouting priority 100; policy accept; }")
	gw.MustRun("nft", "add rule inet nnfqnat post oifname g1 masquerade")
	tp := &topo{srv: gw}
	tp.queueRule(t, unix.IPPROTO_TCP, 7001, 12)
	gwLAN, _ := strconv.Atoi(gw.IfIndex(t, "g0"))
	var cliMAC [6]byte
	if err := cli.Do(func() error {
		ifi, err := net.InterfaceByName("c0")
		if err == nil {
			cliMAC = [6]byte(ifi.HardwareAddr)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c := tp.open(t, Config{Queue: 12})
	w := &flowWatch{}
	serve(c, func(p Packet) {
		if p.Hook != 2 {
			t.Errorf("queued at hook %d, want forward (2)", p.Hook)
		}
		if seg, err := ParseTCP(p.Data); err == nil {
			w.mu.Lock()
			w.last = TCPSegment{Src: seg.Src, Dst: seg.Dst, Seq: seg.Seq, Ack: seg.Ack, Flags: seg.Flags}
			w.l2 = L2Of(p)
			w.mu.Unlock()
		}
		c.Verdict(p.ID, Accept)
	})
	in, err := NewInjector("/var/run/netns/" + gw.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()

	for _, srvAddr := range []string{"198.51.100.2:7001", "[fd00:34::2]:7001"} {
		t.Run(srvAddr, func(t *testing.T) {
			ln, err := srv.Listen("tcp", srvAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			cc, err := cli.DialContext(context.Background(), "tcp", srvAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			sc, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			cc.SetDeadline(time.Now().Add(10 * time.Second))
			sc.SetDeadline(time.Now().Add(10 * time.Second))
			cc.Write([]byte("hello"))
			io.ReadFull(sc, make([]byte, 5))
			sc.Write([]byte("world"))
			io.ReadFull(cc, make([]byte, 5))
			// The client's ACK of "world" says the server's next
			// sequence number; its seq is the client's next.
			var last TCPSegment
			var l2 L2
			deadline := time.Now().Add(5 * time.Second)
			for {
				last, l2 = w.get()
				if last.Flags&ACK != 0 && last.Flags&PSH == 0 && last.Src.Addr().String() == cc.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String() && last.Src.Port() == cc.LocalAddr().(*net.TCPAddr).AddrPort().Port() {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no bare ack of the client's: %+v", last)
				}
				time.Sleep(10 * time.Millisecond)
			}
			client, server := last.Src, last.Dst
			if l2.IfIndex != gwLAN || l2.AddrLen != 6 || [6]byte(l2.Addr[:6]) != cliMAC {
				t.Fatalf("queued from %+v, want interface %d address %x", l2, gwLAN, cliMAC)
			}
			cliNext, srvNext := last.Seq, last.Ack

			// A segment with a wrong checksum is not read (were it,
			// the client would read "corrupt" below): the client's
			// stack checks checksums, so the injected ones are right.
			bad, _ := BuildTCP(server, client, srvNext, cliNext, PSH|ACK, []byte("corrupt"))
			bad[len(bad)-1] ^= 0xff
			proto := uint16(unix.ETH_P_IPV6)
			if client.Addr().Is4() {
				proto = unix.ETH_P_IP
			}
			if err := unix.Sendto(in.fdL2, bad, 0, &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: l2.IfIndex, Halen: 6, Addr: l2.Addr}); err != nil {
				t.Fatal(err)
			}
			if err := in.SegmentL2(l2, server, client, srvNext, cliNext, PSH|ACK, []byte("injected")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 16)
			n, err := cc.Read(buf)
			if err != nil || string(buf[:n]) != "injected" {
				t.Fatalf("client read %q, %v; want the injected payload", buf[:n], err)
			}

			if err := in.Reset(client, server, cliNext, srvNext); err != nil {
				t.Fatal(err)
			}
			if _, err := sc.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("server read after an injected rst: %v", err)
			}
			if err := in.ResetL2(l2, server, client, srvNext+uint32(len("injected")), cliNext); err != nil {
				t.Fatal(err)
			}
			if _, err := cc.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("client read after an injected rst: %v", err)
			}
		})
	}
}

// TestInjectUnderEnforce: egressd's enforce ruleset (the firewall's golden
// file, installed as nft lists it) does not stop injected segments: it has
// no output chain, and its prerouting, input and forward chains do not
// see locally generated packets. From the gateway, a segment in the
// client's name reaches the server through wan0 and one in the server's
// name reaches the client through lan0, IPv4 and IPv6.
func TestInjectUnderEnforce(t *testing.T) {
	cli := testnet.New(t, "nnfqcli")
	gw := testnet.New(t, "nnfqgw")
	srv := testnet.New(t, "nnfqsrv")
	testnet.Link(t, cli, "c0", []string{"192.0.2.1/24", "fd00:33::1/64"}, gw, "lan0", []string{"192.0.2.254/24", "fd00:33::fe/64"})
	testnet.Link(t, gw, "wan0", []string{"198.51.100.254/24", "fd00:34::fe/64"}, srv, "s0", []string{"198.51.100.2/24", "fd00:34::2/64"})
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	gw.MustRun("nft", "-f", "../../firewall/testdata/enforce.nft")
	for _, ns := range []*testnet.NS{cli, srv} {
		ns.MustRun("nft", "add table inet nnfq")
		ns.MustRun("nft", "add chain inet nnfq in { type filter hook input priority -10; policy accept; }")
		ns.MustRun("nft", "add rule inet nnfq in tcp sport 7001 counter")
		ns.MustRun("nft", "add rule inet nnfq in tcp dport 7001 counter")
	}
	in, err := NewInjector("/var/run/netns/" + gw.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	for _, a := range [][2]string{{"192.0.2.1:40000", "198.51.100.2:7001"}, {"[fd00:33::1]:40000", "[fd00:34::2]:7001"}} {
		client, server := netip.MustParseAddrPort(a[0]), netip.MustParseAddrPort(a[1])
		if err := in.Segment(client, server, 1000, 2000, ACK, []byte("to the server")); err != nil {
			t.Fatal(err)
		}
		if err := in.Reset(server, client, 2000, 1000); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		ns   *testnet.NS
		rule string
	}{{srv, "tcp dport 7001 counter packets 2 "}, {cli, "tcp sport 7001 counter packets 2 "}} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			out := c.ns.MustRun("nft", "list chain inet nnfq in")
			if strings.Contains(out, c.rule) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: want %q (IPv4 and IPv6):\n%s\ngateway:\n%s", c.ns.Name, c.rule, out, gw.MustRun("nft", "list table inet egressd"))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
