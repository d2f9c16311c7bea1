package firewall

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestEnforceOtherInterfaces: in enforce mode nothing reaches the WAN side
// that did not pass the LAN's rules, whatever interface it came in on: a
// second LAN segment (a VLAN, a bridge port, a VPN) that --lan does not
// name gets no way around the policy (THREATS.md F3). Without the
// firewall the segment reaches the server, so a zero is the firewall's
// doing; traffic between the two LAN segments is not the firewall's
// business and still flows.
func TestEnforceOtherInterfaces(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	other := testnet.New(t, "fwo")
	testnet.Link(t, other, "eth0", []string{"198.18.3.2/24", "2001:db8:3::2/64"},
		tp.gw, "lan1", []string{"198.18.3.1/24", "2001:db8:3::1/64"})
	other.MustRun("ip", "route", "add", "default", "via", "198.18.3.1")
	other.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:3::1")
	tp.server.MustRun("ip", "route", "add", "198.18.3.0/24", "via", "198.18.2.1")
	tp.server.MustRun("ip", "-6", "route", "add", "2001:db8:3::/64", "via", "2001:db8:2::1")
	tp.serverUDP(t, "198.18.2.3:9000", "[2001:db8:2::3]:9000")
	tp.serverTCP(t, "[::]:80")
	pc, err := tp.client.ListenPacket("udp", "[::]:7000")
	if err != nil {
		t.Fatal(err)
	}
	udpEcho(t, pc)

	tp.gw.MustRun("nft", "-f", writeTemp(t, `table inet h4count {
	chain out {
		type filter hook postrouting priority 0; policy accept;
		oifname "wan0" ip saddr 198.18.3.0/24 counter comment "c0"
		oifname "wan0" ip6 saddr 2001:db8:3::/64 counter comment "c1"
	}
}
`))
	out := func() [2]int {
		var n [2]int
		for _, m := range regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "c(\d)"`).FindAllStringSubmatch(tp.gw.MustRun("nft", "list", "table", "inet", "h4count"), -1) {
			i, _ := strconv.Atoi(m[2])
			n[i], _ = strconv.Atoi(m[1])
		}
		return n
	}
	send := func() {
		for _, dst := range []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000"} {
			udpAsk(other, dst, 300*time.Millisecond)
		}
		for _, dst := range []string{"198.18.2.2:80", "[2001:db8:2::2]:80"} {
			tcpLine(other, dst, 300*time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
	}
	send()
	base := out()
	if base[0] == 0 || base[1] == 0 {
		t.Fatalf("without the firewall, the second segment's packets did not reach the WAN (%v): the test would prove nothing", base)
	}
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	send()
	if now := out(); now != base {
		t.Errorf("enforce: the second segment's packets went out the WAN: %v -> %v", base, now)
	}
	// Between the two LAN segments: not egress.
	if got, err := udpAsk(other, "198.18.1.2:7000", 3*time.Second); err != nil {
		t.Errorf("from the second segment to the LAN: %q %v", got, err)
	}
}

// TestEnforceSeveralLANs: with two LAN interfaces (Config.LANs) each is
// the LAN: from both, DNS and TCP are redirected, forwarded UDP goes out
// where a rule allows it and nowhere else. Traffic from one LAN interface
// to the other is LAN traffic too: a rule (the address of a host on the
// other segment, as `private` would hold it) lets it through, and what no
// rule allows is dropped. Every denial is checked against the same
// exchange without the firewall, so a timeout is the firewall's doing.
func TestEnforceSeveralLANs(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	other := testnet.New(t, "h1fwo")
	testnet.Link(t, other, "eth0", []string{"198.18.3.2/24", "2001:db8:3::2/64"},
		tp.gw, "lan1", []string{"198.18.3.1/24", "2001:db8:3::1/64"})
	other.MustRun("ip", "route", "add", "default", "via", "198.18.3.1")
	other.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:3::1")
	tp.server.MustRun("ip", "route", "add", "198.18.3.0/24", "via", "198.18.2.1")
	tp.server.MustRun("ip", "-6", "route", "add", "2001:db8:3::/64", "via", "2001:db8:2::1")
	tp.proxyStandIn(t)
	tp.dnsStandIn(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000")
	tp.serverTCP(t, "[::]:80")
	// A service on each segment's host, one port a rule opens and one it
	// does not.
	for _, ns := range []*testnet.NS{tp.client, other} {
		for _, a := range []string{"[::]:7000", "[::]:7001"} {
			pc, err := ns.ListenPacket("udp", a)
			if err != nil {
				t.Fatal(err)
			}
			udpEcho(t, pc)
		}
	}
	clients := []struct {
		name string
		ns   *testnet.NS
		peer string // the host of the other LAN segment
	}{{"lan0", tp.client, "198.18.3.2"}, {"lan1", other, "198.18.1.2"}}
	denied := func(c int) []string {
		p := clients[c].peer
		return []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000", p + ":7001"}
	}
	for c := range clients {
		for _, dst := range denied(c) {
			if _, err := udpAsk(clients[c].ns, dst, 3*time.Second); err != nil {
				t.Fatalf("without the firewall, %s to %s: %v: the test would prove nothing", clients[c].name, dst, err)
			}
		}
	}

	fw := tp.firewall(t, Config{LANs: []string{"lan0", "lan1"}})
	policy := testPolicy + `
  - name: between-lans
    to: [198.18.1.2, 198.18.3.2]
    ports: [7000/udp]
`
	if err := fw.Install(compile(t, policy)); err != nil {
		t.Fatal(err)
	}
	for c, cl := range clients {
		t.Run(cl.name, func(t *testing.T) {
			for _, dst := range []string{"198.18.2.2:80", "[2001:db8:2::2]:80"} {
				line, err := tcpLine(cl.ns, dst, 5*time.Second)
				if want := "proxy orig=" + dst + "\n"; err != nil || line != want {
					t.Errorf("tcp %s: got %q, %v; want %q", dst, line, err, want)
				}
			}
			for _, dst := range []string{"203.0.113.53:53", "[2001:db8:2::53]:53"} {
				got, err := udpAsk(cl.ns, dst, 3*time.Second)
				if err != nil || !strings.HasPrefix(got, "ping from ") {
					t.Errorf("dns %s: got %q, %v; want the forwarder's answer", dst, got, err)
				}
			}
			for _, dst := range []string{"198.18.2.2:9000", "[2001:db8:2::2]:9000", cl.peer + ":7000"} {
				if got, err := udpAsk(cl.ns, dst, 3*time.Second); err != nil {
					t.Errorf("udp %s (a rule allows it): %q, %v", dst, got, err)
				}
			}
			for _, dst := range denied(c) {
				if got, err := udpAsk(cl.ns, dst, 700*time.Millisecond); !isTimeout(err) {
					t.Errorf("udp %s (no rule): got %q, %v; want a timeout", dst, got, err)
				}
			}
		})
	}
}
