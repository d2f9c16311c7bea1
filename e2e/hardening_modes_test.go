package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestHardeningModes: THREATS.md F5 (the original destination's port must
// pass, not only the name) and A2 (an allowed name toward an address no
// DNS answer gave out: TLS and a plain HTTP Host, over IPv4 and IPv6), in
// enforce mode and in audit mode. Enforce: nothing reaches the servers
// (witnesses on the allowed name's own address at ports no rule opens, and
// on the attacker's addresses). Audit: everything reaches them, and the
// event log says what enforce would do: a deny, not enforced, for the
// reason enforce gives. And E3: the forwarder's rebinding filter works in
// both modes.
func TestHardeningModes(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			u := tp.startUpstream(t)
			for _, rr := range []string{
				rebindMeta + ". 300 IN A " + metaIP,
				rebindMixed + ". 300 IN A " + privIP,
				rebindMixed + ". 300 IN A " + dockerIP4,
				rebindNAT64 + ". 300 IN AAAA 64:ff9b::a9fe:a9fe",
			} {
				u.add(rr)
			}
			cases := []struct {
				name, addr, payload, reason string
			}{
				// F5: the address our DNS gave this client for dockerName,
				// on ports no rule opens for it.
				{"allowed-name-port-8443", dockerIP4 + ":8443", string(buildHello(helloSpec{sni: [][]string{{dockerName}}})), "port-not-allowed|no-rule"},
				{"allowed-name-port-22", dockerIP4 + ":22", "SSH-2.0-OpenSSH_9.2\r\n", "port-not-allowed|no-rule"},
				{"allowed-name-port-8443-v6", "[" + dockerIP6 + "]:8443", string(buildHello(helloSpec{sni: [][]string{{dockerName}}})), "port-not-allowed|no-rule"},
				// A2: the allowed name toward the attacker's address.
				{"sni-spoof-v4", spoofIP4 + ":443", string(buildHello(helloSpec{sni: [][]string{{dockerName}}})), "sni-mismatch"},
				{"sni-spoof-v6", "[" + spoofIP6 + "]:443", string(buildHello(helloSpec{sni: [][]string{{dockerName}}})), "sni-mismatch"},
				{"host-spoof-v4", spoofIP4 + ":80", "GET / HTTP/1.1\r\nHost: " + vendorName + "\r\n\r\n", "sni-mismatch"},
				{"host-spoof-v6", "[" + spoofIP6 + "]:80", "GET / HTTP/1.1\r\nHost: " + vendorName + "\r\n\r\n", "sni-mismatch"},
			}
			var addrs []string
			for _, c := range cases {
				addrs = append(addrs, c.addr)
			}
			w := tp.newWitness(t, addrs, nil)
			for _, a := range addrs {
				if !tp.dialOK(a) {
					t.Fatalf("without egressd, %s is not reachable from the LAN: the test would prove nothing", a)
				}
			}
			w.settleAfter(t, int64(len(addrs)), 0)
			base := map[string]int{}
			for _, a := range addrs {
				base[a] = w.hits(a)
			}

			d := modeDaemon(t, tp, u, mode)
			for _, q := range [][2]string{{dockerName, "A"}, {dockerName, "AAAA"}, {vendorName, "A"}} {
				if rcode, got := tp.dig(t, q[0], q[1]); rcode != "NOERROR" || len(got) == 0 {
					t.Fatalf("dig %s %s: %s %v", q[0], q[1], rcode, got)
				}
			}

			// E3 in both modes: the forwarder drops special addresses from
			// an allowed name's answer (only the public one of a mix stays).
			for _, q := range [][2]string{{rebindMeta, "A"}, {rebindMixed, "A"}, {rebindNAT64, "AAAA"}} {
				rcode, got := tp.dig(t, q[0], q[1])
				want := ""
				if q[0] == rebindMixed {
					want = dockerIP4
				}
				if rcode != "NOERROR" || strings.Join(got, ",") != want {
					t.Errorf("%s mode: dig %s %s: %s %v, want NOERROR %q", mode, q[0], q[1], rcode, got, want)
				}
				wantFiltered(t, d, q[0], q[1])
			}

			for _, c := range cases {
				port, hit := tp.poke(c.addr, c.payload)
				if port == 0 {
					t.Errorf("%s: dial %s failed", c.name, c.addr)
					continue
				}
				if want := mode == "audit"; hit != want {
					t.Errorf("%s: %s reached %v, want %v in %s mode", c.name, c.addr, hit, want, mode)
				}
				ev := d.waitEvent(t, c.name, func(e flowEvent) bool {
					return e.Kind == "flow" && e.ClientPort == port && e.Verdict == "deny" && !e.Time.Before(dialedAt(port))
				})
				if ev.Kind == "" {
					continue
				}
				t.Logf("%s: %v", c.name, ev)
				want := dockerName
				if strings.HasPrefix(c.name, "host-") {
					want = vendorName
				}
				if ev.Name != want {
					t.Errorf("%s: event names %q, want the name the client gave", c.name, ev.Name)
				}
				if !slices.Contains(strings.Split(c.reason, "|"), ev.Reason) || ev.Enforced != (mode == "enforce") {
					t.Errorf("%s: %s mode event %v; want a deny for %s, enforced %v", c.name, mode, ev, c.reason, mode == "enforce")
				}
				// No component reports it allowed.
				for _, e := range d.allEvents() {
					if e.Kind == "flow" && e.ClientPort == port && e.Verdict == "allow" && !e.Time.Before(dialedAt(port)) {
						t.Errorf("%s: an allow for the same connection: %v", c.name, e)
					}
				}
			}
			for _, a := range addrs {
				n := w.hits(a) - base[a]
				if mode == "enforce" && n != 0 {
					t.Errorf("enforce: %s accepted %d connections", a, n)
				}
			}
		})
	}
}

// poke connects from the LAN to addr, sends payload and reads for up to
// 2 s: hit says a witness answered ("hit"). It closes the connection, so
// capture ends the flow. port 0: the dial failed.
func (tp *topo) poke(addr, payload string) (port int, hit bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.dialTCP(ctx, addr)
	if err != nil {
		return 0, false
	}
	defer c.Close()
	port = c.LocalAddr().(*net.TCPAddr).Port
	c.SetDeadline(time.Now().Add(2 * time.Second))
	c.Write([]byte(payload))
	buf := make([]byte, 4)
	n, _ := c.Read(buf)
	return port, string(buf[:n]) == "hit\n"
}

// TestHardeningExplicitKeepAlive (THREATS.md C6, F5): on one keep-alive
// connection to the explicit proxy, each absolute-form request is decided
// on its own: after an allowed request, one naming a denied host, and ones
// that change only the port of the allowed name (to 22 and 8080, which no
// rule opens for it), get the 403 and reach no server; an allowed one
// still goes through.
func TestHardeningExplicitKeepAlive(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	otherPorts := []string{vendorIP + ":22", vendorIP + ":8080"}
	w := tp.newWitness(t, otherPorts, nil)
	for _, a := range otherPorts {
		if !tp.dialOK(a) {
			t.Fatalf("without egressd, %s is not reachable from the LAN: the test would prove nothing", a)
		}
	}
	w.settleAfter(t, int64(len(otherPorts)), 0)
	base := w.tcp.Load()
	d := hardeningDaemon(t, tp, u, "")
	if rcode, got := tp.dig(t, vendorName, "A"); rcode != "NOERROR" || len(got) == 0 {
		t.Fatalf("dig %s: %s %v", vendorName, rcode, got)
	}

	get := func(target string) string {
		host := strings.TrimPrefix(target, "http://")
		host, _, _ = strings.Cut(host, "/")
		return "GET " + target + " HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: e2e\r\n\r\n"
	}
	steps := []struct {
		target string
		code   int
		reason string
	}{
		{"http://" + vendorName + "/ka-first", 200, ""},
		{"http://" + trackerName + "/ka-denied-host", 403, "no-rule"},
		{"http://" + vendorName + "/ka-second", 200, ""},
		{"http://" + vendorName + ":22/ka-port-22", 403, "port-not-allowed"},
		{"http://" + vendorName + "/ka-third", 200, ""},
		{"http://" + vendorName + ":8080/ka-port-8080", 403, "port-not-allowed"},
		{"http://" + vendorName + "/ka-fourth", 200, ""},
	}
	c := tp.dialLAN(t, gwLAN4+":3128", 30*time.Second)
	defer func() { c.Close() }()
	br := bufio.NewReader(c)
	for i, s := range steps {
		io.WriteString(c, get(s.target))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			// A proxy may close the connection after a refusal; the
			// rest is then tried on a new one.
			t.Logf("step %d (%s): %v: reconnecting", i, s.target, err)
			c.Close()
			c = tp.dialLAN(t, gwLAN4+":3128", 30*time.Second)
			br = bufio.NewReader(c)
			if i > 0 && steps[i-1].code == 200 {
				t.Errorf("step %d (%s): the connection ended after an allowed request", i, s.target)
			}
			io.WriteString(c, get(s.target))
			if resp, err = http.ReadResponse(br, nil); err != nil {
				t.Fatalf("step %d (%s) on a new connection: %v", i, s.target, err)
			}
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode != s.code {
			t.Errorf("step %d: %s: %d, want %d: %q", i, s.target, resp.StatusCode, s.code, firstLine(string(body), nil))
		}
		if s.code == 403 && resp.Header.Get("X-Egressd-Reason") != s.reason {
			t.Errorf("step %d: %s: reason %q, want %q", i, s.target, resp.Header.Get("X-Egressd-Reason"), s.reason)
		}
		if s.code == 403 {
			d.waitEvent(t, s.target, func(e flowEvent) bool {
				return e.Verdict == "deny" && e.Enforced && e.Reason == s.reason && strings.Contains(s.target, e.Name) &&
					(e.Path == "" || strings.HasSuffix(s.target, e.Path))
			})
		}
		if s.code == 200 && !strings.Contains(string(body), "host="+vendorName) {
			t.Errorf("step %d: %s: body %q", i, s.target, firstLine(string(body), nil))
		}
	}
	if n := w.tcp.Load() - base; n != 0 {
		t.Errorf("the servers on ports no rule opens accepted %d connections", n)
	}
	log := waitNginxLog(t, tp, "/ka-fourth ")
	for _, s := range steps {
		path := s.target[strings.LastIndex(s.target, "/"):]
		if got := strings.Contains(string(log), path+" "); got != (s.code == 200) {
			t.Errorf("nginx's access log has %s: %v, want %v", path, got, s.code == 200)
		}
	}
}

// TestHardeningExplicitUpstreamDown (THREATS.md G4): with the DNS upstream
// down, the explicit proxy's own lookup of a CONNECT name fails, and the
// CONNECT is refused (fail closed), logged as a denied flow; nothing
// reaches the address the name would have had. When the upstream is back,
// a CONNECT to another name of the same rule goes through (the control).
func TestHardeningExplicitUpstreamDown(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	const freshIP = "203.0.113.42"
	for _, n := range []string{"down1", "down2"} {
		u.add(n + ".nirovision.com. 300 IN A " + freshIP)
	}
	w := tp.newWitness(t, []string{freshIP + ":443"}, nil)
	if !tp.dialOK(freshIP + ":443") {
		t.Fatalf("without egressd, %s:443 is not reachable from the LAN: the test would prove nothing", freshIP)
	}
	w.settleAfter(t, 1, 0)
	base := w.tcp.Load()
	d := hardeningDaemon(t, tp, u, "")
	proxyAddr := gwLAN4 + ":3128"

	u.down.Store(true)
	body, port, err := tp.rawHTTP(proxyAddr, "CONNECT down1.nirovision.com:443 HTTP/1.1\r\nHost: down1.nirovision.com:443\r\nConnection: close\r\n\r\n")
	if !strings.HasPrefix(body, "HTTP/1.1 403") {
		t.Errorf("CONNECT with the upstream down: %q, want 403", firstLine(body, err))
	}
	ev := wantEvent(t, d, "CONNECT with the upstream down", byClientPort(port), "deny", "resolve-failed")
	t.Logf("CONNECT with the upstream down: %q; %v", firstLine(body, err), ev)
	if n := w.tcp.Load() - base; n != 0 {
		t.Errorf("%s accepted %d connections while the upstream was down", freshIP, n)
	}

	u.down.Store(false)
	deadline := time.Now().Add(30 * time.Second)
	for {
		c := tp.dialLAN(t, proxyAddr, 10*time.Second)
		io.WriteString(c, "CONNECT down2.nirovision.com:443 HTTP/1.1\r\nHost: down2.nirovision.com:443\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		c.Close()
		if err == nil && resp.StatusCode == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("control: CONNECT down2.nirovision.com:443 after the upstream came back: %v %v", resp, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	deadline = time.Now().Add(5 * time.Second)
	for w.tcp.Load() == base && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if w.tcp.Load() == base {
		t.Errorf("control: the CONNECT after the upstream came back did not reach %s", freshIP)
	}
}

// TestHardeningSmuggling (THREATS.md C6): on a transparent plain HTTP
// keep-alive connection to an allowed name, after an allowed request,
// framing shapes that a parser and the origin (nginx) might read
// differently carry a request for a denied name in what egressd could
// take for a body. Whatever egressd answers (a refusal, or the origin's
// responses when it frames the request as nginx does), the origin never
// serves the hidden request: no response names it and nginx's access log
// never has it.
func TestHardeningSmuggling(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	d := hardeningDaemon(t, tp, u, "")
	if rcode, got := tp.dig(t, vendorName, "A"); rcode != "NOERROR" || len(got) == 0 {
		t.Fatalf("dig %s: %s %v", vendorName, rcode, got)
	}
	hidden := func(tag string) string {
		return "GET /c6x-" + tag + "-hidden HTTP/1.1\r\nHost: " + trackerName + "\r\n\r\n"
	}
	post := func(fields string) string {
		return "POST /c6x-post HTTP/1.1\r\nHost: " + vendorName + "\r\n" + fields + "\r\n"
	}
	// What egressd does with each, pinned: origin, the origin answers the
	// outer request first (egressd frames it as nginx does); refused, the
	// reason of egressd's 403 (its X-Egressd-Reason header and its
	// request event), "" for none. Most shapes nginx refuses by itself,
	// so the nginx checks alone would pass whatever egressd did; the
	// refusal is what egressd adds.
	cases := []struct {
		name, write string
		origin      bool
		refused     string
	}{
		{"te-comma", post("Transfer-Encoding: chunked,\r\n") + "0\r\n\r\n" + hidden("te-comma"), false, "http-framing"},
		{"te-identity-chunked", post("Transfer-Encoding: identity, chunked\r\n") + "0\r\n\r\n" + hidden("te-identity-chunked"), false, "http-framing"},
		{"te-xchunked-cl", post("Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n") + "0\r\n\r\n" + hidden("te-xchunked-cl"), false, "http-framing"},
		{"te-space-name", post("Transfer-Encoding : chunked\r\n") + "0\r\n\r\n" + hidden("te-space-name"), false, "http-malformed"},
		{"te-two-headers", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n") + "0\r\n\r\n" + hidden("te-two-headers"), false, "http-framing"},
		{"cl-plus", post("Content-Length: +5\r\n") + "hello" + hidden("cl-plus"), false, "http-framing"},
		{"cl-list", post("Content-Length: 5, 5\r\n") + "hello" + hidden("cl-list"), false, "http-framing"},
		{"cl-hex", post("Content-Length: 0x5\r\n") + "hello" + hidden("cl-hex"), false, "http-framing"},
		{"chunk-ext-lf", post("Transfer-Encoding: chunked\r\n") + "5;x\nhello\r\n0\r\n\r\n" + hidden("chunk-ext-lf"), true, "http-framing"},
		{"chunk-size-overflow", post("Transfer-Encoding: chunked\r\n") + "10000000000000005\r\nhello\r\n0\r\n\r\n" + hidden("chunk-size-overflow"), true, "http-framing"},
		{"get-with-body-cl", "GET /c6x-get HTTP/1.1\r\nHost: " + vendorName + "\r\nContent-Length: " + fmt.Sprint(len(hidden("get-with-body-cl"))) + "\r\n\r\n" + hidden("get-with-body-cl"), true, ""},
		{"host-space", "GET /c6x-host-space HTTP/1.1\r\nHost: " + vendorName + " " + trackerName + "\r\n\r\n" + hidden("host-space"), false, "http-malformed"},
		{"host-cr", "GET /c6x-host-cr HTTP/1.1\r\nHost: " + vendorName + "\rHost: " + trackerName + "\r\n\r\n" + hidden("host-cr"), false, "http-malformed"},
		{"request-line-lf", "GET /c6x-lf HTTP/1.1\nHost: " + vendorName + "\n\n" + hidden("request-line-lf"), false, "http-malformed"},
		{"http10-absolute", "GET http://" + trackerName + "/c6x-http10-absolute-hidden HTTP/1.0\r\nHost: " + vendorName + "\r\n\r\n", false, "host-mismatch"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn := tp.dialLAN(t, vendorIP+":80", 10*time.Second)
			defer conn.Close()
			br := bufio.NewReader(conn)
			io.WriteString(conn, "GET /c6x-first HTTP/1.1\r\nHost: "+vendorName+"\r\n\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("the allowed first request: %v %v", resp, err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			io.WriteString(conn, c.write)
			// Read what comes back until the connection ends or is quiet.
			conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			rest, _ := io.ReadAll(br)
			var codes []string
			for _, l := range strings.Split(string(rest), "\r\n") {
				if strings.HasPrefix(l, "HTTP/1.") {
					codes = append(codes, l)
				}
			}
			t.Logf("%s: responses %q", c.name, codes)
			port := conn.LocalAddr().(*net.TCPAddr).Port
			reason := ""
			if _, after, ok := strings.Cut(string(rest), "\r\nX-Egressd-Reason: "); ok {
				reason, _, _ = strings.Cut(after, "\r\n")
			}
			if c.origin != (len(codes) > 0 && codes[0] == "HTTP/1.1 200 OK") {
				t.Errorf("%s: responses %q; want the origin's 200 for the outer request first: %v", c.name, codes, c.origin)
			}
			if reason != c.refused {
				t.Errorf("%s: responses %q, egressd's 403 for %q; want %q", c.name, codes, reason, c.refused)
			}
			if c.refused != "" {
				d.waitEvent(t, c.name+" refused", func(e flowEvent) bool {
					return e.Kind == "request" && e.ClientPort == port && !e.Time.Before(dialedAt(port)) && e.Verdict == "deny" && e.Enforced && e.Reason == reason
				})
			}
			if strings.Contains(string(rest), "hidden") && strings.Contains(string(rest), "host="+trackerName) {
				t.Errorf("%s: the origin served the hidden request: %q", c.name, rest)
			}
		})
	}
	// nginx logs a request when it is done, after its response: a last
	// allowed request, on a connection of its own after every other one
	// ended, marks where the log is complete enough to read.
	conn := tp.dialLAN(t, vendorIP+":80", 10*time.Second)
	io.WriteString(conn, "GET /c6x-last HTTP/1.1\r\nHost: "+vendorName+"\r\nConnection: close\r\n\r\n")
	io.Copy(io.Discard, conn)
	conn.Close()
	waitNginxLog(t, tp, "/c6x-last ")
	time.Sleep(500 * time.Millisecond) // the other connections' lines, if any
	log, _ := os.ReadFile(filepath.Join(tp.dir, "nginx-access.log"))
	for _, l := range strings.Split(string(log), "\n") {
		if strings.Contains(l, "-hidden") {
			t.Errorf("nginx served a hidden request: %s", l)
		}
	}
	for _, ev := range d.allEvents() {
		if ev.Name == trackerName && ev.Verdict == "allow" {
			t.Errorf("an allow for %s: %v", trackerName, ev)
		}
	}
}

// dialLAN connects from the LAN to addr (the test fails if it cannot) and
// sets the connection's deadline d from now.
func (tp *topo) dialLAN(t *testing.T, addr string, d time.Duration) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := tp.dialTCP(ctx, addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c.SetDeadline(time.Now().Add(d))
	return c
}

// modeDaemon is hardeningDaemon in either mode.
func modeDaemon(t *testing.T, tp *topo, u *recUpstream, mode string) *daemon {
	t.Helper()
	return modeDaemonRules(t, tp, u, mode, "")
}

// modeDaemonRules is modeDaemon with extraRules appended to the policy
// (hardeningDaemon is its enforce mode).
func modeDaemonRules(t *testing.T, tp *topo, u *recUpstream, mode, extraRules string) *daemon {
	t.Helper()
	d := newDaemon(t, tp, mode)
	d.writePolicy(append(testPolicy(t), (hardeningRules + extraRules)...))
	d.extra = []string{"--upstream-dns", u.addr}
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
		}
	})
	return d
}

// modeResolved makes the topology and modeDaemon, and has the LAN client
// resolve name (A), so that its address is vouched for this client.
func modeResolved(t *testing.T, mode, name string) (*topo, *daemon) {
	t.Helper()
	tp := newTopo(t)
	d := modeDaemon(t, tp, tp.startUpstream(t), mode)
	if rcode, addrs := tp.dig(t, name, "A"); rcode != "NOERROR" || len(addrs) == 0 {
		t.Fatalf("dig %s: %s %v", name, rcode, addrs)
	}
	return tp, d
}

// TestHardeningPausedHello (THREATS.md C1, tldr.fail's test): Go's ML-KEM
// ClientHello (about 1.8 KB) sent in pieces of 900 bytes with 3 s between
// them, well inside the hello deadline: the proxy (enforce) and capture
// (audit) wait for the rest and decide by the name, not by a timeout or
// as malformed. The allowed name's handshake completes with the origin in
// both modes; the denied name's only in audit mode.
func TestHardeningPausedHello(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp, d := modeResolved(t, mode, registry)
			// ML-KEM offered (TLS 1.3 allowed, 1.2 too: the tracker's
			// origin speaks only 1.2).
			mlkem := func(c *tls.Config) { c.CurvePreferences = []tls.CurveID{tls.X25519MLKEM768, tls.X25519} }
			wrap := func(c net.Conn) net.Conn { return &splitConn{Conn: c, seg: 900, gap: 3 * time.Second} }
			for _, c := range []struct{ name, addr, verdict, reason string }{
				{registry, registryIP, "allow", "allowed"},
				{trackerName, trackerIP, "deny", "no-rule"},
			} {
				body, port, err := tp.tlsGet(c.addr+":443", c.name, wrap, mlkem)
				// The origin answered the hello: a response, or its own
				// TLS alert (nginx at the tracker's address refuses Go's
				// offer), not egressd's access_denied.
				through := err == nil && body != "" ||
					err != nil && strings.Contains(err.Error(), "remote error") && !strings.Contains(err.Error(), "access denied")
				if want := c.verdict == "allow" || mode == "audit"; through != want {
					t.Errorf("%s mode: paused hello for %s: through %v, want %v (%q %v)", mode, c.name, through, want, firstLine(body, nil), err)
				}
				ev := d.waitEvent(t, "paused hello for "+c.name, func(e flowEvent) bool {
					return e.Kind == "flow" && e.ClientPort == port && !e.Time.Before(dialedAt(port))
				})
				if ev.Kind == "" {
					continue
				}
				t.Logf("%s mode: %v", mode, ev)
				if ev.Verdict != c.verdict || ev.Reason != c.reason || ev.Name != c.name || ev.NameSource != "sni" || ev.Enforced != (mode == "enforce" && c.verdict == "deny") {
					t.Errorf("%s mode: paused hello for %s recorded as %v; want %s %q by its SNI", mode, c.name, ev, c.verdict, c.reason)
				}
			}
		})
	}
}

// hostileSNI is a server name a client may put in a hello crypto/tls
// refuses (the trailing dot): control bytes, markup, over 255 bytes.
var hostileSNI = "evil\n\x1b[2J<script>x</script>" + strings.Repeat("a", 300) + ".example."

// TestOddSNIParity (THREATS.md A5, in both modes): the odd server names of
// TestHardeningNames/odd-sni, sent as raw ClientHellos to the address our
// DNS gave for the allowed name, get the same verdict, reason and name
// from capture in audit mode as from the proxy in enforce mode: audit mode
// reports what enforce would do.
func TestOddSNIParity(t *testing.T) {
	cases := []struct {
		name string
		sni  [][]string
	}{
		{"plain", [][]string{{dockerName}}},
		{"duplicate-extension", [][]string{{dockerName}, {trackerName}}},
		{"duplicate-extension-evil-first", [][]string{{trackerName}, {dockerName}}},
		{"duplicate-entries", [][]string{{dockerName, trackerName}}},
		{"empty-extension", [][]string{{}}},
		{"no-extension", nil},
		{"ip-literal", [][]string{{dockerIP4}}},
		{"trailing-dot", [][]string{{dockerName + "."}}},
		{"uppercase-allowed", [][]string{{strings.ToUpper(dockerName)}}},
		{"uppercase-denied", [][]string{{strings.ToUpper(trackerName)}}},
		{"homograph-cyrillic", [][]string{{"production.cloudflare.d\u043ecker.com"}}},
		{"utf8-label", [][]string{{"d\u00f6cker.docker.com"}}},
		{"nul-byte", [][]string{{dockerName + "\x00.evil.net"}}},
		{"space", [][]string{{"a b.docker.com"}}},
		// A refused hello's name is recorded (a193781): one with a
		// newline, a terminal escape and markup, past the 255-byte bound.
		{"hostile-trailing-dot", [][]string{{hostileSNI}}},
	}
	got := map[string][2]string{} // case -> [enforce, audit]
	for mi, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp, d := modeResolved(t, mode, dockerName)
			for _, c := range cases {
				o := tp.sendHello(dockerIP4+":443", buildHello(helloSpec{sni: c.sni}), 0, 0)
				if o.port == 0 {
					t.Errorf("%s: %v", c.name, o)
					continue
				}
				ev := d.waitEvent(t, c.name, func(e flowEvent) bool {
					return e.Kind == "flow" && e.ClientPort == o.port && !e.Time.Before(dialedAt(o.port))
				})
				if c.name == "hostile-trailing-dot" && ev.Kind != "" &&
					(len(ev.Name) > 255 || !strings.HasPrefix(ev.Name, hostileSNI[:20]) || ev.Reason != "hello-malformed") {
					t.Errorf("%s: event %v: want hello-malformed, the name kept and cut to 255 bytes (%d)", c.name, ev, len(ev.Name))
				}
				v := got[c.name]
				v[mi] = fmt.Sprintf("%s %s name=%q", ev.Verdict, ev.Reason, ev.Name)
				got[c.name] = v
			}
		})
	}
	for _, c := range cases {
		v := got[c.name]
		t.Logf("%s: enforce %s; audit %s", c.name, v[0], v[1])
		if v[0] != v[1] {
			t.Errorf("%s: enforce mode %s, audit mode %s: audit does not report what enforce does", c.name, v[0], v[1])
		}
	}
}

// waitNginxLog reads nginx's access log until it has want (nginx writes a
// request's line after its response, so a client can read the response
// first), for up to 10 s; the test fails if it never does.
func waitNginxLog(t *testing.T, tp *topo, want string) []byte {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		log, _ := os.ReadFile(filepath.Join(tp.dir, "nginx-access.log"))
		if strings.Contains(string(log), want) {
			return log
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx's access log has no %q after 10 s: is it the right log?\n%s", want, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wantFiltered wants the dns event of the query for name and qtype to say
// the forwarder's rebinding filter changed the answer: the upstream did
// give the special address, and the filter took it out.
func wantFiltered(t *testing.T, d *daemon, name, qtype string) {
	t.Helper()
	ev := d.waitEvent(t, "the "+qtype+" query for "+name, func(e flowEvent) bool {
		return e.Kind == "dns" && e.Name == name && e.QType == qtype
	})
	if ev.Kind != "" && ev.Filtered != "rebinding" {
		t.Errorf("%s %s: event filtered %q, want rebinding: %v", name, qtype, ev.Filtered, ev)
	}
}
