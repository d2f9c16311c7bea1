package e2e

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// The addresses the gateway gains on its WAN interface while egressd
// runs (a PPPoE or DHCP reconnect, a new delegated prefix).
const (
	newWAN4 = "198.18.2.77"
	newWAN6 = "2001:db8:2::77"
)

// ownServer stands for a service of the gateway's: it listens on every
// address of the gateway's namespace, port, and counts the connections
// it accepts by the local address they were made to.
type ownServer struct {
	mu   sync.Mutex
	hits map[string]int
	all  atomic.Int64
}

func startOwnServer(t *testing.T, ns *testnet.NS, port string) *ownServer {
	t.Helper()
	ln, err := ns.Listen("tcp", ":"+port)
	if err != nil {
		t.Fatalf("own server: %v", err)
	}
	s := &ownServer{hits: map[string]int{}}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a := c.LocalAddr().(*net.TCPAddr).IP.String()
			s.mu.Lock()
			s.hits[a]++
			s.mu.Unlock()
			s.all.Add(1)
			c.Close()
		}
	}()
	return s
}

func (s *ownServer) count(addr string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[addr]
}

// TestOwnAddrsFollowed: an address the gateway gains on its WAN interface
// after egressd started is one of its own for the proxies' guard
// (THREATS.md F1): a LAN client's CONNECT to it by number, which the
// rule opening 0.0.0.0/0 and ::/0 on 443 would allow anywhere else, is
// refused (special-range) and never reaches the gateway's service on it.
// Before, the proxies read the gateway's addresses once at start, and
// dialled the new one: a connection from the gateway to itself.
func TestOwnAddrsFollowed(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	srv := startOwnServer(t, tp.gw, "443")
	d := hardeningDaemon(t, tp, u, anyRule)
	defer d.stop()
	dial := dialFrom(tp.lan, lanClient4)

	// Control: the address the WAN had at start is refused.
	status, port, err := connectVia(dial, net.JoinHostPort(gwLAN4, "3128"), net.JoinHostPort(gwWAN4, "443"))
	if strings.Contains(firstLine(status, err), " 200 ") {
		t.Errorf("CONNECT %s:443 (the WAN address at start): %q, want refused", gwWAN4, firstLine(status, err))
	}
	wantEvent(t, d, "CONNECT to the WAN address at start", byClientPort(port), "deny", "special-range")

	tp.gw.MustRun("ip", "addr", "add", newWAN4+"/24", "dev", "wan0")
	tp.gw.AddAddr(t, "wan0", newWAN6+"/64")
	d.waitLog(t, "+"+newWAN4, 1)
	d.waitLog(t, "+"+newWAN6, 1)

	for _, a := range []string{newWAN4, newWAN6} {
		target := net.JoinHostPort(a, "443")
		status, port, err := connectVia(dial, net.JoinHostPort(gwLAN4, "3128"), target)
		if line := firstLine(status, err); strings.Contains(line, " 200 ") {
			t.Errorf("CONNECT %s (an address the WAN gained): %q, want refused", target, line)
		}
		wantEvent(t, d, "CONNECT "+target, byClientPort(port), "deny", "special-range")
		if n := srv.count(a); n != 0 {
			t.Errorf("the gateway's service on %s accepted %d connections through the proxy", a, n)
		}
	}

	// Taken off again: the proxy no longer counts it as its own. (The
	// address is no longer anyone's; the proxy's dial of it fails.)
	tp.gw.MustRun("ip", "addr", "del", newWAN4+"/24", "dev", "wan0")
	d.waitLog(t, "-"+newWAN4, 1)
}

// TestCaptureOwnAddrsFollowed: in audit mode, a LAN client's connection
// to an address the gateway gained after egressd started is the
// gateway's own traffic: capture counts it (egress_capture_own_flows_total)
// and records no flow for it, as for the addresses it had at start.
// Before, capture read the gateway's addresses once, and reported such a
// flow as egress.
func TestCaptureOwnAddrsFollowed(t *testing.T) {
	tp := newTopo(t)
	srv := startOwnServer(t, tp.gw, "8080")
	d := newDaemon(t, tp, "audit")
	d.start()
	defer d.stop()

	tp.gw.MustRun("ip", "addr", "add", newWAN4+"/24", "dev", "wan0")
	d.waitLog(t, "+"+newWAN4, 1)
	own := d.metric("egress_capture_own_flows_total")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	c, err := tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(newWAN4, "8080"))
	cancel()
	if err != nil {
		t.Fatalf("dial the gateway's new address: %v", err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("hello\n"))
	c.Read(make([]byte, 1)) // the server closes
	c.Close()
	if n := srv.count(newWAN4); n != 1 {
		t.Fatalf("the gateway's service on %s accepted %d connections, want 1: the test would prove nothing", newWAN4, n)
	}

	// A flow after it, which capture records: once its event is there,
	// the earlier flow's would be too.
	if _, err := tp.curl(dockerName, 443, dockerIP4, "/", true); err != nil {
		t.Fatalf("HTTPS after the connection to the gateway: %v", err)
	}
	d.waitEvent(t, "HTTPS after the connection to the gateway", func(ev flowEvent) bool {
		return ev.Kind == "flow" && ev.Source == "capture" && ev.Client == lanClient4 && ev.Name == dockerName
	})
	for _, ev := range d.eventsWith([]byte(newWAN4)) {
		if ev.Kind == "flow" && ev.Dest == newWAN4 {
			t.Errorf("capture recorded the flow to the gateway's new address as egress: %v", ev)
		}
	}
	if got := d.metric("egress_capture_own_flows_total"); got < own+1 {
		t.Errorf("egress_capture_own_flows_total %v after the connection to the new address, was %v: want it counted", got, own)
	}
}

// TestExplicitFollowsLANAddrs: without --explicit-proxy-listen the
// explicit proxy listens on port 3128 of each LAN interface's address; a
// LAN interface that gets its address after the start gets a listener (its
// client is answered), with the WAN interface's socket filter as the
// others (a connection from the WAN side gets no handshake), and one that
// loses its address has its listener closed. Before, the listeners were
// opened once at start. Audit mode without the WAN guard: only the socket
// filter keeps the WAN side out.
func TestExplicitFollowsLANAddrs(t *testing.T) {
	const cli1, gw1 = "198.18.5.10", "198.18.5.1"
	tp := newTopo(t)
	own := startOwnServer(t, tp.gw, "8080") // no filter: what the WAN side reaches without one
	d := newDaemon(t, tp, "audit")
	d.noGuard = true
	d.extra = []string{"--lan", "lan0,lan1"}
	d.unready = true // lan1 does not exist yet
	d.start()
	defer d.stop()

	lan1 := testnet.New(t, "h2lan1")
	testnet.Link(t, lan1, "eth0", []string{cli1 + "/24"}, tp.gw, "lan1", []string{gw1 + "/24"})
	lan1.MustRun("ip", "route", "add", "default", "via", gw1)
	tp.inet.MustRun("ip", "route", "add", "198.18.5.0/24", "via", gwWAN4)
	d.waitLog(t, "explicit proxy: listening on "+gw1+":3128", 1)
	status, _, err := connectVia(dialFrom(lan1, cli1), net.JoinHostPort(gw1, "3128"), dockerName+":443")
	if line := firstLine(status, err); !strings.Contains(line, " 200 ") {
		t.Errorf("CONNECT %s:443 through %s:3128 (a LAN address that came after the start): %q, want 200", dockerName, gw1, line)
	}
	fromWAN := func(addr string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := tp.inet.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	reached := fromWAN(net.JoinHostPort(gw1, "8080"))
	// The handshake ends before the server's Accept returns: wait for it.
	for i := 0; reached && own.all.Load() == 0 && i < 200; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if !reached || own.all.Load() == 0 {
		t.Errorf("control: the WAN side does not reach %s:8080, which has no filter: the check below would prove nothing", gw1)
	}
	if fromWAN(net.JoinHostPort(gw1, "3128")) {
		t.Errorf("the WAN side got a handshake from the explicit proxy on %s:3128: no WAN filter on the new listener", gw1)
	}

	tp.gw.MustRun("ip", "addr", "del", gw1+"/24", "dev", "lan1")
	d.waitLog(t, "explicit proxy: stopped listening on "+gw1+":3128", 1)
	out := tp.gw.MustRun("ss", "-Hltn")
	if strings.Contains(out, gw1+":3128") {
		t.Errorf("a listener on %s:3128 is still open after the address went:\n%s", gw1, out)
	}
	if !strings.Contains(out, gwLAN4+":3128") {
		t.Errorf("the listener on %s:3128 went too:\n%s", gwLAN4, out)
	}
}

// TestExplicitTentativeLANAddr: a LAN interface whose only address is an
// IPv6 one still in duplicate address detection when egressd starts (a
// network manager that configured it a moment before) has no explicit
// listener yet, and egressd does not count that as a failure (the
// address is not the gateway's yet): /readyz says every part runs. Once
// the detection is done, the listener opens on the address notice.
// Before, egressd tried to listen on the tentative address, failed, and
// /readyz said the explicit proxy did not run, for good.
func TestExplicitTentativeLANAddr(t *testing.T) {
	const gw1 = "fd00:5::1"
	tp := newTopo(t)
	lan1 := testnet.New(t, "r3lan1")
	testnet.Link(t, lan1, "eth0", nil, tp.gw, "lan1", nil)
	// No carrier: the address stays tentative until the peer comes up.
	lan1.MustRun("ip", "link", "set", "eth0", "down")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv6.conf.lan1.accept_dad=1")
	tp.gw.MustRun("ip", "-6", "addr", "add", gw1+"/64", "dev", "lan1")
	if out := tp.gw.MustRun("ip", "-6", "addr", "show", "dev", "lan1"); !strings.Contains(out, "tentative") {
		t.Fatalf("control: %s is not tentative: the test would prove nothing:\n%s", gw1, out)
	}

	d := newDaemon(t, tp, "audit")
	d.extra = []string{"--lan", "lan0,lan1"}
	d.unready = true
	d.start()
	defer d.stop()
	ln := "[" + gw1 + "]:3128"
	// lan1 has no carrier, so capture is not running there (503 naming
	// capture); the explicit proxy must not be named.
	if code, body, err := d.get("/readyz"); err != nil || (code != 200 && code != 503) || strings.Contains(body, "explicit") {
		t.Errorf("/readyz while %s is tentative: %d %q %v, want no word of the explicit proxy", gw1, code, body, err)
	}

	lan1.MustRun("ip", "link", "set", "eth0", "up") // the detection runs and ends
	d.waitLog(t, "explicit proxy: listening on "+ln, 1)
	if out := tp.gw.MustRun("ss", "-Hltn"); !strings.Contains(out, ln) {
		t.Errorf("no listener on %s after its detection ended:\n%s", ln, out)
	}
	if strings.Contains(d.logs(), "cannot listen on "+ln) {
		t.Errorf("egressd tried to listen on %s while it was tentative:\n%s", ln, d.logs())
	}
}

// TestExplicitOpensLate: an explicit listener on a LAN address that does
// not open at start (port 3128 there taken by another program) makes
// /readyz name the explicit proxy; once the port is free and the
// listener opens (on the next address notice), /readyz says every part
// runs. Before, the part stayed "not running" until a restart, while
// the listener served.
func TestExplicitOpensLate(t *testing.T) {
	tp := newTopo(t)
	taken, err := tp.gw.Listen("tcp", net.JoinHostPort(gwLAN4, "3128"))
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	d := newDaemon(t, tp, "audit")
	d.unready = true
	d.start()
	defer d.stop()
	if code, body, err := d.get("/readyz"); err != nil || code != 503 || !strings.Contains(body, "explicit-proxy") {
		t.Fatalf("/readyz while %s:3128 is taken: %d %q %v, want 503 naming explicit-proxy", gwLAN4, code, body, err)
	}
	taken.Close()
	tp.gw.MustRun("ip", "addr", "add", "198.18.77.1/32", "dev", "lo") // an address notice: the follower checks again
	d.waitLog(t, "explicit proxy: listening on "+gwLAN4+":3128", 1)
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body, err := d.get("/readyz")
		if err == nil && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz after the explicit listener opened: %d %q %v, want 200", code, body, err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestExplicitEveryLANAddr: without --explicit-proxy-listen the explicit
// proxy listens on port 3128 of every address of a LAN interface that a
// client can use (each IPv4 one, each global or ULA IPv6 one; not the
// link-local one): an IPv6 client configured with the gateway's IPv6
// address, or a second subnet on the same LAN port, is answered there,
// and the WAN side gets no handshake on any of them (each listener
// carries the socket filter). Before, only the first IPv4 address had a
// listener. Audit mode without the WAN guard: only the socket filter
// keeps the WAN side out.
func TestExplicitEveryLANAddr(t *testing.T) {
	const cli2, gw2 = "198.18.9.10", "198.18.9.1" // a second subnet on lan0
	tp := newTopo(t)
	own := startOwnServer(t, tp.gw, "8080") // no filter: what the WAN side reaches without one
	d := newDaemon(t, tp, "audit")
	d.noGuard = true
	d.start()
	defer d.stop()

	v6 := "[" + gwLAN6 + "]:3128"
	if want := "explicit on " + gwLAN4 + ":3128, " + v6; !strings.Contains(d.logs(), want) {
		t.Errorf("no start-up line with %q:\n%s", want, d.logs())
	}
	status, _, err := connectVia(dialFrom(tp.lan, lanClient6), v6, dockerName+":443")
	if line := firstLine(status, err); !strings.Contains(line, " 200 ") {
		t.Errorf("CONNECT %s:443 through %s (the LAN interface's IPv6 address): %q, want 200", dockerName, v6, line)
	}

	tp.gw.MustRun("ip", "addr", "add", gw2+"/24", "dev", "lan0")
	tp.lan.MustRun("ip", "addr", "add", cli2+"/24", "dev", "eth0")
	tp.inet.MustRun("ip", "route", "add", "198.18.9.0/24", "via", gwWAN4)
	d.waitLog(t, "explicit proxy: listening on "+gw2+":3128", 1)
	status, _, err = connectVia(dialFrom(tp.lan, cli2), net.JoinHostPort(gw2, "3128"), dockerName+":443")
	if line := firstLine(status, err); !strings.Contains(line, " 200 ") {
		t.Errorf("CONNECT %s:443 through %s:3128 (a second address of the LAN interface): %q, want 200", dockerName, gw2, line)
	}

	fromWAN := func(addr string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := tp.inet.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	for _, a := range []string{gwLAN6, gw2} {
		before := own.count(a)
		reached := fromWAN(net.JoinHostPort(a, "8080"))
		// The handshake ends before the server's Accept returns: wait for it.
		for i := 0; reached && own.count(a) == before && i < 200; i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if !reached || own.count(a) == before {
			t.Errorf("control: the WAN side does not reach %s port 8080, which has no filter: the check below would prove nothing", a)
		}
		if fromWAN(net.JoinHostPort(a, "3128")) {
			t.Errorf("the WAN side got a handshake from the explicit proxy on %s port 3128: no WAN filter on that listener", a)
		}
	}
	out := tp.gw.MustRun("ss", "-Hltn")
	if strings.Contains(out, "[fe80") {
		t.Errorf("a listener on a link-local address:\n%s", out)
	}

	tp.gw.MustRun("ip", "addr", "del", gw2+"/24", "dev", "lan0")
	d.waitLog(t, "explicit proxy: stopped listening on "+gw2+":3128", 1)
	out = tp.gw.MustRun("ss", "-Hltn")
	for _, a := range []string{gwLAN4 + ":3128", v6} {
		if !strings.Contains(out, a) {
			t.Errorf("the listener on %s went with %s:\n%s", a, gw2, out)
		}
	}
}

// TestExplicitReopensAfterAcceptFails: an explicit listener whose accept
// fails for good (here the kernel aborts the listening socket: ss -K) is
// closed and opened again, 1 s later, with a log line; meanwhile the part
// is "not running" (/readyz), and running again once it listens, with
// the WAN socket filter as before (audit mode without the WAN guard). Both a
// listener opened later (a LAN address that came after the start) and
// one opened at start are checked, and the transparent proxy goes on
// throughout. Before, the listener opened later stayed closed until its
// address went and came back, and an accept failure of one opened at
// start stopped the whole proxy.
func TestExplicitReopensAfterAcceptFails(t *testing.T) {
	const cli2, gw2 = "198.18.9.10", "198.18.9.1"
	tp := newTopo(t)
	startOwnServer(t, tp.gw, "8080") // no filter: what the WAN side reaches without one
	d := newDaemon(t, tp, "audit")
	d.noGuard = true // only the socket filter keeps the WAN side out
	d.start()
	defer d.stop()
	tp.gw.MustRun("ip", "addr", "add", gw2+"/24", "dev", "lan0")
	tp.lan.MustRun("ip", "addr", "add", cli2+"/24", "dev", "eth0")
	d.waitLog(t, "explicit proxy: listening on "+gw2+":3128", 1)

	for i, c := range []struct{ cli, gw string }{{cli2, gw2}, {lanClient4, gwLAN4}} {
		a := net.JoinHostPort(c.gw, "3128")
		opened := strings.Count(d.logs(), "explicit proxy: listening on "+a) // 0 for one opened at start
		tp.gw.MustRun("ss", "-K", "state", "listening", "src", a)
		d.waitLog(t, "explicit proxy: accept on "+a+" failed", 1)
		d.waitLog(t, "explicit proxy: listening on "+a, opened+1)
		status, _, err := connectVia(dialFrom(tp.lan, c.cli), a, dockerName+":443")
		if line := firstLine(status, err); !strings.Contains(line, " 200 ") {
			t.Errorf("CONNECT %s:443 through %s after its listener was opened again: %q, want 200", dockerName, a, line)
		}
		// /readyz follows the part: not running while down, running again.
		d.waitLog(t, `"msg":"part not running","part":"explicit-proxy"`, i+1)
		d.waitLog(t, `"msg":"part running again","part":"explicit-proxy"`, i+1)
	}
	// The listener opened again has the WAN filter.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := tp.inet.DialContext(ctx, "tcp", net.JoinHostPort(gwLAN4, "8080")); err != nil {
		t.Errorf("control: the WAN side does not reach %s:8080, which has no filter: %v", gwLAN4, err)
	} else {
		c.Close()
	}
	if c, err := tp.inet.DialContext(ctx, "tcp", net.JoinHostPort(gwLAN4, "3128")); err == nil {
		c.Close()
		t.Errorf("the WAN side got a handshake from the explicit listener on %s:3128 opened again: no WAN filter on it", gwLAN4)
	}
	if out := tp.gw.MustRun("ss", "-Hltn"); !strings.Contains(out, ":15001") {
		t.Errorf("the transparent proxy's listener went with an explicit one:\n%s", out)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body, err := d.get("/readyz")
		if err == nil && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz after the listeners were opened again: %d %q %v, want 200", code, body, err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestWANLineListsListening: the start-up line on the WAN socket filter
// names only the listeners that listen: not the explicit proxy when its
// listener did not open, nor the proxies when the proxy did not start.
// Before, it named what was configured.
func TestWANLineListsListening(t *testing.T) {
	tp := newTopo(t)
	for _, c := range []struct {
		name, taken string
		extra       []string
		want        string
	}{
		{"explicit", net.JoinHostPort(gwLAN4, "3128"), []string{"--explicit-proxy-listen", net.JoinHostPort(gwLAN4, "3128")},
			"wan: the DNS forwarder, the transparent proxy drop what arrives on wan0 (socket filter)"},
		{"proxy", "[::]:15001", nil, "wan: the DNS forwarder drops what arrives on wan0 (socket filter)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			taken, err := tp.gw.Listen("tcp", c.taken)
			if err != nil {
				t.Fatal(err)
			}
			defer taken.Close()
			d := newDaemon(t, tp, "audit")
			d.noGuard = true
			d.unready = true
			d.extra = c.extra
			d.start()
			defer d.stop()
			d.waitLog(t, "admin: http://", 1)
			if !strings.Contains(d.logs(), c.want+"\n") {
				t.Errorf("no line %q:\n%s", c.want, d.logs())
			}
		})
	}
}
