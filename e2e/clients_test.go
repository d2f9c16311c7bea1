package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The LAN's clients. Each returns what the client saw; none fails the test
// by itself, the caller says what was expected.

// curl fetches url from the LAN, connecting to ip (--resolve: the address
// comes from an earlier dig through the gateway, so that every DNS query
// the report counts is one the test made). It returns the body and the
// error (curl's exit status and message).
func (tp *topo) curl(name string, port int, ip, path string, tlsOn bool) (string, error) {
	scheme := "http"
	if tlsOn {
		scheme = "https"
	}
	host := ip
	if strings.Contains(ip, ":") {
		host = "[" + ip + "]"
	}
	url := fmt.Sprintf("%s://%s:%d%s", scheme, name, port, path)
	out, err := tp.lan.Run("curl", "-fsS", "--max-time", "5", "--cacert", tp.caFile,
		"--resolve", fmt.Sprintf("%s:%d:%s", name, port, host), url)
	if err != nil {
		return out, fmt.Errorf("curl %s (%s): %v: %s", url, ip, err, strings.TrimSpace(out))
	}
	return out, nil
}

// curlIP fetches https://IP:port/ with no name at all (no SNI).
func (tp *topo) curlIP(ip string, port int) (string, error) {
	url := fmt.Sprintf("https://%s:%d/", ip, port)
	out, err := tp.lan.Run("curl", "-fsS", "--max-time", "5", "--cacert", tp.caFile, url)
	if err != nil {
		return out, fmt.Errorf("curl %s: %v: %s", url, err, strings.TrimSpace(out))
	}
	return out, nil
}

// sClient runs openssl s_client from the LAN and reports whether the
// handshake completed and the certificate verified.
func (tp *topo) sClient(ip string, port int, sni string) (string, error) {
	addr := netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(port)).String()
	out, err := tp.lan.Run("timeout", "10", "openssl", "s_client", "-connect", addr, "-servername", sni,
		"-CAfile", tp.caFile, "-verify_return_error", "-brief")
	if err != nil || !strings.Contains(out, "Verification: OK") {
		return out, fmt.Errorf("openssl s_client %s -servername %s: %v: %s", addr, sni, err, strings.TrimSpace(out))
	}
	return out, nil
}

// digBasePort is where dig's source ports start (below 32768, Linux's
// default ephemeral range).
const digBasePort = 20000

var (
	digStatus = regexp.MustCompile(`status: ([A-Z]+)`)
	digAnswer = regexp.MustCompile(`(?m)^\S+\s+\d+\s+IN\s+(?:A|AAAA)\s+(\S+)$`)
)

// dig asks the LAN's resolver (the gateway, from resolv.conf) once, over
// UDP with no retry, and returns the rcode and the addresses answered.
// Each query of a topology has a source port of its own, below the
// kernel's ephemeral range (digBasePort + n): two of them never share a
// flow in capture's eyes, as two drawn at random can (then a report
// counts one flow for two queries), and a flow missing from a report
// names the query.
func (tp *topo) dig(t *testing.T, name, qtype string) (string, []string) {
	t.Helper()
	src := fmt.Sprintf("0.0.0.0#%d", digBasePort+tp.digs.Add(1)%10000)
	out, err := tp.lan.Run("dig", "-b", src, "+tries=1", "+time=3", "+nocookie", name, qtype)
	m := digStatus.FindStringSubmatch(out)
	if m == nil {
		return "no answer: " + strings.TrimSpace(firstLine(out, err)), nil
	}
	var addrs []string
	for _, a := range digAnswer.FindAllStringSubmatch(out, -1) {
		addrs = append(addrs, a[1])
	}
	return m[1], addrs
}

func firstLine(s string, err error) string {
	if i := strings.IndexByte(strings.TrimSpace(s), '\n'); i > 0 {
		s = s[:i]
	}
	if err != nil {
		s += " (" + err.Error() + ")"
	}
	return s
}

// goResolver is a Go resolver in the LAN that asks the gateway.
func (tp *topo) goResolver() *net.Resolver {
	gw := tp.lanGW4
	if gw == "" {
		gw = gwLAN4
	}
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return tp.lan.DialContext(ctx, network, net.JoinHostPort(gw, "53"))
	}}
}

// mlkemResult is what the Go ML-KEM client saw.
type mlkemResult struct {
	helloLen int    // bytes of the first TLS record the client wrote
	reply    string // the origin's line
}

// countWrites records the size of the first write (the ClientHello).
type countWrites struct {
	net.Conn
	first int
}

func (c *countWrites) Write(p []byte) (int, error) {
	if c.first == 0 {
		c.first = len(p)
	}
	return c.Conn.Write(p)
}

// goMLKEM resolves name through the gateway (one A query) and speaks TLS 1.3
// to it offering X25519MLKEM768 first: a ClientHello of more than one TCP
// segment, the kind middleboxes choke on.
func (tp *topo) goMLKEM(name string) (mlkemResult, error) {
	var res mlkemResult
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", name+".")
	if err != nil {
		return res, fmt.Errorf("go resolver %s: %w", name, err)
	}
	c, err := tp.lan.DialContext(ctx, "tcp", netip.AddrPortFrom(addrs[0], 443).String())
	if err != nil {
		return res, err
	}
	defer c.Close()
	cw := &countWrites{Conn: c}
	tc := tls.Client(cw, &tls.Config{ServerName: name, RootCAs: tp.pool, MinVersion: tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519}})
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		return res, fmt.Errorf("go tls %s: %w", name, err)
	}
	res.helloLen = cw.first
	if _, err := tc.Write([]byte("hello\n")); err != nil {
		return res, err
	}
	line, err := bufio.NewReader(tc).ReadString('\n')
	res.reply = line
	if err != nil {
		return res, fmt.Errorf("go tls %s: read: %w", name, err)
	}
	return res, nil
}

// ntp resolves name through the gateway (one A query) and asks its NTP
// server for the time from one socket (one flow), up to tries times, 1s
// apart, like an NTP client. It returns how many requests went unanswered
// and an error when no valid answer came.
func (tp *topo) ntp(name string, tries int) (lost int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", name+".")
	if err != nil {
		return 0, fmt.Errorf("go resolver %s: %w", name, err)
	}
	c, err := tp.lan.DialContext(ctx, "udp", netip.AddrPortFrom(addrs[0], 123).String())
	if err != nil {
		return 0, err
	}
	defer c.Close()
	for range tries {
		req := make([]byte, 48)
		req[0] = 0<<6 | 4<<3 | 3 // version 4, mode 3 (client)
		binary.BigEndian.PutUint64(req[40:], uint64(time.Now().UnixNano()))
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write(req); err != nil {
			return lost, err
		}
		r := make([]byte, 128)
		n, rerr := c.Read(r)
		if rerr != nil {
			lost++
			err = fmt.Errorf("ntp %s: %w", addrs[0], rerr)
			continue
		}
		if n < 48 || r[0]&7 != 4 || string(r[24:32]) != string(req[40:48]) {
			return lost, fmt.Errorf("ntp %s: not an answer to our request (%d bytes)", addrs[0], n)
		}
		return lost, nil
	}
	return lost, err
}

// udpEcho sends one datagram to addr and waits up to 2s for the echo.
func (tp *topo) udpEcho(addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil {
		return fmt.Errorf("udp %s: %w", addr, err)
	}
	if string(buf[:n]) != "echo:ping" {
		return fmt.Errorf("udp %s: got %q", addr, buf[:n])
	}
	return nil
}

// keepAlive is a long-lived HTTPS connection from the LAN to an origin,
// carrying one request at a time.
type keepAlive struct {
	name string
	tc   *tls.Conn
	br   *bufio.Reader
}

func (tp *topo) openKeepAlive(name, ip string) (*keepAlive, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(ip, "443"))
	if err != nil {
		return nil, err
	}
	tc := tls.Client(c, &tls.Config{ServerName: name, RootCAs: tp.pool})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		c.Close()
		return nil, err
	}
	return &keepAlive{name: name, tc: tc, br: bufio.NewReader(tc)}, nil
}

// get sends one request on the connection and returns the body.
func (k *keepAlive) get(path string) (string, error) {
	k.tc.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(k.tc, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, k.name); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := bufio.NewReader(resp.Body).WriteTo(&b); err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return b.String(), fmt.Errorf("status %d", resp.StatusCode)
	}
	return b.String(), nil
}

func (k *keepAlive) close() { k.tc.Close() }

// resolve4 resolves name through the gateway (an A query from the LAN)
// and returns its first address; the test fails when there is none.
func (tp *topo) resolve4(t *testing.T, ctx context.Context, name string) netip.Addr {
	t.Helper()
	addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", name+".")
	if err != nil || len(addrs) == 0 {
		t.Fatalf("resolving %s through the gateway: %v %v", name, addrs, err)
	}
	return addrs[0]
}

// ntpFrom sends one NTP request to a from a new LAN socket (a new
// conntrack entry: the firewall's forward chain decides it anew) and
// waits up to timeout for its answer.
func (tp *topo) ntpFrom(ctx context.Context, a netip.Addr, timeout time.Duration) error {
	c, err := tp.lan.DialContext(ctx, "udp", netip.AddrPortFrom(a, 123).String())
	if err != nil {
		return err
	}
	defer c.Close()
	req := ntpRequest()
	return askWithin(c, timeout, req, func(r []byte) bool { return ntpAnswers(req, r) })
}
