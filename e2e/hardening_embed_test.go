package e2e

import (
	"net/netip"
	"strings"
	"testing"
)

// anyRule80 opens every address on 443/tcp and 80/tcp: a deny below is the
// special-range guard's, not a missing rule.
const anyRule80 = `
  - name: e2e-any
    why: every address on 443 and 80, to show the special-range guard
    to: ["0.0.0.0/0", "::/0"]
    ports: [443/tcp, 80/tcp]
`

// TestHardeningEmbeddings (THREATS.md F2's table, F1, F3): the IPv6 forms
// of cloud metadata (IPv4-mapped, NAT64, 6to4, Teredo, the AWS ULA one) and
// Azure's WireServer, in every place a client can name a destination: the
// explicit proxy's CONNECT authority and absolute-form URL, the transparent
// proxy's plain HTTP Host (to the address itself), an IP-literal SNI, and a
// DNS answer for an allowed name. Each is denied in enforce mode under a
// rule that opens every address, and the transparent proxy's event names
// the original IPv6 destination (F3). Each deny must be the guard's
// (special-range): no server has these addresses here, so a connection
// the guard let through would fail to dial all the same.
func TestHardeningEmbeddings(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	answers := []struct{ name, qtype, rr string }{
		{"teredo.nirovision.com", "AAAA", "2001:0:a9fe:a9fe::1"},
		{"imds6.nirovision.com", "AAAA", "fd00:ec2::254"},
		{"wire.nirovision.com", "A", "168.63.129.16"},
		{"alimeta.nirovision.com", "A", "100.100.100.200"},
	}
	for _, a := range answers {
		u.add(a.name + ". 300 IN " + a.qtype + " " + a.rr)
	}
	d := hardeningDaemon(t, tp, u, anyRule80)
	proxyAddr := gwLAN4 + ":3128"

	// Controls: the same rule lets ordinary addresses through each path.
	if body, port, err := tp.rawHTTP(proxyAddr, "CONNECT ["+dockerIP6+"]:443 HTTP/1.1\r\nHost: ["+dockerIP6+"]:443\r\n\r\n"); !strings.HasPrefix(body, "HTTP/1.1 200") {
		t.Errorf("control: CONNECT [%s]:443: %q", dockerIP6, firstLine(body, err))
	} else {
		wantEvent(t, d, "control CONNECT", byClientPort(port), "allow", "")
	}
	// The IPv4-mapped form of an ordinary address counts as the address
	// under 0.0.0.0/0 (README: ::ffff:17.1.2.3 counts as 17.1.2.3).
	mapped := "[::ffff:" + dockerIP4 + "]:443"
	if body, port, err := tp.rawHTTP(proxyAddr, "CONNECT "+mapped+" HTTP/1.1\r\nHost: "+mapped+"\r\n\r\n"); !strings.HasPrefix(body, "HTTP/1.1 200") {
		t.Errorf("control: CONNECT %s: %q", mapped, firstLine(body, err))
	} else {
		wantEvent(t, d, "control CONNECT mapped", byClientPort(port), "allow", "")
	}
	if o := tp.sendHello("["+dockerIP6+"]:443", buildHello(helloSpec{sni: [][]string{{dockerIP6}}}), 0, 0); o.denied || o.err != nil {
		t.Errorf("control: IP-literal SNI to [%s]:443: %v", dockerIP6, o)
	} else if ev := wantEvent(t, d, "control hello", byClientPort(o.port), "allow", ""); ev.Dest != dockerIP6 {
		t.Errorf("control hello: event dest %q, want %s", ev.Dest, dockerIP6)
	}

	for _, c := range []struct {
		name, addr  string
		transparent bool // a LAN client can send to it (not an IPv4-mapped form)
	}{
		{"mapped-metadata", "::ffff:169.254.169.254", false},
		{"mapped-loopback", "::ffff:127.0.0.1", false},
		{"nat64-metadata", "64:ff9b::a9fe:a9fe", true},
		{"6to4-metadata", "2002:a9fe:a9fe::1", true},
		{"teredo-metadata", "2001:0:a9fe:a9fe::1", true},
		{"aws-imds-v6", "fd00:ec2::254", true},
		{"azure-wireserver", "168.63.129.16", true},
		{"alibaba-metadata", "100.100.100.200", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := netip.MustParseAddr(c.addr)
			hp443 := netip.AddrPortFrom(a, 443).String()
			host := c.addr
			if a.Is6() {
				host = "[" + c.addr + "]"
			}
			for _, req := range []string{
				"CONNECT " + hp443 + " HTTP/1.1\r\nHost: " + hp443 + "\r\n\r\n",
				"GET http://" + host + "/latest/meta-data/ HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n",
			} {
				body, port, err := tp.rawHTTP(proxyAddr, req)
				if !strings.HasPrefix(body, "HTTP/1.1 403") {
					t.Errorf("explicit %q: %q", firstLine(req, nil), firstLine(body, err))
				}
				wantEvent(t, d, "explicit "+firstLine(req, nil), byClientPort(port), "deny", "special-range")
			}
			if !c.transparent {
				return
			}
			body, port, err := tp.rawHTTP(netip.AddrPortFrom(a, 80).String(), "GET /latest/meta-data/ HTTP/1.1\r\nHost: "+host+"\r\nConnection: close\r\n\r\n")
			if strings.Contains(body, "200 OK") {
				t.Errorf("plain HTTP to %s got through: %q", host, firstLine(body, err))
			}
			if ev := wantEvent(t, d, "plain HTTP to "+host, byClientPort(port), "deny", "special-range"); ev.Dest != c.addr {
				t.Errorf("plain HTTP to %s: event dest %q, want the original destination %s", host, ev.Dest, c.addr)
			}
			o := tp.sendHello(hp443, buildHello(helloSpec{sni: [][]string{{c.addr}}}), 0, 0)
			if !o.denied {
				t.Errorf("IP-literal SNI to %s: %v", hp443, o)
			}
			if ev := wantEvent(t, d, "IP-literal SNI to "+hp443, byClientPort(o.port), "deny", "special-range"); ev.Dest != c.addr {
				t.Errorf("IP-literal SNI to %s: event dest %q, want the original destination %s", hp443, ev.Dest, c.addr)
			}
		})
	}

	t.Run("dns-answers", func(t *testing.T) {
		for _, a := range answers {
			if rcode, addrs := tp.dig(t, a.name, a.qtype); rcode != "NOERROR" || len(addrs) != 0 {
				t.Errorf("dig %s %s (upstream: %s): %s %v, want NOERROR and no address", a.name, a.qtype, a.rr, rcode, addrs)
			}
			// The filter took the address out (an empty answer from an
			// upstream without the record would look the same).
			wantFiltered(t, d, a.name, a.qtype)
		}
	})
}
