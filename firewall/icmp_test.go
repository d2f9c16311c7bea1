package firewall

import (
	"net"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestEnforceOtherProtocols: in enforce mode nothing but the rules' UDP
// (and the redirected TCP and DNS) is forwarded from the LAN, for IPv4 and
// IPv6 alike: ICMP echo (a ping tunnel's carrier), another IP protocol
// (GRE), and UDP datagrams too large for one packet — fragmented by the
// client, reassembled by conntrack before the rules see them — to a
// denied address (THREATS.md F3, section 0 point 4). Each case is tried
// without the firewall first, so a pass is the firewall's doing; a
// fragmented datagram to an allowed address still passes.
func TestEnforceOtherProtocols(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::2]:9000", "[2001:db8:2::3]:9000")
	gre4 := rawCounter(t, tp.server, "ip4:47", "0.0.0.0")
	gre6 := rawCounter(t, tp.server, "ip6:47", "::")

	big := strings.Repeat("x", 4000)
	check := func(t *testing.T, enforce bool) {
		t.Helper()
		for _, dst := range []string{"198.18.2.2", "2001:db8:2::2"} {
			err := ping(tp.client, dst)
			if !enforce && err != nil {
				t.Fatalf("without the firewall, ping %s: %v: the test would prove nothing", dst, err)
			}
			if enforce && err == nil {
				t.Errorf("enforce: ping %s answered", dst)
			}
		}
		for _, c := range []struct {
			network, dst string
			n            *rawCount
		}{{"ip4:47", "198.18.2.2", gre4}, {"ip6:47", "2001:db8:2::2", gre6}} {
			before := c.n.n()
			if err := sendRaw(tp.client, c.network, c.dst, []byte("\x00\x00\x08\x00gre payload")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			got := c.n.n() > before
			if !enforce && !got {
				t.Fatalf("without the firewall, %s to %s did not arrive: the test would prove nothing", c.network, c.dst)
			}
			if enforce && got {
				t.Errorf("enforce: %s to %s reached the server", c.network, c.dst)
			}
		}
		for _, dst := range []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000"} {
			got, err := udpAskBig(tp.client, dst, big, 700*time.Millisecond)
			if !enforce && err != nil {
				t.Fatalf("without the firewall, a fragmented datagram to %s: %v", dst, err)
			}
			if enforce && !isTimeout(err) {
				t.Errorf("enforce: a fragmented datagram to denied %s: got %d bytes, %v; want a timeout", dst, len(got), err)
			}
		}
		for _, dst := range []string{"198.18.2.2:9000", "[2001:db8:2::2]:9000"} {
			if got, err := udpAskBig(tp.client, dst, big, 3*time.Second); err != nil || !strings.HasPrefix(got, "xxx") {
				t.Errorf("a fragmented datagram to allowed %s: got %d bytes, %v", dst, len(got), err)
			}
		}
	}
	check(t, false)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	check(t, true)
	// A fragmented DNS datagram (THREATS.md E5) is reassembled and
	// redirected to the forwarder like any other query, whatever server
	// it names.
	tp.dnsStandIn(t)
	for _, dst := range []string{"198.18.2.3:53", "[2001:db8:2::3]:53"} {
		if got, err := udpAskBig(tp.client, dst, big, 3*time.Second); err != nil || !strings.HasPrefix(got, "xxx") || !strings.Contains(got, " from ") {
			t.Errorf("a fragmented DNS datagram to %s: got %d bytes, %v; want the forwarder's answer", dst, len(got), err)
		}
	}
}

// ping sends one ICMP or ICMPv6 echo request from ns (the kernel picks
// the source) and waits 1 s for the reply.
func ping(ns *testnet.NS, dst string) error {
	src := "0.0.0.0"
	if strings.Contains(dst, ":") {
		src = "::"
	}
	return pingFrom(ns, src, dst)
}

// rawCount counts the packets a raw socket receives.
type rawCount struct{ ch chan struct{} }

func (r *rawCount) n() int { return len(r.ch) }

func rawCounter(t *testing.T, ns *testnet.NS, network, laddr string) *rawCount {
	t.Helper()
	pc, err := ns.ListenPacket(network, laddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	r := &rawCount{ch: make(chan struct{}, 1000)}
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			select {
			case r.ch <- struct{}{}:
			default:
			}
		}
	}()
	return r
}

// sendRaw sends one packet of an IP protocol from ns.
func sendRaw(ns *testnet.NS, network, dst string, payload []byte) error {
	laddr := "0.0.0.0"
	if strings.HasPrefix(network, "ip6") {
		laddr = "::"
	}
	pc, err := ns.ListenPacket(network, laddr)
	if err != nil {
		return err
	}
	defer pc.Close()
	_, err = pc.WriteTo(payload, &net.IPAddr{IP: net.ParseIP(dst)})
	return err
}

// udpAskBig sends one datagram of payload from a fresh socket and waits
// for the answer.
func udpAskBig(ns *testnet.NS, addr, payload string, timeout time.Duration) (string, error) {
	pc, err := ns.ListenPacket("udp", ":0")
	if err != nil {
		return "", err
	}
	defer pc.Close()
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return "", err
	}
	pc.SetDeadline(time.Now().Add(timeout))
	if _, err := pc.WriteTo([]byte(payload), ua); err != nil {
		return "", err
	}
	buf := make([]byte, 9000)
	n, _, err := pc.ReadFrom(buf)
	return string(buf[:n]), err
}
