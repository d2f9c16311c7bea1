package proxy

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/netutil"
	"egressd/policy"
)

var alert = tlsAlertAccessDenied

// TestTransparent drives real clients (Go, curl, openssl s_client) from the
// client namespace through the nftables REDIRECT in the gateway namespace
// to servers in the server namespace, IPv4 and IPv6.
func TestTransparent(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	// What our DNS told the client.
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	tp.facts.add(clientV6, srvV6, "www.allowed.test")

	t.Run("go-client-mlkem", func(t *testing.T) {
		for _, dst := range []netip.Addr{srvV4, srvV6} {
			c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(dst, 443))
			hw := &helloWriter{Conn: c}
			body, err := tp.tlsGet(hw, "www.allowed.test", "/x", nil)
			if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
				t.Fatalf("%s: body %q err %v", dst, body, err)
			}
			// Go's default client offers X25519MLKEM768: a hello of ~1.8 KB.
			if hw.size < 1500 {
				t.Errorf("hello is %d bytes: not an ML-KEM hello", hw.size)
			}
			ev := tp.ev.wait(t, "allowed "+dst.String(), byFlow(c))
			if ev.Verdict != policy.Allow || ev.Rule != "allowed" || ev.Name != "www.allowed.test" || ev.NameSource != audit.NameSNI ||
				ev.Dest != dst || ev.DestPort != 443 || ev.BytesIn == 0 || ev.BytesOut < uint64(hw.size) || ev.Close == "" {
				t.Errorf("event %+v", ev)
			}
		}
	})

	t.Run("curl", func(t *testing.T) {
		for _, c := range []struct{ ip, flag string }{{"198.18.2.2", "-4"}, {"[2001:db8:2::2]", "-6"}} {
			out, err := tp.c.Run("curl", "-sS", c.flag, "--max-time", "10", "--cacert", tp.pki.caFile,
				"--resolve", "www.allowed.test:443:"+strings.Trim(c.ip, "[]"), "https://www.allowed.test/curl")
			if err != nil || !strings.Contains(out, "sni=www.allowed.test") || !strings.Contains(out, "path=/curl") {
				t.Errorf("curl %s allowed: %v: %s", c.flag, err, out)
			}
			out, err = tp.c.Run("curl", "-sS", c.flag, "--max-time", "10", "--cacert", tp.pki.caFile,
				"--resolve", "evil.example:443:"+strings.Trim(c.ip, "[]"), "https://evil.example/")
			if err == nil || !strings.Contains(strings.ToLower(out), "access denied") {
				t.Errorf("curl %s denied: want a TLS access_denied alert, got %v: %s", c.flag, err, out)
			}
			// Plain HTTP: allowed Host, and a 403 page for a denied one.
			out, err = tp.c.Run("curl", "-sS", c.flag, "--max-time", "10", "--resolve", "www.allowed.test:80:"+strings.Trim(c.ip, "[]"), "http://www.allowed.test/plain")
			if err != nil || !strings.Contains(out, "host=www.allowed.test path=/plain") {
				t.Errorf("curl %s http allowed: %v: %s", c.flag, err, out)
			}
			out, err = tp.c.Run("curl", "-sS", c.flag, "--max-time", "10", "-w", "\ncode=%{http_code}", "--resolve", "evil.example:80:"+strings.Trim(c.ip, "[]"), "http://evil.example/secret")
			if err != nil || !strings.Contains(out, "code=403") || !strings.Contains(out, "evil.example/secret") || !strings.Contains(out, "no-rule") || !strings.Contains(out, "<code>test</code>") {
				t.Errorf("curl %s http denied: %v: %s", c.flag, err, out)
			}
		}
		tp.ev.wait(t, "IPv6 deny", func(ev audit.Event) bool {
			return ev.Dest == srvV6 && ev.Name == "evil.example" && ev.Verdict == policy.Deny && ev.Enforced && ev.Reason == policy.ReasonNoRule && ev.Close == closeDenied
		})
	})

	t.Run("openssl", func(t *testing.T) {
		out, err := tp.c.Run("sh", "-c", "echo | openssl s_client -connect 198.18.2.2:443 -servername www.allowed.test -CAfile "+tp.pki.caFile+" 2>&1")
		if err != nil || !strings.Contains(out, "Verify return code: 0") {
			t.Errorf("openssl allowed: %v: %s", err, out)
		}
		out, _ = tp.c.Run("sh", "-c", "echo | openssl s_client -connect [2001:db8:2::2]:443 -servername evil.example 2>&1")
		if !strings.Contains(strings.ToLower(out), "access denied") {
			t.Errorf("openssl denied: want alert access denied: %s", out)
		}
	})

	t.Run("hello-one-byte-per-write", func(t *testing.T) {
		c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)) // Go's TCP conns are TCP_NODELAY
		body, err := tp.tlsGet(&helloWriter{Conn: c, chunk: 1}, "www.allowed.test", "/bytes", nil)
		if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
			t.Fatalf("body %q err %v", body, err)
		}
	})

	t.Run("hello-split-across-records", func(t *testing.T) {
		for _, n := range []int{1, 3, 100} {
			c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
			hw := &helloWriter{Conn: c, transform: func(b []byte) []byte { return refragment(b, n) }, chunk: 7}
			body, err := tp.tlsGet(hw, "www.allowed.test", "/records", nil)
			if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
				t.Fatalf("%d-byte records: body %q err %v", n, body, err)
			}
		}
	})

	t.Run("hello-11KB", func(t *testing.T) {
		c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
		var protos []string
		for i := 0; i < 45; i++ {
			protos = append(protos, fmt.Sprintf("p%03d-%s", i, strings.Repeat("x", 240)))
		}
		protos = append(protos, "http/1.1")
		hw := &helloWriter{Conn: c}
		body, err := tp.tlsGet(hw, "www.allowed.test", "/big", &tls.Config{NextProtos: protos})
		if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
			t.Fatalf("body %q err %v", body, err)
		}
		if hw.size < 11*1024 {
			t.Fatalf("hello is only %d bytes", hw.size)
		}
	})

	t.Run("slowloris", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 443))
		hello := buildHello(sniExt("www.allowed.test"))
		c.Write(hello[:20]) // starts as TLS, never completes
		got := readAll(c, 15*time.Second)
		if !bytes.Equal(got, alert) {
			t.Errorf("got %x, want the access_denied alert", got)
		}
		ev := tp.ev.wait(t, "slowloris", byFlow(c))
		if ev.Reason != ReasonHelloTimeout || !ev.Enforced {
			t.Errorf("event %+v", ev)
		}
	})

	rawHello := func(t *testing.T, dst netip.Addr, hello []byte) ([]byte, audit.Event) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(dst, 443))
		c.Write(hello)
		got := readAll(c, 2*time.Second)
		c.Close()
		return got, tp.ev.wait(t, "raw hello", byFlow(c))
	}

	t.Run("duplicate-sni", func(t *testing.T) {
		for name, h := range map[string][]byte{
			"two-extensions": buildHello(sniExt("www.allowed.test"), sniExt("evil.example")),
			"two-entries":    buildHello(sniExt("www.allowed.test", "evil.example")),
		} {
			got, ev := rawHello(t, srvV4, h)
			if !bytes.Equal(got, alert) || ev.Reason != ReasonDuplicateSNI || ev.Verdict != policy.Deny {
				t.Errorf("%s: answer %x event %+v", name, got, ev)
			}
		}
	})

	t.Run("malformed-hello", func(t *testing.T) {
		// A server_name extension whose body is one byte: not a list.
		h := buildHello(ext(0x0000, []byte{0x00}))
		got, ev := rawHello(t, srvV4, h)
		if !bytes.Equal(got, alert) || ev.Verdict != policy.Deny || ev.Reason != ReasonHelloBad {
			t.Errorf("answer %x event %+v", got, ev)
		}
	})

	t.Run("hello-cut-by-reset", func(t *testing.T) {
		// The client resets the connection mid-hello: the proxy reads
		// the bytes that came, then the reset, and refuses the hello as
		// it refuses one cut short by a FIN (capture reports the same).
		for i := 0; i < 3; i++ {
			c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 443))
			c.Write(buildHello(sniExt("www.allowed.test"))[:20])
			if i > 0 {
				time.Sleep(100 * time.Millisecond) // the proxy is reading when the reset comes
			}
			c.SetLinger(0)
			c.Close()
			ev := tp.ev.wait(t, "reset hello", byFlow(c))
			if ev.Verdict != policy.Deny || ev.Reason != ReasonHelloBad {
				t.Errorf("try %d: event %+v, want hello-malformed", i, ev)
			}
		}
	})

	t.Run("ip-literal-sni", func(t *testing.T) {
		// Decided by address: the client was told srvV4 is www.allowed.test.
		_, ev := rawHello(t, srvV4, buildHello(sniExt("198.18.2.2")))
		if ev.Verdict != policy.Allow || ev.NameSource != audit.NameDNSLearned || ev.Name != "www.allowed.test" {
			t.Errorf("learned address: event %+v", ev)
		}
		// Nobody was told about spoofV4: denied, no name.
		got, ev := rawHello(t, spoofV4, buildHello(sniExt("198.18.2.3")))
		if !bytes.Equal(got, alert) || ev.Verdict != policy.Deny || ev.NameSource != audit.NameNoSNI {
			t.Errorf("unknown address: answer %x event %+v", got, ev)
		}
	})

	t.Run("no-sni", func(t *testing.T) {
		// A Go client sends no SNI for an IP address.
		c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
		body, err := tp.tlsGet(c, "198.18.2.2", "/nosni", nil)
		if err != nil || !strings.Contains(body, "sni= ") {
			t.Fatalf("dns-learned: body %q err %v", body, err)
		}
		ev := tp.ev.wait(t, "no-sni allowed", byFlow(c))
		if ev.NameSource != audit.NameDNSLearned || ev.Rule != "allowed" {
			t.Errorf("event %+v", ev)
		}
		c = tp.dialAtFirstWrite(t, netip.AddrPortFrom(spoofV4, 443))
		if _, err := tp.tlsGet(c, "198.18.2.3", "/", nil); err == nil {
			t.Fatal("no-SNI to an address nobody was told about went through")
		}
		// The port alone may be an earlier connection's (to srvV4): the
		// kernel reuses a local port toward another destination.
		port := localPort(c)
		ev = tp.ev.wait(t, "no-sni denied", func(ev audit.Event) bool { return int(ev.ClientPort) == port && ev.Dest == spoofV4 })
		if ev.NameSource != audit.NameNoSNI || ev.Verdict != policy.Deny || !ev.Enforced {
			t.Errorf("event %+v", ev)
		}
	})

	t.Run("ech-outer-sni-decides", func(t *testing.T) {
		tp.facts.add(clientV4, srvV4, "ech-front.allowed-ech.test")
		_, ev := rawHello(t, srvV4, buildHello(sniExt("ech-front.allowed-ech.test"), echOuterExt()))
		if ev.Verdict != policy.Allow || ev.Name != "ech-front.allowed-ech.test" || ev.NameSource != audit.NameSNI {
			t.Errorf("allowed outer name: event %+v", ev)
		}
		got, ev := rawHello(t, srvV4, buildHello(sniExt("cloudflare-ech.com"), echOuterExt()))
		if !bytes.Equal(got, alert) || ev.Verdict != policy.Deny || ev.Name != "cloudflare-ech.com" {
			t.Errorf("denied outer name: answer %x event %+v", got, ev)
		}
	})

	t.Run("sni-spoofing", func(t *testing.T) {
		// An allowed SNI toward an address no DNS answer gave out for it
		// (and a fresh lookup of www.allowed.test does not return).
		c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(spoofV4, 443))
		if _, err := tp.tlsGet(c, "www.allowed.test", "/", nil); err == nil {
			t.Fatal("spoofed SNI went through")
		}
		ev := tp.ev.wait(t, "spoof", byFlow(c))
		if ev.Reason != ReasonSNIMismatch || !ev.Enforced || ev.Dest != spoofV4 {
			t.Errorf("event %+v", ev)
		}
		// An address only the fresh lookup vouches for: our DNS told
		// client2 nothing.
		c = tp.dialAtFirstWriteFrom(t, client2V4, netip.AddrPortFrom(srvV4, 443))
		if body, err := tp.tlsGet(c, "allowed.test", "/", nil); err != nil || !strings.Contains(body, "sni=allowed.test") {
			t.Fatalf("fresh lookup: %q %v", body, err)
		}
	})

	t.Run("host-vs-absolute-form", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 80))
		io.WriteString(c, "GET http://evil.example/ HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n")
		got := string(readAll(c, 5*time.Second))
		if !strings.HasPrefix(got, "HTTP/1.1 403") || !strings.Contains(got, ReasonHostMismatch) {
			t.Errorf("got %q", got)
		}
	})

	t.Run("special-range", func(t *testing.T) {
		tp.c.MustRun("ip", "route", "replace", "169.254.0.0/16", "via", "198.18.1.1")
		tp.facts.add(clientV4, netip.MustParseAddr("169.254.169.254"), "www.allowed.test")
		c := tp.dialFromClient(t, netip.Addr{}, netip.MustParseAddrPort("169.254.169.254:443"))
		c.Write(buildHello(sniExt("www.allowed.test")))
		got := readAll(c, 5*time.Second)
		ev := tp.ev.wait(t, "metadata", byFlow(c))
		if !bytes.Equal(got, alert) || ev.Reason != ReasonSpecialRange {
			t.Errorf("answer %x event %+v", got, ev)
		}
	})

	t.Run("non-tls-by-cidr-and-half-close", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(echoV4, 8443))
		msg := []byte("\x00\x2a\x38 not TLS, a VPN over TCP \xff\xfe")
		c.Write(msg)
		c.CloseWrite() // the echo server sees EOF only if the half close is propagated
		got := readAll(c, 5*time.Second)
		if !bytes.Equal(got, msg) {
			t.Fatalf("echo %q", got)
		}
		ev := tp.ev.wait(t, "vpn", byFlow(c))
		if ev.Verdict != policy.Allow || ev.Rule != "vpn" || ev.BytesOut != uint64(len(msg)) || ev.BytesIn != uint64(len(msg)) || ev.NameSource != audit.NameNone {
			t.Errorf("event %+v", ev)
		}
		// Denied non-TLS: closed.
		c = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(deniedV4, 8443))
		c.Write(msg)
		if got := readAll(c, 5*time.Second); len(got) != 0 {
			t.Errorf("denied non-TLS got %q", got)
		}
		// Server speaks first: nothing from the client, decided on the
		// address after FirstByteWait and spliced.
		c = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(echoV4, 8443))
		time.Sleep(500 * time.Millisecond)
		c.Write([]byte("late"))
		c.CloseWrite()
		if got := readAll(c, 5*time.Second); string(got) != "late" {
			t.Errorf("server-first flow: %q", got)
		}
	})
}

// TestTransparentAudit: audit mode never denies, and records what enforce
// would have done.
func TestTransparentAudit(t *testing.T) {
	tp := newTopo(t, topoOpts{mode: "audit"})
	c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(spoofV4, 443))
	body, err := tp.tlsGet(c, "www.allowed.test", "/spoof", nil)
	if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
		t.Fatalf("audit mode blocked a spoofed SNI: %q %v", body, err)
	}
	ev := tp.ev.wait(t, "audit spoof", byFlow(c))
	if ev.Verdict != policy.Deny || ev.Reason != ReasonSNIMismatch || ev.Enforced || ev.Mode != policy.ModeAudit || ev.BytesIn == 0 {
		t.Errorf("event %+v", ev)
	}
	c = tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
	body, err = tp.tlsGet(c, "evil.example", "/", nil)
	if err != nil || !strings.Contains(body, "sni=evil.example") {
		t.Fatalf("audit mode blocked a denied name: %q %v", body, err)
	}
	ev = tp.ev.wait(t, "audit deny", byFlow(c))
	if ev.Verdict != policy.Deny || ev.Reason != policy.ReasonNoRule || ev.Enforced {
		t.Errorf("event %+v", ev)
	}
}

// TestTransparentLimits: one client at its limit does not stop another.
func TestTransparentLimits(t *testing.T) {
	tp := newTopo(t, topoOpts{config: func(c *Config) { c.MaxConnsPerClient = 20 }})
	var conns []net.Conn
	for i := 0; i < 20; i++ {
		c := tp.dialFromClient(t, clientV4, netip.AddrPortFrom(echoV4, 8443))
		c.Write([]byte("x"))
		if got := make([]byte, 1); true {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("tunnel %d: %v", i, err)
			}
		}
		conns = append(conns, c)
	}
	// The 21st is refused with a reset: the dial itself may already see it.
	var c21 net.Conn
	tp.c.Do(func() (err error) {
		c21, err = net.DialTimeout("tcp", "198.18.2.4:8443", 5*time.Second)
		return
	})
	if c21 != nil {
		c21.Write([]byte("x"))
		if got := readAll(c21, 5*time.Second); len(got) != 0 {
			t.Errorf("21st connection got %q", got)
		}
		c21.Close()
	}
	ev := tp.ev.wait(t, "limit", func(ev audit.Event) bool { return ev.Reason == ReasonLimit })
	if ev.Client != clientV4 || !ev.Enforced || ev.Close != closeLimit {
		t.Errorf("event %+v", ev)
	}
	c := tp.dialFromClient(t, client2V4, netip.AddrPortFrom(echoV4, 8443))
	c.Write([]byte("y"))
	c.CloseWrite()
	if got := readAll(c, 5*time.Second); string(got) != "y" {
		t.Errorf("other client: %q", got)
	}
	for _, c := range conns {
		c.Close()
	}
}

// TestTransparentPortClash: a client reuses its source port toward another
// destination while the first connection's conntrack entry lingers in
// TIME_WAIT. After the REDIRECT both connections have the reply tuple
// gateway:15001 -> client:port, so the kernel's NAT remaps the second
// one's source port; the proxy's event must still carry the port the
// client used (capture sees that one on the LAN, and the ledger matches
// the two by 5-tuple). IPv4 and IPv6.
func TestTransparentPortClash(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	remapped := func() float64 { return tp.conntrackLookups("remapped") }
	for _, c := range []struct {
		name         string
		client       netip.Addr
		destA, destB netip.AddrPort
	}{
		// A is an allowed tunnel to the echo service, B a denied address.
		{"ipv4", clientV4, netip.AddrPortFrom(echoV4, 8443), netip.AddrPortFrom(deniedV4, 8443)},
		// Both denied (no rule for the ports): the proxy closes.
		{"ipv6", clientV6, netip.AddrPortFrom(srvV6, 8443), netip.AddrPortFrom(srvV6, 8444)},
	} {
		t.Run(c.name, func(t *testing.T) {
			local := netip.AddrPortFrom(c.client, 40123)
			before := remapped()
			msg := []byte("\x00\x2a not TLS")

			a := tp.dialFromPort(t, local, c.destA)
			a.Write(msg)
			a.CloseWrite()
			readAll(a, 5*time.Second) // the echo, or nothing; then the proxy's close
			a.Close()
			ev := tp.ev.wait(t, "first connection", func(ev audit.Event) bool { return ev.Dest == c.destA.Addr() && ev.DestPort == c.destA.Port() })
			if ev.Client != c.client || ev.ClientPort != local.Port() {
				t.Fatalf("first connection: event from %s:%d, want %s", ev.Client, ev.ClientPort, local)
			}

			// Within seconds, from the same port to another destination.
			b := tp.dialFromPort(t, local, c.destB)
			b.Write(msg)
			readAll(b, 5*time.Second)
			ev = tp.ev.wait(t, "second connection", func(ev audit.Event) bool { return ev.Dest == c.destB.Addr() && ev.DestPort == c.destB.Port() })
			if got := remapped() - before; got != 1 {
				t.Fatalf("%v remapped lookups, want 1: the kernel did not remap the clashing port, the test reproduced nothing", got)
			}
			if ev.Client != c.client || ev.ClientPort != local.Port() {
				t.Errorf("second connection: event from %s:%d, want %s", ev.Client, ev.ClientPort, local)
			}
			if ev.Verdict != policy.Deny || !ev.Enforced {
				t.Errorf("second connection: event %+v", ev)
			}
		})
	}
	if n := tp.conntrackLookups("same"); n != 2 {
		t.Errorf("%v lookups found the socket's own address, want 2 (the first connections)", n)
	}
	if n := tp.conntrackLookups("error") + tp.conntrackLookups("not-found"); n != 0 {
		t.Errorf("%v lookups failed", n)
	}
}

// dialFromPort dials dest from the client namespace from a fixed local
// address and port, with SO_REUSEADDR (the port's previous connection may
// be in TIME_WAIT).
func (tp *topo) dialFromPort(t *testing.T, local, dest netip.AddrPort) *net.TCPConn {
	t.Helper()
	var c net.Conn
	err := tp.c.Do(func() error {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(local),
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
				return serr
			}}
		var err error
		c, err = d.Dial("tcp", dest.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dest, local, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// TestTransparentConntrackFallback: a lookup that cannot be done (here a
// closed netlink socket) keeps the socket's address, counts an error, and
// the connection goes on.
func TestTransparentConntrackFallback(t *testing.T) {
	tp := newTopo(t, topoOpts{deps: func(d *Deps) {
		ct, err := netutil.OpenConntrack()
		if err != nil {
			t.Fatal(err)
		}
		ct.Close()
		d.Conntrack = ct
	}})
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(echoV4, 8443))
	c.Write([]byte("ping"))
	c.CloseWrite()
	if got := readAll(c, 5*time.Second); string(got) != "ping" {
		t.Fatalf("echo %q", got)
	}
	ev := tp.ev.wait(t, "tunnel", byFlow(c))
	if ev.Verdict != policy.Allow || ev.Client != clientV4 {
		t.Errorf("event %+v", ev)
	}
	if n := tp.conntrackLookups("error"); n != 1 {
		t.Errorf("%v lookup errors counted, want 1", n)
	}
	if n := tp.conntrackLookups("same") + tp.conntrackLookups("remapped"); n != 0 {
		t.Errorf("%v lookups succeeded on a closed socket", n)
	}
}

// conntrackLookups reads the proxy's lookup counter for one result.
func (tp *topo) conntrackLookups(result string) float64 {
	var m dto.Metric
	tp.proxy.met.conntrack.WithLabelValues(result).Write(&m)
	return m.GetCounter().GetValue()
}

// TestTransparentHelloInPieces: a Go client's ML-KEM hello (about 1.8 KB)
// whose second part comes 50 ms after its first 1000 bytes, so the peek's
// first read holds only the start, is read on and parsed by the fast
// path: the connection goes through and the fast parser's count, not
// crypto/tls's, goes up by one.
func TestTransparentHelloInPieces(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	fast, slow := tp.helloParses("fast"), tp.helloParses("crypto-tls")
	c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443)) // Go's TCP conns are TCP_NODELAY
	hw := &helloWriter{Conn: c, chunk: 1000, pause: 50 * time.Millisecond}
	body, err := tp.tlsGet(hw, "www.allowed.test", "/pieces", nil)
	if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
		t.Fatalf("body %q err %v", body, err)
	}
	if hw.size <= 1000 {
		t.Fatalf("a %d-byte hello was sent in one piece", hw.size)
	}
	ev := tp.ev.wait(t, "allowed", byFlow(c))
	if ev.Verdict != policy.Allow || ev.Name != "www.allowed.test" || ev.NameSource != audit.NameSNI || ev.BytesOut < uint64(hw.size) {
		t.Errorf("event %+v", ev)
	}
	if d := tp.helloParses("fast") - fast; d != 1 {
		t.Errorf("fast parses went up by %v, want 1", d)
	}
	if d := tp.helloParses("crypto-tls") - slow; d != 0 {
		t.Errorf("crypto/tls parses went up by %v, want 0", d)
	}
}

// helloParses reads the proxy's hello counter for one parser.
func (tp *topo) helloParses(parser string) float64 {
	var m dto.Metric
	tp.proxy.met.hellos.WithLabelValues(parser).Write(&m)
	return m.GetCounter().GetValue()
}

// TestTransparentDeferAccept: through the listener the proxy opens itself
// (as egressd run does), under TCP_DEFER_ACCEPT: TLS is served and decided
// as before, a client that closes without a byte is recorded as closed
// early, and a service where the server speaks first still gets its
// client's connection once the kernel and the first-byte wait have waited
// (the banner arrives, the echo works, the flow is decided on the address).
func TestTransparentDeferAccept(t *testing.T) {
	tp := newTopo(t, topoOpts{ownListener: true, config: func(c *Config) { c.FirstByteWait = time.Second }})
	if !tp.proxy.deferAccept {
		t.Fatal("the proxy's own listener has no TCP_DEFER_ACCEPT with a first-byte wait of 1 s")
	}
	tc := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
	body, err := tp.tlsGet(tc, "www.allowed.test", "/deferred", nil)
	if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
		t.Fatalf("TLS through the deferred listener: %q %v", body, err)
	}
	ev := tp.ev.wait(t, "tls", byFlow(tc))
	if ev.Verdict != policy.Allow || ev.NameSource != audit.NameSNI {
		t.Errorf("TLS event %+v", ev)
	}

	// Closed without a byte: the FIN reaches accept at once.
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 443))
	c.Close()
	if ev := tp.ev.wait(t, "early close", byFlow(c)); ev.Close != closeEarly {
		t.Errorf("early close: event %+v", ev)
	}

	// Server speaks first.
	c = tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(echoV4, 8444))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line := make([]byte, len(bannerLine))
	if _, err := io.ReadFull(c, line); err != nil || string(line) != bannerLine {
		t.Fatalf("banner %q, %v", line, err)
	}
	c.Write([]byte("after the banner"))
	c.CloseWrite()
	if got := readAll(c, 5*time.Second); string(got) != "after the banner" {
		t.Errorf("echo after the banner: %q", got)
	}
	ev = tp.ev.wait(t, "server first", byFlow(c))
	if ev.Verdict != policy.Allow || ev.Rule != "vpn" || ev.NameSource != audit.NameNone || ev.BytesIn != uint64(len(bannerLine)+len("after the banner")) {
		t.Errorf("server-first event %+v", ev)
	}
}
