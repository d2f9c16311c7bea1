package e2e

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/ipv6"
)

// The gateway itself, attacked from the LAN by a host with root on its own
// machine: routing messages that would change the gateway's own routes.
const (
	rogueRAPrefix = "2001:db8:66::" // the prefix a rogue RA advertises
	lanRouter4    = "198.18.1.20"   // a router on the LAN: the gateway routes lanRouted through it
	lanRouted     = "192.0.2.0/24"  // a subnet behind lanRouter4
	lanRoutedHost = "192.0.2.5"
)

// lanLinkLocal returns the LAN client's link-local address once DAD is
// done with it.
func (tp *topo) lanLinkLocal(t *testing.T) netip.Addr {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		out, _ := tp.lan.Run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
		if strings.Contains(out, "tentative") {
			continue
		}
		for _, f := range strings.Fields(out) {
			if p, err := netip.ParsePrefix(f); err == nil && p.Addr().IsLinkLocalUnicast() {
				return p.Addr()
			}
		}
	}
	t.Fatal("the LAN client has no usable link-local address after 5s")
	return netip.Addr{}
}

// sendRogueRA sends three Router Advertisements from the LAN client to
// all nodes on its link: a default router (lifetime 1800 s) and an
// autonomous prefix, rogueRAPrefix/64.
func (tp *topo) sendRogueRA(t *testing.T) {
	t.Helper()
	ll := tp.lanLinkLocal(t)
	pc, err := tp.lan.ListenPacket("ip6:ipv6-icmp", ll.String()+"%eth0")
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
	dst := &net.IPAddr{IP: net.ParseIP("ff02::1"), Zone: "eth0"}
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
		// next hop: the LAN client's traffic to it gives one.
		tp.lan.Run("ping", "-c1", "-W1", gwLAN4)
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
// defaults). Each is first shown to work without egressd; in enforce
// mode the firewall drops RAs and redirects arriving on the LAN side.
func TestHardeningGateway(t *testing.T) {
	tp := newTopo(t)
	tp.gw.MustRun("sysctl", "-qw", "net.ipv6.conf.lan0.accept_ra=2")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.lan0.accept_redirects=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.shared_media=1")
	tp.gw.MustRun("ip", "route", "add", lanRouted, "via", lanRouter4, "dev", "lan0")
	tp.lan.MustRun("ip", "addr", "add", lanRouter4+"/32", "dev", "eth0")

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

	d := newDaemon(t, tp, "enforce")
	d.start()
	defer d.stop()
	t.Run("rogue-ra", func(t *testing.T) {
		tp.sendRogueRA(t)
		time.Sleep(time.Second)
		if took, why := tp.gwTookRA(t); took {
			t.Errorf("enforce: the gateway took a rogue RA from the LAN:\n%s", why)
		}
	})
	t.Run("icmp-redirect", func(t *testing.T) {
		tp.sendRedirect(t)
		if ok, out := tp.gwRedirected(t); ok {
			t.Errorf("enforce: a LAN host's ICMP redirect moved the gateway's route: %s", out)
		}
	})
}
