package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// keepAlivePolicy opens port 8080 (the recording origin's) to the test
// names; evil.example has no rule.
const keepAlivePolicy = `version: 1
mode: %s
rules:
  - name: allowed
    to: ["*.allowed.test", "allowed.test"]
    ports: [8080/tcp]
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [8080/tcp]
`

const originPort = 8080

// recorder is an origin on srvV4:8080 that keeps every byte it read and
// every request it served (Host and path), and answers keep-alive. A path
// ending in /ws switches to an echo of raw bytes after a 101 (/once/ws: of
// one 6-byte frame, then the origin closes); one ending in
// /events is a stream of server-sent events that stays open.
type originRec struct {
	mu   sync.Mutex
	raw  bytes.Buffer
	reqs []string
}

func (o *originRec) saw() (string, []string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.raw.String(), append([]string(nil), o.reqs...)
}

type recConn struct {
	net.Conn
	o *originRec
}

func (c recConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.o.mu.Lock()
	c.o.raw.Write(b[:n])
	c.o.mu.Unlock()
	return n, err
}

type recListener struct {
	net.Listener
	o *originRec
}

func (l recListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return recConn{c, l.o}, nil
}

// keepAliveTopo is the proxy topology with the recording origin and the
// keep-alive policy in mode; inspection is off, so host/path rules are
// decided by the transparent proxy per plain-HTTP request.
func keepAliveTopo(t *testing.T, mode string) (*topo, *originRec) {
	t.Helper()
	tp := newTopo(t, topoOpts{mode: mode, config: func(c *Config) { c.Inspect = false }})
	eng, err := policy.Compile("keepalive.yaml", []byte(fmt.Sprintf(keepAlivePolicy, mode)))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)
	for _, n := range []string{"www.allowed.test", "allowed.test", "docs.paths.test"} {
		tp.facts.add(clientV4, srvV4, n)
	}
	o := &originRec{}
	ln, err := tp.s.Listen("tcp", netip.AddrPortFrom(srvV4, originPort).String())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		o.reqs = append(o.reqs, r.Host+r.URL.Path)
		o.mu.Unlock()
		if strings.HasSuffix(r.URL.Path, "/ws") && r.Header.Get("Upgrade") != "" {
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			brw.Flush()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if strings.HasSuffix(r.URL.Path, "/once/ws") {
				// Echo one frame of 6 bytes (upgradeEchoes), then
				// close first.
				b := make([]byte, len("\x82\x85abcd")+6)
				n, _ := io.ReadFull(brw, b)
				c.Write(b[:n])
				return
			}
			io.Copy(c, brw) // echo until the client closes
			return
		}
		if strings.HasSuffix(r.URL.Path, "/events") {
			// Server-sent events: one, then nothing until the client
			// goes (at most 10 s).
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: first\n\n")
			http.NewResponseController(w).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			return
		}
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "host=%s path=%s body=%d", r.Host, r.URL.Path, len(body))
	})}
	go srv.Serve(recListener{ln, o})
	t.Cleanup(func() { srv.Close() })
	return tp, o
}

func req(host, path string) string {
	return fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: egressd-test\r\n\r\n", path, host)
}

// readResponses reads HTTP responses from br until EOF or an error, for
// at most 10 s; it returns their status codes and bodies.
func readResponses(c net.Conn, br *bufio.Reader, n int) (codes []int, bodies []string, err error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := 0; i < n; i++ {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return codes, bodies, err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		codes = append(codes, resp.StatusCode)
		bodies = append(bodies, string(b))
		if err != nil {
			return codes, bodies, err
		}
	}
	return codes, bodies, nil
}

// closedAfter reports whether the connection ends (EOF) within d.
func closedAfter(c net.Conn, br *bufio.Reader, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := br.ReadByte()
	return err == io.EOF
}

// TestTransparentKeepAlive: every request on a plain-HTTP connection is
// decided, not only the first (THREATS.md C6). A later request to a
// denied Host (keep-alive or pipelined in the same write), a path outside
// a host/path rule, or a smuggling shape gets the 403 and the connection
// closes, and the origin never reads a byte of it; allowed later requests
// work, an upgraded connection is spliced; each later request is an event
// of its own.
func TestTransparentKeepAlive(t *testing.T) {
	tp, o := keepAliveTopo(t, "enforce")
	dest := netip.AddrPortFrom(srvV4, originPort)

	reqEvent := func(t *testing.T, port int, what string, pred func(audit.Event) bool) audit.Event {
		t.Helper()
		return tp.ev.wait(t, what, func(ev audit.Event) bool {
			return ev.Kind == audit.KindRequest && int(ev.ClientPort) == port && pred(ev)
		})
	}
	connEvent := func(t *testing.T, port int) audit.Event {
		t.Helper()
		return tp.ev.wait(t, "connection", func(ev audit.Event) bool {
			return ev.Kind == audit.KindFlow && int(ev.ClientPort) == port
		})
	}
	assertNotSeen := func(t *testing.T, marker string) {
		t.Helper()
		raw, reqs := o.saw()
		if strings.Contains(raw, marker) {
			t.Fatalf("the origin read the refused request (%q): %q", marker, raw)
		}
		for _, r := range reqs {
			if strings.Contains(r, marker) {
				t.Fatalf("the origin served %q", r)
			}
		}
	}

	t.Run("keep-alive-denied-host", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		io.WriteString(c, req("www.allowed.test", "/first-ka"))
		codes, bodies, err := readResponses(c, br, 1)
		if err != nil || codes[0] != 200 || !strings.Contains(bodies[0], "path=/first-ka") {
			t.Fatalf("first request: %v %v %q", err, codes, bodies)
		}
		io.WriteString(c, req("evil.example", "/second-ka"))
		codes, bodies, err = readResponses(c, br, 1)
		if err != nil || codes[0] != 403 || !strings.Contains(bodies[0], "evil.example/second-ka") || !strings.Contains(bodies[0], "no-rule") {
			t.Fatalf("second request: want the 403 page, got %v %v %q", err, codes, bodies)
		}
		if !closedAfter(c, br, 5*time.Second) {
			t.Error("the connection stayed open after the 403")
		}
		c.Close()
		assertNotSeen(t, "second-ka")
		ev := reqEvent(t, localPort(c), "denied request", func(ev audit.Event) bool { return ev.Name == "evil.example" })
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != policy.ReasonNoRule || ev.Path != "/second-ka" || ev.Close != closeDenied ||
			ev.Dest != srvV4 || ev.DestPort != originPort || ev.NameSource != audit.NameHost {
			t.Errorf("request event %+v", ev)
		}
		fe := connEvent(t, localPort(c))
		if fe.Verdict != policy.Allow || fe.Rule != "allowed" || fe.Name != "www.allowed.test" || fe.Close != closeRequestDenied || fe.BytesIn == 0 {
			t.Errorf("connection event %+v", fe)
		}
		if want := uint64(len(req("www.allowed.test", "/first-ka"))); fe.BytesOut != want {
			t.Errorf("bytes out %d, want %d (the refused request is not forwarded)", fe.BytesOut, want)
		}
	})

	t.Run("pipelined-denied-host", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		// One write: an allowed request, a denied one, an allowed one after it.
		io.WriteString(c, req("www.allowed.test", "/first-pl")+req("evil.example", "/second-pl")+req("www.allowed.test", "/third-pl"))
		codes, bodies, err := readResponses(c, br, 2)
		if err != nil || len(codes) != 2 || codes[0] != 200 || codes[1] != 403 || !strings.Contains(bodies[0], "path=/first-pl") {
			t.Fatalf("want 200 then 403: %v %v %q", err, codes, bodies)
		}
		if !closedAfter(c, br, 5*time.Second) {
			t.Error("the connection stayed open after the 403")
		}
		assertNotSeen(t, "second-pl")
		assertNotSeen(t, "third-pl")
		reqEvent(t, localPort(c), "denied pipelined request", func(ev audit.Event) bool {
			return ev.Name == "evil.example" && ev.Enforced
		})
	})

	t.Run("allowed-second-request", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		// A chunked upload whose body holds a request line for evil.example,
		// then another allowed host on the same address, then a POST with a
		// Content-Length.
		inner := "GET /in-body HTTP/1.1\r\nHost: evil.example\r\n\r\n"
		chunked := "POST /up HTTP/1.1\r\nHost: www.allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n" +
			fmt.Sprintf("%x\r\n%s\r\n", len(inner), inner) + "0\r\nX-T: 1\r\n\r\n"
		io.WriteString(c, chunked)
		io.WriteString(c, req("allowed.test", "/second-ok"))
		io.WriteString(c, "POST /third-ok HTTP/1.1\r\nHost: www.allowed.test\r\nContent-Length: 5\r\n\r\nhello")
		codes, bodies, err := readResponses(c, br, 3)
		if err != nil || fmt.Sprint(codes) != "[200 200 200]" || !strings.Contains(bodies[0], fmt.Sprintf("body=%d", len(inner))) ||
			!strings.Contains(bodies[1], "host=allowed.test path=/second-ok") || !strings.Contains(bodies[2], "body=5") {
			t.Fatalf("%v %v %q", err, codes, bodies)
		}
		ev := reqEvent(t, localPort(c), "allowed second request", func(ev audit.Event) bool { return ev.Path == "/second-ok" })
		if ev.Verdict != policy.Allow || ev.Rule != "allowed" || ev.Name != "allowed.test" || ev.Close != closeForwarded {
			t.Errorf("request event %+v", ev)
		}
		c.Close()
		fe := connEvent(t, localPort(c))
		if fe.Verdict != policy.Allow || fe.Path != "/up" || fe.BytesOut != uint64(len(chunked)+len(req("allowed.test", "/second-ok"))+len("POST /third-ok HTTP/1.1\r\nHost: www.allowed.test\r\nContent-Length: 5\r\n\r\nhello")) {
			t.Errorf("connection event %+v", fe)
		}
		tp.ev.mu.Lock()
		for _, e := range tp.ev.evs {
			if int(e.ClientPort) == localPort(c) && e.Name == "evil.example" {
				t.Errorf("the chunked body was taken for a request: %+v", e)
			}
		}
		tp.ev.mu.Unlock()
	})

	t.Run("path-rule-per-request", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		io.WriteString(c, req("docs.paths.test", "/public/a"))
		codes, _, err := readResponses(c, br, 1)
		if err != nil || codes[0] != 200 {
			t.Fatalf("public path: %v %v", err, codes)
		}
		io.WriteString(c, req("docs.paths.test", "/private-path"))
		codes, bodies, err := readResponses(c, br, 1)
		if err != nil || codes[0] != 403 || !strings.Contains(bodies[0], policy.ReasonPath) {
			t.Fatalf("private path: %v %v %q", err, codes, bodies)
		}
		assertNotSeen(t, "private-path")
		// Paths that an origin reads as another one do not pass a path
		// glob; a query is not part of the path.
		for _, c := range []struct {
			path string
			code int
		}{
			{"/public/q?x=/elsewhere", 200},
			{"/public/../private-dots", 403},
			{"/public/%2e%2e/private-enc", 403},
			{"/public/..;/private-semi", 403},
			{"/public/x%2f..%2fprivate-slash", 403},
			// A fragment is not cut off before the check: an origin
			// that reads past the '#' (Go's http.FileServer) cleans
			// "/public/#/../private-frag" to "/private-frag".
			{"/public/#/../private-frag", 403},
			// IIS's %u escape and overlong UTF-8 forms of '.' (nginx
			// and Go's FileServer answer 400 or 404; IIS and old
			// decoders read dots).
			{"/public/%u002e%u002e/private-iis", 403},
			{"/public/%e0%80%ae%e0%80%ae/private-overlong", 403},
		} {
			c2 := tp.dialFromClient(t, netip.Addr{}, dest)
			br := bufio.NewReader(c2)
			io.WriteString(c2, req("docs.paths.test", "/public/ok")+req("docs.paths.test", c.path))
			codes, bodies, err := readResponses(c2, br, 2)
			if err != nil || codes[0] != 200 || codes[1] != c.code || c.code == 403 && !strings.Contains(bodies[1], ReasonPathForm) {
				t.Errorf("%s: %v %v", c.path, err, codes)
			}
			if c.code == 403 {
				assertNotSeen(t, strings.TrimPrefix(c.path, "/public/"))
			}
		}
	})

	t.Run("smuggling-shapes", func(t *testing.T) {
		// marker: what the origin must never read. A head the parser
		// refuses is not forwarded at all; a framing error inside a
		// chunked body is found after its head went out: nothing from the
		// error on is forwarded (the origin answers the truncated request,
		// then the 403 follows).
		for _, c := range []struct{ name, second, reason, marker string }{
			{"cl-te", "POST /sm-clte HTTP/1.1\r\nHost: www.allowed.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", ReasonHTTPFraming, "/sm-clte"},
			{"te-tab", "POST /sm-tetab HTTP/1.1\r\nHost: www.allowed.test\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n", ReasonHTTPFraming, "/sm-tetab"},
			{"two-cl", "POST /sm-twocl HTTP/1.1\r\nHost: www.allowed.test\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n", ReasonHTTPFraming, "/sm-twocl"},
			{"obs-fold", "GET /sm-fold HTTP/1.1\r\nHost: www.allowed.test\r\nX-A: b\r\n c\r\n\r\n", ReasonHTTPBad, "/sm-fold"},
			{"bare-lf-chunk", "POST /sm-lf HTTP/1.1\r\nHost: www.allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n2\nxx\r\n0\r\n\r\n", ReasonHTTPFraming, "2\nxx"},
			{"two-hosts", "GET /sm-hosts HTTP/1.1\r\nHost: www.allowed.test\r\nHost: evil.example\r\n\r\n", ReasonHTTPBad, "/sm-hosts"},
		} {
			conn := tp.dialFromClient(t, netip.Addr{}, dest)
			br := bufio.NewReader(conn)
			io.WriteString(conn, req("www.allowed.test", "/before-"+c.name))
			if codes, _, err := readResponses(conn, br, 1); err != nil || codes[0] != 200 {
				t.Fatalf("%s: first request: %v %v", c.name, err, codes)
			}
			io.WriteString(conn, c.second+req("evil.example", "/after-"+c.name))
			codes, bodies, err := readResponses(conn, br, 2)
			if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF || len(codes) == 0 || codes[len(codes)-1] != 403 || !strings.Contains(bodies[len(codes)-1], c.reason) {
				t.Errorf("%s: want a 403 (%s) and the end, got %v %v %q", c.name, c.reason, err, codes, bodies)
			}
			if err == nil && !closedAfter(conn, br, 5*time.Second) {
				t.Errorf("%s: the connection stayed open", c.name)
			}
			assertNotSeen(t, c.marker)
			assertNotSeen(t, "after-"+c.name)
			reqEvent(t, localPort(conn), c.name, func(ev audit.Event) bool { return ev.Reason == c.reason && ev.Enforced })
		}
	})

	t.Run("large-later-heads", func(t *testing.T) {
		// A 40 KiB head after the first (the buffer grows for it, the
		// request goes through), then one over the 64 KiB cap (refused).
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		io.WriteString(c, req("www.allowed.test", "/large-first"))
		big := "GET /large-40k HTTP/1.1\r\nHost: www.allowed.test\r\nX-Big: " + strings.Repeat("b", 40<<10) + "\r\n\r\n"
		io.WriteString(c, big)
		codes, bodies, err := readResponses(c, br, 2)
		if err != nil || fmt.Sprint(codes) != "[200 200]" || !strings.Contains(bodies[1], "path=/large-40k") {
			t.Fatalf("40 KiB head: %v %v", err, codes)
		}
		huge := "GET /large-70k HTTP/1.1\r\nHost: www.allowed.test\r\nX-Big: " + strings.Repeat("h", 70<<10) + "\r\n\r\n"
		go io.WriteString(c, huge)
		codes, bodies, err = readResponses(c, br, 1)
		if err != nil || codes[0] != 403 || !strings.Contains(bodies[0], ReasonHelloTooLarge) {
			t.Fatalf("70 KiB head: %v %v", err, codes)
		}
		assertNotSeen(t, "large-70k")
	})

	t.Run("half-close-and-slow-head", func(t *testing.T) {
		// The client half-closes after its requests: the responses still
		// come, then the end.
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		io.WriteString(c, req("www.allowed.test", "/hc-1")+req("allowed.test", "/hc-2"))
		c.CloseWrite()
		codes, _, err := readResponses(c, br, 2)
		if err != nil || fmt.Sprint(codes) != "[200 200]" || !closedAfter(c, br, 5*time.Second) {
			t.Fatalf("half-closed client: %v %v", err, codes)
		}
		// A later head that does not complete within HelloTimeout (2 s
		// here): refused, never forwarded.
		c = tp.dialFromClient(t, netip.Addr{}, dest)
		br = bufio.NewReader(c)
		io.WriteString(c, req("www.allowed.test", "/slow-1"))
		if codes, _, err := readResponses(c, br, 1); err != nil || codes[0] != 200 {
			t.Fatalf("first: %v %v", err, codes)
		}
		io.WriteString(c, "GET /slow-2 HTTP/1.1\r\nHost: www.allo")
		codes, bodies, err := readResponses(c, br, 1)
		if err != nil || codes[0] != 403 || !strings.Contains(bodies[0], ReasonHelloTimeout) {
			t.Fatalf("slow head: %v %v", err, codes)
		}
		assertNotSeen(t, "slow-2")
	})

	t.Run("websocket-upgrade", func(t *testing.T) {
		c := tp.dialFromClient(t, netip.Addr{}, dest)
		br := bufio.NewReader(c)
		io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: www.allowed.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 101 {
			t.Fatalf("upgrade: %v %v", err, resp)
		}
		// Masked binary frames (they would not parse as HTTP), then bytes
		// that look like a request: after the switch nothing is parsed.
		frames := "\x82\x83abcd\x01\x02\x03" + req("evil.example", "/inside-ws")
		io.WriteString(c, frames)
		got := make([]byte, len(frames))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != frames {
			t.Fatalf("echo after the upgrade: %v %q", err, got)
		}
		c.Close()
		fe := connEvent(t, localPort(c))
		if fe.Verdict != policy.Allow || fe.BytesOut < uint64(len(frames)) {
			t.Errorf("connection event %+v", fe)
		}
	})

	t.Run("curl-keep-alive", func(t *testing.T) {
		// curl reuses the connection for the second URL (same host and
		// port); the second transfer names evil.example in its Host header.
		out, err := tp.c.Run("curl", "-sv", "--max-time", "10", "-w", "\ncode=%{http_code}\n",
			"http://198.18.2.2:8080/curl-first", "-H", "Host: www.allowed.test",
			"--next", "-sv", "--max-time", "10", "-w", "\ncode=%{http_code}\n", "-H", "Host: evil.example", "http://198.18.2.2:8080/curl-second")
		if err != nil || !strings.Contains(out, "path=/curl-first") || !strings.Contains(out, "code=403") ||
			!strings.Contains(out, "evil.example/curl-second") {
			t.Fatalf("curl: %v: %s", err, out)
		}
		if !strings.Contains(out, "Re-using existing connection") && !strings.Contains(out, "Reusing existing") {
			t.Fatalf("curl did not reuse the connection: %s", out)
		}
		assertNotSeen(t, "curl-second")
		tp.ev.wait(t, "curl's denied request", func(ev audit.Event) bool {
			return ev.Kind == audit.KindRequest && ev.Path == "/curl-second" && ev.Enforced
		})
	})
}

// TestTransparentKeepAliveAudit: in audit mode a later request to a denied
// Host (and a smuggling shape) is forwarded and recorded as would-deny;
// nothing is blocked.
func TestTransparentKeepAliveAudit(t *testing.T) {
	tp, o := keepAliveTopo(t, "audit")
	dest := netip.AddrPortFrom(srvV4, originPort)
	c := tp.dialFromClient(t, netip.Addr{}, dest)
	br := bufio.NewReader(c)
	io.WriteString(c, req("www.allowed.test", "/audit-first")+req("evil.example", "/audit-second")+req("allowed.test", "/audit-third"))
	codes, bodies, err := readResponses(c, br, 3)
	if err != nil || fmt.Sprint(codes) != "[200 200 200]" || !strings.Contains(bodies[1], "host=evil.example path=/audit-second") {
		t.Fatalf("%v %v %q", err, codes, bodies)
	}
	ev := tp.ev.wait(t, "would-deny request", func(ev audit.Event) bool {
		return ev.Kind == audit.KindRequest && ev.Path == "/audit-second"
	})
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Mode != policy.ModeAudit || ev.Name != "evil.example" || ev.Close != closeForwarded {
		t.Errorf("request event %+v", ev)
	}
	tp.ev.wait(t, "allowed third request", func(ev audit.Event) bool {
		return ev.Kind == audit.KindRequest && ev.Path == "/audit-third" && ev.Verdict == policy.Allow && ev.Rule == "allowed"
	})
	// A smuggling shape in audit mode: recorded, then the rest of the
	// connection is spliced unparsed (nothing is blocked).
	io.WriteString(c, "POST /audit-smuggle HTTP/1.1\r\nHost: www.allowed.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
	tp.ev.wait(t, "would-deny framing", func(ev audit.Event) bool {
		return ev.Kind == audit.KindRequest && int(ev.ClientPort) == localPort(c) && ev.Reason == ReasonHTTPFraming && !ev.Enforced
	})
	c.Close()
	fe := tp.ev.wait(t, "connection", func(ev audit.Event) bool { return ev.Kind == audit.KindFlow && int(ev.ClientPort) == localPort(c) })
	if fe.Verdict != policy.Allow || fe.Close == closeRequestDenied {
		t.Errorf("connection event %+v", fe)
	}
	_, reqs := o.saw()
	if !strings.Contains(strings.Join(reqs, " "), "evil.example/audit-second") {
		t.Errorf("the origin did not get the audit-mode request: %q", reqs)
	}
}

// TestTransparentAnyMethod: a first request whose method is not one of the
// common ones (WebDAV's PROPFIND, a custom FOO: a Go handler or an
// Express app.all serves any method) is still read as HTTP, so that its
// Host and path, and every request after it on the connection, are
// decided. Taken for an unknown protocol, it was decided by address only
// (allowed where our DNS gave the address for an allowed name) and the
// connection spliced, so that a path outside a host/path rule, and a
// later request to another virtual host, reached the origin.
func TestTransparentAnyMethod(t *testing.T) {
	tp, o := keepAliveTopo(t, "enforce")
	dest := netip.AddrPortFrom(srvV4, originPort)
	for _, c := range []struct {
		name, first, second, marker, reason string
		codes                               []int
	}{
		{"later-host", "PROPFIND /first-dav HTTP/1.1\r\nHost: www.allowed.test\r\nDepth: 0\r\n\r\n",
			req("evil.example", "/second-dav"), "second-dav", policy.ReasonNoRule, []int{200, 403}},
		{"first-path", "FOO /private-foo HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n",
			"", "private-foo", policy.ReasonPath, []int{403}},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn := tp.dialFromClient(t, netip.Addr{}, dest)
			br := bufio.NewReader(conn)
			io.WriteString(conn, c.first+c.second)
			codes, bodies, err := readResponses(conn, br, len(c.codes))
			if err != nil || fmt.Sprint(codes) != fmt.Sprint(c.codes) || !strings.Contains(bodies[len(bodies)-1], c.reason) {
				t.Errorf("want %v, the last with %s: %v %v %q", c.codes, c.reason, err, codes, bodies)
			}
			raw, _ := o.saw()
			if strings.Contains(raw, c.marker) {
				t.Errorf("the origin read the refused request: %q", raw)
			}
		})
	}
}

// TestTransparentKeepAliveReload: the proxy decides each later request of
// a plain-HTTP connection in the mode of the policy at that request, and
// does what its event says: after a reload from enforce to audit a request
// to a denied Host is forwarded and recorded as would-deny (not
// enforced); after a reload back to enforce the next one is refused with
// the 403, enforced. (Capture, which does not see these connections in
// enforce mode, does not record them twice: it decides whether to follow a
// connection at its first request.)
func TestTransparentKeepAliveReload(t *testing.T) {
	tp, o := keepAliveTopo(t, "enforce")
	swap := func(mode string) {
		eng, err := policy.Compile("keepalive.yaml", []byte(fmt.Sprintf(keepAlivePolicy, mode)))
		if err != nil {
			t.Fatal(err)
		}
		tp.store.Swap(eng)
	}
	c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, originPort))
	c.SetDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(c)
	for _, s := range []struct {
		mode, host, path string
		code             int
	}{
		{"", "www.allowed.test", "/reload-first", 200},
		{"audit", "evil.example", "/reload-audit", 200},
		{"enforce", "evil.example", "/reload-enforce", 403},
	} {
		if s.mode != "" {
			swap(s.mode)
		}
		io.WriteString(c, req(s.host, s.path))
		codes, bodies, err := readResponses(c, br, 1)
		if err != nil || codes[0] != s.code {
			t.Fatalf("%s%s: %v %v %q, want %d", s.host, s.path, err, codes, bodies, s.code)
		}
	}
	for _, w := range []struct {
		path  string
		mode  policy.Mode
		close string
	}{{"/reload-audit", policy.ModeAudit, closeForwarded}, {"/reload-enforce", policy.ModeEnforce, closeDenied}} {
		ev := tp.ev.wait(t, "request "+w.path, func(ev audit.Event) bool {
			return ev.Kind == audit.KindRequest && ev.Path == w.path
		})
		if ev.Verdict != policy.Deny || ev.Mode != w.mode || ev.Enforced != (w.mode == policy.ModeEnforce) || ev.Close != w.close {
			t.Errorf("%s: event %+v, want deny in %s, close %s", w.path, ev, w.mode, w.close)
		}
	}
	_, reqs := o.saw()
	got := strings.Join(reqs, " ")
	if !strings.Contains(got, "evil.example/reload-audit") || strings.Contains(got, "reload-enforce") {
		t.Errorf("the origin got %q, want the audit-mode request and not the enforce-mode one", got)
	}
}
