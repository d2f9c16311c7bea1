package firewall

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
	"egressd/policy"
)

// The test topology: a client, the gateway and a server ("the internet"),
// each a network namespace:
//
//	client eth0 198.18.1.2 2001:db8:1::2 ── lan0 198.18.1.1 2001:db8:1::1  gateway
//	gateway wan0 198.18.2.1 2001:db8:2::1 ── eth0 198.18.2.2-.4 2001:db8:2::2-3  server
//
// The gateway forwards; the firewall under test is installed in its
// namespace, and its "proxy" and "forwarder" are test listeners there.
type topo struct {
	client, gw, server *testnet.NS
	nsPath             string
}

const (
	proxyPort = 15001
	dnsPort   = 5353
	udpPort   = 9000
)

func newTopo(t *testing.T) *topo {
	t.Helper()
	tp := &topo{client: testnet.New(t, "fwc"), gw: testnet.New(t, "fwg"), server: testnet.New(t, "fws")}
	testnet.Link(t, tp.client, "eth0", []string{"198.18.1.2/24", "2001:db8:1::2/64"},
		tp.gw, "lan0", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	testnet.Link(t, tp.gw, "wan0", []string{"198.18.2.1/24", "2001:db8:2::1/64"},
		tp.server, "eth0", []string{"198.18.2.2/24", "198.18.2.3/24", "198.18.2.4/24", "2001:db8:2::2/64", "2001:db8:2::3/64"})
	tp.client.MustRun("ip", "route", "add", "default", "via", "198.18.1.1")
	tp.client.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
	tp.server.MustRun("ip", "route", "add", "198.18.1.0/24", "via", "198.18.2.1")
	tp.server.MustRun("ip", "-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8:2::1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	tp.nsPath = "/var/run/netns/" + tp.gw.Name
	return tp
}

func requireNft(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("nft (Debian package nftables) is not installed: %v", err)
	}
}

const testPolicy = `
version: 1
mode: enforce
rules:
  - name: udp-net
    to: [198.18.2.2/32, "2001:db8:2::2/128"]
    ports: [9000/udp]
  - name: udp-name
    to: [ntp.test]
    ports: [9000/udp]
  - name: quic-ok
    to: [198.18.2.3]
    ports: [443/udp]
  - name: web
    to: ["*.example.test"]
    ports: [443/tcp]
`

func compile(t testing.TB, src string) *policy.Engine {
	t.Helper()
	eng, err := policy.Compile("test.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

func (tp *topo) firewall(t *testing.T, cfg Config) *Firewall {
	t.Helper()
	return tp.firewallWith(t, cfg, Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
}

// firewallWith is firewall with the given collaborators.
func (tp *topo) firewallWith(t *testing.T, cfg Config, deps Deps) *Firewall {
	t.Helper()
	cfg.NetNS = tp.nsPath
	if len(cfg.LANs) == 0 {
		cfg.LANs = []string{"lan0"}
	}
	if cfg.WAN == "" {
		cfg.WAN = "wan0"
	}
	if cfg.ProxyPort == 0 {
		cfg.ProxyPort = proxyPort
	}
	if cfg.DNSPort == 0 {
		cfg.DNSPort = dnsPort
	}
	fw, err := New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	return fw
}

// serve runs fn for every connection accepted on ln until the test ends.
func serve(t *testing.T, ln net.Listener, fn func(net.Conn)) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); c.SetDeadline(time.Now().Add(10 * time.Second)); fn(c) }()
		}
	}()
}

// udpEcho answers every datagram with "PAYLOAD from SENDER" until the test
// ends.
func udpEcho(t *testing.T, pc net.PacketConn) {
	testnet.UDPEcho(t, pc, func(p []byte, from net.Addr) []byte { return fmt.Appendf(nil, "%s from %s", p, from) })
}

// origDst reads the original destination of a redirected connection
// (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST for IPv6: both option 80).
func origDst(c net.Conn) (netip.AddrPort, error) {
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	v6 := c.LocalAddr().(*net.TCPAddr).IP.To4() == nil
	var ap netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		var buf [28]byte // sockaddr_in6
		n := uint32(len(buf))
		level := unix.SOL_IP
		if v6 {
			level = unix.SOL_IPV6
		}
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), 80, uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		if e != 0 {
			serr = e
			return
		}
		port := uint16(buf[2])<<8 | uint16(buf[3])
		if v6 {
			ap = netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port)
		} else {
			ap = netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port)
		}
	})
	if err == nil {
		err = serr
	}
	return ap, err
}

// proxyStandIn is the gateway's "transparent proxy": it answers every
// connection with the original destination it read.
func (tp *topo) proxyStandIn(t *testing.T) net.Listener {
	t.Helper()
	ln, err := tp.gw.Listen("tcp", fmt.Sprintf("[::]:%d", proxyPort))
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) {
		od, err := origDst(c)
		if err != nil {
			fmt.Fprintf(c, "error %v\n", err)
			return
		}
		fmt.Fprintf(c, "proxy orig=%s\n", od)
	})
	return ln
}

// dnsStandIn is the gateway's "forwarder", on UDP and TCP.
func (tp *topo) dnsStandIn(t *testing.T) (net.PacketConn, net.Listener) {
	t.Helper()
	pc, err := tp.gw.ListenPacket("udp", fmt.Sprintf("[::]:%d", dnsPort))
	if err != nil {
		t.Fatal(err)
	}
	udpEcho(t, pc)
	ln, err := tp.gw.Listen("tcp", fmt.Sprintf("[::]:%d", dnsPort))
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) { fmt.Fprintf(c, "forwarder tcp\n") })
	return pc, ln
}

// tcpLine dials addr from ns and reads one line.
func tcpLine(ns *testnet.NS, addr string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	return bufio.NewReader(c).ReadString('\n')
}

// udpAsk sends one datagram from a fresh socket (a new flow) and waits for
// the answer.
func udpAsk(ns *testnet.NS, addr string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("ping")); err != nil {
		return "", err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// serverUDP starts echo servers on the server's addresses.
func (tp *topo) serverUDP(t *testing.T, addrs ...string) {
	t.Helper()
	for _, a := range addrs {
		pc, err := tp.server.ListenPacket("udp", a)
		if err != nil {
			t.Fatal(err)
		}
		udpEcho(t, pc)
	}
}

func (tp *topo) serverTCP(t *testing.T, addr string) {
	t.Helper()
	ln, err := tp.server.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) { fmt.Fprintf(c, "server saw %s\n", c.RemoteAddr()) })
}

func TestEnforce(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	proxyLn := tp.proxyStandIn(t)
	dnsPC, dnsLn := tp.dnsStandIn(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "198.18.2.4:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000",
		"198.18.2.2:443", "198.18.2.3:443", "198.18.2.2:853", "[2001:db8:2::2]:443")
	// Something real on the server's port 80: a redirect that did not
	// happen would reach it and say so.
	tp.serverTCP(t, "[::]:80")

	fw := tp.firewall(t, Config{MinTTL: time.Second, WANOpen: []policy.PortRange{{Lo: 2225, Hi: 2225, Proto: policy.TCP}}})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	if out := tp.gw.MustRun("nft", "list", "table", "inet", "egressd"); !strings.Contains(out, `redirect to :15001`) {
		t.Fatalf("installed table has no redirect:\n%s", out)
	}

	t.Run("tcp redirected to the proxy", func(t *testing.T) {
		for _, dst := range []string{"198.18.2.2:80", "[2001:db8:2::2]:80", "203.0.113.7:443", "[2001:db8:2::99]:22"} {
			line, err := tcpLine(tp.client, dst, 5*time.Second)
			if err != nil {
				t.Fatalf("%s: %v", dst, err)
			}
			if want := "proxy orig=" + dst + "\n"; line != want {
				t.Errorf("%s: got %q, want %q", dst, line, want)
			}
		}
	})

	t.Run("dns redirected to the forwarder", func(t *testing.T) {
		for _, dst := range []string{"203.0.113.53:53", "198.18.2.2:53", "[2001:db8:2::53]:53"} {
			got, err := udpAsk(tp.client, dst, 3*time.Second)
			if err != nil {
				t.Fatalf("udp %s: %v", dst, err)
			}
			if !strings.HasPrefix(got, "ping from ") {
				t.Errorf("udp %s: got %q", dst, got)
			}
			line, err := tcpLine(tp.client, dst, 3*time.Second)
			if err != nil || line != "forwarder tcp\n" {
				t.Errorf("tcp %s: got %q, %v", dst, line, err)
			}
		}
	})

	t.Run("udp by cidr", func(t *testing.T) {
		for _, dst := range []string{"198.18.2.2:9000", "[2001:db8:2::2]:9000"} {
			if got, err := udpAsk(tp.client, dst, 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from 198.18.1.2:") && !strings.HasPrefix(got, "ping from [2001:db8:1::2]:") {
				t.Errorf("allowed %s: got %q, %v", dst, got, err)
			}
		}
		for _, dst := range []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000"} {
			if got, err := udpAsk(tp.client, dst, 700*time.Millisecond); !isTimeout(err) {
				t.Errorf("denied %s: got %q, %v; want a timeout (dropped)", dst, got, err)
			}
		}
	})

	t.Run("learned address opens until its timeout", func(t *testing.T) {
		const dst = "198.18.2.4:9000"
		if got, err := udpAsk(tp.client, dst, 700*time.Millisecond); !isTimeout(err) {
			t.Fatalf("before learning: got %q, %v; want a timeout", got, err)
		}
		// Another rule's name does not open it.
		if err := fw.Learn("web", netip.MustParseAddr("198.18.2.4"), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if got, err := udpAsk(tp.client, dst, 700*time.Millisecond); !isTimeout(err) {
			t.Fatalf("learned for a TCP-only rule: got %q, %v; want a timeout", got, err)
		}
		learnedAt := time.Now()
		if err := fw.Learn("udp-name", netip.MustParseAddr("198.18.2.4"), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if got, err := udpAsk(tp.client, dst, 1*time.Second); err != nil {
			t.Fatalf("after learning: %v", err)
		} else if !strings.HasPrefix(got, "ping from 198.18.1.2:") {
			t.Fatalf("after learning: got %q", got)
		}
		if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name"); !strings.Contains(out, "198.18.2.4") {
			t.Errorf("set does not show the address:\n%s", out)
		}
		time.Sleep(time.Until(learnedAt.Add(2500 * time.Millisecond)))
		if got, err := udpAsk(tp.client, dst, 700*time.Millisecond); !isTimeout(err) {
			t.Fatalf("after the timeout: got %q, %v; want a timeout", got, err)
		}
		// A refresh extends an address already in the set.
		if err := fw.Learn("udp-name", netip.MustParseAddr("198.18.2.4"), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond)
		if err := fw.Learn("udp-name", netip.MustParseAddr("198.18.2.4"), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1200 * time.Millisecond) // past the first timeout, within the second
		if _, err := udpAsk(tp.client, dst, 1*time.Second); err != nil {
			t.Fatalf("after a refresh: %v", err)
		}
	})

	t.Run("quic and dot rejected unless allowed", func(t *testing.T) {
		for _, dst := range []string{"198.18.2.2:443", "198.18.2.2:853", "[2001:db8:2::2]:443"} {
			got, err := udpAsk(tp.client, dst, 3*time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("%s: got %q, %v; want connection refused (rejected)", dst, got, err)
			}
		}
		if got, err := udpAsk(tp.client, "198.18.2.3:443", 3*time.Second); err != nil {
			t.Errorf("allowed QUIC: got %q, %v", got, err)
		}
	})

	t.Run("no new connections from the wan side", func(t *testing.T) {
		ln, err := tp.client.Listen("tcp", "[::]:2222")
		if err != nil {
			t.Fatal(err)
		}
		serve(t, ln, func(c net.Conn) { fmt.Fprintln(c, "client") })
		gwln, err := tp.gw.Listen("tcp", "[::]:2223")
		if err != nil {
			t.Fatal(err)
		}
		serve(t, gwln, func(c net.Conn) { fmt.Fprintln(c, "gateway") })
		pc, err := tp.client.ListenPacket("udp", "[::]:2224")
		if err != nil {
			t.Fatal(err)
		}
		udpEcho(t, pc)
		for _, dst := range []string{"198.18.1.2:2222", "[2001:db8:1::2]:2222", "198.18.2.1:2223", "[2001:db8:2::1]:2223"} {
			if got, err := tcpLine(tp.server, dst, 700*time.Millisecond); !isTimeout(err) {
				t.Errorf("inbound tcp %s: got %q, %v; want a timeout (dropped)", dst, got, err)
			}
		}
		if got, err := udpAsk(tp.server, "198.18.1.2:2224", 700*time.Millisecond); !isTimeout(err) {
			t.Errorf("inbound udp: got %q, %v; want a timeout", got, err)
		}
		// A port the operator opened on the gateway answers from the WAN.
		open, err := tp.gw.Listen("tcp", "[::]:2225")
		if err != nil {
			t.Fatal(err)
		}
		serve(t, open, func(c net.Conn) { fmt.Fprintln(c, "ssh") })
		for _, dst := range []string{"198.18.2.1:2225", "[2001:db8:2::1]:2225"} {
			if got, err := tcpLine(tp.server, dst, 3*time.Second); err != nil || got != "ssh\n" {
				t.Errorf("WAN-open port %s: got %q, %v", dst, got, err)
			}
		}
		// The gateway's own connections out (the proxy's, the forwarder's
		// upstream queries) pass, replies included, even where the LAN may
		// not go.
		if line, err := tcpLine(tp.gw, "198.18.2.2:80", 3*time.Second); err != nil || !strings.HasPrefix(line, "server saw 198.18.2.1:") {
			t.Errorf("gateway dialing out: got %q, %v", line, err)
		}
		if got, err := udpAsk(tp.gw, "198.18.2.3:9000", 3*time.Second); err != nil {
			t.Errorf("gateway UDP out: got %q, %v", got, err)
		}
		// The same ports answer from the LAN side: only the WAN is shut.
		if got, err := tcpLine(tp.client, "198.18.1.1:2223", 3*time.Second); err != nil || got != "gateway\n" {
			t.Errorf("gateway from the LAN: got %q, %v", got, err)
		}
	})

	t.Run("fail closed when egressd is gone", func(t *testing.T) {
		// The process dies: its listeners close and its netlink socket
		// goes, without Remove.
		proxyLn.Close()
		dnsPC.Close()
		dnsLn.Close()
		if err := fw.Detach(); err != nil {
			t.Fatal(err)
		}
		for _, dst := range []string{"198.18.2.2:80", "[2001:db8:2::2]:80"} {
			if got, err := tcpLine(tp.client, dst, 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("tcp %s: got %q, %v; want connection refused", dst, got, err)
			}
		}
		if got, err := udpAsk(tp.client, "203.0.113.53:53", 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("dns: got %q, %v; want connection refused", got, err)
		}
		if got, err := udpAsk(tp.client, "198.18.2.3:9000", 700*time.Millisecond); !isTimeout(err) {
			t.Errorf("denied udp: got %q, %v; want a timeout", got, err)
		}
	})

	t.Run("a start that installs nothing removes the leftover", func(t *testing.T) {
		// The next egressd starts in audit mode: it installs nothing, and
		// must not keep enforcing the table the last one left.
		next := tp.firewall(t, Config{})
		if had, err := next.RemoveLeftover(); err != nil || !had {
			t.Fatalf("RemoveLeftover: %v, %v; want the leftover table found and removed", had, err)
		}
		if line, err := tcpLine(tp.client, "198.18.2.2:80", 3*time.Second); err != nil || !strings.HasPrefix(line, "server saw 198.18.1.2:") {
			t.Errorf("after the leftover is removed: got %q, %v", line, err)
		}
		if had, err := next.RemoveLeftover(); err != nil || had {
			t.Errorf("second RemoveLeftover: %v, %v; want nothing there", had, err)
		}
		next.Close()
	})

	t.Run("remove leaves other tables alone", func(t *testing.T) {
		tp.gw.MustRun("nft", "add", "table", "ip", "operator")
		tp.gw.MustRun("nft", "add", "chain", "ip", "operator", "opchain", "{ type filter hook forward priority 10; policy accept; }")
		if err := fw.Remove(); err != nil {
			t.Fatal(err)
		}
		out := tp.gw.MustRun("nft", "list", "ruleset")
		if strings.Contains(out, "egressd") {
			t.Errorf("egressd left something behind:\n%s", out)
		}
		if !strings.Contains(out, "table ip operator") || !strings.Contains(out, "chain opchain") {
			t.Errorf("the operator's table is gone:\n%s", out)
		}
		// Traffic flows as before egressd: straight to the server.
		if line, err := tcpLine(tp.client, "198.18.2.2:80", 3*time.Second); err != nil || !strings.HasPrefix(line, "server saw 198.18.1.2:") {
			t.Errorf("after remove: got %q, %v", line, err)
		}
		if err := fw.Remove(); err != nil {
			t.Errorf("second remove: %v", err)
		}
	})
}

// TestEnforceTCPPortSet: with a set of redirected ports, other TCP is
// forwarded only where a rule's addresses allow it, replies pass, and TCP
// 853 is reset.
func TestEnforceTCPPortSet(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.proxyStandIn(t)
	tp.serverTCP(t, "[::]:7001")
	tp.serverTCP(t, "[::]:853")
	tp.serverTCP(t, "[::]:8080")
	fw := tp.firewall(t, Config{TCPPorts: []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}, {Lo: 443, Hi: 443, Proto: policy.TCP}}})
	eng := compile(t, `
version: 1
mode: enforce
rules:
  - name: cams
    to: [198.18.2.2/32, "2001:db8:2::/64"]
    ports: [7001/tcp]
`)
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	if line, err := tcpLine(tp.client, "198.18.2.3:443", 3*time.Second); err != nil || line != "proxy orig=198.18.2.3:443\n" {
		t.Errorf("443: got %q, %v", line, err)
	}
	for _, dst := range []string{"198.18.2.2:7001", "[2001:db8:2::3]:7001"} {
		if line, err := tcpLine(tp.client, dst, 3*time.Second); err != nil || !strings.HasPrefix(line, "server saw ") {
			t.Errorf("allowed %s: got %q, %v", dst, line, err)
		}
	}
	for _, dst := range []string{"198.18.2.3:7001", "198.18.2.2:8080"} {
		if line, err := tcpLine(tp.client, dst, 700*time.Millisecond); !isTimeout(err) {
			t.Errorf("denied %s: got %q, %v; want a timeout", dst, line, err)
		}
	}
	if line, err := tcpLine(tp.client, "198.18.2.2:853", 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("853: got %q, %v; want a reset", line, err)
	}
}

// TestAudit: nothing is redirected or blocked, and with no egressd
// listener anywhere traffic flows end to end.
func TestAudit(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverTCP(t, "[::]:80")
	tp.serverUDP(t, "198.18.2.3:9000", "198.18.2.2:53", "198.18.2.2:443", "[2001:db8:2::3]:9000")
	ln, err := tp.client.Listen("tcp", "[::]:2222")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(c net.Conn) { fmt.Fprintln(c, "client") })

	eng := compile(t, testPolicy).WithMode(policy.ModeAudit)
	check := func(t *testing.T, inbound bool) {
		t.Helper()
		for _, dst := range []string{"198.18.2.2:80", "[2001:db8:2::2]:80"} {
			if line, err := tcpLine(tp.client, dst, 3*time.Second); err != nil || !strings.HasPrefix(line, "server saw ") {
				t.Errorf("tcp %s: got %q, %v", dst, line, err)
			}
		}
		for _, dst := range []string{"198.18.2.3:9000", "198.18.2.2:53", "198.18.2.2:443", "[2001:db8:2::3]:9000"} {
			if got, err := udpAsk(tp.client, dst, 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from ") {
				t.Errorf("udp %s: got %q, %v", dst, got, err)
			}
		}
		line, err := tcpLine(tp.server, "198.18.1.2:2222", 700*time.Millisecond)
		if inbound && (err != nil || line != "client\n") {
			t.Errorf("inbound: got %q, %v; want it to pass", line, err)
		}
		if !inbound && !isTimeout(err) {
			t.Errorf("inbound with the guard: got %q, %v; want a timeout", line, err)
		}
	}

	t.Run("default", func(t *testing.T) {
		fw := tp.firewall(t, Config{})
		if err := fw.Install(eng); err != nil {
			t.Fatal(err)
		}
		out := tp.gw.MustRun("nft", "list", "table", "inet", "egressd")
		for _, bad := range []string{"redirect", "drop", "reject"} {
			if strings.Contains(out, bad) {
				t.Errorf("audit table has %q:\n%s", bad, out)
			}
		}
		check(t, true)
		// Learn in audit mode remembers without a kernel set.
		if err := fw.Learn("udp-name", netip.MustParseAddr("198.18.2.4"), time.Minute); err != nil {
			t.Fatal(err)
		}
		// A reload to enforce puts it in the set.
		if err := fw.Replace(eng.WithMode(policy.ModeEnforce)); err != nil {
			t.Fatal(err)
		}
		if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name"); !strings.Contains(out, "198.18.2.4") {
			t.Errorf("learned in audit, not in the enforce set:\n%s", out)
		}
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
		if out := tp.gw.MustRun("nft", "list", "ruleset"); strings.Contains(out, "egressd") {
			t.Errorf("Close left the table:\n%s", out)
		}
		if err := fw.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := fw.Install(eng); !errors.Is(err, ErrClosed) {
			t.Errorf("Install after Close: %v, want ErrClosed", err)
		}
	})
	t.Run("guard wan", func(t *testing.T) {
		fw := tp.firewall(t, Config{GuardWAN: true})
		if err := fw.Install(eng); err != nil {
			t.Fatal(err)
		}
		check(t, false)
		fw.Close()
	})
}

// TestMasquerade: with masquerade the server sees the gateway's WAN
// address and needs no route back to the LAN.
func TestMasquerade(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.server.MustRun("ip", "route", "del", "198.18.1.0/24")
	tp.server.MustRun("ip", "-6", "route", "del", "2001:db8:1::/64")
	tp.serverTCP(t, "[::]:80")
	fw := tp.firewall(t, Config{Masquerade: true})
	if err := fw.Install(compile(t, testPolicy).WithMode(policy.ModeAudit)); err != nil {
		t.Fatal(err)
	}
	for dst, want := range map[string]string{"198.18.2.2:80": "server saw 198.18.2.1:", "[2001:db8:2::2]:80": "server saw [2001:db8:2::1]:"} {
		if line, err := tcpLine(tp.client, dst, 3*time.Second); err != nil || !strings.HasPrefix(line, want) {
			t.Errorf("%s: got %q, %v; want %q", dst, line, err, want)
		}
	}
}

// TestReplaceAtomic: while the ruleset is replaced again and again, the
// table is always there, a redirected connection established before keeps
// working, and learned addresses of rules that remain stay.
func TestReplaceAtomic(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.4:9000")
	ln, err := tp.gw.Listen("tcp", fmt.Sprintf("[::]:%d", proxyPort))
	if err != nil {
		t.Fatal(err)
	}
	// An echo "proxy" that keeps the connection open.
	serve(t, ln, func(c net.Conn) { io.Copy(c, c) })

	fw := tp.firewall(t, Config{})
	a := compile(t, testPolicy)
	b := compile(t, testPolicy+`
  - name: extra
    to: [203.0.113.0/24]
    ports: [5000-5010/udp]
`)
	if err := fw.Install(a); err != nil {
		t.Fatal(err)
	}
	if err := fw.Learn("udp-name", netip.MustParseAddr("198.18.2.4"), time.Minute); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := tp.client.DialContext(ctx, "tcp", "198.18.2.2:80")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	roundTrip := func(i int) {
		t.Helper()
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		fmt.Fprintf(conn, "line %d\n", i)
		if got, err := rd.ReadString('\n'); err != nil || got != fmt.Sprintf("line %d\n", i) {
			t.Fatalf("established connection after %d replaces: got %q, %v", i, got, err)
		}
	}
	roundTrip(0)

	// A watcher lists egressd's table over its own netlink socket as fast
	// as it can while the table is replaced.
	nsf, err := os.Open(tp.nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer nsf.Close()
	watch, err := nftables.New(nftables.WithNetNSFd(int(nsf.Fd())), nftables.AsLasting())
	if err != nil {
		t.Fatal(err)
	}
	defer watch.CloseLasting()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var lists, missing int
	var lastErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 100000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			lists++
			tab, err := watch.ListTableOfFamily(TableName, nftables.TableFamilyINet)
			if err != nil || tab == nil {
				missing++
				lastErr = err
				continue
			}
			chains, err := watch.ListChainsOfTableFamily(nftables.TableFamilyINet)
			n := 0
			for _, c := range chains {
				if c.Table.Name == TableName {
					n++
				}
			}
			// prerouting, input, forward. A dump that spans the commit can
			// see the old chains and the new ones (the kernel flags such a
			// dump as interrupted; this library does not retry), never
			// fewer: more than 3 is not a gap.
			if err != nil || n < 3 {
				missing++
				lastErr = fmt.Errorf("%d chains, %v", n, err)
			}
		}
	}()
	const replaces = 60
	for i := 1; i <= replaces; i++ {
		eng := a
		if i%2 == 1 {
			eng = b
		}
		if err := fw.Replace(eng); err != nil {
			t.Fatal(err)
		}
		if i%10 == 0 {
			roundTrip(i)
		}
	}
	close(stop)
	wg.Wait()
	if missing > 0 {
		t.Errorf("the table or its chains were missing %d times out of %d listings during %d replaces (last: %v)", missing, lists, replaces, lastErr)
	}
	if lists < replaces {
		t.Logf("only %d listings during %d replaces", lists, replaces)
	}
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 3*time.Second); err != nil {
		t.Errorf("learned address after replaces: %q, %v", got, err)
	}
	// A policy without the rule drops its learned addresses.
	if err := fw.Replace(compile(t, strings.Split(testPolicy, "  - name: udp-name")[0])); err != nil {
		t.Fatal(err)
	}
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 700*time.Millisecond); !isTimeout(err) {
		t.Errorf("rule removed: got %q, %v; want a timeout", got, err)
	}
	// A bad policy for this config keeps the old ruleset.
	if err := fw.Replace(nil); err == nil {
		t.Error("Replace(nil) succeeded")
	}
	if _, err := watch.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		t.Errorf("table gone after a failed replace: %v", err)
	}
}

// TestInstalledMatchesRender: what the kernel holds, listed by nft, is what
// Render describes (counter values aside), in every configuration of the
// golden files: the netlink translation and the printed form agree.
func TestInstalledMatchesRender(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	eng := sitePolicy(t)
	counters := regexp.MustCompile(`counter packets \d+ bytes \d+`)
	wrapped := regexp.MustCompile(`,\n\s+`) // nft wraps long element lists
	xtNoise := regexp.MustCompile(`libxtables: unhandled NFPROTO in xtables_set_nfproto\n\s*XT target NFQUEUE not found\n\s*comment`)
	for _, c := range []struct {
		cfg  Config
		mode policy.Mode
	}{
		{Config{Masquerade: true}, policy.ModeEnforce},
		{Config{LANs: []string{"lan0", "lan0.10", "lan1"}}, policy.ModeEnforce},
		{Config{TCPPorts: []policy.PortRange{{Lo: 80, Hi: 90, Proto: policy.TCP}, {Lo: 443, Hi: 443, Proto: policy.TCP}}, ProxyPort6: 15002}, policy.ModeEnforce},
		{Config{GuardWAN: true, Masquerade: true}, policy.ModeAudit},
		{Config{}, policy.ModeAudit},
		{Config{FastPath: true, TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}, policy.ModeEnforce},
		{Config{FastPath: true, FastPathQueue: 7, LANs: []string{"lan0", "lan1"}}, policy.ModeEnforce},
	} {
		fw := tp.firewall(t, c.cfg)
		if err := fw.Install(eng.WithMode(c.mode)); err != nil {
			t.Fatal(err)
		}
		got := counters.ReplaceAllString(tp.gw.MustRun("nft", "list", "table", "inet", "egressd"), "counter")
		got = wrapped.ReplaceAllString(got, ", ")
		// nft lists the fast path's NFQUEUE target (nft_compat) through
		// libxtables, which has no translation for the inet family: it
		// says so in the middle of the line, and warns about the table.
		got = strings.Replace(got, "# Warning: table inet egressd is managed by iptables-nft, do not touch!\n", "", 1)
		got = xtNoise.ReplaceAllString(got, fmt.Sprintf("xt target NFQUEUE queue %d comment", c.cfg.fastQueue()))
		want := fw.Ruleset().String()
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("%s %+v: nft list differs from Render (-render +nft):\n%s", c.mode, c.cfg, diff)
		}
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLearnGroupCommit: Learn calls that arrive while a transaction is in
// flight share the next one, and every address lands in its set.
func TestLearnGroupCommit(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	learns := func() float64 { return counterValue(fw.m.applies.WithLabelValues("learn", "ok")) }
	// Hold the netlink lock, as a slow transaction would.
	fw.ioMu.Lock()
	const n = 100
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			errs <- fw.Learn("udp-name", netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), time.Minute)
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		fw.mu.Lock()
		queued := 0
		if fw.pending != nil {
			queued = len(fw.pending.ops)
		}
		fw.mu.Unlock()
		if queued == n-1 { // one call is the writer, waiting for the lock
			break
		}
		if time.Now().After(deadline) {
			fw.ioMu.Unlock()
			t.Fatalf("only %d calls queued", queued)
		}
		time.Sleep(5 * time.Millisecond)
	}
	fw.ioMu.Unlock()
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := learns(); got != 2 {
		t.Errorf("%d learn transactions for %d addresses, want 2", int(got), n)
	}
	out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
	for i := 0; i < n; i++ {
		if a := fmt.Sprintf("203.0.113.%d ", i); !strings.Contains(out, a) {
			t.Fatalf("%s missing from the set:\n%s", a, out)
		}
	}
	// Learning them again is free: no transaction.
	for i := 0; i < n; i++ {
		if err := fw.Learn("udp-name", netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	if got := learns(); got != 2 {
		t.Errorf("re-learning wrote %d transactions", int(got)-2)
	}
}

// TestLearnAfterExternalFlush: if the kernel's set lost an address behind
// egressd's back, a refresh (delete + add) fails and Learn retries with an
// add, so the address is back.
func TestLearnAfterExternalFlush(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.4:9000")
	fw := tp.firewall(t, Config{MinTTL: time.Second})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("198.18.2.4")
	if err := fw.Learn("udp-name", a, 4*time.Second); err != nil {
		t.Fatal(err)
	}
	tp.gw.MustRun("nft", "flush", "set", "inet", "egressd", "dns4_udp-name")
	if got, err := udpAsk(tp.client, "198.18.2.4:9000", 700*time.Millisecond); !isTimeout(err) {
		t.Fatalf("after the flush: got %q, %v; want a timeout", got, err)
	}
	if err := fw.Learn("udp-name", a, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := udpAsk(tp.client, "198.18.2.4:9000", 3*time.Second); err != nil {
		t.Fatalf("after learning again: %v", err)
	}
	if got := counterValue(fw.m.applies.WithLabelValues("learn", "ok")); got != 2 {
		t.Errorf("learn transactions: %v, want 2", got)
	}
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

// TestKill9 runs a real process that installs the firewall and serves the
// "proxy", then kills it with SIGKILL: enforce fails closed (the ruleset
// stays, redirected connections are refused), audit fails open (traffic
// flows with no egressd at all).
func TestKill9(t *testing.T) {
	requireNft(t)
	for _, mode := range []policy.Mode{policy.ModeEnforce, policy.ModeAudit} {
		t.Run(string(mode), func(t *testing.T) {
			tp := newTopo(t)
			tp.serverTCP(t, "[::]:80")
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
			cmd.Env = append(os.Environ(), "EGRESSD_FW_HELPER=1", "EGRESSD_FW_NETNS="+tp.nsPath, "EGRESSD_FW_MODE="+string(mode))
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			ready := make(chan string, 1)
			go func() {
				line, _ := bufio.NewReader(out).ReadString('\n')
				ready <- line
			}()
			select {
			case line := <-ready:
				if line != "ready\n" {
					t.Fatalf("helper said %q", line)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("helper not ready")
			}
			line, err := tcpLine(tp.client, "198.18.2.2:80", 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			want := map[policy.Mode]string{policy.ModeEnforce: "helper proxy\n", policy.ModeAudit: "server saw 198.18.1.2:"}[mode]
			if !strings.HasPrefix(line, want) {
				t.Fatalf("with egressd running: got %q, want %q", line, want)
			}
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			cmd.Wait()
			line, err = tcpLine(tp.client, "198.18.2.2:80", 3*time.Second)
			switch mode {
			case policy.ModeEnforce:
				if !errors.Is(err, syscall.ECONNREFUSED) {
					t.Errorf("after kill -9: got %q, %v; want connection refused", line, err)
				}
				if out := tp.gw.MustRun("nft", "list", "table", "inet", "egressd"); !strings.Contains(out, "redirect to :15001") {
					t.Errorf("the ruleset went with the process:\n%s", out)
				}
			case policy.ModeAudit:
				if err != nil || !strings.HasPrefix(line, "server saw 198.18.1.2:") {
					t.Errorf("after kill -9: got %q, %v; want the server", line, err)
				}
			}
		})
	}
}

// TestHelperProcess is the process TestKill9 kills; it does nothing in a
// normal test run.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("EGRESSD_FW_HELPER") != "1" {
		return
	}
	nsPath := os.Getenv("EGRESSD_FW_NETNS")
	mode, _ := policy.ParseMode(os.Getenv("EGRESSD_FW_MODE"))
	fw, err := New(Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: proxyPort, DNSPort: dnsPort, NetNS: nsPath}, Deps{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Install(compile(t, testPolicy).WithMode(mode)); err != nil {
		t.Fatal(err)
	}
	// Listen in the gateway's namespace from a thread that stays there.
	runtime.LockOSThread()
	nsf, err := os.Open(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Setns(int(nsf.Fd()), unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", fmt.Sprintf("[::]:%d", proxyPort))
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "helper proxy")
			c.Close()
		}
	}()
	fmt.Println("ready")
	time.Sleep(60 * time.Second) // killed long before
}

// TestRuleExpiry: when a rule's expiry passes, the firewall re-renders on
// its own and the rule's addresses close.
func TestRuleExpiry(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000")
	fw := tp.firewall(t, Config{})
	expires := time.Now().Add(2 * time.Second).Truncate(time.Second).Add(time.Second)
	eng := compile(t, fmt.Sprintf(`
version: 1
mode: enforce
rules:
  - name: temporary
    to: [198.18.2.2]
    ports: [9000/udp]
    expires: %s
`, expires.UTC().Format(time.RFC3339)))
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	if _, err := udpAsk(tp.client, "198.18.2.2:9000", 3*time.Second); err != nil {
		t.Fatalf("before the expiry: %v", err)
	}
	time.Sleep(time.Until(expires.Add(2 * time.Second)))
	if got, err := udpAsk(tp.client, "198.18.2.2:9000", 700*time.Millisecond); !isTimeout(err) {
		t.Errorf("after the expiry: got %q, %v; want a timeout", got, err)
	}
	if rs := fw.Ruleset(); rs == nil || strings.Contains(rs.String(), "rule temporary") {
		t.Errorf("installed ruleset still has the expired rule")
	}
}

func BenchmarkRender(b *testing.B) {
	eng := sitePolicy(b)
	for b.Loop() {
		if _, err := Render(siteConfig, eng); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLearn measures Learn in the gateway's namespace: "known" is an
// address already in the set (the common case: a repeated DNS answer),
// "new" writes one address per call (one netlink transaction each),
// "parallel" many concurrent writers sharing transactions (ns/op is per
// address).
func BenchmarkLearn(b *testing.B) {
	if _, err := exec.LookPath("nft"); err != nil {
		b.Skip("nft not installed")
	}
	gw := testnet.New(b, "fwb")
	fw, err := New(Config{LANs: []string{"lo"}, ProxyPort: proxyPort, NetNS: "/var/run/netns/" + gw.Name, MaxLearned: 1 << 22},
		Deps{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer fw.Close()
	if err := fw.Install(compile(b, testPolicy)); err != nil {
		b.Fatal(err)
	}
	// Distinct documentation addresses (set elements only, no traffic).
	var n uint64
	addrN := func() netip.Addr {
		n++
		var a [16]byte
		copy(a[:], []byte{0x20, 0x01, 0x0d, 0xb8})
		for i := 0; i < 8; i++ {
			a[15-i] = byte(n >> (8 * i))
		}
		return netip.AddrFrom16(a)
	}
	b.Run("known", func(b *testing.B) {
		a := netip.MustParseAddr("203.0.113.1")
		if err := fw.Learn("udp-name", a, time.Hour); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if err := fw.Learn("udp-name", a, time.Hour); err != nil {
				b.Fatal(err)
			}
		}
	})
	// A known address as the forwarder hands it over (egressd's
	// firewallGate): decided under the installed policy (a pointer
	// compare), or under another one (the installed rule must cover it).
	installed, other := fw.eng, compile(b, testPolicy)
	for _, c := range []struct {
		name string
		eng  *policy.Engine
	}{{"known-installed-engine", installed}, {"known-other-engine", other}} {
		b.Run(c.name, func(b *testing.B) {
			as := []Address{{Rule: "udp-name", Addr: netip.MustParseAddr("203.0.113.1"), TTL: time.Hour, Engine: c.eng, Client: netip.MustParseAddr("198.18.1.2"), Name: "ntp.test"}}
			ctx := context.Background()
			if err := fw.LearnAll(ctx, as); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if err := fw.LearnAll(ctx, as); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("new", func(b *testing.B) {
		for b.Loop() {
			if err := fw.Learn("udp-name", addrN(), time.Hour); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		var mu sync.Mutex
		tx0, n0 := counterValue(fw.m.applies.WithLabelValues("learn", "ok")), n
		defer func() {
			if tx := counterValue(fw.m.applies.WithLabelValues("learn", "ok")) - tx0; tx > 0 {
				b.ReportMetric(float64(n-n0)/tx, "addrs/tx")
			}
		}()
		b.SetParallelism(32) // many DNS answers at once, as under load
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				mu.Lock()
				a := addrN()
				mu.Unlock()
				if err := fw.Learn("udp-name", a, time.Hour); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// TestRuleExpiryFarFuture: a rule that expires centuries from now (written
// as "9999-12-31" to mean "keep it") schedules no re-render now: the time
// until it does not fit a Duration, and must not wrap into a timer that
// fires at once and replaces the table again and again.
func TestRuleExpiryFarFuture(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	eng := compile(t, `
version: 1
mode: enforce
rules:
  - name: kept
    to: [198.18.2.2]
    ports: [9000/udp]
    expires: 9999-12-31
`)
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if n := counterValue(fw.m.applies.WithLabelValues("replace", "ok")); n != 0 {
		t.Errorf("%v replaces of the table within half a second of the install, want 0", n)
	}
}

// TestRuleExpiryRaceWithReplace: the re-render after a rule expires must
// not put back the policy it was armed for when a Replace (a reload) has
// installed another one while the re-render waited for the netlink lock.
// It checked that its policy was current before waiting, and then
// installed it anyway.
func TestRuleExpiryRaceWithReplace(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	expires := time.Now().Add(time.Second).Truncate(time.Second).Add(time.Second)
	old := compile(t, fmt.Sprintf(`
version: 1
mode: enforce
rules:
  - name: temporary
    to: [198.18.2.2]
    ports: [9000/udp]
    expires: %s
`, expires.UTC().Format(time.RFC3339)))
	reloaded := compile(t, testPolicy)
	if err := fw.Install(old); err != nil {
		t.Fatal(err)
	}
	// A slow transaction while the re-render fires (a second after the
	// expiry) and waits for it.
	fw.ioMu.Lock()
	time.Sleep(time.Until(expires.Add(1500 * time.Millisecond)))
	// What a Replace(reloaded) finishing first leaves behind, done here
	// by hand since the lock is held: the reloaded policy is installed.
	rs, err := render(fw.cfg, reloaded, time.Now())
	if err != nil {
		fw.ioMu.Unlock()
		t.Fatal(err)
	}
	fw.mu.Lock()
	fw.rs, fw.eng = rs, reloaded
	fw.cur.Store(rs)
	fw.scheduleLocked(rs.NextExpiry, time.Now())
	fw.mu.Unlock()
	fw.ioMu.Unlock()
	time.Sleep(500 * time.Millisecond)
	fw.mu.Lock()
	got := fw.eng
	fw.mu.Unlock()
	if got != reloaded {
		t.Errorf("the re-render for the expired rule installed the policy it was armed for over the reloaded one")
	}
}

// TestEnforceTCPPortSetPathRule: with a set of redirected ports, a port of
// a rule with a host/path target is redirected to the proxy (which checks
// the path), not forwarded to the rule's learned addresses; before, plain
// HTTP to such an address went out on that port whatever its path.
func TestEnforceTCPPortSetPathRule(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.proxyStandIn(t)
	tp.serverTCP(t, "[::]:8080")
	fw := tp.firewall(t, Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}})
	eng := compile(t, `
version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.example.test/public/*"]
    ports: [8080/tcp]
`)
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	if err := fw.Learn("docs", netip.MustParseAddr("198.18.2.2"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if line, err := tcpLine(tp.client, "198.18.2.2:8080", 3*time.Second); err != nil || line != "proxy orig=198.18.2.2:8080\n" {
		t.Errorf("8080 to a learned address of the host/path rule: got %q, %v; want the proxy", line, err)
	}
}
