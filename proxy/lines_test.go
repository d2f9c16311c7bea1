package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestTransparentShutdownLines: a connection the proxy's shutdown drops
// before it is served gets a decision line and an event of its own,
// denied with ReasonShutdown and enforced (the proxy reset it), not
// nothing: one still in the transparent listener's accept queue when
// Close closes the listener (Close accepts and refuses it first), and one
// accepted just before Close whose handling starts after it. Before
// session 27 both went without a line or an event: the kernel reset the
// first when the listener closed, and the second was closed unrecorded.
func TestTransparentShutdownLines(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	// Two more redirected ports: 9444 to a listener the proxy holds but
	// does not serve (its queue is as a busy proxy's), 9445 to one the
	// test accepts from.
	const queuedPort, lateListenPort = transparentPort + 1, transparentPort + 2
	rules := filepath.Join(t.TempDir(), "more.nft")
	os.WriteFile(rules, []byte(fmt.Sprintf(`insert rule inet egressd_test prerouting iifname "gwc" tcp dport 9444 redirect to :%d
insert rule inet egressd_test prerouting iifname "gwc" tcp dport 9445 redirect to :%d
`, queuedPort, lateListenPort)), 0o644)
	tp.g.MustRun("nft", "-f", rules)
	queuedLn, err := tp.g.Listen("tcp", fmt.Sprintf("[::]:%d", queuedPort))
	if err != nil {
		t.Fatal(err)
	}
	if !tp.proxy.trackListener(queuedLn) {
		t.Fatal("proxy closed already")
	}
	lateLn, err := tp.g.Listen("tcp", fmt.Sprintf("[::]:%d", lateListenPort))
	if err != nil {
		t.Fatal(err)
	}
	defer lateLn.Close()

	queued := tp.dialFromClient(t, clientV4, netip.AddrPortFrom(echoV4, 9444))
	late := tp.dialFromClient(t, clientV4, netip.AddrPortFrom(echoV4, 9445))
	lc, err := lateLn.Accept()
	if err != nil {
		t.Fatal(err)
	}
	tp.proxy.Close()
	tp.proxy.handleTransparent(lc.(*net.TCPConn), false)

	for _, c := range []struct {
		what string
		conn *net.TCPConn
		port uint16
	}{{"queued", queued, 9444}, {"accepted", late, 9445}} {
		ev := tp.ev.wait(t, c.what, byFlow(c.conn))
		if ev.Verdict != policy.Deny || ev.Reason != ReasonShutdown || !ev.Enforced || ev.Close != closeShutdown ||
			ev.Source != audit.SourceProxy || ev.Client != clientV4 || ev.Dest != echoV4 || ev.DestPort != c.port {
			t.Errorf("%s: event %+v, want a deny %s, enforced, to %s:%d", c.what, ev, ReasonShutdown, echoV4, c.port)
		}
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.conn.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Errorf("%s: read %d, %v after the shutdown, want the connection closed", c.what, n, err)
		}
	}
}

// TestTransparentTellsAccepted: the proxy tells Deps.Accepted each
// transparent connection it accepts, by the client's address and port and
// its original destination, so that capture, which sees the connection on
// the LAN too, leaves the decision line to the proxy whatever redirected
// it (an operator's own redirect under --no-firewall included): one it
// forwards, one it refuses over the connection limit. Before session 27
// capture could not know, and under --no-firewall both wrote a line.
func TestTransparentTellsAccepted(t *testing.T) {
	var mu sync.Mutex
	told := map[netip.AddrPort]netip.AddrPort{}
	ended := map[netip.AddrPort]bool{}
	tp := newTopo(t, topoOpts{
		config: func(c *Config) { c.MaxConnsPerClient = 1 },
		deps: func(d *Deps) {
			d.Accepted = func(client, dest netip.AddrPort, end func() bool) bool {
				mu.Lock()
				told[client], ended[client] = dest, end()
				mu.Unlock()
				return false
			}
		},
	})
	first := tp.dialFromClient(t, clientV4, netip.AddrPortFrom(echoV4, 8443))
	first.Write([]byte("x"))
	first.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := first.Read(make([]byte, 1)); err != nil {
		t.Fatalf("tunnel: %v", err)
	}
	tp.c.Do(func() error { // over the limit: reset, the dial itself may see it
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(deniedV4, 8443).String(), 5*time.Second)
		if err == nil {
			c.Close()
		}
		return nil
	})
	refused := tp.ev.wait(t, "limit", func(ev audit.Event) bool { return ev.Reason == ReasonLimit })
	mu.Lock()
	defer mu.Unlock()
	for _, c := range []struct {
		client, dest netip.AddrPort
	}{
		{netip.AddrPortFrom(clientV4, uint16(localPort(first))), netip.AddrPortFrom(echoV4, 8443)},
		{netip.AddrPortFrom(refused.Client, refused.ClientPort), netip.AddrPortFrom(deniedV4, 8443)},
	} {
		client := c.client
		if got := told[client]; got != c.dest {
			t.Errorf("told %s -> %v, want %s (all: %v)", client, got, c.dest, told)
		}
	}
	// The first, which the client still holds, is told not ended: else
	// capture would take a record of an earlier connection of its
	// 4-tuple for this one's (capture.ProxyAccepted). The refused one's
	// client closes it at once.
	if held := netip.AddrPortFrom(clientV4, uint16(localPort(first))); ended[held] {
		t.Errorf("told %s ended, a connection its client holds", held)
	}
}

// closingDevices is a device table whose first look-up closes the proxy:
// the slot of a transparent connection's handler asks it after the
// connection is tracked, so Close runs, and closes the connection, in the
// middle of the handler's setup.
type closingDevices struct {
	once  sync.Once
	proxy atomic.Pointer[Proxy]
}

func (d *closingDevices) ClientDevice(netip.Addr) net.HardwareAddr {
	d.once.Do(func() { d.proxy.Load().Close() })
	return nil
}

// TestTransparentShutdownMidSetup: a transparent connection that Close
// closes while its handler sets it up (here from the device look-up of
// its slot; in a run, Close at any instant after the handler tracked the
// connection, down to the few instructions between trackConn's store and
// its second look at the flag) still has its original destination in its
// event, and Deps.Accepted is told it: the proxy writes its line, denied
// as shutdown as Close's other refusals, and capture none. Before session 28 the handler read the destination from the
// socket Close had closed: the event was a deny no-orig-dst without a
// destination, Accepted was not told, and capture wrote a second line.
func TestTransparentShutdownMidSetup(t *testing.T) {
	var mu sync.Mutex
	told := map[netip.AddrPort]netip.AddrPort{}
	devs := &closingDevices{}
	tp := newTopo(t, topoOpts{deps: func(d *Deps) {
		d.Devices = devs
		d.Accepted = func(client, dest netip.AddrPort, _ func() bool) bool {
			mu.Lock()
			told[client] = dest
			mu.Unlock()
			return false
		}
	}})
	devs.proxy.Store(tp.proxy)
	dest := netip.AddrPortFrom(echoV4, 8443)
	c := tp.dialFromClient(t, clientV4, dest)
	ev := tp.ev.wait(t, "of the connection", byFlow(c))
	if ev.Dest != dest.Addr() || ev.DestPort != dest.Port() || ev.Verdict != policy.Deny || ev.Reason != ReasonShutdown ||
		!ev.Enforced || ev.Close != closeShutdown {
		t.Errorf("event %+v, want a deny %s, enforced, to %s", ev, ReasonShutdown, dest)
	}
	mu.Lock()
	defer mu.Unlock()
	if client := netip.AddrPortFrom(clientV4, uint16(localPort(c))); told[client] != dest {
		t.Errorf("Accepted told %v for %s, want %s (capture writes a line of its own)", told[client], client, dest)
	}
}

// TestTransparentLinkLocalClient: a transparent connection from a LAN
// client's IPv6 link-local address, which the proxy's socket gives with
// the LAN interface's zone (fe80::…%gwc), has the address without the
// zone in its event, as capture's events (from the packet) and the DNS
// forwarder's have it: the report keys a client by its address, and
// counted fe80::…%gwc and fe80::… as two clients, each connection as two
// flows (capture's event and the proxy's did not merge). Deps.Accepted
// (capture.ProxyAccepted, which keys connections as the packets give
// them, without a zone) is told the client so too.
func TestTransparentLinkLocalClient(t *testing.T) {
	var mu sync.Mutex
	var told []netip.AddrPort
	tp := newTopo(t, topoOpts{deps: func(d *Deps) {
		d.Accepted = func(client, _ netip.AddrPort, _ func() bool) bool {
			mu.Lock()
			told = append(told, client)
			mu.Unlock()
			return false
		}
	}})
	ll, idx := tp.c.LinkLocal(t, "c0")
	var c net.Conn
	err := tp.c.Do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: ll.AsSlice(), Zone: idx}}
		c, err = d.Dial("tcp", netip.AddrPortFrom(srvV6, 8443).String())
		return err
	})
	if err != nil {
		t.Fatalf("dial from %s: %v", ll, err)
	}
	port := localPort(c)
	c.Close()
	ev := tp.ev.wait(t, "of the link-local client", byClientPort(port))
	if ev.Client != ll {
		t.Errorf("event's client %s, want %s (no zone)", ev.Client, ll)
	}
	mu.Lock()
	defer mu.Unlock()
	want := netip.AddrPortFrom(ll, uint16(port))
	if len(told) != 1 || told[0] != want || told[0].String() != want.String() || told[0].Addr().Zone() != "" {
		t.Errorf("Accepted told %v, want [%s] (no zone, as capture keys it)", told, want)
	}
}
