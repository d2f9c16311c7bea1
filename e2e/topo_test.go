package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// The test internet. Every name the seed profile's rules need resolves, in
// the authoritative zone served by unbound, to an address of the internet
// namespace; so do some names no rule allows.
const (
	lanClient4  = "198.18.1.10"
	lanClient6  = "2001:db8:1::10"
	gwLAN4      = "198.18.1.1"
	gwLAN6      = "2001:db8:1::1"
	gwWAN4      = "198.18.2.1"
	gwWAN6      = "2001:db8:2::1"
	inetWAN4    = "198.18.2.2"
	inetWAN6    = "2001:db8:2::2"
	authDNS4    = "198.18.2.53"
	dockerName  = "production.cloudflare.docker.com" // vendor-cloud, deep name
	dockerIP4   = "203.0.113.10"
	dockerIP6   = "2001:db8:2::10"
	vendorName  = "api.nirovision.com" // vendor-cloud; port 80 is no rule's
	vendorIP    = "203.0.113.11"
	intakeName  = "agent-intake.logs.datadoghq.com" // health-logging, 10516
	intakeIP    = "203.0.113.12"
	notionName  = "notion.so" // vendor-docs, notion.so/nirovision/*
	notionIP    = "203.0.113.13"
	registry    = "registry-1.docker.io" // vendor-cloud, served by Go with ML-KEM
	registryIP  = "203.0.113.14"
	registryIP6 = "2001:db8:2::14"  // the same server (TestCaptureEvasion)
	trackerName = "tracker.example" // no rule
	trackerIP   = "203.0.113.20"
	lookalike   = "docker.com.evil.net" // no rule: *.docker.com must not match it
	lookalikeIP = "203.0.113.21"
	ntpName     = "time.google.com" // ntp, 123/udp
	ntpIP       = "198.51.100.123"
	clockName   = "clock.example" // an NTP server the seed's ntp rule does not name
	clockIP     = "198.51.100.127"
	udpDenyIP   = "198.51.100.77" // UDP 7777: no rule
	udpDenyPort = 7777
	apnsName    = "api.push.apple.com" // apple-mdm
	apnsIP      = "198.51.100.130"     // in the test's stand-in for 17.0.0.0/8
	apnsBareIP  = "198.51.100.131"     // reached by address only: the CIDR rule
	fcmName     = "mtalk.google.com"   // android-mdm, the FCM ports 5228-5230
	fcmIP       = "203.0.113.15"
	appleTest   = "198.51.100.128/25" // replaces 17.0.0.0/8 in the test policy
	lanSvcPort  = 8080                // a LAN host's service: inbound target
	gwSvcPort   = 2222                // the gateway's WAN-side service: inbound target
	adminAddr   = "127.0.0.1:9901"    // in the gateway namespace
)

// zone is the authoritative data: name, type, address.
var zone = [][3]string{
	{dockerName, "A", dockerIP4},
	{dockerName, "AAAA", dockerIP6},
	{vendorName, "A", vendorIP},
	{intakeName, "A", intakeIP},
	{notionName, "A", notionIP},
	{registry, "A", registryIP},
	{registry, "AAAA", registryIP6},
	{trackerName, "A", trackerIP},
	{lookalike, "A", lookalikeIP},
	{ntpName, "A", ntpIP},
	{apnsName, "A", apnsIP},
	{fcmName, "A", fcmIP},
	{"0.pool.ntp.org", "A", "198.51.100.124"}, // ntp: fresh addresses for
	{"1.pool.ntp.org", "A", "198.51.100.125"}, // TestKnownBugs
	{"2.pool.ntp.org", "A", "198.51.100.126"},
	{clockName, "A", clockIP},
	{h3Second, "A", dockerIP4}, // a second name of dockerIP4: TestHTTP3OtherNames
}

// poolNames are the pool.ntp.org names of the zone, each with its own
// address and NTP responder.
var poolNames = []string{"0.pool.ntp.org", "1.pool.ntp.org", "2.pool.ntp.org"}

// topo is one LAN, one gateway and one internet, with the internet's
// servers running.
type topo struct {
	lan, gw, inet *testnet.NS
	dir           string // certificates and configurations
	caFile        string
	pool          *x509.CertPool
	inboundHits   atomic.Int64 // connections accepted by the inbound targets
	ntpAnswers    atomic.Int64
	udpEchoes     atomic.Int64
	digs          atomic.Uint32 // dig's queries so far: each its own source port (dig)

	// lanGW4 is the gateway's address on lan's segment, which the Go
	// resolver asks; "": gwLAN4.
	lanGW4 string

	// registrySNI is the server name of each ClientHello the Go server
	// at registryIP:443 read, by the client's port: what a server
	// received, whatever capture read (TestCaptureEvasion).
	registrySNI sync.Map
}

func newTopo(t *testing.T) *topo {
	t.Helper()
	tp := &topo{dir: t.TempDir()}
	tp.lan = testnet.New(t, "e2lan")
	tp.gw = testnet.New(t, "e2gw")
	tp.inet = testnet.New(t, "e2net")
	testnet.Link(t, tp.lan, "eth0", []string{lanClient4 + "/24", lanClient6 + "/64"}, tp.gw, "lan0", []string{gwLAN4 + "/24", gwLAN6 + "/64"})
	testnet.Link(t, tp.gw, "wan0", []string{gwWAN4 + "/24", gwWAN6 + "/64"}, tp.inet, "eth0", []string{inetWAN4 + "/24", inetWAN6 + "/64"})
	tp.lan.MustRun("ip", "route", "add", "default", "via", gwLAN4)
	tp.lan.MustRun("ip", "-6", "route", "add", "default", "via", gwLAN6)
	tp.gw.MustRun("ip", "route", "add", "default", "via", inetWAN4)
	tp.gw.MustRun("ip", "-6", "route", "add", "default", "via", inetWAN6)
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	tp.inet.MustRun("ip", "route", "add", "198.18.1.0/24", "via", gwWAN4)
	tp.inet.MustRun("ip", "-6", "route", "add", "2001:db8:1::/64", "via", gwWAN6)
	for _, a := range []string{"198.51.100.124", "198.51.100.125", "198.51.100.126", authDNS4, dockerIP4, vendorIP, intakeIP, notionIP, registryIP, trackerIP, lookalikeIP, ntpIP, udpDenyIP, apnsIP, apnsBareIP, fcmIP, clockIP} {
		tp.inet.MustRun("ip", "addr", "add", a+"/32", "dev", "eth0")
	}
	tp.inet.AddAddr(t, "eth0", dockerIP6+"/128", registryIP6+"/128")

	// The LAN's resolver is the gateway: ip netns exec bind-mounts
	// /etc/netns/NAME/resolv.conf over /etc/resolv.conf for dig.
	nsEtc := filepath.Join("/etc/netns", tp.lan.Name)
	if err := os.MkdirAll(nsEtc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(nsEtc) })
	if err := os.WriteFile(filepath.Join(nsEtc, "resolv.conf"), []byte("nameserver "+gwLAN4+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	tp.makePKI(t)
	tp.startNginx(t)
	tp.startUnbound(t)
	tp.startGoServers(t)
	return tp
}

// makePKI makes a CA and one leaf certificate for every test name (and the
// bare APNs address), for nginx and the Go origin.
func (tp *topo) makePKI(t *testing.T) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "egressd e2e test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range zone {
		names = append(names, r[0])
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: dockerName},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		DNSNames: names, IPAddresses: []net.IP{net.ParseIP(apnsBareIP)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(tp.dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca.pem", "CERTIFICATE", caDER)
	write("leaf.pem", "CERTIFICATE", leafDER)
	write("leaf.key", "EC PRIVATE KEY", keyDER)
	tp.caFile = filepath.Join(tp.dir, "ca.pem")
	tp.pool = x509.NewCertPool()
	tp.pool.AddCert(ca)
}

// startNginx runs Debian's nginx in the internet namespace: TLS on 443
// (IPv4 and IPv6; the bare APNs address too, where Apple's Private Relay
// ingress would be), 10516, 5223, 5228 and 5230, plain HTTP on 80, every
// server answering with the SNI, Host, port and path it saw.
func (tp *topo) startNginx(t *testing.T) {
	t.Helper()
	d := tp.dir
	// Each origin on its own address (the Go origin has 443 of another).
	var listen string
	for _, l := range []string{dockerIP4 + ":443 ssl", "[" + dockerIP6 + "]:443 ssl", vendorIP + ":443 ssl", vendorIP + ":80",
		notionIP + ":443 ssl", trackerIP + ":443 ssl", lookalikeIP + ":443 ssl", intakeIP + ":10516 ssl",
		apnsIP + ":5223 ssl", apnsBareIP + ":5223 ssl", apnsBareIP + ":443 ssl", fcmIP + ":5228 ssl", fcmIP + ":5230 ssl"} {
		listen += "\t\tlisten " + l + ";\n"
	}
	conf := fmt.Sprintf(`user root;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log warn;
events { worker_connections 512; }
http {
	access_log %[1]s/nginx-access.log;
	client_body_temp_path %[1]s/nginx-body;
	proxy_temp_path %[1]s/nginx-proxy;
	fastcgi_temp_path %[1]s/nginx-fastcgi;
	uwsgi_temp_path %[1]s/nginx-uwsgi;
	scgi_temp_path %[1]s/nginx-scgi;
	ssl_certificate %[1]s/leaf.pem;
	ssl_certificate_key %[1]s/leaf.key;
	keepalive_timeout 300s;
	keepalive_requests 10000;
	default_type text/plain;
	server {
%[2]s		server_name _;
		location / {
			return 200 "sni=$ssl_server_name host=$host port=$server_port path=$request_uri\n";
		}
	}
}
`, d, listen)
	path := filepath.Join(d, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	p := tp.inet.Start("nginx", "-c", path, "-p", d, "-e", filepath.Join(d, "nginx-error.log"), "-g", "daemon off;")
	if err := tp.inet.WaitTCP(dockerIP4+":443", 10*time.Second); err != nil {
		p.Stop()
		log, _ := os.ReadFile(filepath.Join(d, "nginx-error.log"))
		t.Fatalf("nginx: %v\nstderr: %s\nlog: %s", err, p.Stderr, log)
	}
}

// startUnbound runs Debian's unbound as the authoritative server of the test
// zone (and nothing else: every other name is refused, so it never
// recurses), the gateway's upstream.
func (tp *topo) startUnbound(t *testing.T) {
	t.Helper()
	d := tp.dir
	var b strings.Builder
	fmt.Fprintf(&b, `server:
	interface: %[2]s
	port: 53
	do-ip6: no
	num-threads: 1
	chroot: ""
	username: ""
	directory: "%[1]s"
	pidfile: "%[1]s/unbound.pid"
	use-syslog: no
	logfile: ""
	verbosity: 1
	module-config: "iterator"
	access-control: 0.0.0.0/0 allow
	local-zone: "." refuse
`, d, authDNS4)
	zones := map[string]bool{}
	for _, r := range zone {
		// Each name is its own static zone: no parent of it answers.
		if !zones[r[0]] {
			zones[r[0]] = true
			fmt.Fprintf(&b, "\tlocal-zone: %q static\n", r[0]+".")
		}
		fmt.Fprintf(&b, "\tlocal-data: \"%s. 300 IN %s %s\"\n", r[0], r[1], r[2])
	}
	b.WriteString("remote-control:\n\tcontrol-enable: no\n")
	path := filepath.Join(d, "unbound.conf")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	p := tp.inet.Start("unbound", "-d", "-c", path)
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := tp.gw.Run("dig", "+tries=1", "+time=1", "+short", "@"+authDNS4, dockerName, "A")
		if err == nil && strings.TrimSpace(out) == dockerIP4 {
			return
		}
		if time.Now().After(deadline) {
			p.Stop()
			t.Fatalf("unbound does not answer on %s: %v %s\nstderr: %s", authDNS4, err, out, p.Stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startGoServers starts the in-process services: a TLS origin offering
// X25519MLKEM768 (nginx on Debian 12 has no ML-KEM), an NTP responder on
// 123, a UDP echo on a port no rule allows, and the inbound targets (a LAN
// host's service and one on the gateway's WAN address).
func (tp *topo) startGoServers(t *testing.T) {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(tp.dir, "leaf.pem"), filepath.Join(tp.dir, "leaf.key"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	serveTCP := func(ns *testnet.NS, addr string, handle func(net.Conn)) {
		ln, err := ns.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				wg.Add(1)
				go func() { defer wg.Done(); defer c.Close(); handle(c) }()
			}
		}()
	}
	serveUDP := func(ns *testnet.NS, addr string, reply func([]byte) []byte) {
		pc, err := ns.ListenPacket("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				if r := reply(buf[:n]); r != nil {
					pc.WriteTo(r, from)
				}
			}
		}()
	}

	tlsCfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519}}
	tlsCfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		if a, ok := h.Conn.RemoteAddr().(*net.TCPAddr); ok {
			tp.registrySNI.Store(a.Port, h.ServerName)
		}
		return nil, nil
	}
	registrySrv := func(c net.Conn) {
		tc := tls.Server(c, tlsCfg)
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if err := tc.Handshake(); err != nil {
			return
		}
		// One line in, one line out: the negotiated group and the SNI.
		buf := make([]byte, 512)
		n, _ := tc.Read(buf)
		st := tc.ConnectionState()
		fmt.Fprintf(tc, "group=%s sni=%s got=%q\n", st.CurveID, st.ServerName, bytes.TrimSpace(buf[:n]))
	}
	serveTCP(tp.inet, registryIP+":443", registrySrv)
	serveTCP(tp.inet, "["+registryIP6+"]:443", registrySrv)
	ntpServer := func(req []byte) []byte {
		// NTP server: mode 4, the client's transmit time as origin.
		if len(req) < 48 || req[0]&7 != 3 {
			return nil
		}
		tp.ntpAnswers.Add(1)
		r := make([]byte, 48)
		r[0] = 0<<6 | 4<<3 | 4 // LI 0, version 4, mode 4 (server)
		r[1] = 2               // stratum
		copy(r[24:32], req[40:48])
		secs := uint64(time.Now().Unix() + 2208988800)
		binary.BigEndian.PutUint32(r[32:], uint32(secs))
		binary.BigEndian.PutUint32(r[40:], uint32(secs))
		return r
	}
	for _, a := range []string{ntpIP, "198.51.100.124", "198.51.100.125", "198.51.100.126", clockIP} {
		serveUDP(tp.inet, a+":123", ntpServer)
	}
	serveUDP(tp.inet, fmt.Sprintf("%s:%d", udpDenyIP, udpDenyPort), func(req []byte) []byte {
		tp.udpEchoes.Add(1)
		return append([]byte("echo:"), req...)
	})
	inbound := func(c net.Conn) { tp.inboundHits.Add(1); c.Write([]byte("in\n")) }
	serveTCP(tp.lan, fmt.Sprintf("[::]:%d", lanSvcPort), inbound)
	serveTCP(tp.gw, fmt.Sprintf("[::]:%d", gwSvcPort), inbound)
}

// inboundAttempts tries to connect from the internet to the LAN host and to
// the gateway's WAN side, over IPv4 and IPv6, and returns how many got a
// byte back from the service.
func (tp *topo) inboundAttempts(t *testing.T) int {
	t.Helper()
	targets := []string{
		netip.AddrPortFrom(netip.MustParseAddr(lanClient4), lanSvcPort).String(),
		netip.AddrPortFrom(netip.MustParseAddr(lanClient6), lanSvcPort).String(),
		netip.AddrPortFrom(netip.MustParseAddr(gwWAN4), gwSvcPort).String(),
		netip.AddrPortFrom(netip.MustParseAddr(gwWAN6), gwSvcPort).String(),
	}
	var got atomic.Int64
	var wg sync.WaitGroup
	for _, a := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			c, err := tp.inet.DialContext(ctx, "tcp", a)
			if err != nil {
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 3)
			if n, _ := c.Read(buf); n > 0 {
				got.Add(1)
				t.Logf("inbound connection to %s got in", a)
			}
		}()
	}
	wg.Wait()
	return int(got.Load())
}
