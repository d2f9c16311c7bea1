package e2e

import (
	"net/netip"
	"testing"
)

// anyRule opens every address on 443/tcp: the special-range guard must
// still keep metadata, CGNAT and the IPv6 embeddings of private addresses
// out (a CIDR rule must name such a range to open it).
const anyRule = `
  - name: e2e-any443
    why: every address on 443, to show the special-range guard
    to: ["0.0.0.0/0", "::/0"]
    ports: [443/tcp]
`

// TestHardeningRanges: metadata, CGNAT, NAT64, 6to4, Teredo and ULA
// metadata destinations, and IPv6 paths that would skip IPv4 rules
// (THREATS.md F1, F2, F3).
func TestHardeningRanges(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	special := []struct{ name, addr string }{
		{"metadata", "169.254.169.254"},
		{"cgnat-low-edge", "100.64.0.1"},
		{"cgnat-alibaba-metadata", "100.100.100.200"},
		{"cgnat-high-edge", "100.127.255.254"},
		{"nat64-metadata", "64:ff9b::a9fe:a9fe"},
		{"nat64-private", "64:ff9b::a01:203"},
		{"nat64-allowed-cidr", "64:ff9b::c633:6482"}, // 198.51.100.130, in the Apple rule's range
		{"local-nat64", "64:ff9b:1::a9fe:a9fe"},
		{"6to4-metadata", "2002:a9fe:a9fe::1"},
		{"6to4-private", "2002:a01:203::1"},
		{"teredo", "2001:0:a9fe:a9fe::1"},
		{"aws-imds-v6", "fd00:ec2::254"},
	}
	// The special addresses get no host (the project's network rule: tests
	// assign only test-range addresses); a connection to them is
	// intercepted at the gateway and judged by the proxy's verdict. The
	// witnesses below are on test-range addresses only.
	apnsNAT64 := "[64:ff9b::c633:6482]:5223"
	tracker6TCP := "[" + tracker6 + "]:8443" // no rule opens 8443
	tcp := []string{tracker6TCP, "[" + tracker6 + "]:22"}
	w := tp.newWitness(t, tcp, []string{"[" + tracker6 + "]:7777"})
	for _, a := range tcp {
		if !tp.dialOK(a) {
			t.Fatalf("without egressd, %s is not reachable from the LAN: the test would prove nothing", a)
		}
	}
	if err := udpExchange(tp, "["+tracker6+"]:7777", []byte("ping")); err != nil {
		t.Fatalf("without egressd, UDP [%s]:7777 does not answer: %v", tracker6, err)
	}
	w.settleAfter(t, int64(len(tcp)), 1)
	baseTCP, baseUDP := w.tcp.Load(), w.udp.Load()

	d := hardeningDaemon(t, tp, u, anyRule)

	// Controls: the same rule lets ordinary addresses through, so a deny
	// below is the guard's, not a missing rule.
	for _, a := range []string{dockerIP4, dockerIP6} {
		o := tp.sendHello(netip.AddrPortFrom(netip.MustParseAddr(a), 443).String(), buildHello(helloSpec{}), 0, 0)
		if o.denied || o.err != nil {
			t.Errorf("control: no SNI to %s:443 under %s: %v", a, "e2e-any443", o)
		}
		wantEvent(t, d, "control "+a, byClientPort(o.port), "allow", "")
	}

	for _, s := range special {
		t.Run(s.name, func(t *testing.T) {
			addr := netip.AddrPortFrom(netip.MustParseAddr(s.addr), 443).String()
			// Without a name, and with an allowed name as SNI.
			for _, spec := range []helloSpec{{}, {sni: [][]string{{dockerName}}}} {
				o := tp.sendHello(addr, buildHello(spec), 0, 0)
				if !o.denied {
					t.Errorf("hello %v to %s: %v", spec.sni, addr, o)
				}
				ev := wantEvent(t, d, s.name, byClientPort(o.port), "deny", "special-range|sni-mismatch")
				t.Logf("%s %v: %s", addr, spec.sni, ev.Reason)
			}
		})
	}
	t.Run("nat64-of-allowed-cidr-5223", func(t *testing.T) {
		// 198.51.100.130:5223 is allowed (apple-mdm CIDR); its NAT64 form
		// is not the same rule's business unless the rule names it.
		o := tp.sendHello(apnsNAT64, buildHello(helloSpec{}), 0, 0)
		if !o.denied {
			t.Errorf("no SNI to %s: %v", apnsNAT64, o)
		}
		wantEvent(t, d, "NAT64 of an allowed CIDR", byClientPort(o.port), "deny", "")
	})
	t.Run("ipv6-skips-ipv4-rules", func(t *testing.T) {
		// A name and port no rule allows, TCP port 22 and UDP 7777, over IPv6:
		// the IPv6 path is filtered like the IPv4 one.
		o := tp.sendHello(tracker6TCP, buildHello(helloSpec{sni: [][]string{{trackerName}}}), 0, 0)
		if !o.denied {
			t.Errorf("SNI %s over IPv6: %v", trackerName, o)
		}
		wantEvent(t, d, "denied name over IPv6", byClientPort(o.port), "deny", "no-rule|port-not-allowed")
		body, port, err := tp.rawHTTP("["+tracker6+"]:22", "SSH-2.0-OpenSSH_9.2\r\n")
		if err == nil && body != "" {
			t.Errorf("TCP [%s]:22 got through: %q", tracker6, body)
		}
		wantEvent(t, d, "IPv6 TCP port 22", byClientPort(port), "deny", "no-rule|port-not-allowed")
		if err := udpExchange(tp, "["+tracker6+"]:7777", []byte("ping")); err == nil {
			t.Errorf("UDP [%s]:7777 got an answer", tracker6)
		}
	})

	if n := w.tcp.Load() - baseTCP; n != 0 {
		t.Errorf("witness servers accepted %d TCP connections with egressd enforcing", n)
	}
	if n := w.udp.Load() - baseUDP; n != 0 {
		t.Errorf("witness servers received %d UDP datagrams with egressd enforcing", n)
	}
}
