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
	// the LAN address only.
	wanSide := []string{gwWAN4, gwWAN6, gwLAN4, gwLAN6}
	var tcp []string
	for _, a := range wanSide {
		tcp = append(tcp, net.JoinHostPort(a, "15001"))
	}
	tcp = append(tcp, net.JoinHostPort(gwLAN4, "3128"))
	got := wanProbe(tp.inet, wanSide, []string{"+notcp", "+tcp"}, tcp)
	if len(got) != 13 {
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
