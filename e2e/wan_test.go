package e2e

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestWANNoOpenResolver: in audit mode without --guard-wan, where nothing
// is installed in nftables, the DNS forwarder answers the LAN client's dig
// and gives a host on the internet side none, over UDP and TCP, IPv4 and
// IPv6, to the gateway's WAN address and to its LAN address routed over
// the WAN link; the proxies complete no handshake with it
// (THREATS.md: never an open resolver, nor an open proxy, on the WAN
// side). Their socket filters drop what arrives on wan0. With --wan-open
// 53/udp, the operator's choice, UDP is answered there and TCP still not,
// and egressd says so.
func TestWANNoOpenResolver(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.noGuard = true
	d.start()
	if tp.nftTable() {
		t.Error("audit mode without --guard-wan installed an nftables table")
	}
	lanDig := func(to, tr string) bool { return digAnswered(tp.lan, to, tr) }
	for _, tr := range []string{"+notcp", "+tcp"} {
		for _, to := range []string{gwLAN4, gwLAN6} {
			if !lanDig(to, tr) {
				t.Errorf("dig %s from the LAN to %s: no answer\n%s", tr, to, d.logs())
			}
		}
	}
	// The transparent proxy listens on every address, the explicit one on
	// the LAN addresses only (IPv4 and IPv6).
	wanSide := []string{gwWAN4, gwWAN6, gwLAN4, gwLAN6}
	var tcp []string
	for _, a := range wanSide {
		tcp = append(tcp, net.JoinHostPort(a, "15001"))
	}
	tcp = append(tcp, net.JoinHostPort(gwLAN4, "3128"), net.JoinHostPort(gwLAN6, "3128"))
	got := wanProbe(tp.inet, wanSide, []string{"+notcp", "+tcp"}, tcp)
	if len(got) != 14 {
		t.Fatalf("%d probes", len(got))
	}
	for _, g := range got {
		if g.answered {
			t.Errorf("from the internet side: %s answered", g.what)
		}
	}
	if !tp.dialOK(net.JoinHostPort(gwLAN4, "3128")) {
		t.Errorf("the LAN client cannot reach the explicit proxy")
	}
	if want := "wan: the DNS forwarder, the transparent proxy, the explicit proxy drop what arrives on wan0 (socket filter)"; !strings.Contains(d.logs(), want) {
		t.Errorf("no line %q:\n%s", want, d.logs())
	}
	if strings.Contains(d.logs(), "open resolver") {
		t.Errorf("a warning of an open resolver where there is none:\n%s", d.logs())
	}
	d.stop()

	d.extra = []string{"--wan-open", "53/udp"}
	d.start()
	if !digAnswered(tp.inet, gwWAN4, "+notcp") {
		t.Errorf("--wan-open 53/udp: dig over UDP from the internet side gets no answer")
	}
	if digAnswered(tp.inet, gwWAN4, "+tcp") {
		t.Errorf("--wan-open 53/udp: dig over TCP from the internet side answered")
	}
	if want := "--wan-open 53/udp lets clients on the WAN side (wan0) reach the DNS forwarder"; !strings.Contains(d.logs(), want) {
		t.Errorf("no warning %q:\n%s", want, d.logs())
	}
	d.stop()
}

// digAnswered runs dig in ns against the gateway's DNS at to and reports
// whether an answer came (any rcode).
func digAnswered(ns *testnet.NS, to, transport string) bool {
	out, _ := ns.Run("dig", "@"+to, "+tries=2", "+time=1", "+nocookie", transport, dockerName, "A")
	return digStatus.MatchString(out)
}

type probe struct {
	what     string
	answered bool
}

// wanProbe digs every address (each transport) and connects to every TCP
// address, all at once, from ns.
func wanProbe(ns *testnet.NS, addrs, transports, tcp []string) []probe {
	var mu sync.Mutex
	var out []probe
	var wg sync.WaitGroup
	add := func(what string, ok bool) {
		mu.Lock()
		out = append(out, probe{what, ok})
		mu.Unlock()
	}
	for _, a := range addrs {
		for _, tr := range transports {
			wg.Go(func() { add("dig "+tr+" @"+a, digAnswered(ns, a, tr)) })
		}
	}
	for _, to := range tcp {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			c, err := ns.DialContext(ctx, "tcp", to)
			if err == nil {
				c.Close()
				add("tcp connect to "+to, true)
				return
			}
			if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
				// Refused (an RST) is an answer too, though not a
				// listener's: name it.
				add("tcp connect to "+to+" ("+err.Error()+")", true)
				return
			}
			add("tcp connect to "+to, false)
		})
	}
	wg.Wait()
	return out
}

// TestWANFilterFollowsInterface: the socket filters hold an interface
// index; a WAN interface that appears after egressd started, and one that
// is re-made (another index, as a PPP link that comes back), get the
// filters all the same: a host beyond it gets no DNS answer, UDP or TCP.
func TestWANFilterFollowsInterface(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.noGuard = true
	d.extra = []string{"--wan", "wan1"} // the last --wan counts
	d.start()
	defer d.stop()
	if want := "wan: wan1 does not exist (yet)"; !strings.Contains(d.logs(), want) {
		t.Errorf("no line %q:\n%s", want, d.logs())
	}
	const gwWAN1, inetWAN1 = "198.18.3.1", "198.18.3.2"
	for round := 1; round <= 2; round++ {
		if round == 2 {
			tp.gw.MustRun("ip", "link", "del", "wan1")
		}
		testnet.Link(t, tp.gw, "wan1", []string{gwWAN1 + "/24"}, tp.inet, "eth1", []string{inetWAN1 + "/24"})
		// The LAN side still answers; the line of the new index comes.
		for deadline := time.Now().Add(10 * time.Second); strings.Count(d.logs(), "wan: the WAN interface has a new index") < round; {
			if time.Now().After(deadline) {
				t.Errorf("round %d: no log line of the WAN interface's new index in 10s:\n%s", round, d.logs())
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		for _, tr := range []string{"+notcp", "+tcp"} {
			if !digAnswered(tp.lan, gwLAN4, tr) {
				t.Errorf("round %d: dig %s from the LAN: no answer", round, tr)
			}
			if digAnswered(tp.inet, gwWAN1, tr) {
				t.Errorf("round %d: dig %s from beyond wan1 to its address answered", round, tr)
			}
		}
	}
}
