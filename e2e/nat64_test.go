package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// The NAT64 test's network-specific prefix (RFC 6052) and the synthesized
// addresses of 198.18.x.x test addresses in it, which the internet
// namespace holds directly (egressd only sees IPv6: no translator).
const (
	nat64Prefix   = "2001:db8:64::/96"
	nat64Allowed  = "2001:db8:64::c612:710"  // 198.18.7.16, allowed.nat64.test
	nat64Denied   = "2001:db8:64::c612:711"  // 198.18.7.17, denied.nat64.test
	nat64CIDR     = "2001:db8:64::c612:820"  // 198.18.8.32, in the v4net rule's 198.18.8.0/24
	nat64Metadata = "2001:db8:64::a9fe:a9fe" // 169.254.169.254
	nat64Name     = "allowed.nat64.test"
	nat64DenyName = "denied.nat64.test"
	nat64UDPName  = "udp.nat64.test" // an attacker's zone: answers nat64Metadata
)

const nat64Policy = `version: 1
mode: enforce
rules:
  - name: nat64-name
    to: [allowed.nat64.test]
    ports: [443/tcp]
  - name: nat64-v4net
    to: [198.18.8.0/24]
    ports: [7443/tcp, 9001/udp]
  - name: nat64-any6
    to: ["::/0"]
    ports: [8443/tcp]
  - name: nat64-udp-name
    to: [udp.nat64.test]
    ports: [9002/udp]
`

// TestNAT64: an IPv6-only LAN behind a NAT64/DNS64 whose prefix is a
// network-specific one. With --nat64-prefix, in enforce mode: an allowed
// name's synthesized address is reached over TLS through the proxy, and a
// denied name's is not; an IPv4 CIDR rule (198.18.8.0/24) opens the NAT64
// form of its addresses, through the proxy (TCP) and the firewall
// (forwarded UDP); the NAT64 form of 169.254.169.254 stays closed
// (special-range) though a rule opens ::/0 on its port, which does open
// the NAT64 form of a public address. A name under a UDP rule whose
// authoritative answer is the NAT64 form of 169.254.169.254 opens no
// forwarded UDP to it: the forwarder drops the address from the answer, so
// the rule's learned set never holds it (dnsfilter's TestAnswerFilterNAT64
// as a unit). nftables is a second line there: the rule's accept for its
// learned set excludes the guarded set, which holds the NAT64 forms of the
// guarded and private IPv4 ranges under the flag. With the filter judging
// the prefix as any IPv6 one (a mutation), the answer is given out and the
// datagram is still dropped (firewall's TestEnforceLearnedSetsKeepGuardedRanges
// puts such addresses into a learned set directly), where it got out when
// the filter was the only guard.
//
// Without the flag (today's behaviour), the prefix is an IPv6 prefix like
// any other: the IPv4 CIDR rule does not match the NAT64 form (no-rule),
// and nothing guards the NAT64 form of 169.254.169.254, which ::/0 opens,
// and which the UDP rule's name, answered so, lets out.
// (With the well-known prefix 64:ff9b::/96 instead, the guard closes
// every synthesized address, the allowed name's too: special-range;
// TestHardeningRanges, proxy's TestDecideNAT64.)
func TestNAT64(t *testing.T) {
	tp := newIPv6OnlyTopo(t, "h7")

	u := tp.startUpstream(t)
	// The DNS64 upstream: synthesized AAAA records only.
	u.add(nat64Name + ". 300 IN AAAA " + nat64Allowed)
	u.add(nat64DenyName + ". 300 IN AAAA " + nat64Denied)
	u.add(nat64UDPName + ". 300 IN AAAA " + nat64Metadata)

	origin := tp.newDualOrigin(t, []string{nat64Allowed, nat64Denied})
	hits := tp.nat64Servers(t, []string{nat64CIDR, nat64Metadata}, []int{7443, 8443},
		[]string{net.JoinHostPort(nat64CIDR, "9001"), net.JoinHostPort(nat64Metadata, "9002")})

	for _, withFlag := range []bool{true, false} {
		t.Run(fmt.Sprintf("nat64-prefix=%v", withFlag), func(t *testing.T) {
			d := newDaemon(t, tp, "enforce")
			d.writePolicy([]byte(nat64Policy))
			d.extra = []string{"--upstream-dns", u.addr}
			if withFlag {
				d.extra = append(d.extra, "--nat64-prefix", nat64Prefix)
			}
			d.start()
			d.stopAtCleanup(t)
			// event waits for the proxy's event of the connection from
			// port and checks its reason.
			event := func(what string, port int, reason string) {
				t.Helper()
				ev := d.waitEvent(t, what, func(e flowEvent) bool {
					return e.Kind == "flow" && e.Source == "proxy" && e.Client == lanClient6 && e.ClientPort == port
				})
				if ev.Reason != reason {
					t.Errorf("%s: event %v, want reason %s", what, ev, reason)
				}
			}

			// DNS: the allowed name's synthesized address is given out,
			// the denied name's is not.
			for _, c := range []struct {
				name  string
				rcode int
			}{{nat64Name, dns.RcodeSuccess}, {nat64DenyName, dns.RcodeRefused}} {
				m, err := dnsAsk(tp.lan, lanClient6, gwLAN6, c.name, dns.TypeAAAA, false)
				if err != nil || m.Rcode != c.rcode {
					t.Fatalf("AAAA %s: %v %v, want rcode %s", c.name, m, err, dns.RcodeToString[c.rcode])
				}
				if c.rcode == dns.RcodeSuccess && (len(m.Answer) != 1 || !strings.Contains(m.Answer[0].String(), nat64Allowed)) {
					t.Fatalf("AAAA %s: %v, want %s", c.name, m.Answer, nat64Allowed)
				}
			}

			tlsBefore := origin.tls.Load()
			port, err := nat64TLS(tp.lan, nat64Allowed, nat64Name)
			if err != nil {
				t.Errorf("TLS to %s (%s): %v", nat64Name, nat64Allowed, err)
			}
			event("the allowed name", port, "allowed")
			port, err = nat64TLS(tp.lan, nat64Denied, nat64DenyName)
			if err == nil {
				t.Errorf("TLS to %s (%s): connected", nat64DenyName, nat64Denied)
			}
			event("the denied name", port, "no-rule")
			// The allowed name at an address never given out for it
			// (A2): still sni-mismatch.
			port, err = nat64TLS(tp.lan, nat64Denied, nat64Name)
			if err == nil {
				t.Errorf("TLS to %s at %s: connected", nat64Name, nat64Denied)
			}
			event("the allowed name at another address", port, "sni-mismatch")
			if got := origin.tls.Load() - tlsBefore; got != 1 {
				t.Errorf("the origin saw %d TLS connections, want 1", got)
			}

			// TCP by address: the IPv4 CIDR rule's NAT64 form, and ::/0.
			for _, c := range []struct {
				what    string
				addr    string
				port    int
				reason  string // with the flag; without it, want
				without string
			}{
				{"the IPv4 CIDR rule's NAT64 form", nat64CIDR, 7443, "allowed", "no-rule"},
				{"::/0 to a public address's NAT64 form", nat64CIDR, 8443, "allowed", "allowed"},
				{"::/0 to metadata's NAT64 form", nat64Metadata, 8443, "special-range", "allowed"},
			} {
				want := c.reason
				if !withFlag {
					want = c.without
				}
				before := hits.tcp(c.addr, c.port)
				port, ok := nat64Raw(tp.lan, c.addr, c.port)
				if ok != (want == "allowed") {
					t.Errorf("%s ([%s]:%d): answered %v, want %v", c.what, c.addr, c.port, ok, want == "allowed")
				}
				if got := hits.tcp(c.addr, c.port) - before; (got > 0) != (want == "allowed") {
					t.Errorf("%s: the server saw %d connections", c.what, got)
				}
				event(c.what, port, want)
			}

			// Forwarded UDP (the firewall): the IPv4 CIDR rule's NAT64
			// form.
			before := hits.udp(nat64CIDR, 9001)
			answered := nat64UDP(tp.lan, nat64CIDR, 9001)
			if answered != withFlag {
				t.Errorf("UDP to [%s]:9001: answered %v, want %v", nat64CIDR, answered, withFlag)
			}
			if got := hits.udp(nat64CIDR, 9001) - before; (got > 0) != withFlag {
				t.Errorf("UDP to [%s]:9001: the server saw %d datagrams", nat64CIDR, got)
			}

			// Forwarded UDP by name (the rule's learned set): the answer
			// is metadata's NAT64 form, which the flag keeps out of the
			// answer and the set.
			m, err := dnsAsk(tp.lan, lanClient6, gwLAN6, nat64UDPName, dns.TypeAAAA, false)
			if err != nil {
				t.Fatalf("AAAA %s: %v", nat64UDPName, err)
			}
			if given := strings.Contains(fmt.Sprint(m.Answer), nat64Metadata); given == withFlag {
				t.Errorf("AAAA %s: %v; metadata's NAT64 form given out: %v", nat64UDPName, m.Answer, given)
			}
			before = hits.udp(nat64Metadata, 9002)
			answered = nat64UDP(tp.lan, nat64Metadata, 9002)
			if got := hits.udp(nat64Metadata, 9002) - before; answered == withFlag || (got > 0) == withFlag {
				t.Errorf("UDP to [%s]:9002 (%s): answered %v, the server saw %d datagrams", nat64Metadata, nat64UDPName, answered, got)
			}
		})
	}
}

// stopAtCleanup stops d when t ends, logging its output, its flows and
// the gateway's ruleset should t have failed.
func (d *daemon) stopAtCleanup(t *testing.T) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
			t.Logf("flows:\n%s", d.events())
			out, _ := d.tp.gw.Run("nft", "list", "table", "inet", "egressd")
			t.Logf("ruleset:\n%s", out)
		}
		d.stop()
	})
}

// nat64Hits counts what the NAT64 test's servers saw.
type nat64Hits struct {
	mu  sync.Mutex
	m   map[string]int // TCP connections by address:port
	dgs map[string]int // UDP datagrams by address:port
}

func (h *nat64Hits) tcp(addr string, port int) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.m[net.JoinHostPort(addr, fmt.Sprint(port))]
}

func (h *nat64Hits) udp(addr string, port int) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dgs[net.JoinHostPort(addr, fmt.Sprint(port))]
}

// newIPv6OnlyTopo is the NAT64 tests' network: the LAN client has IPv6
// only, the gateway keeps its usual addresses; the namespaces' names begin
// with tag.
func newIPv6OnlyTopo(t *testing.T, tag string) *topo {
	t.Helper()
	tp := &topo{dir: t.TempDir()}
	tp.lan = testnet.New(t, tag+"lan")
	tp.gw = testnet.New(t, tag+"gw")
	tp.inet = testnet.New(t, tag+"net")
	testnet.Link(t, tp.lan, "eth0", []string{lanClient6 + "/64"}, tp.gw, "lan0", []string{gwLAN4 + "/24", gwLAN6 + "/64"})
	testnet.Link(t, tp.gw, "wan0", []string{gwWAN4 + "/24", gwWAN6 + "/64"}, tp.inet, "eth0", []string{inetWAN4 + "/24", inetWAN6 + "/64"})
	tp.lan.MustRun("ip", "-6", "route", "add", "default", "via", gwLAN6)
	tp.gw.MustRun("ip", "route", "add", "default", "via", inetWAN4)
	tp.gw.MustRun("ip", "-6", "route", "add", "default", "via", inetWAN6)
	tp.gw.MustRun("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	tp.inet.MustRun("ip", "-6", "route", "add", "2001:db8:1::/64", "via", gwWAN6)
	tp.makePKI(t)
	return tp
}

// nat64Servers runs the servers a NAT64 test reaches by address, in the
// internet namespace, which gets addrs: TCP on tcpPorts of each of addrs
// (each answers "ok" to a line), UDP echo on each of udp (address:port).
func (tp *topo) nat64Servers(t *testing.T, addrs []string, tcpPorts []int, udp []string) *nat64Hits {
	t.Helper()
	h := &nat64Hits{m: map[string]int{}, dgs: map[string]int{}}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	for _, a := range addrs {
		tp.inet.AddAddr(t, "eth0", a+"/128")
		for _, port := range tcpPorts {
			addr := net.JoinHostPort(a, fmt.Sprint(port))
			ln, err := tp.inet.Listen("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					h.mu.Lock()
					h.m[addr]++
					h.mu.Unlock()
					c.SetDeadline(time.Now().Add(5 * time.Second))
					buf := make([]byte, 64)
					c.Read(buf)
					c.Write([]byte("ok\n"))
					c.Close()
				}
			}()
		}
	}
	for _, addr := range udp {
		pc, err := tp.inet.ListenPacket("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1500)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				h.mu.Lock()
				h.dgs[addr]++
				h.mu.Unlock()
				pc.WriteTo(buf[:n], from)
			}
		}()
	}
	return h
}

// nat64TLS completes a TLS handshake with sni from the LAN client to
// addr:443 and returns the client's port.
func nat64TLS(lan *testnet.NS, addr, sni string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := lan.DialContext(ctx, "tcp", net.JoinHostPort(addr, "443"))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	port := c.LocalAddr().(*net.TCPAddr).Port
	dialTimes.Store(port, time.Now())
	c.SetDeadline(time.Now().Add(5 * time.Second))
	tc := tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
	return port, tc.Handshake()
}

// nat64Raw sends a line from the LAN client to addr:port and reports
// whether "ok" came back, with the client's port.
func nat64Raw(lan *testnet.NS, addr string, port int) (int, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := lan.DialContext(ctx, "tcp", net.JoinHostPort(addr, fmt.Sprint(port)))
	if err != nil {
		return 0, false
	}
	defer c.Close()
	lport := c.LocalAddr().(*net.TCPAddr).Port
	dialTimes.Store(lport, time.Now())
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("hello\n"))
	b, _ := io.ReadAll(io.LimitReader(c, 16))
	return lport, string(b) == "ok\n"
}

// nat64UDP sends one datagram from the LAN client to addr:port, up to
// three times, and reports whether it was echoed.
func nat64UDP(lan *testnet.NS, addr string, port int) bool {
	var pc net.PacketConn
	if err := lan.Do(func() (err error) { pc, err = net.ListenPacket("udp", net.JoinHostPort(lanClient6, "0")); return }); err != nil {
		return false
	}
	defer pc.Close()
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(addr), uint16(port)))
	buf := make([]byte, 64)
	for range 3 {
		pc.WriteTo([]byte("ping"), to)
		pc.SetReadDeadline(time.Now().Add(time.Second))
		if n, _, err := pc.ReadFrom(buf); err == nil && string(buf[:n]) == "ping" {
			return true
		}
	}
	return false
}
