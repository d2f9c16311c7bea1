package dnsfilter

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestTCPNoKeepalive: the forwarder's accepted TCP connections carry no
// keepalive timer (Go's listener default would set one, with four system
// calls, on every accepted connection); an idle client connection ends on
// TCPIdleTimeout instead.
func TestTCPNoKeepalive(t *testing.T) {
	srv := startServer(t, "rules: []", Config{}, Deps{})
	accepted, _, _ := srv.tcpLim.slots.Counts()
	c, err := net.Dial("tcp", srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sport := srv.Addrs()[0].Port()
	cport := c.LocalAddr().(*net.TCPAddr).Port
	// The server's side: local port sport, remote port cport. Its timer
	// field is 2 while a keepalive timer is pending, 0 with none.
	var tr string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if tr = timerOf(t, sport, cport); tr != "" {
			break
		}
	}
	if tr == "" {
		t.Fatalf("no server-side socket %d→%d in /proc/net/tcp", sport, cport)
	}
	// The socket is in /proc/net/tcp from the handshake on, in the
	// kernel's accept queue, before the server has accepted it (and Go's
	// accept sets the keepalive): wait for the server's accept itself,
	// its connection slot taken. Before, a fixed 200 ms stood for it,
	// and an accept later than that had the check pass with no accept.
	waitFor(t, func() bool { n, _, _ := srv.tcpLim.slots.Counts(); return n > accepted })
	if tr = timerOf(t, sport, cport); tr != "0" {
		t.Errorf("server side of an idle DNS TCP connection: timer %q, want 0 (no keepalive)", tr)
	}
}

// timerOf returns the "tr" field of the /proc/net/tcp entry with local
// port lport and remote port rport on loopback, or "" if there is none.
func timerOf(t *testing.T, lport uint16, rport int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	local := fmt.Sprintf("0100007F:%04X", lport)
	remote := fmt.Sprintf("0100007F:%04X", rport)
	for l := range strings.Lines(string(b)) {
		f := strings.Fields(l)
		// sl local rem st tx:rx tr:when ...
		if len(f) > 5 && f[1] == local && f[2] == remote {
			tr, _, _ := strings.Cut(f[5], ":")
			n, err := strconv.ParseUint(tr, 16, 8)
			if err != nil {
				t.Fatalf("/proc/net/tcp timer field %q", f[5])
			}
			return strconv.FormatUint(n, 10)
		}
	}
	return ""
}
