package proxy

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestOwnAddresses: the gateway's own addresses are not destinations, even
// when a CIDR rule's range holds them (THREATS.md F1, Smokescreen's
// ipDenySelfConnection): a CONNECT or a redirected connection to them would
// reach the gateway's own services (the explicit proxy, the transparent
// listener, ssh) from the proxy's address. An address of the same range
// that is not the gateway's is allowed, so the refusal is the guard's.
func TestOwnAddresses(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	eng, err := policy.Compile("own.yaml", []byte(`version: 1
mode: enforce
rules:
  - name: test-net
    to: [198.18.0.0/15, "2001:db8::/32"]
    ports: [443/tcp, 3128/tcp, 15001/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)

	resp, body := tp.proxyRequest(t, "CONNECT 198.18.2.2:443 HTTP/1.1\r\nHost: 198.18.2.2:443\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("control: CONNECT 198.18.2.2:443 under the CIDR rule: %d %q", resp.StatusCode, body)
	}
	for _, a := range []string{"198.18.1.1:3128", "198.18.2.1:3128", "198.18.2.1:443", "[2001:db8:1::1]:15001", "[2001:db8:2::1]:443", "[::ffff:198.18.2.1]:443"} {
		resp, body := tp.proxyRequest(t, "CONNECT "+a+" HTTP/1.1\r\nHost: "+a+"\r\n\r\n")
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("CONNECT %s: %d %q", a, resp.StatusCode, body)
			continue
		}
		if got := resp.Header.Get("X-Egressd-Reason"); got != ReasonSpecialRange {
			t.Errorf("CONNECT %s: reason %q, want %s", a, got, ReasonSpecialRange)
		}
	}
	// The transparent path: a connection whose original destination is
	// the gateway's own address.
	for _, a := range []netip.AddrPort{netip.AddrPortFrom(gwWanV4, 443), netip.AddrPortFrom(gwWanV6, 443)} {
		c := tp.dialFromClient(t, netip.Addr{}, a)
		c.Write(buildHello(sniExt("www.allowed.test")))
		got := readAll(c, 5*time.Second)
		ev := tp.ev.wait(t, "own address "+a.String(), byFlow(c))
		if !bytes.Equal(got, alert) || ev.Reason != ReasonSpecialRange || ev.Verdict != policy.Deny {
			t.Errorf("transparent to %s: answer %x, event %+v", a, got, ev)
		}
	}
}

// TestSelfConnectionAudit: in audit mode the proxy forwards what it would
// deny, but never to the gateway itself. A connection whose original
// destination is the proxy's own port made the proxy dial itself, which
// dialled itself again, until the connection limit: one client's single
// connection filled every slot. And CONNECT to loopback reached the
// gateway's local-only services (the admin API) from the LAN. Both are
// refused in audit mode too (THREATS.md F1, G1), as is a name that
// resolves to loopback.
func TestSelfConnectionAudit(t *testing.T) {
	tp := newTopo(t, topoOpts{mode: "audit", config: func(c *Config) { c.MaxConns, c.MaxConnsPerClient = 40, 40 }})
	local, err := tp.g.Listen("tcp", "127.0.0.1:9901")
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	reached := make(chan struct{}, 100)
	go serveEach(local, func(c net.Conn) { reached <- struct{}{}; c.Close() })

	selfConnections(t, tp, "")
	for _, a := range []string{"127.0.0.1:9901", "[::ffff:127.0.0.1]:9901", "loop.allowed.test:9901"} {
		resp, body := tp.proxyRequest(t, "CONNECT "+a+" HTTP/1.1\r\nHost: "+a+"\r\n\r\n")
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("audit mode, CONNECT %s: %d %q", a, resp.StatusCode, body)
		}
	}
	resp, body := tp.proxyRequest(t, "GET http://127.0.0.1:9901/ HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n\r\n")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("audit mode, GET http://127.0.0.1:9901/: %d %q", resp.StatusCode, body)
	}
	select {
	case <-reached:
		t.Errorf("the gateway's 127.0.0.1:9901 was reached through the proxy in audit mode")
	case <-time.After(300 * time.Millisecond):
	}
}

// TestSelfConnectionNewAddress: the gateway's own addresses are read once;
// one it gains later (DHCP on the WAN side, an address added by hand) is
// not among them. A connection to the transparent port on such an address
// is still not dialled back: its original destination is the address and
// port it was accepted on, so it was never redirected and there is nothing
// to forward; the address joins the own addresses from then on.
func TestSelfConnectionNewAddress(t *testing.T) {
	tp := newTopo(t, topoOpts{mode: "audit", config: func(c *Config) {
		c.MaxConns, c.MaxConnsPerClient = 40, 40
		c.OwnAddrs = []netip.Addr{gwWanV4, gwWanV6} // the LAN addresses came later
	}})
	selfConnections(t, tp, ", an address not yet known as the gateway's")
	resp, body := tp.proxyRequest(t, "CONNECT 198.18.1.1:22 HTTP/1.1\r\nHost: 198.18.1.1:22\r\n\r\n")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("CONNECT to the address learned as the gateway's: %d %q", resp.StatusCode, body)
	}
}

// selfConnections dials the transparent port on the gateway's LAN
// addresses (IPv4, IPv6) from the client, each a connection redirected to
// nowhere but the proxy itself: the proxy must not dial itself (it holds
// one connection), and records an enforced special-range deny. note
// follows the address in the errors.
func selfConnections(t *testing.T, tp *topo, note string) {
	t.Helper()
	for _, a := range []netip.AddrPort{netip.AddrPortFrom(gwLanV4, transparentPort), netip.AddrPortFrom(gwLanV6, transparentPort)} {
		c := tp.dialFromClient(t, netip.Addr{}, a)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n"))
		readAll(c, 3*time.Second)
		n, _, _ := tp.proxy.slots.Counts()
		c.Close()
		if n > 1 {
			t.Errorf("a connection to %s%s: the proxy holds %d connections (it dialled itself)", a, note, n)
		}
		ev := tp.ev.wait(t, "self "+a.String(), byFlow(c))
		if ev.Reason != ReasonSpecialRange || !ev.Enforced {
			t.Errorf("a connection to %s: event %+v, want an enforced %s", a, ev, ReasonSpecialRange)
		}
	}
}

// TestSetOwnAddrs: the gateway's own addresses follow SetOwnAddrs (egressd
// run calls it on address changes): one gained after the start (a new WAN
// address on a reconnect) is refused as a destination, under a rule that
// opens every address on 443; one taken off is a destination like any
// other again. Readers run meanwhile (the race detector watches the swap).
// No root needed: the decision is asked directly.
func TestSetOwnAddrs(t *testing.T) {
	eng, err := policy.Compile("own.yaml", []byte(`version: 1
mode: enforce
rules:
  - name: any443
    to: [0.0.0.0/0, "::/0"]
    ports: [443/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	start := netip.MustParseAddr("198.18.2.1")
	gained4, gained6 := netip.MustParseAddr("198.18.2.77"), netip.MustParseAddr("2001:db8:2::77")
	p, err := New(Config{OwnAddrs: []netip.Addr{start}}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	refused := func(a netip.Addr) bool {
		d, ok := p.selfDecision(eng, policy.Input{Client: netip.MustParseAddr("198.18.1.10"), Dest: a, Port: 443, Proto: policy.TCP})
		return ok && d.Reason == ReasonSpecialRange
	}
	if !refused(start) || refused(gained4) || refused(gained6) {
		t.Fatalf("at start: refused %s %v, %s %v, %s %v; want only the first", start, refused(start), gained4, refused(gained4), gained6, refused(gained6))
	}

	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // a reader while the list changes, bounded by stop
		defer close(done)
		for i := 0; i < 1_000_000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			refused(gained4)
		}
	}()
	p.SetOwnAddrs([]netip.Addr{start, netip.MustParseAddr("::ffff:198.18.2.77"), gained6})
	if !refused(start) || !refused(gained4) || !refused(gained6) {
		t.Errorf("after the WAN gained %s and %s: refused %v, %v, %v; want all", gained4, gained6, refused(start), refused(gained4), refused(gained6))
	}
	p.SetOwnAddrs([]netip.Addr{start, gained6})
	if refused(gained4) || !refused(gained6) {
		t.Errorf("after %s went: refused %v, %s %v; want only %s", gained4, refused(gained4), gained6, refused(gained6), gained6)
	}
	close(stop)
	<-done
	if got := p.ownAddrs(); len(got) != 2 {
		t.Errorf("own addresses %v, want [%s %s]", got, start, gained6)
	}
}
