package firewall

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"egressd/internal/netutil"
	"egressd/internal/testnet"
)

const icmpPolicy = `
version: 1
mode: enforce
rules:
  - name: udp-net
    to: [198.18.2.2/32]
    ports: [9000/udp]
  - name: monitoring
    from: [198.18.1.2, "2001:db8:1::2"]
    to: [198.18.2.2/32, "2001:db8:2::2/128", status.test]
    ports: [icmp]
`

// TestEnforceICMPEcho: a rule with icmp in its ports lets its clients
// ping its addresses in enforce mode, IPv4 and IPv6: a CIDR target at
// once, a name's address once learned (as for a UDP rule's names); an
// address it does not name, and a client its from: does not hold, stay
// dropped. Each case is tried without the firewall first, so a drop is
// the firewall's doing.
func TestEnforceICMPEcho(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	// A second client address, outside the rule's from:.
	tp.client.AddAddr(t, "eth0", "198.18.1.3/24", "2001:db8:1::3/64")
	const in, out = "198.18.1.2", "198.18.1.3"
	const in6, out6 = "2001:db8:1::2", "2001:db8:1::3"
	type probe struct{ src, dst string }
	all := []probe{
		{in, "198.18.2.2"}, {in6, "2001:db8:2::2"}, {in, "198.18.2.3"}, {in6, "2001:db8:2::3"},
		{in, "198.18.2.4"}, {out, "198.18.2.2"}, {out6, "2001:db8:2::2"}, {out, "198.18.2.3"}, {out6, "2001:db8:2::3"},
	}
	for _, p := range all {
		if err := pingFrom(tp.client, p.src, p.dst); err != nil {
			t.Fatalf("without the firewall, ping %s from %s: %v: the test would prove nothing", p.dst, p.src, err)
		}
	}
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, icmpPolicy)); err != nil {
		t.Fatal(err)
	}
	check := func(pass []probe, drop []probe) {
		t.Helper()
		for _, p := range pass {
			if err := pingFrom(tp.client, p.src, p.dst); err != nil {
				t.Errorf("enforce: ping %s from %s: %v, want an answer", p.dst, p.src, err)
			}
		}
		for _, p := range drop {
			if err := pingFrom(tp.client, p.src, p.dst); err == nil {
				t.Errorf("enforce: ping %s from %s answered, want it dropped", p.dst, p.src)
			}
		}
	}
	// Before the name's addresses are learned: the CIDR targets only.
	check(all[:2], all[2:])
	for _, a := range []string{"198.18.2.3", "2001:db8:2::3"} {
		if err := fw.Learn("monitoring", netip.MustParseAddr(a), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	check(all[:4], all[4:])
	// UDP to the icmp rule's addresses stays closed: icmp opens no port.
	tp.serverUDP(t, "198.18.2.3:9000")
	if got, err := udpAsk(tp.client, "198.18.2.3:9000", 700*time.Millisecond); !isTimeout(err) {
		t.Errorf("UDP to a learned address of the icmp rule: %q, %v; want a timeout", got, err)
	}
}

// pingFrom sends one ICMP or ICMPv6 echo request from src in ns and waits
// 1 s for the reply.
func pingFrom(ns *testnet.NS, src, dst string) error {
	v6 := strings.Contains(dst, ":")
	network, proto := "ip4:icmp", 1
	var typ, reply icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if v6 {
		network, proto = "ip6:ipv6-icmp", 58
		typ, reply = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	var c *icmp.PacketConn
	if err := ns.Do(func() (err error) { c, err = icmp.ListenPacket(network, src); return }); err != nil {
		return err
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: 2, Data: []byte("egressd " + src)}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return err
	}
	if _, err := c.WriteTo(b, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != reply || from.String() != dst {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && string(e.Data) == "egressd "+src {
			return nil
		}
	}
}

// TestKeepsICMPEcho: a reload that changes an icmp rule keeps the echo
// flows (ICMP and ICMPv6 conntrack entries, which carry no ports) the new
// rule still allows, and cuts the others.
func TestKeepsICMPEcho(t *testing.T) {
	old := renderEnforce(t, `  - {name: ping, to: [198.51.100.0/24, "2001:db8:5::/48"], ports: [icmp]}`+"\n")
	tg := old.flows[0].tag
	entry := func(proto uint8, dst string) netutil.ConntrackEntry {
		src := "198.18.1.2"
		if strings.Contains(dst, ":") {
			src = "2001:db8:1::2"
		}
		// An ICMP tuple has an id, no ports.
		return netutil.ConntrackEntry{Proto: proto,
			Orig:  netutil.ConntrackTuple{Src: netip.AddrPortFrom(netip.MustParseAddr(src), 0), Dst: netip.AddrPortFrom(netip.MustParseAddr(dst), 0)},
			Reply: netutil.ConntrackTuple{Src: netip.AddrPortFrom(netip.MustParseAddr(dst), 0), Dst: netip.AddrPortFrom(netip.MustParseAddr(src), 0)}}
	}
	noLive := func(string, netip.Addr) bool { return false }
	for _, c := range []struct {
		rules string
		e     netutil.ConntrackEntry
		keep  bool
	}{
		{`  - {name: ping, to: [198.51.100.0/25, "2001:db8:5::/48"], ports: [icmp]}`, entry(1, "198.51.100.7"), true},
		{`  - {name: ping, to: [198.51.100.0/25, "2001:db8:5::/48"], ports: [icmp]}`, entry(58, "2001:db8:5::7"), true},
		{`  - {name: ping, to: [198.51.100.0/25, "2001:db8:5::/48"], ports: [icmp]}`, entry(1, "198.51.100.200"), false},
		{`  - {name: ping, to: [198.51.100.0/24, "2001:db8:5::/48"], ports: [123/udp]}`, entry(58, "2001:db8:5::7"), false},
	} {
		now := renderEnforce(t, c.rules+"\n")
		if got, _ := now.keeps([]*Ruleset{old, now}, defaultMark(tg), keyOf(c.e), noLive); got != c.keep {
			t.Errorf("%s, proto %d to %s: keeps = %v, want %v", c.rules, c.e.Proto, c.e.Reply.Src.Addr(), got, c.keep)
		}
	}
}
