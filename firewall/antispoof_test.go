package firewall

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// fromAddr dials addr from ns with the local address src, sends "ping"
// and reads the answer (UDP), or reads one line (TCP).
func fromAddr(ns *testnet.NS, network, src, addr string, timeout time.Duration) (string, error) {
	var c net.Conn
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := ns.Do(func() (err error) {
		d := net.Dialer{}
		if network == "udp" {
			d.LocalAddr = &net.UDPAddr{IP: net.ParseIP(src)}
		} else {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
		}
		c, err = d.DialContext(ctx, network, addr)
		return
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if network == "udp" {
		if _, err := c.Write([]byte("ping")); err != nil {
			return "", err
		}
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	return string(buf[:n]), err
}

// sendDHCPDiscoverLike sends, from ns's eth0, an IPv4 UDP datagram from
// 0.0.0.0:68 to 255.255.255.255:67 in an Ethernet broadcast frame, as a
// DHCP client without an address does (AF_PACKET: a socket would put the
// interface's address in the source).
func sendDHCPDiscoverLike(ns *testnet.NS, dev string) error {
	return ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		payload := []byte("dhcp-like")
		udp := make([]byte, 8)
		binary.BigEndian.PutUint16(udp[0:], 68)
		binary.BigEndian.PutUint16(udp[2:], 67)
		binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
		ip := []byte{0x45, 0, 0, 0, 0, 0, 0, 0, 64, unix.IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255}
		binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
		var sum uint32
		for i := 0; i < 20; i += 2 {
			sum += uint32(binary.BigEndian.Uint16(ip[i:]))
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
		pkt := append(append(ip, udp...), payload...)
		sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
		return unix.Sendto(fd, pkt, 0, sa)
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestForgedSources: in enforce mode a LAN host's packets from sources its
// interface does not route back to (BCP 38) are dropped before anything
// sees them: a DNS query and a TCP SYN from a forged off-link source get
// no answer reflected out of the WAN to that address, and forwarded UDP
// from it does not leave. A routed subnet behind a LAN-side router (the
// gateway has its route via the LAN) still gets through, a DHCP client's
// 0.0.0.0 broadcast still reaches a gateway socket, and IPv6 duplicate
// address detection (from ::) still hears the gateway.
func TestForgedSources(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.proxyStandIn(t)
	tp.dnsStandIn(t)
	tp.serverUDP(t, "198.18.2.2:9000", "[2001:db8:2::2]:9000")

	// The gateway's default routes point at the "internet": replies to
	// an address it has no other route for leave by the WAN.
	tp.gw.MustRun("ip", "route", "add", "default", "via", "198.18.2.2")
	tp.gw.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:2::2")
	// The forged addresses: the client uses them; the server is the
	// victim that holds them.
	const forged4, forged6 = "198.51.100.77", "2001:db8:99::77"
	for _, ns := range []*testnet.NS{tp.client, tp.server} {
		ns.AddAddr(t, "lo", forged4+"/32", forged6+"/128")
	}
	// A routed subnet behind the client, which routes for it: the gateway
	// reaches it through the LAN.
	const routed4, routed6 = "198.18.7.2", "2001:db8:7::2"
	tp.client.AddAddr(t, "lo", routed4+"/32", routed6+"/128")
	tp.gw.MustRun("ip", "route", "add", "198.18.7.0/24", "via", "198.18.1.2", "dev", "lan0")
	tp.gw.MustRun("ip", "-6", "route", "add", "2001:db8:7::/64", "via", "2001:db8:1::2", "dev", "lan0")
	tp.server.MustRun("ip", "route", "add", "198.18.7.0/24", "via", "198.18.2.1")
	tp.server.MustRun("ip", "-6", "route", "add", "2001:db8:7::/64", "via", "2001:db8:2::1")

	// The server counts what arrives from the gateway from or to the
	// forged addresses, before its own routing (which drops a packet
	// from its own address as martian).
	tp.server.MustRun("nft", "add", "table", "inet", "f1count")
	tp.server.MustRun("nft", "add", "chain", "inet", "f1count", "pre", "{ type filter hook prerouting priority -300; policy accept; }")
	for _, r := range []string{
		`iifname "eth0" ip saddr ` + forged4 + ` counter comment "fwd4"`,
		`iifname "eth0" ip daddr ` + forged4 + ` counter comment "refl4"`,
		`iifname "eth0" ip6 saddr ` + forged6 + ` counter comment "fwd6"`,
		`iifname "eth0" ip6 daddr ` + forged6 + ` counter comment "refl6"`,
	} {
		tp.server.MustRun(append([]string{"nft", "add", "rule", "inet", "f1count", "pre"}, strings.Fields(r)...)...)
	}
	counted := regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "(\w+)"`)
	counts := func() map[string]int {
		m := map[string]int{}
		for _, g := range counted.FindAllStringSubmatch(tp.server.MustRun("nft", "list", "chain", "inet", "f1count", "pre"), -1) {
			n, _ := strconv.Atoi(g[1])
			m[g[2]] = n
		}
		return m
	}

	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}

	// The forged sources: DNS (to the forwarder), TCP (to the proxy),
	// UDP a rule forwards; three tries each.
	for _, c := range []struct{ src, dns, tcp, udp string }{
		{forged4, "198.18.2.2:53", "198.18.2.2:443", "198.18.2.2:9000"},
		{forged6, "[2001:db8:2::2]:53", "[2001:db8:2::2]:443", "[2001:db8:2::2]:9000"},
	} {
		for range 3 {
			if got, err := fromAddr(tp.client, "udp", c.src, c.dns, 300*time.Millisecond); err == nil {
				t.Errorf("DNS from %s: answered %q", c.src, got)
			}
			if got, err := fromAddr(tp.client, "tcp", c.src, c.tcp, 300*time.Millisecond); err == nil {
				t.Errorf("TCP from %s: got %q", c.src, got)
			}
			if got, err := fromAddr(tp.client, "udp", c.src, c.udp, 300*time.Millisecond); err == nil {
				t.Errorf("UDP from %s: answered %q", c.src, got)
			}
		}
	}
	if m := counts(); m["fwd4"]+m["fwd6"]+m["refl4"]+m["refl6"] != 0 {
		t.Errorf("from or to the forged sources, the server saw %v; want none", m)
	}

	// The routed subnet, and the client's own on-link addresses.
	for _, c := range []struct{ src, dns, tcp, udp string }{
		{routed4, "198.18.2.2:53", "198.18.2.2:443", "198.18.2.2:9000"},
		{routed6, "[2001:db8:2::2]:53", "[2001:db8:2::2]:443", "[2001:db8:2::2]:9000"},
		{"198.18.1.2", "198.18.2.2:53", "198.18.2.2:443", "198.18.2.2:9000"},
		{"2001:db8:1::2", "[2001:db8:2::2]:53", "[2001:db8:2::2]:443", "[2001:db8:2::2]:9000"},
	} {
		if got, err := fromAddr(tp.client, "udp", c.src, c.dns, 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from ") {
			t.Errorf("DNS from %s: %q, %v", c.src, got, err)
		}
		if got, err := fromAddr(tp.client, "tcp", c.src, c.tcp, 3*time.Second); err != nil || got != "proxy orig="+c.tcp+"\n" {
			t.Errorf("TCP from %s: %q, %v", c.src, got, err)
		}
		if got, err := fromAddr(tp.client, "udp", c.src, c.udp, 3*time.Second); err != nil || !strings.HasPrefix(got, "ping from ") {
			t.Errorf("UDP from %s: %q, %v", c.src, got, err)
		}
	}

	// A DHCP client's broadcast from 0.0.0.0 reaches a socket of the
	// gateway.
	dhcp, err := tp.gw.ListenPacket("udp4", "0.0.0.0:67")
	if err != nil {
		t.Fatal(err)
	}
	defer dhcp.Close()
	got := make(chan string, 8)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := dhcp.ReadFrom(buf)
			if err != nil {
				close(got)
				return
			}
			got <- fmt.Sprintf("%s from %s", buf[:n], from)
		}
	}()
	heard := ""
	for i := 0; i < 3 && heard == ""; i++ {
		if err := sendDHCPDiscoverLike(tp.client, "eth0"); err != nil {
			t.Fatal(err)
		}
		select {
		case heard = <-got:
		case <-time.After(time.Second):
		}
	}
	if heard != "dhcp-like from 0.0.0.0:68" {
		t.Errorf("the gateway's DHCP socket heard %q of 3 broadcasts from 0.0.0.0; want one", heard)
	}

	// IPv6 duplicate address detection: the client's solicitation from
	// :: for the gateway's own address gets the gateway's answer, and the
	// address fails.
	// (testnet turns DAD off on its links.)
	tp.client.MustRun("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1")
	tp.client.MustRun("ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", "eth0")
	failed := false
	for i := 0; i < 50 && !failed; i++ {
		failed = strings.Contains(tp.client.MustRun("ip", "-6", "addr", "show", "dev", "eth0"), "dadfailed")
		if !failed {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !failed {
		t.Errorf("DAD from :: for the gateway's address did not fail:\n%s", tp.client.MustRun("ip", "-6", "addr", "show", "dev", "eth0"))
	}
}
