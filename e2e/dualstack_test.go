package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// Addresses of the dual-stack tests.
const (
	// tempClient6 is the LAN client's second IPv6 address, on the same
	// interface (and MAC) as lanClient4 and lanClient6: a privacy
	// (temporary) address, which happy eyeballs connects from.
	tempClient6 = "2001:db8:1::11"
	// otherDev4 and otherDev6 are another device of the LAN, with a MAC
	// of its own (a macvlan on the LAN client's link).
	otherDev4 = "198.18.1.20"
	otherDev6 = "2001:db8:1::20"
	// sharedMAC4 is a second IPv4 address on the LAN client's link: its
	// MAC then has two, as a repeater's that puts its MAC on its clients'
	// frames, or a proxy-ARP router's.
	sharedMAC4 = "198.18.1.12"
	// dualName, dualName6 and dualNameShared are names of the seed's
	// android-mdm rule (443/tcp), whose answers rotate as a CDN's do.
	dualName       = fcmName
	dualName6      = "mtalk4.google.com"
	dualNameShared = "android.apis.google.com"
)

// The rotating answers: each query for a name gets the next address.
var (
	dualRotA     = []string{"203.0.113.60", "203.0.113.61", "203.0.113.62", "203.0.113.63"}
	dualRotAAAA  = []string{"2001:db8:2::60", "2001:db8:2::61", "2001:db8:2::62", "2001:db8:2::63"}
	dualRotAAAA6 = []string{"2001:db8:2::70", "2001:db8:2::71", "2001:db8:2::72", "2001:db8:2::73"}
	dualRotAAAAS = []string{"2001:db8:2::80", "2001:db8:2::81", "2001:db8:2::82", "2001:db8:2::83"}
)

// TestDualStackDevice: a dual-stack device asks DNS from one of its
// addresses and connects from another. DHCPv4 names the gateway as the
// resolver, so the device asks for A and AAAA over IPv4, and happy
// eyeballs then connects over IPv6 from a privacy address; or it asks over
// one IPv6 address and connects from another. Its queries carry the DNSSEC
// OK bit, as a validating stub's do (systemd-resolved), so the forwarder
// caches its answers under another key than the proxy's own lookup, which
// therefore asks the upstream again; the upstream rotates its answers (a
// CDN), so that lookup never returns the address the device was given.
//
// The connections from the other address, to the address the device was
// given, are allowed in both modes: TLS with the name as SNI (vouched as
// an address given to this device, THREATS.md A2) and bytes that are not
// TLS (the name DNS gave out for the address, dns-learned): capture, which
// decides in audit mode, and the proxy, in enforce mode, agree.
//
// Another device of the same LAN (its own MAC) still cannot use those
// addresses: TLS with the name is sni-mismatch in enforce mode, and bytes
// that are not TLS are no-rule in both modes. Nor can one address of a
// MAC that has two IPv4 addresses (a box that answers for others) use
// what another of its addresses was given.
//
// Before session 20 a client was an address: enforce mode denied the
// device's connections from its other address (sni-mismatch, no-rule),
// while capture counted a DNS answer on the wire to any client for a flow
// without a name, so audit mode reported them allowed, and another
// device's too.
func TestDualStackDevice(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) { dualStack(t, mode) })
	}
}

func dualStack(t *testing.T, mode string) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	u.rotate(dualName, dns.TypeA, dualRotA...)
	u.rotate(dualName, dns.TypeAAAA, dualRotAAAA...)
	u.rotate(dualName6, dns.TypeAAAA, dualRotAAAA6...)
	u.rotate(dualNameShared, dns.TypeAAAA, dualRotAAAAS...)
	var originAddrs []string
	for _, l := range [][]string{dualRotA, dualRotAAAA, dualRotAAAA6, dualRotAAAAS} {
		originAddrs = append(originAddrs, l...)
	}
	origin := tp.newDualOrigin(t, originAddrs)
	tp.lan.AddAddr(t, "eth0", tempClient6+"/64")
	other := tp.newLANDevice(t, "e2dev", otherDev4, otherDev6)

	d := newDaemon(t, tp, mode)
	d.extra = []string{"--upstream-dns", u.addr}
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
			t.Logf("flows:\n%s", d.events())
			out, _ := tp.gw.Run("ip", "neigh", "show", "dev", "lan0")
			t.Logf("the gateway's neighbours on lan0:\n%s", out)
		}
	})
	source := "proxy" // the component whose verdict counts
	if mode == "audit" {
		source = "capture"
	}

	// ask resolves name (type qtype) through the gateway from the LAN
	// client's address src, with the DO bit, and returns the one address.
	ask := func(src, server, name string, qtype uint16) string {
		t.Helper()
		m, err := dnsAsk(tp.lan, src, server, name, qtype, true)
		if err != nil || m.Rcode != dns.RcodeSuccess {
			t.Fatalf("%s %s from %s: %v %v", name, dns.TypeToString[qtype], src, m, err)
		}
		for _, rr := range m.Answer {
			switch r := rr.(type) {
			case *dns.A:
				return r.A.String()
			case *dns.AAAA:
				return r.AAAA.String()
			}
		}
		t.Fatalf("%s %s from %s: no address in %v", name, dns.TypeToString[qtype], src, m)
		return ""
	}
	// check waits for the event of the connection from src:port and
	// checks it.
	check := func(what, src string, port int, verdict, reason, name, nameSrc string) {
		t.Helper()
		since := dialedAt(port)
		ev := d.waitEvent(t, what, func(e flowEvent) bool {
			return e.Kind == "flow" && e.Source == source && e.Client == src && e.ClientPort == port && !e.Time.Before(since)
		})
		if ev.Kind == "" {
			return
		}
		if ev.Verdict != verdict || reason != "" && ev.Reason != reason || name != "" && (ev.Name != name || ev.NameSource != nameSrc) {
			t.Errorf("%s: %v; want %s reason %q name %q (%s)", what, ev, verdict, reason, name, nameSrc)
		}
		if want := verdict == "deny" && mode == "enforce"; ev.Enforced != want {
			t.Errorf("%s: enforced %v, want %v", what, ev.Enforced, want)
		}
	}
	hello := func(name string) []byte { return buildHello(helloSpec{sni: [][]string{{name}}}) }
	const notTLS = "SSH-2.0-OpenSSH_9.2\r\n" // a VPN over 443, as the seed's devices run
	// try connects from src (in ns) to addr:443 twice, with a hello for
	// name and with bytes that are not TLS, and checks both: allowed (the
	// origin answers) or denied (enforce: nothing reaches it).
	try := func(what string, ns *testnet.NS, src, addr, name string, allow, helloAllow bool, helloReason, rawReason string) {
		t.Helper()
		dial := dialFrom(ns, src)
		hp := net.JoinHostPort(addr, "443")
		tlsBefore, rawBefore := origin.tls.Load(), origin.raw.Load()
		o := sendHelloVia(dial, hp, hello(name), 0, 0)
		reached := o.err == nil && !o.denied
		if reached != (helloAllow || mode == "audit") {
			t.Errorf("%s: TLS, SNI %s, from %s to %s: %v", what, name, src, hp, o)
		}
		verdict := "allow"
		if !helloAllow {
			verdict = "deny"
		}
		if helloReason != "-" {
			check(what+": TLS with SNI", src, o.port, verdict, helloReason, name, "sni")
		}
		verdict = "allow"
		if !allow {
			verdict = "deny"
		}
		body, port, err := rawVia(dial, hp, notTLS)
		if got := strings.HasPrefix(body, "raw"); got != (allow || mode == "audit") {
			t.Errorf("%s: bytes that are not TLS from %s to %s: %q %v", what, src, hp, body, err)
		}
		learned := name
		if !allow {
			learned = ""
		}
		check(what+": not TLS", src, port, verdict, rawReason, learned, "dns-learned")
		if mode == "enforce" && !allow && !helloAllow && (origin.tls.Load() != tlsBefore || origin.raw.Load() != rawBefore) {
			t.Errorf("%s: the origin was reached", what)
		}
		if mode == "enforce" && !allow && origin.raw.Load() != rawBefore {
			t.Errorf("%s: the origin was reached by bytes that are not TLS", what)
		}
	}

	// DNS over IPv4 (A and AAAA), the connection over IPv6 from the
	// temporary address.
	a4 := ask(lanClient4, gwLAN4, dualName, dns.TypeA)
	a6 := ask(lanClient4, gwLAN4, dualName, dns.TypeAAAA)
	// The upstream gives out another address each time: a lookup of the
	// name now does not return the one the device was given.
	if m, err := dnsAsk(tp.gw, gwWAN4, u.addr, dualName, dns.TypeAAAA, false); err != nil || len(m.Answer) != 1 || m.Answer[0].(*dns.AAAA).AAAA.String() == a6 {
		t.Fatalf("the upstream's second answer for %s AAAA: %v %v; want one address other than %s", dualName, m, err, a6)
	}
	try("DNS over IPv4, connection from another IPv6 address", tp.lan, tempClient6, a6, dualName, true, true, "", "")

	// DNS over one IPv6 address, the connection from another.
	b6 := ask(lanClient6, gwLAN6, dualName6, dns.TypeAAAA)
	try("DNS over IPv6, connection from another IPv6 address", tp.lan, tempClient6, b6, dualName6, true, true, "", "")

	// Another device: the addresses given to the first are not its own,
	// for bytes that are not TLS (no name: no-rule). A TLS hello with the
	// name is vouched for all the same: the proxy's fresh lookup of the
	// name is answered from the forwarder's cache, which holds the answer
	// the first device was given (it asked with the DNSSEC OK bit: since
	// TestLookupNetIPFindsDOAnswers the lookup takes that answer too), an
	// address given out for that name (THREATS.md A2 holds). Its event
	// is checked in enforce mode only: capture reads the flow as the
	// fresh lookup would most likely find it ("-").
	helloReason := "allowed"
	if mode == "audit" {
		helloReason = "-"
	}
	try("another device, IPv6", other, otherDev6, a6, dualName, false, true, helloReason, "no-rule")
	try("another device, IPv4", other, otherDev4, a4, dualName, false, true, helloReason, "no-rule")

	// A second IPv4 address on the client's MAC: the MAC is no longer one
	// device's, and what the forwarder gave that address does not count
	// for the IPv6 ones.
	tp.lan.MustRun("ip", "addr", "add", sharedMAC4+"/24", "dev", "eth0")
	c6 := ask(sharedMAC4, gwLAN4, dualNameShared, dns.TypeAAAA)
	try("a MAC with two IPv4 addresses", tp.lan, tempClient6, c6, dualNameShared, false, true, helloReason, "no-rule")
}

// dialFrom returns a dialer of TCP connections from address src of
// namespace ns (recorded for byClientPort and dialedAt).
func dialFrom(ns *testnet.NS, src string) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		var c net.Conn
		start := time.Now()
		err := ns.Do(func() (err error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
			c, err = d.DialContext(ctx, "tcp", addr)
			return
		})
		if err == nil {
			dialTimes.Store(c.LocalAddr().(*net.TCPAddr).Port, start)
		}
		return c, err
	}
}

// newLANDevice adds another device to the LAN: a namespace named after
// prefix whose interface is a macvlan (a MAC of its own) on the LAN
// client's link, with addresses addr4 (/24) and addr6 (/64) and the
// gateway as its router.
func (tp *topo) newLANDevice(t *testing.T, prefix, addr4, addr6 string) *testnet.NS {
	t.Helper()
	ns := testnet.New(t, prefix)
	tp.lan.MustRun("ip", "link", "add", "dev0", "link", "eth0", "type", "macvlan", "mode", "bridge")
	tp.lan.MustRun("ip", "link", "set", "dev0", "netns", ns.Name)
	ns.MustRun("sysctl", "-qw", "net.ipv6.conf.dev0.accept_dad=0")
	ns.MustRun("ip", "addr", "add", addr4+"/24", "dev", "dev0")
	ns.MustRun("ip", "-6", "addr", "add", addr6+"/64", "dev", "dev0", "nodad")
	ns.MustRun("ip", "link", "set", "dev0", "up")
	ns.WaitAddr(t, addr6)
	ns.MustRun("ip", "route", "add", "default", "via", gwLAN4)
	ns.MustRun("ip", "-6", "route", "add", "default", "via", gwLAN6)
	return ns
}

// dualOrigin is a server on port 443 of test addresses in the internet
// namespace: TLS (the test leaf certificate) to a client whose first byte
// starts a TLS handshake, else the line "raw"; it counts each.
type dualOrigin struct {
	tls, raw atomic.Int64
}

func (tp *topo) newDualOrigin(t *testing.T, addrs []string) *dualOrigin {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(tp.dir, "leaf.pem"), filepath.Join(tp.dir, "leaf.key"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	o := &dualOrigin{}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	for _, a := range addrs {
		if netip.MustParseAddr(a).Is4() {
			tp.inet.AddAddr(t, "eth0", a+"/32")
		} else {
			tp.inet.AddAddr(t, "eth0", a+"/128")
		}
		ln, err := tp.inet.Listen("tcp", net.JoinHostPort(a, "443"))
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
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					c.SetDeadline(time.Now().Add(20 * time.Second))
					br := bufio.NewReader(c)
					first, err := br.Peek(1)
					if err != nil {
						return
					}
					if first[0] != 0x16 {
						o.raw.Add(1)
						fmt.Fprintf(c, "raw\n")
						return
					}
					o.tls.Add(1)
					tc := tls.Server(&peekedConn{Conn: c, r: br}, cfg)
					tc.Handshake()
				}()
			}
		}()
	}
	return o
}

// peekedConn is a connection whose first bytes a bufio.Reader has read.
type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
