package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TCP tricks at the transparent proxy's REDIRECT, and plain HTTP without
// a usable Host (session 26's red team): urgent data inside the
// ClientHello, data in the SYN (TCP Fast Open), a reset right after the
// hello, a FIN after part of the hello or of a request head, a
// simultaneous open toward a denied address, HTTP/1.0 without Host or
// HTTP/1.1 with an empty one, and a TLS 1.2 renegotiation after the splice.

// dialWith dials from the LAN with control applied to the socket before
// connect (socket options) and laddr as the local address (nil: any).
func (tp *topo) dialWith(ctx context.Context, addr string, laddr *net.TCPAddr, control func(fd uintptr) error) (*net.TCPConn, error) {
	var c net.Conn
	err := tp.lan.Do(func() (err error) {
		d := net.Dialer{LocalAddr: laddr}
		if control != nil {
			d.Control = func(_, _ string, rc syscall.RawConn) error {
				var cerr error
				if err := rc.Control(func(fd uintptr) { cerr = control(fd) }); err != nil {
					return err
				}
				return cerr
			}
		}
		c, err = d.DialContext(ctx, "tcp", addr)
		return
	})
	if err != nil {
		return nil, err
	}
	dialTimes.Store(c.LocalAddr().(*net.TCPAddr).Port, time.Now().Add(-time.Second))
	return c.(*net.TCPConn), nil
}

// readVerdict reads what came back after a raw hello: a ServerHello
// (0x16) or egressd's refusal (its alert, or a close with nothing).
func readVerdict(c net.Conn) helloOutcome {
	o := helloOutcome{port: c.LocalAddr().(*net.TCPAddr).Port}
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	buf := make([]byte, 16)
	n, err := io.ReadAtLeast(c, buf, 5)
	o.reply = buf[:n]
	switch {
	case n >= 5 && buf[0] == 0x16:
	case strings.HasPrefix(string(buf[:n]), string(tlsAlertDenied)), n == 0 && (errors.Is(err, io.EOF) || isReset(err)):
		o.denied = true
	default:
		o.err = fmt.Errorf("reply % x: %v", buf[:n], err)
	}
	return o
}

// sendOOB sends b as urgent data (MSG_OOB: its last byte is the urgent
// byte, out of the stream for a reader without SO_OOBINLINE).
func sendOOB(c *net.TCPConn, b []byte) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, unix.MSG_OOB, nil)
		return serr != unix.EAGAIN
	}); err != nil {
		return err
	}
	return serr
}

// mustDial dials addr from the LAN within 5 s, control applied to the
// socket before connect (nil: none); a failed dial ends the test.
func (tp *topo) mustDial(t *testing.T, addr string, control func(fd uintptr) error) *net.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, err := tp.dialWith(ctx, addr, nil, control)
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// verdictOf is the verdict of a flow event that allowed or not.
func verdictOf(allowed bool) string {
	if allowed {
		return "allow"
	}
	return "deny"
}

// checkHello dials addr from the LAN (control as for mustDial), sends
// with send (its error ends the test), reads the verdict and wants it, and
// the proxy's record of the connection, to allow or deny (with reason,
// "" any) as allowed says. label names the case in errors and waits.
func checkHello(t *testing.T, tp *topo, d *daemon, label, addr string, control func(fd uintptr) error, send func(*net.TCPConn) error, allowed bool, reason string) helloOutcome {
	t.Helper()
	conn := tp.mustDial(t, addr, control)
	if err := send(conn); err != nil {
		conn.Close()
		t.Fatalf("%s: %v", label, err)
	}
	o := readVerdict(conn)
	conn.Close()
	if o.err != nil || o.denied == allowed {
		t.Errorf("%s: %v (want allowed=%v)", label, o, allowed)
	}
	wantEvent(t, d, label, byClientPort(o.port), verdictOf(allowed), reason)
	return o
}

// TestHardeningTCP: TCP-level tricks against the transparent proxy's
// REDIRECT and the Host-less plain HTTP requests.
func TestHardeningTCP(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	w := tp.newWitness(t, []string{spoofIP4 + ":443", spoofIP4 + ":80"}, nil)
	for _, a := range []string{spoofIP4 + ":443", spoofIP4 + ":80"} {
		if !tp.dialOK(a) {
			t.Fatalf("without egressd, %s is not reachable from the LAN: the test would prove nothing", a)
		}
	}
	// Simultaneous open needs the internet side to reach a LAN port
	// without egressd: a LAN listener takes a connection from the
	// attacker's address.
	const simPort = 40443
	ln, err := tp.lan.Listen("tcp", fmt.Sprintf("%s:%d", lanClient4, simPort))
	if err != nil {
		t.Fatal(err)
	}
	inDial := func(lport, rport int) (net.Conn, error) {
		var c net.Conn
		err := tp.inet.Do(func() (err error) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(spoofIP4), Port: lport}}
			c, err = d.DialContext(ctx, "tcp", fmt.Sprintf("%s:%d", lanClient4, rport))
			return
		})
		return c, err
	}
	if c, err := inDial(0, simPort); err != nil {
		t.Fatalf("without egressd, %s cannot reach the LAN's %d: the simultaneous-open case would prove nothing: %v", spoofIP4, simPort, err)
	} else {
		c.Close()
	}
	ln.Close()
	w.settleAfter(t, 2, 0)
	base := w.tcp.Load()

	d := hardeningDaemon(t, tp, u, "")
	for _, q := range [][2]string{{dockerName, "A"}, {vendorName, "A"}} {
		if rcode, addrs := tp.dig(t, q[0], q[1]); rcode != "NOERROR" || len(addrs) == 0 {
			t.Fatalf("dig %s %s: %s %v", q[0], q[1], rcode, addrs)
		}
	}
	allowedHello := buildHello(helloSpec{sni: [][]string{{dockerName}}})
	trackerHello := buildHello(helloSpec{sni: [][]string{{trackerName}}})

	t.Run("urgent-data", func(t *testing.T) {
		// An urgent byte before the hello, and one inside it. Without
		// SO_OOBINLINE the proxy's reads skip it, and what the proxy
		// replays is what it read: the origin parses the hello the proxy
		// decided on, never the bytes capture or another parser saw.
		for _, c := range []struct {
			name, addr string
			hello      []byte
			at         int
			allowed    bool
			reason     string
		}{
			{"before-allowed", dockerIP4 + ":443", allowedHello, 0, true, ""},
			{"inside-allowed", dockerIP4 + ":443", allowedHello, 60, true, ""},
			{"inside-denied", trackerIP + ":443", trackerHello, 60, false, "no-rule"},
			{"inside-spoof", spoofIP4 + ":443", allowedHello, 60, false, "sni-mismatch"},
		} {
			o := checkHello(t, tp, d, "urgent "+c.name, c.addr, nil, func(conn *net.TCPConn) error {
				if _, err := conn.Write(c.hello[:c.at]); err != nil {
					return err
				}
				if err := sendOOB(conn, []byte{0x16}); err != nil {
					return fmt.Errorf("MSG_OOB: %w", err)
				}
				_, err := conn.Write(c.hello[c.at:])
				return err
			}, c.allowed, c.reason)
			verdict := verdictOf(c.allowed)
			// Capture saw the urgent byte in sequence: it takes it out,
			// as the proxy's socket does, and parses the hello the proxy
			// parsed (not hello-malformed, nor an allow by address for
			// a name the proxy denies), so it agrees with the proxy.
			ce := d.waitEvent(t, "capture's record of urgent "+c.name, func(e flowEvent) bool {
				return e.Kind == "flow" && e.Source == "capture" && e.ClientPort == o.port
			})
			if ce.Verdict != verdict || (c.reason != "" && ce.Reason != c.reason) || ce.Reason == "hello-malformed" {
				t.Errorf("urgent %s: capture recorded %v; the proxy's verdict is %s", c.name, ce, verdict)
			}
		}
	})

	t.Run("data-in-syn", func(t *testing.T) {
		// TCP Fast Open without a cookie (tcp_fastopen 0x4): the hello
		// rides the SYN. The proxy's listener takes no SYN data, so the
		// kernel sends it again after the handshake, into the REDIRECT
		// like any other byte.
		tp.lan.MustRun("sysctl", "-qw", "net.ipv4.tcp_fastopen=5")
		defer tp.lan.MustRun("sysctl", "-qw", "net.ipv4.tcp_fastopen=1")
		tfo := func(fd uintptr) error {
			return unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_FASTOPEN_CONNECT, 1)
		}
		for _, c := range []struct {
			name, addr string
			hello      []byte
			allowed    bool
			reason     string
		}{
			{"allowed", dockerIP4 + ":443", allowedHello, true, ""},
			{"denied", trackerIP + ":443", trackerHello, false, "no-rule"},
			{"spoof", spoofIP4 + ":443", allowedHello, false, "sni-mismatch"},
		} {
			checkHello(t, tp, d, "TFO "+c.name, c.addr, tfo, func(conn *net.TCPConn) error {
				_, err := conn.Write(c.hello)
				return err
			}, c.allowed, c.reason)
		}
		// The hellos rode SYNs: the client's kernel counts each SYN whose
		// data the other side did not take (TCPFastOpenActiveFail), or took.
		out, _ := tp.lan.Run("nstat", "-az")
		var synData int
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && (f[0] == "TcpExtTCPFastOpenActive" || f[0] == "TcpExtTCPFastOpenActiveFail") {
				n, _ := strconv.Atoi(f[1])
				synData += n
			}
		}
		if synData < 3 {
			t.Errorf("%d SYNs carried data, want 3: the case proves nothing\n%s", synData, out)
		}
	})

	t.Run("reset-after-hello", func(t *testing.T) {
		// The hello, then a reset at once (SO_LINGER 0), before the proxy
		// has decided or dialled: each connection still gets its record,
		// the spoofed one is refused, and nothing stays open.
		fds := d.fds()
		const n = 20
		var ports []int
		for i := range n {
			addr := dockerIP4 + ":443"
			if i%2 == 1 {
				addr = spoofIP4 + ":443"
			}
			conn := tp.mustDial(t, addr, nil)
			conn.Write(allowedHello)
			conn.SetLinger(0)
			conn.Close()
			ports = append(ports, conn.LocalAddr().(*net.TCPAddr).Port)
		}
		for i, port := range ports {
			ev := d.waitEvent(t, fmt.Sprintf("reset connection %d", i), byClientPort(port))
			if i%2 == 1 && (ev.Verdict != "deny" || ev.Reason != "sni-mismatch") {
				t.Errorf("reset after a spoofed hello: %v", ev)
			}
			if i%2 == 0 && ev.Verdict != "allow" {
				t.Errorf("reset after an allowed hello: %v", ev)
			}
		}
		var now int
		for range 50 {
			if now = d.fds(); now <= fds+2 {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if now > fds+2 {
			t.Errorf("egressd holds %d descriptors after %d reset connections, %d before", now, n, fds)
		}
	})

	t.Run("fin-after-partial", func(t *testing.T) {
		// Half a hello (or half a request head), then FIN: nothing to
		// decide on, nothing forwarded. A whole hello or head, then FIN
		// (a client that half-closes, as `nc -N` does), still works.
		for _, c := range []struct {
			name, addr string
			send       []byte
			allowed    bool
			reason     string
		}{
			{"half-hello-allowed", dockerIP4 + ":443", allowedHello[:len(allowedHello)/2], false, "hello-malformed"},
			{"half-hello-sni-cut", dockerIP4 + ":443", allowedHello[:len(allowedHello)-20], false, "hello-malformed"},
			{"whole-hello-allowed", dockerIP4 + ":443", allowedHello, true, ""},
		} {
			checkHello(t, tp, d, c.name, c.addr, nil, func(conn *net.TCPConn) error {
				conn.Write(c.send)
				conn.CloseWrite()
				return nil
			}, c.allowed, c.reason)
		}
		head := "GET /fin-half HTTP/1.1\r\nHost: " + vendorName + "\r\n\r\n"
		for _, c := range []struct {
			name, send string
			code       int
			reason     string
		}{
			{"half-head", head[:len(head)-3], 403, "http-malformed"},
			{"whole-head", head, 200, ""},
		} {
			conn := tp.mustDial(t, vendorIP+":80", nil)
			port := conn.LocalAddr().(*net.TCPAddr).Port
			io.WriteString(conn, c.send)
			conn.CloseWrite()
			conn.SetReadDeadline(time.Now().Add(15 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			conn.Close()
			if err != nil || resp.StatusCode != c.code {
				t.Errorf("%s then FIN: %v %v, want %d", c.name, resp, err, c.code)
			}
			verdict := "allow"
			if c.code == 403 {
				verdict = "deny"
			}
			wantEvent(t, d, c.name, byClientPort(port), verdict, c.reason)
		}
	})

	t.Run("simultaneous-open", func(t *testing.T) {
		// The attacker's server and the LAN client each send a SYN for
		// the same four-tuple. The client's is redirected to the proxy;
		// the server's is a new connection from the WAN side, which the
		// gateway drops: the two never meet.
		const simRemote = 8443
		results := make(chan error, 1)
		go func() {
			// The server's SYNs first (dropped, they retransmit), then the
			// client's.
			c, err := inDial(simRemote, simPort)
			if err == nil {
				c.Close()
				err = errors.New("connected")
			}
			results <- err
		}()
		time.Sleep(300 * time.Millisecond)
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		conn, err := tp.dialWith(ctx, fmt.Sprintf("%s:%d", spoofIP4, simRemote), &net.TCPAddr{IP: net.ParseIP(lanClient4), Port: simPort}, func(fd uintptr) error {
			return unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		})
		cancel()
		var o helloOutcome
		if err == nil {
			conn.Write(buildHello(helloSpec{sni: [][]string{{trackerName}}}))
			o = readVerdict(conn)
			conn.Close()
		}
		if err := <-results; err != nil && err.Error() == "connected" {
			t.Errorf("the attacker's server (%s:%d) connected to the LAN client's port %d", spoofIP4, simRemote, simPort)
		} else {
			t.Logf("attacker's SYN from %s:%d: %v", spoofIP4, simRemote, err)
		}
		if err == nil {
			if !o.denied {
				t.Errorf("simultaneous open, client side: %v", o)
			}
			wantEvent(t, d, "simultaneous open", byClientPort(o.port), "deny", "no-rule")
		} else {
			t.Logf("client's dial: %v", err)
		}
	})

	t.Run("http-without-host", func(t *testing.T) {
		// No Host (HTTP/1.0, or HTTP/1.1 that omits it): the request names
		// nothing, so the address decides, by the names our DNS gave this
		// client for it (dns-learned), like TLS without SNI. The vendor's
		// address was given out for a name the e2e-http rule allows on 80;
		// the attacker's address and the tracker's never were (the
		// tracker's name is not asked here). An empty Host is refused as
		// malformed wherever it goes: stricter than RFC 9112 (which wants
		// it when the target has no authority), never a way through.
		for _, c := range []struct {
			name, addr, req string
			verdict, reason string
			status          string // the response's status line prefix
		}{
			{"http10-no-host-allowed", vendorIP + ":80", "GET /h10 HTTP/1.0\r\n\r\n", "allow", "", "HTTP/1.1 200"},
			// nginx answers 400 to HTTP/1.1 without Host: the proxy let it through.
			{"http11-no-host-allowed", vendorIP + ":80", "GET /h11n HTTP/1.1\r\nConnection: close\r\n\r\n", "allow", "", "HTTP/1.1 400"},
			{"http11-empty-host-allowed", vendorIP + ":80", "GET /h11 HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n", "deny", "http-malformed", "HTTP/1.1 403"},
			{"http10-no-host-spoof", spoofIP4 + ":80", "GET / HTTP/1.0\r\n\r\n", "deny", "no-rule", "HTTP/1.1 403"},
			{"http11-no-host-spoof", spoofIP4 + ":80", "GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "deny", "no-rule", "HTTP/1.1 403"},
			{"http11-empty-host-spoof", spoofIP4 + ":80", "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n", "deny", "http-malformed", "HTTP/1.1 403"},
			{"http10-no-host-denied", trackerIP + ":80", "GET / HTTP/1.0\r\n\r\n", "deny", "no-rule", "HTTP/1.1 403"},
			// The docker address was given out for a name allowed on 443 only.
			{"http10-no-host-other-port", dockerIP4 + ":80", "GET / HTTP/1.0\r\n\r\n", "deny", "port-not-allowed", "HTTP/1.1 403"},
			{"absolute-form-empty-host", vendorIP + ":80", "GET http://" + trackerName + "/ HTTP/1.1\r\nHost: \r\n\r\n", "deny", "http-malformed", "HTTP/1.1 403"},
		} {
			body, port, err := tp.rawHTTP(c.addr, c.req)
			if !strings.HasPrefix(body, c.status) {
				t.Errorf("%s: %q %v, want %s", c.name, firstLine(body, nil), err, c.status)
			}
			if strings.Contains(body, "hit") || c.verdict == "deny" && strings.Contains(body, "host=") {
				t.Errorf("%s: got through: %q", c.name, body)
			}
			ev := wantEvent(t, d, c.name, byClientPort(port), c.verdict, c.reason)
			switch {
			case c.verdict == "allow" && (ev.Name != vendorName || ev.NameSource != "dns-learned"):
				t.Errorf("%s: event %v: want name %s from dns-learned", c.name, ev, vendorName)
			case c.reason == "port-not-allowed" && (ev.Name != dockerName || ev.NameSource != "dns-learned"):
				t.Errorf("%s: event %v: want the name our DNS gave out, %s (dns-learned)", c.name, ev, dockerName)
			case c.verdict == "deny" && c.reason != "port-not-allowed" && ev.NameSource != "none":
				t.Errorf("%s: event %v: want name source none", c.name, ev)
			}
		}
	})

	t.Run("tls12-renegotiation", func(t *testing.T) {
		// TLS 1.2 with an allowed SNI, then a client-initiated
		// renegotiation. The proxy decided on the first hello and spliced:
		// the second hello travels encrypted under the first handshake's
		// keys, so whatever name it carries is never seen, and it reaches
		// the same origin at the same vouched address (what an encrypted
		// Host header reaches: THREATS.md A1, a residual risk).
		const renegName, renegIP = "reneg.nirovision.com", "203.0.113.50"
		tp.inet.MustRun("ip", "addr", "add", renegIP+"/32", "dev", "eth0")
		u.add(renegName + ". 300 IN A " + renegIP)
		// s_server ends at the end of its input: a bounded sleep feeds it.
		srv := tp.inet.Start("sh", "-c", "sleep 15 | exec openssl s_server -naccept 1 -accept "+renegIP+":443 -tls1_2 -cert "+
			tp.dir+"/leaf.pem -key "+tp.dir+"/leaf.key")
		defer srv.Stop()
		for i := 0; !strings.Contains(srv.StdoutSoFar(), "ACCEPT"); i++ { // one accept only: no probe
			if i == 100 {
				t.Fatalf("openssl s_server: %q", srv.StdoutSoFar())
			}
			time.Sleep(100 * time.Millisecond)
		}
		if rcode, addrs := tp.dig(t, renegName, "A"); rcode != "NOERROR" || len(addrs) == 0 {
			t.Fatalf("dig %s: %s %v", renegName, rcode, addrs)
		}
		out, _ := tp.lan.Run("sh", "-c", "(sleep 1; echo R; sleep 2) | timeout 10 openssl s_client -tls1_2 -servername "+
			renegName+" -connect "+renegIP+":443 2>&1")
		// OpenSSL 3's s_server refuses a client's renegotiation (no
		// renegotiation alert), but only after its hello arrived: it
		// counts the renegotiation it was asked for.
		var got string
		for range 50 {
			if got = srv.StdoutSoFar(); strings.Contains(got, "server renegotiates") {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if !strings.Contains(out, "RENEGOTIATING") || !strings.Contains(got, "1 server renegotiates") {
			t.Errorf("renegotiation through the splice: client:\n%s\nserver:\n%s", out, got)
		}
		evs := d.eventsWith([]byte(renegIP))
		var flows int
		for _, e := range evs {
			if e.Kind == "flow" && e.Source == "proxy" {
				flows++
				if e.Name != renegName || e.Verdict != "allow" {
					t.Errorf("renegotiated connection recorded as %v", e)
				}
			}
		}
		if flows != 1 {
			t.Errorf("%d proxy flow records for %s, want 1: the renegotiation is no new connection", flows, renegIP)
		}
	})

	w.settle()
	if n := w.tcp.Load() - base; n != 0 {
		t.Errorf("the attacker's servers accepted %d connections with egressd enforcing", n)
	}
}
