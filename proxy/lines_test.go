package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
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
		ev := tp.ev.wait(t, c.what, byClientPort(localPort(c.conn)))
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
	tp := newTopo(t, topoOpts{
		config: func(c *Config) { c.MaxConnsPerClient = 1 },
		deps: func(d *Deps) {
			d.Accepted = func(client, dest netip.AddrPort) bool {
				mu.Lock()
				told[client] = dest
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
}
