package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv6"
)

// The gateway itself, attacked from the LAN by a host with root on its own
// machine: routing messages that would change the gateway's own routes.
const (
	rogueRAPrefix = "2001:db8:66::" // the prefix a rogue RA advertises
	lanRouter4    = "198.18.1.20"   // a router on the LAN: the gateway routes lanRouted through it
	lanRouted     = "192.0.2.0/24"  // a subnet behind lanRouter4
	lanRoutedHost = "192.0.2.5"
	loopStandIn   = "127.0.0.1:9902" // a service on the gateway's loopback
)

// dialLoopbackViaGW connects from the LAN to addr, a loopback address and
// port, through the gateway (loopbackViaGW). It reports whether the
// gateway's service answered.
func (tp *topo) dialLoopbackViaGW(t *testing.T, addr string) (ok bool, err error) {
	t.Helper()
	tp.loopbackViaGW(t, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, derr := tp.lan.DialContext(ctx, "tcp", addr)
		if derr != nil {
			err = derr
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err = c.Write([]byte("GET /report.json HTTP/1.0\r\n\r\n")); err != nil {
			return
		}
		b := make([]byte, 64)
		n, rerr := c.Read(b)
		ok, err = n > 0, fmt.Errorf("read %q: %v", b[:n], rerr)
	})
	return ok, err
}

// loopbackViaGW runs fn while the LAN host (root on its own machine)
// routes 127.0.0.1 to the gateway: it takes 127.0.0.1 out of its own
// local table, for the length of the call.
func (tp *topo) loopbackViaGW(t *testing.T, fn func()) {
	t.Helper()
	tp.lan.MustRun("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
	tp.lan.MustRun("sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1")
	// The gateway's answer comes from 127.0.0.1, an address of the
	// host's own lo: accept_local takes it.
	tp.lan.MustRun("sysctl", "-qw", "net.ipv4.conf.eth0.accept_local=1")
	tp.lan.MustRun("ip", "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local")
	tp.lan.MustRun("ip", "route", "add", "127.0.0.1/32", "via", gwLAN4, "dev", "eth0")
	defer func() {
		tp.lan.Run("ip", "route", "del", "127.0.0.1/32", "via", gwLAN4, "dev", "eth0")
		tp.lan.Run("ip", "route", "add", "local", "127.0.0.1", "dev", "lo", "table", "local")
	}()
	fn()
}

// sendRogueRA sends three Router Advertisements from the LAN client to
// all nodes on its link: a default router (lifetime 1800 s) and an
// autonomous prefix, rogueRAPrefix/64.
func (tp *topo) sendRogueRA(t *testing.T) {
	t.Helper()
	// The zone by index: Go's cache of interface names is the
	// process's, up to a minute old, and another test's namespace had
	// an eth0 of another index.
	ll, idx := tp.lan.LinkLocal(t, "eth0")
	pc, err := tp.lan.ListenPacket("ip6:ipv6-icmp", ll.String()+"%"+idx)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	p := ipv6.NewPacketConn(pc)
	if err := p.SetMulticastHopLimit(255); err != nil {
		t.Fatal(err)
	}
	ra := []byte{134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0}
	// Prefix information: /64, on-link and autonomous, valid 86400 s,
	// preferred 14400 s.
	pi := []byte{3, 4, 64, 0xc0}
	pi = binary.BigEndian.AppendUint32(pi, 86400)
	pi = binary.BigEndian.AppendUint32(pi, 14400)
	pi = append(pi, 0, 0, 0, 0)
	pfx := netip.MustParseAddr(rogueRAPrefix).As16()
	ra = append(ra, append(pi, pfx[:]...)...)
	dst := &net.IPAddr{IP: net.ParseIP("ff02::1"), Zone: idx}
	for range 3 {
		if _, err := pc.WriteTo(ra, dst); err != nil { // the kernel fills in the checksum
			t.Fatalf("rogue RA: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// gwTookRA reports whether the gateway has a default route through its
// LAN interface or an address of the rogue prefix: what the rogue RA
// asked for.
func (tp *topo) gwTookRA(t *testing.T) (bool, string) {
	t.Helper()
	routes, _ := tp.gw.Run("ip", "-6", "route", "show", "default", "dev", "lan0")
	addrs, _ := tp.gw.Run("ip", "-6", "-o", "addr", "show", "dev", "lan0")
	took := strings.TrimSpace(routes) != "" || strings.Contains(addrs, strings.TrimSuffix(rogueRAPrefix, ":"))
	return took, "routes: " + routes + "addresses: " + addrs
}

// forgetRA removes what a rogue RA gave the gateway.
func (tp *topo) forgetRA() {
	for range 4 {
		if _, err := tp.gw.Run("ip", "-6", "route", "del", "default", "dev", "lan0"); err != nil {
			break
		}
	}
	out, _ := tp.gw.Run("ip", "-6", "-o", "addr", "show", "dev", "lan0")
	for _, f := range strings.Fields(out) {
		if strings.HasPrefix(f, strings.TrimSuffix(rogueRAPrefix, ":")) {
			tp.gw.Run("ip", "-6", "addr", "del", f, "dev", "lan0")
		}
	}
}

// icmpChecksum is the Internet checksum of b.
func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// sendRedirect sends the gateway ICMP host redirects, as from the LAN
// router (an address the attacker adds to its own interface): for
// lanRoutedHost use the LAN client instead. The quoted packet is the
// gateway's own ICMP echo reply to lanRoutedHost, which the kernel acts
// on without a socket (icmp_err).
func (tp *topo) sendRedirect(t *testing.T) {
	t.Helper()
	inner := []byte{0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0}
	inner = append(inner, net.ParseIP(gwLAN4).To4()...)
	inner = append(inner, net.ParseIP(lanRoutedHost).To4()...)
	cs := icmpChecksum(inner)
	inner[10], inner[11] = byte(cs>>8), byte(cs)
	inner = append(inner, 0, 0, 0xff, 0xfe, 0, 1, 0, 0) // echo reply, id 1, seq 0
	msg := []byte{5, 1, 0, 0}
	msg = append(msg, net.ParseIP(lanClient4).To4()...)
	msg = append(msg, inner...)
	cs = icmpChecksum(msg)
	msg[2], msg[3] = byte(cs>>8), byte(cs)
	pc, err := tp.lan.ListenPacket("ip4:icmp", lanRouter4)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	for range 3 {
		// The gateway must hold a valid neighbour entry for the new
		// next hop: the LAN client's traffic to it gives one (a
		// datagram to the discard port; no ping binary is installed).
		if c, err := tp.lan.DialContext(context.Background(), "udp", net.JoinHostPort(gwLAN4, "9")); err == nil {
			c.Write([]byte{0})
			c.Close()
		}
		if _, err := pc.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(gwLAN4)}); err != nil {
			t.Fatalf("redirect: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// gwRedirected reports whether the gateway now routes lanRoutedHost
// through the LAN client.
func (tp *topo) gwRedirected(t *testing.T) (bool, string) {
	t.Helper()
	out, _ := tp.gw.Run("ip", "route", "get", lanRoutedHost)
	return strings.Contains(out, "via "+lanClient4+" "), out
}

// TestHardeningGateway: a LAN host sends the gateway routing messages.
// A rogue IPv6 Router Advertisement would give the gateway a default
// route through the attacker on a gateway that takes RAs while it
// forwards (accept_ra=2, as set for SLAAC on the WAN side, here on the
// LAN interface, or on all of them): the proxy's and the forwarder's own
// IPv6 connections upstream would then go to the attacker. An ICMP
// redirect, forged from a LAN router, would move the gateway's route to
// the subnet behind that router (a stock kernel takes redirects while it
// forwards when all/ and the interface's accept_redirects are 1, the
// defaults). A LAN host that routes 127.0.0.1 to a gateway with
// route_localnet=1 reaches its loopback services. Each is first shown to
// work without egressd; in enforce mode the firewall drops RAs and
// redirects arriving on the LAN side and LAN packets to 127.0.0.0/8.
// Besides: odd DNS-over-TCP frames to the forwarder and odd CONNECT
// authorities to the explicit proxy.
func TestHardeningGateway(t *testing.T) {
	tp := newTopo(t)
	tp.gw.MustRun("sysctl", "-qw", "net.ipv6.conf.lan0.accept_ra=2")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.lan0.accept_redirects=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.shared_media=1")
	tp.gw.MustRun("ip", "route", "add", lanRouted, "via", lanRouter4, "dev", "lan0")
	tp.lan.MustRun("ip", "addr", "add", lanRouter4+"/32", "dev", "eth0")

	ln, err := tp.gw.Listen("tcp", loopStandIn)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("loopback service\n"))
			c.Close()
		}
	}()
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.lan0.route_localnet=1")
	if ok, err := tp.dialLoopbackViaGW(t, loopStandIn); !ok {
		t.Fatalf("without egressd a LAN host cannot reach the gateway's loopback: the test would prove nothing (%v)", err)
	}

	tp.sendRogueRA(t)
	took := false
	var why string
	for deadline := time.Now().Add(3 * time.Second); !took && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		took, why = tp.gwTookRA(t)
	}
	if !took {
		t.Fatalf("without egressd the gateway ignored the rogue RA: the test would prove nothing\n%s", why)
	}
	tp.forgetRA()
	tp.sendRedirect(t)
	if ok, out := tp.gwRedirected(t); !ok {
		t.Fatalf("without egressd the gateway ignored the redirect: the test would prove nothing\n%s", out)
	}
	tp.gw.MustRun("ip", "route", "flush", "cache")
	if ok, out := tp.gwRedirected(t); ok {
		t.Fatalf("the redirect outlived a cache flush: %s", out)
	}

	u := tp.startUpstream(t)
	d := hardeningDaemon(t, tp, u, "")
	defer d.stop()
	t.Run("rogue-ra", func(t *testing.T) {
		tp.sendRogueRA(t)
		time.Sleep(time.Second)
		if took, why := tp.gwTookRA(t); took {
			t.Errorf("enforce: the gateway took a rogue RA from the LAN:\n%s", why)
		}
	})
	// DNS over TCP to the gateway: queries pipelined in one write, an
	// allowed name and a denied one; a frame too short for a header; a
	// query with bytes after it inside its frame; a query with two
	// questions, the second denied. The denied names must never reach the
	// upstream, the allowed ones be answered, and the forwarder live on.
	t.Run("dns-tcp-pipelined", func(t *testing.T) {
		before := len(u.seenNames())
		var b []byte
		b = append(b, dnsFrame(t, dnsQ(1, dockerName), nil)...)
		b = append(b, dnsFrame(t, dnsQ(2, trackerName), nil)...)
		b = append(b, dnsFrame(t, dnsQ(3, dockerName, trackerName), nil)...)
		b = append(b, dnsFrame(t, dnsQ(4, "pipe."+trackerName), []byte("trailing-exfil"))...)
		b = append(b, dnsFrame(t, dnsQ(5, vendorName), nil)...)
		got := tp.tcpDNS(t, b)
		if a := got[1]; a == nil || a.Rcode != dns.RcodeSuccess || len(a.Answer) == 0 {
			t.Errorf("pipelined: the allowed query got %v", a)
		}
		if a := got[2]; a == nil || len(a.Answer) != 0 {
			t.Errorf("pipelined: the denied query got %v, want an answer without records", a)
		}
		for _, id := range []uint16{3, 4} {
			if a := got[id]; a != nil && len(a.Answer) != 0 {
				t.Errorf("pipelined: query %d (a denied name in it) got records: %v", id, a)
			}
		}
		if a := got[5]; a == nil || a.Rcode != dns.RcodeSuccess || len(a.Answer) == 0 {
			t.Errorf("pipelined: the allowed query after the odd ones got %v", a)
		}
		// A frame of two bytes, then an allowed query.
		odd := append([]byte{0, 2, 0xab, 0xcd}, dnsFrame(t, dnsQ(6, vendorName), nil)...)
		got = tp.tcpDNS(t, odd)
		if a := got[6]; a == nil || len(a.Answer) == 0 {
			t.Errorf("the allowed query after a 2-byte frame got %v (answers: %v)", a, got)
		}
		// A frame announcing more than it sends: the forwarder waits, and
		// the connection ends at its deadline; nothing else is hurt.
		tp.tcpDNS(t, []byte{0xff, 0xff, 0, 7})
		for _, n := range u.seenNames()[before:] {
			if strings.HasSuffix(n, trackerName) {
				t.Errorf("the upstream was asked %q", n)
			}
		}
		if m, err := tp.dnsQuery(dockerName, dns.TypeA, 2*time.Second); err != nil || len(m.Answer) == 0 {
			t.Errorf("after the odd frames, a UDP query: %v %v", m, err)
		}
	})
	// The explicit proxy with odd CONNECT authorities: userinfo naming
	// an allowed host before a denied one, uppercase with a trailing dot,
	// ports 0, 65536, with a leading zero or a sign, IPv6 zone ids,
	// punycode, and a second CONNECT pipelined after an allowed one (it
	// goes into the tunnel, to the allowed origin). Each is refused, or
	// tunnels to the allowed name's own address; none reaches the denied
	// host or the attacker's address.
	t.Run("connect-odd-authority", func(t *testing.T) {
		proxyAddr := gwLAN4 + ":3128"
		for _, c := range []struct {
			target string
			mayTo  string // "": must be refused; else a 200 must go here
		}{
			{"user@" + trackerName + ":443", ""},
			{dockerName + "@" + trackerName + ":443", ""},
			{dockerName + ":443@" + trackerName + ":443", ""},
			{trackerName + ":443@" + dockerName + ":443", dockerIP4},
			{"user:pw@" + spoofIP4 + ":443", ""},
			{strings.ToUpper(dockerName) + ".:443", dockerIP4},
			{dockerName + ":0", ""},
			{dockerName + ":65536", ""},
			{dockerName + ":0443", dockerIP4},
			{dockerName + ":+443", ""},
			{dockerName + ":443 ", ""},
			{"[fe80::1%25lan0]:443", ""},
			{"[fe80::1%lan0]:443", ""},
			{"[" + dockerIP6 + "%25wan0]:443", ""},
			{"xn--80ak6aa92e.com:443", ""},
			{trackerName + "%00" + dockerName + ":443", ""},
		} {
			body, port, _ := tp.rawHTTP(proxyAddr, "CONNECT "+c.target+" HTTP/1.1\r\nHost: "+dockerName+":443\r\n\r\n")
			status := firstLine(body, nil)
			if !strings.HasPrefix(status, "HTTP/1.1 200") {
				continue
			}
			if c.mayTo == "" {
				t.Errorf("CONNECT %q: %q, want it refused", c.target, status)
				continue
			}
			ev := d.waitEvent(t, "CONNECT "+c.target, byClientPort(port))
			if ev.Dest != c.mayTo {
				t.Errorf("CONNECT %q went to %s (%v), want %s", c.target, ev.Dest, ev, c.mayTo)
			}
		}
		// Two CONNECTs in one write: the second is the tunnel's first
		// bytes, for the first one's origin.
		body, port, _ := tp.rawHTTP(proxyAddr, "CONNECT "+dockerName+":443 HTTP/1.1\r\nHost: "+dockerName+":443\r\n\r\nCONNECT "+trackerName+":443 HTTP/1.1\r\nHost: "+trackerName+":443\r\n\r\n")
		if ev := d.waitEvent(t, "pipelined CONNECTs", byClientPort(port)); ev.Dest != dockerIP4 {
			t.Errorf("pipelined CONNECTs: %v (client got %q)", ev, firstLine(body, nil))
		}
		for _, ev := range d.allEvents() {
			if ev.Kind == "flow" && ev.Verdict == "allow" && (ev.Dest == trackerIP || ev.Dest == spoofIP4 || ev.Name == trackerName) {
				t.Errorf("allowed: %v", ev)
			}
		}
	})
	// The admin page listens on the gateway's loopback. A LAN host that
	// routes 127.0.0.1 to the gateway reaches it where the gateway has
	// route_localnet=1 (kube-proxy sets it on all interfaces; Linux drops
	// such packets as martians otherwise).
	t.Run("loopback-from-lan", func(t *testing.T) {
		if ok, err := tp.dialLoopbackViaGW(t, adminAddr); ok {
			t.Errorf("enforce: a LAN host reached the admin page on the gateway's loopback (%v)", err)
		}
		if ok, err := tp.dialLoopbackViaGW(t, loopStandIn); ok {
			t.Errorf("enforce: a LAN host reached a service on the gateway's loopback (%v)", err)
		}
	})
	// A TLS record before the ClientHello (a warning alert, a
	// ChangeCipherSpec), then a hello for a denied name, to an address
	// DNS gave for an allowed one: the proxy reads the first byte as "not
	// a hello" and decides by address (allowed, recorded under the
	// address's name, as a connection without SNI). An origin that
	// skipped the record would then read the denied name; nginx and Go
	// do not (nginx answers 400: not TLS). The test fails if the origin
	// answers the hello.
	t.Run("record-before-hello", func(t *testing.T) {
		tp.dig(t, dockerName, "A")
		for _, pre := range []struct {
			name string
			rec  []byte
		}{
			{"warning-alert", []byte{0x15, 3, 1, 0, 2, 1, 90}}, // user_canceled
			{"ccs", []byte{0x14, 3, 1, 0, 1, 1}},
		} {
			raw := append(append([]byte(nil), pre.rec...), buildHello(helloSpec{sni: [][]string{{trackerName}}})...)
			o := tp.sendHello(net.JoinHostPort(dockerIP4, "443"), raw, 0, 0)
			ev := d.waitEvent(t, pre.name, byClientPort(o.port))
			if ev.Dest != dockerIP4 || ev.Verdict == "allow" && (ev.Name != dockerName || ev.NameSource != "dns-learned") {
				t.Errorf("%s then a hello for %s: event %v, want the address's name, dns-learned", pre.name, trackerName, ev)
			}
			if !o.denied && o.err == nil && ev.Verdict == "allow" {
				t.Errorf("%s then a hello for %s: the origin answered the hello (%v) and egressd recorded %v", pre.name, trackerName, o, ev)
			}
		}
	})
	// Plain HTTP to an allowed Host, then a request for a denied Host on
	// the same connection hidden behind what the proxy or the origin
	// might read differently: an Upgrade (WebSocket, h2c) the origin does
	// not take, followed by the request, or by a NUL and the request;
	// Expect: 100-continue with the request as the body; a GET whose
	// Content-Length covers the request (CL.0, for an origin that ignores
	// a GET's body). The origin (nginx: "host=$host" in every body) must
	// never answer for the denied Host.
	t.Run("upgrade-expect-cl0", func(t *testing.T) {
		req := func(host, path string) string {
			return "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n"
		}
		denied := req(trackerName, "/h3-denied")
		for _, c := range []struct{ name, write string }{
			{"websocket", "GET /h3-ws HTTP/1.1\r\nHost: " + vendorName + "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + denied},
			{"websocket-nul", "GET /h3-wsn HTTP/1.1\r\nHost: " + vendorName + "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x00" + denied},
			{"h2c", "GET /h3-h2c HTTP/1.1\r\nHost: " + vendorName + "\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" + denied},
			{"expect", fmt.Sprintf("POST /h3-expect HTTP/1.1\r\nHost: %s\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n%s", vendorName, len(denied), denied) + denied},
			{"cl0", fmt.Sprintf("GET /h3-cl0 HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s", vendorName, len(denied), denied) + denied},
		} {
			body, port, err := tp.rawHTTP(vendorIP+":80", c.write)
			if !strings.Contains(body, "host="+vendorName) {
				t.Errorf("%s: the allowed request got no answer: %q %v", c.name, body, err)
			}
			if strings.Contains(body, "host="+trackerName) {
				t.Errorf("%s: the origin answered for %s: %q", c.name, trackerName, body)
			}
			if c.name != "websocket-nul" && !strings.Contains(body, "HTTP/1.1 403") {
				t.Errorf("%s: the later request for %s was not refused: %q", c.name, trackerName, body)
			}
			d.waitEvent(t, c.name, byClientPort(port))
		}
	})
	t.Run("icmp-redirect", func(t *testing.T) {
		tp.sendRedirect(t)
		if ok, out := tp.gwRedirected(t); ok {
			t.Errorf("enforce: a LAN host's ICMP redirect moved the gateway's route: %s", out)
		}
	})
}

// dnsFrame is m packed for DNS over TCP (a two-byte length first), with
// extra bytes inside the frame after the message.
func dnsFrame(t *testing.T, m *dns.Msg, extra []byte) []byte {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, extra...)
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)
}

func dnsQ(id uint16, names ...string) *dns.Msg {
	m := new(dns.Msg)
	m.Id = id
	m.RecursionDesired = true
	for _, n := range names {
		m.Question = append(m.Question, dns.Question{Name: dns.Fqdn(n), Qtype: dns.TypeA, Qclass: dns.ClassINET})
	}
	return m
}

// tcpDNS writes b to the gateway's forwarder over TCP in one write and
// reads answers until the forwarder closes or 3 s pass: answers by ID.
func (tp *topo) tcpDNS(t *testing.T, b []byte) map[uint16]*dns.Msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(gwLAN4, "53"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	got := map[uint16]*dns.Msg{}
	for range 16 {
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			break
		}
		buf := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, buf); err != nil {
			break
		}
		m := new(dns.Msg)
		if m.Unpack(buf) == nil {
			got[m.Id] = m
		}
	}
	return got
}
