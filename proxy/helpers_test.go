package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/internal/netutil"
	"egressd/internal/nfq"
	"egressd/internal/testnet"
	"egressd/internal/tlshello/hellotest"
	"egressd/policy"
)

// Addresses of the test topology (198.18.0.0/15 and 2001:db8::/32 only).
var (
	clientV4  = netip.MustParseAddr("198.18.1.2")
	client2V4 = netip.MustParseAddr("198.18.1.3")
	clientV6  = netip.MustParseAddr("2001:db8:1::2")
	gwLanV4   = netip.MustParseAddr("198.18.1.1")
	gwLanV6   = netip.MustParseAddr("2001:db8:1::1")
	gwWanV4   = netip.MustParseAddr("198.18.2.1")
	gwWanV6   = netip.MustParseAddr("2001:db8:2::1")
	srvV4     = netip.MustParseAddr("198.18.2.2") // www.allowed.test, docs.paths.test
	srvV6     = netip.MustParseAddr("2001:db8:2::2")
	spoofV4   = netip.MustParseAddr("198.18.2.3") // a server nobody was told about
	echoV4    = netip.MustParseAddr("198.18.2.4") // a non-TLS service allowed by CIDR
	deniedV4  = netip.MustParseAddr("198.18.2.5") // evil.example
)

const (
	transparentPort = 15001
	explicitPort    = 3128
)

const testPolicy = `version: 1
mode: %s
rules:
  - name: allowed
    to: ["*.allowed.test", "allowed.test"]
    ports: [443/tcp, 80/tcp]
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [443/tcp, 80/tcp]
  - name: vpn
    to: [198.18.2.4/32]
    ports: [8443/tcp, 8444/tcp]
  - name: ech-front
    to: ["ech-front.allowed-ech.test"]
    ports: [443/tcp]
`

// facts is an in-test DNSFacts: what "our DNS" gave out, per client.
type facts struct {
	mu sync.Mutex
	m  map[[2]netip.Addr][]string
}

func (f *facts) add(client, addr netip.Addr, names ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.m == nil {
		f.m = map[[2]netip.Addr][]string{}
	}
	k := [2]netip.Addr{client, addr}
	f.m[k] = append(f.m[k], names...)
}

func (f *facts) NamesFor(client, addr netip.Addr) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.m[[2]netip.Addr{client, addr}]...)
}

// dnsResolver is a Resolver that asks a real miekg/dns server on loopback.
type dnsResolver struct{ addr string }

func (r dnsResolver) LookupNetIP(ctx context.Context, name string) ([]netip.Addr, error) {
	var out []netip.Addr
	c := &dns.Client{Timeout: 2 * time.Second}
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qt)
		resp, _, err := c.ExchangeContext(ctx, m, r.addr)
		if err != nil {
			return nil, err
		}
		for _, rr := range resp.Answer {
			switch x := rr.(type) {
			case *dns.A:
				a, _ := netip.AddrFromSlice(x.A)
				out = append(out, a.Unmap())
			case *dns.AAAA:
				a, _ := netip.AddrFromSlice(x.AAAA)
				out = append(out, a)
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no addresses for %s", name)
	}
	return out, nil
}

// startDNS runs a miekg/dns server on 127.0.0.1 answering from zone.
func startDNS(t testing.TB, zone map[string][]netip.Addr) dnsResolver {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		if len(q.Question) == 1 {
			name := strings.TrimSuffix(strings.ToLower(q.Question[0].Name), ".")
			for _, a := range zone[name] {
				hdr := dns.RR_Header{Name: q.Question[0].Name, Class: dns.ClassINET, Ttl: 60}
				if a.Is4() && q.Question[0].Qtype == dns.TypeA {
					hdr.Rrtype = dns.TypeA
					m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: a.AsSlice()})
				}
				if a.Is6() && q.Question[0].Qtype == dns.TypeAAAA {
					hdr.Rrtype = dns.TypeAAAA
					m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
				}
			}
			if len(zone[name]) == 0 {
				m.Rcode = dns.RcodeNameError
			}
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return dnsResolver{addr: pc.LocalAddr().String()}
}

// events collects audit events.
type events struct {
	mu  sync.Mutex
	evs []audit.Event
}

func (e *events) Emit(ev audit.Event) {
	e.mu.Lock()
	e.evs = append(e.evs, ev)
	e.mu.Unlock()
}

// wait returns the first event matching pred, waiting up to 10 s.
func (e *events) wait(t *testing.T, what string, pred func(audit.Event) bool) audit.Event {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		e.mu.Lock()
		for _, ev := range e.evs {
			if pred(ev) {
				e.mu.Unlock()
				return ev
			}
		}
		n := len(e.evs)
		e.mu.Unlock()
		if time.Now().After(deadline) {
			e.mu.Lock()
			defer e.mu.Unlock()
			var b strings.Builder
			for _, ev := range e.evs[max(0, len(e.evs)-4):] {
				fmt.Fprintf(&b, "\n  %+v", ev)
			}
			t.Fatalf("no event %s among %d; the last:%s", what, n, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// byClientPort matches the event of one connection by its client port
// alone (a link-local client's address carries a zone its event drops);
// where a test's rig has seen other connections, byFlow.
func byClientPort(port int) func(audit.Event) bool {
	return func(ev audit.Event) bool { return int(ev.ClientPort) == port }
}

// byClient matches the events of the client connection c by its address
// and port: an IPv4 and an IPv6 connection of one test may draw the same
// port number.
func byClient(c net.Conn) func(audit.Event) bool {
	a := addrPortOf(c.LocalAddr())
	return func(ev audit.Event) bool {
		return ev.ClientPort == a.Port() && ev.Client.Unmap() == a.Addr().Unmap()
	}
}

// byFlow matches the events of the transparent connection c by its
// client address and port and its original destination (the address it
// dialled): the kernel gives one local port to connections to different
// destinations at once, so the client's address and port alone can
// match an earlier connection's event (TestTransparent/special-range
// took the allowed connection's of an earlier subtest).
func byFlow(c net.Conn) func(audit.Event) bool {
	a, d := addrPortOf(c.LocalAddr()), addrPortOf(c.RemoteAddr())
	return func(ev audit.Event) bool {
		return ev.ClientPort == a.Port() && ev.Client.Unmap() == a.Addr().Unmap() &&
			ev.DestPort == d.Port() && ev.Dest.Unmap() == d.Addr().Unmap()
	}
}

// pki is a test CA and a server certificate for every test name.
type pki struct {
	pool    *x509.CertPool
	caFile  string
	srvCert tls.Certificate
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caT := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "egressd test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caT, caT, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafT := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "www.allowed.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames:    []string{"*.allowed.test", "allowed.test", "docs.paths.test", "evil.example", "ech-front.allowed-ech.test"},
		IPAddresses: []net.IP{srvV4.AsSlice(), spoofV4.AsSlice(), srvV6.AsSlice(), deniedV4.AsSlice()},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leafT, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	p := &pki{pool: x509.NewCertPool(), caFile: filepath.Join(t.TempDir(), "ca.pem")}
	p.pool.AddCert(ca)
	os.WriteFile(p.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644)
	p.srvCert = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return p
}

// topo is the three-namespace topology with the proxy in the gateway.
type topo struct {
	c, g, s *testnet.NS
	pki     *pki
	facts   *facts
	ev      *events
	proxy   *Proxy
	store   *policy.Store
	res     dnsResolver
	state   string         // the proxy's state dir (inspection CA)
	tlsSrv  *countListener // the server's TLS listener (:443)
}

type topoOpts struct {
	mode   string
	config func(*Config)
	deps   func(*Deps)
	// ownListener: the transparent listener is the one the proxy opens
	// itself (listenTransparent, as Run does), not the test's.
	ownListener bool
	// fastQueue: the gateway's rules are the firewall package's enforce
	// ruleset with its fast path on this queue (masquerading on the WAN
	// side), not the test's redirect table, and the proxy's ServeQueue
	// reads the queue (fastKernel).
	fastQueue uint16
	// fastTap, with fastQueue: ServeQueue reads the queue through it (a
	// test's look at each queued packet before the fast path's: tapQueue).
	fastTap func(nfq.Packet)
}

func newTopo(t *testing.T, o topoOpts) *topo {
	t.Helper()
	testnet.RequireRoot(t)
	if _, err := os.Stat("/usr/sbin/nft"); err != nil {
		if _, err := execLookPath("nft"); err != nil {
			t.Fatal("nft (Debian package nftables) is needed for the transparent-mode tests")
		}
	}
	if o.mode == "" {
		o.mode = "enforce"
	}
	tp := &topo{pki: newPKI(t), facts: &facts{}, ev: &events{}}
	tp.c = testnet.New(t, "pxc")
	tp.g = testnet.New(t, "pxg")
	tp.s = testnet.New(t, "pxs")
	testnet.Link(t, tp.c, "c0", []string{"198.18.1.2/24", "198.18.1.3/24", "2001:db8:1::2/64"},
		tp.g, "gwc", []string{"198.18.1.1/24", "2001:db8:1::1/64"})
	testnet.Link(t, tp.g, "gws", []string{"198.18.2.1/24", "2001:db8:2::1/64"},
		tp.s, "s0", []string{"198.18.2.2/24", "198.18.2.3/24", "198.18.2.4/24", "198.18.2.5/24", "2001:db8:2::2/64"})
	tp.c.MustRun("ip", "route", "add", "default", "via", "198.18.1.1")
	tp.c.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
	tp.s.MustRun("ip", "route", "add", "default", "via", "198.18.2.1")
	tp.s.MustRun("ip", "-6", "route", "add", "default", "via", "2001:db8:2::1")
	tp.g.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	tp.g.MustRun("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	var fast *fastKernel
	if o.fastQueue != 0 {
		fast = tp.installFastPath(t, o.mode, o.fastQueue)
	} else {
		tp.installRedirect(t)
	}

	tp.startServers(t)

	tp.res = startDNS(t, map[string][]netip.Addr{
		"www.allowed.test":  {srvV4, srvV6},
		"allowed.test":      {srvV4},
		"docs.paths.test":   {srvV4},
		"evil.example":      {deniedV4},
		"loop.allowed.test": {netip.MustParseAddr("127.0.0.1")},
	})
	eng, err := policy.Compile("test.yaml", []byte(fmt.Sprintf(testPolicy, o.mode)))
	if err != nil {
		t.Fatal(err)
	}
	tp.store = policy.NewStore(eng)
	tp.state = t.TempDir()
	cfg := Config{
		HelloTimeout:  2 * time.Second,
		FirstByteWait: 300 * time.Millisecond,
		Inspect:       true,
		StateDir:      tp.state,
		UpstreamRoots: tp.pki.pool,
		OwnAddrs:      []netip.Addr{gwLanV4, gwLanV6, gwWanV4, gwWanV6},
	}
	if o.config != nil {
		o.config(&cfg)
	}
	// The proxy's conntrack lookups must ask the gateway's table.
	var ct *netutil.Conntrack
	if err := tp.g.Do(func() (err error) { ct, err = netutil.OpenConntrack(); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ct.Close() })
	deps := Deps{
		Policy:    tp.store,
		Sink:      tp.ev,
		Logger:    slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
		DNS:       tp.facts,
		Resolver:  tp.res,
		Dial:      tp.g.DialContext,
		Conntrack: ct,
	}
	if fast != nil {
		cfg.FastMarks, deps.Inject = fast.marks, fast.inj
	}
	if o.deps != nil {
		o.deps(&deps)
	}
	p, err := New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	tp.proxy = p
	var ln net.Listener
	if o.ownListener {
		err = tp.g.Do(func() (err error) {
			ln, err = p.listenTransparent(context.Background(), fmt.Sprintf("[::]:%d", transparentPort))
			return err
		})
	} else {
		ln, err = tp.g.Listen("tcp", fmt.Sprintf("[::]:%d", transparentPort))
	}
	if err != nil {
		t.Fatal(err)
	}
	eln, err := tp.g.Listen("tcp", fmt.Sprintf("198.18.1.1:%d", explicitPort))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	go func() { p.Serve(ln); done <- struct{}{} }()
	go func() { p.ServeExplicit(eln); done <- struct{}{} }()
	t.Cleanup(func() {
		p.Close()
		<-done
		<-done
	})
	if fast != nil {
		fast.serve(t, p, o.fastTap) // stops before the proxy closes
	}
	return tp
}

// installRedirect is the gateway's rules without the firewall package:
// every TCP connection from the client side to the transparent listener,
// but the explicit proxy's port.
func (tp *topo) installRedirect(t *testing.T) {
	t.Helper()
	rules := filepath.Join(t.TempDir(), "redirect.nft")
	os.WriteFile(rules, []byte(fmt.Sprintf(`table inet egressd_test {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "gwc" tcp dport %d return
		iifname "gwc" meta l4proto tcp redirect to :%d
	}
}
`, explicitPort, transparentPort)), 0o644)
	tp.g.MustRun("nft", "-f", rules)
}

// testWriter sends log lines to t.Log, until the test ends.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	defer func() { recover() }() // a late line after the test ended
	if testing.Verbose() {
		w.t.Log(strings.TrimSpace(string(b)))
	}
	return len(b), nil
}

// echoHandler tells the client what the server saw.
func echoHandler(w http.ResponseWriter, r *http.Request) {
	sni := ""
	if r.TLS != nil {
		sni = r.TLS.ServerName
	}
	fmt.Fprintf(w, "sni=%s host=%s path=%s", sni, r.Host, r.URL.Path)
}

func (tp *topo) startServers(t *testing.T) {
	t.Helper()
	tlsLn, err := tp.s.Listen("tcp", "[::]:443")
	if err != nil {
		t.Fatal(err)
	}
	tp.tlsSrv = &countListener{Listener: tlsLn}
	httpLn, err := tp.s.Listen("tcp", "[::]:80")
	if err != nil {
		t.Fatal(err)
	}
	echoLn, err := tp.s.Listen("tcp", "198.18.2.4:8443")
	if err != nil {
		t.Fatal(err)
	}
	// A service where the server speaks first: a banner, then an echo.
	bannerLn, err := tp.s.Listen("tcp", "198.18.2.4:8444")
	if err != nil {
		t.Fatal(err)
	}
	tlsSrv := &http.Server{Handler: http.HandlerFunc(echoHandler), TLSConfig: &tls.Config{Certificates: []tls.Certificate{tp.pki.srvCert}},
		ErrorLog: nil}
	tlsSrv.ErrorLog = nil
	httpSrv := &http.Server{Handler: http.HandlerFunc(echoHandler)}
	go tlsSrv.ServeTLS(tp.tlsSrv, "", "")
	go httpSrv.Serve(httpLn)
	echo := func(c net.Conn) {
		io.Copy(c, c) // echo until the client half-closes, then close
		c.Close()
	}
	go serveEach(echoLn, echo)
	go serveEach(bannerLn, func(c net.Conn) {
		io.WriteString(c, bannerLine)
		echo(c)
	})
	t.Cleanup(func() {
		tlsSrv.Close()
		httpSrv.Close()
		echoLn.Close()
		bannerLn.Close()
	})
}

// serveEach runs handle on its own goroutine for each connection ln
// accepts, until ln is closed.
func serveEach(ln net.Listener, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go handle(c)
	}
}

// bannerLine is what the server-first service at 198.18.2.4:8444 says.
const bannerLine = "220 egressd-test ready\r\n"

// dialFromClient dials dest from the client namespace, from a chosen
// source address (invalid: the default).
func (tp *topo) dialFromClient(t *testing.T, src netip.Addr, dest netip.AddrPort) *net.TCPConn {
	t.Helper()
	var c net.Conn
	err := tp.c.Do(func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		if src.IsValid() {
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
		}
		var err error
		c, err = d.Dial("tcp", dest.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s: %v", dest, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// dialAtFirstWrite is a connection from the client namespace to dest,
// with a deadline of 20 s, that tp dials at its first write. A TLS
// client's first write is its ClientHello, made after its key shares:
// dialed before them, the connection stands silent while they are made,
// which under -race on a loaded box outlasted the topology's 300 ms
// first-byte wait, and the proxy decided it as a connection whose server
// speaks first (in enforce mode closed: the client read an unexpected
// EOF where a response was due).
func (tp *topo) dialAtFirstWrite(t *testing.T, dest netip.AddrPort) *firstWriteConn {
	return tp.dialAtFirstWriteFrom(t, netip.Addr{}, dest)
}

// dialAtFirstWriteFrom is dialAtFirstWrite from a chosen source address
// (invalid: the default).
func (tp *topo) dialAtFirstWriteFrom(t *testing.T, src netip.Addr, dest netip.AddrPort) *firstWriteConn {
	return &firstWriteConn{dial: func() (*net.TCPConn, error) {
		c := tp.dialFromClient(t, src, dest)
		c.SetDeadline(time.Now().Add(20 * time.Second))
		return c, nil
	}}
}

// firstWriteConn is dialAtFirstWrite's connection: it dials at the first
// write, or at the first call that needs the socket (Read, LocalAddr,
// RemoteAddr, CloseWrite), once. Deadlines set before then (tlsGet sets
// one before its handshake) are kept for the dial; a Close before then
// dials nothing, and the calls after it fail with net.ErrClosed (and the
// addresses are nil), as does every call after a dial that failed, with
// its error.
type firstWriteConn struct {
	dial func() (*net.TCPConn, error)

	mu       sync.Mutex
	tc       *net.TCPConn
	err      error
	rdl, wdl time.Time // deadlines set before the dial
}

// conn dials, the first time, and returns the socket or why there is none.
func (c *firstWriteConn) conn() (*net.TCPConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tc != nil || c.err != nil {
		return c.tc, c.err
	}
	tc, err := c.dial()
	if err != nil {
		c.err = err
		return nil, err
	}
	c.tc = tc
	if !c.rdl.IsZero() {
		tc.SetReadDeadline(c.rdl)
	}
	if !c.wdl.IsZero() {
		tc.SetWriteDeadline(c.wdl)
	}
	return tc, nil
}

func (c *firstWriteConn) Write(b []byte) (int, error) {
	tc, err := c.conn()
	if err != nil {
		return 0, err
	}
	return tc.Write(b)
}

func (c *firstWriteConn) Read(b []byte) (int, error) {
	tc, err := c.conn()
	if err != nil {
		return 0, err
	}
	return tc.Read(b)
}

func (c *firstWriteConn) CloseWrite() error {
	tc, err := c.conn()
	if err != nil {
		return err
	}
	return tc.CloseWrite()
}

func (c *firstWriteConn) LocalAddr() net.Addr {
	if tc, err := c.conn(); err == nil {
		return tc.LocalAddr()
	}
	return nil
}

func (c *firstWriteConn) RemoteAddr() net.Addr {
	if tc, err := c.conn(); err == nil {
		return tc.RemoteAddr()
	}
	return nil
}

// setDeadlines sets the read (read) and write (write) deadline to d, on
// the socket or, before the dial, for it.
func (c *firstWriteConn) setDeadlines(d time.Time, read, write bool) error {
	c.mu.Lock()
	tc := c.tc
	if tc == nil {
		if read {
			c.rdl = d
		}
		if write {
			c.wdl = d
		}
	}
	c.mu.Unlock()
	switch {
	case tc == nil:
		return nil
	case read && write:
		return tc.SetDeadline(d)
	case read:
		return tc.SetReadDeadline(d)
	default:
		return tc.SetWriteDeadline(d)
	}
}

func (c *firstWriteConn) SetDeadline(d time.Time) error      { return c.setDeadlines(d, true, true) }
func (c *firstWriteConn) SetReadDeadline(d time.Time) error  { return c.setDeadlines(d, true, false) }
func (c *firstWriteConn) SetWriteDeadline(d time.Time) error { return c.setDeadlines(d, false, true) }

func (c *firstWriteConn) Close() error {
	c.mu.Lock()
	tc := c.tc
	if tc == nil && c.err == nil {
		c.err = net.ErrClosed // nothing dialed, nothing will be
	}
	c.mu.Unlock()
	if tc == nil {
		return nil
	}
	return tc.Close()
}

// tlsGet does a TLS handshake with serverName over conn and one GET,
// returning the body.
func (tp *topo) tlsGet(conn net.Conn, serverName, path string, cfg *tls.Config) (string, error) {
	if cfg == nil {
		cfg = &tls.Config{}
	}
	cfg.ServerName = serverName
	if cfg.RootCAs == nil {
		cfg.RootCAs = tp.pki.pool
	}
	tc := tls.Client(conn, cfg)
	defer tc.Close() // the connection's event comes when both sides closed
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		return "", err
	}
	host := serverName
	if host == "" || net.ParseIP(host) != nil {
		host = "x"
	}
	fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, host)
	b, err := io.ReadAll(tc)
	return string(b), err
}

// localPort of a connection.
func localPort(c net.Conn) int { return c.LocalAddr().(*net.TCPAddr).Port }

// ---- ClientHello crafting ----

// The hellos are hellotest's, shared with the proxy's and capture's tests.
var (
	ext         = hellotest.Ext
	sniExt      = hellotest.SNIExt
	echOuterExt = hellotest.ECHOuterExt
	buildHello  = hellotest.Build
	refragment  = hellotest.Refragment
)

// helloWriter wraps a client conn: the first Write (the ClientHello) is
// transformed and sent as chunks of chunk bytes, one Write each, pause
// apart.
type helloWriter struct {
	net.Conn
	transform func([]byte) []byte
	chunk     int
	pause     time.Duration
	done      bool
	size      int // size of the hello as sent
}

func (w *helloWriter) Write(b []byte) (int, error) {
	if w.done {
		return w.Conn.Write(b)
	}
	w.done = true
	out := b
	if w.transform != nil {
		out = w.transform(b)
	}
	w.size = len(out)
	for len(out) > 0 {
		k := len(out)
		if w.chunk > 0 {
			k = min(w.chunk, len(out))
		}
		if _, err := w.Conn.Write(out[:k]); err != nil {
			return 0, err
		}
		if out = out[k:]; len(out) > 0 {
			time.Sleep(w.pause)
		}
	}
	return len(b), nil
}

// readAlert reads what the proxy answered to a raw hello.
func readAll(c net.Conn, d time.Duration) []byte {
	c.SetReadDeadline(time.Now().Add(d))
	b, _ := io.ReadAll(c)
	return b
}
