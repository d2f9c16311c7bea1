package proxy

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// relayProxyPolicy stands in for the seed profile's apple-mdm (17.0.0.0/8,
// which Apple asks for whole) with the server network, and opens every
// icloud.com name as device management often does: each would carry
// iCloud Private Relay's ingress (THREATS.md B3, B4).
const relayProxyPolicy = `version: 1
mode: %s
rules:
  - name: apple-like
    to: [198.18.2.0/24]
    ports: [443/tcp, 80/tcp]
  - name: icloud
    to: ["*.icloud.com"]
    ports: [443/tcp]
%s`

// relayTopo is a topology whose policy is relayProxyPolicy in mode, plus
// extra rules; its resolver answers the relay's names with the server's
// address, as Apple's DNS would answer them with its ingress.
func relayTopo(t *testing.T, mode policy.Mode, extra string) *topo {
	t.Helper()
	tp := newTopo(t, topoOpts{mode: string(mode), deps: func(d *Deps) {
		d.Resolver = startDNS(t, map[string][]netip.Addr{
			policy.PrivateRelayQUIC: {srvV4},
			policy.PrivateRelayH2:   {srvV4},
			"www.icloud.com":        {srvV4},
		})
	}})
	eng, err := policy.Compile("relay.yaml", []byte(fmt.Sprintf(relayProxyPolicy, mode, extra)))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)
	return tp
}

// TestPrivateRelayProxies: a TLS hello whose SNI is Private Relay's
// ingress, to an address a CIDR rule allows, is refused (private-relay)
// in enforce mode and recorded so in audit mode, where it goes through;
// the same for a plain HTTP Host, an explicit CONNECT and an absolute-form
// request that "*.icloud.com" would allow. Another name on the same
// address, and another icloud.com name, are allowed (controls).
func TestPrivateRelayProxies(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeEnforce, policy.ModeAudit} {
		t.Run(string(mode), func(t *testing.T) {
			tp := relayTopo(t, mode, "")
			enforce := mode == policy.ModeEnforce
			insecure := &tls.Config{InsecureSkipVerify: true} // the origin has no certificate for the relay's names
			check := func(what string, ev audit.Event, verdict policy.Verdict, reason, rule string) {
				t.Helper()
				if ev.Verdict != verdict || ev.Reason != reason || ev.Rule != rule || ev.Mode != mode ||
					ev.Enforced != (enforce && verdict == policy.Deny) {
					t.Errorf("%s: event %+v, want %s %s rule %q in %s mode", what, ev, verdict, reason, rule, mode)
				}
			}

			// Controls: the CIDR rule allows the address, by itself and
			// under another name.
			c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
			if body, err := tp.tlsGet(c, "api.push.apple.com", "/", insecure.Clone()); err != nil || !strings.Contains(body, "sni=api.push.apple.com") {
				t.Fatalf("control, another name on the CIDR: %q %v", body, err)
			}
			check("control", tp.ev.wait(t, "control", byFlow(c)), policy.Allow, policy.ReasonAllowed, "apple-like")

			for _, name := range []string{policy.PrivateRelayH2, policy.PrivateRelayQUIC, "Mask-H2.iCloud.com"} {
				c = tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
				body, err := tp.tlsGet(c, name, "/relay", insecure.Clone())
				if enforce && err == nil {
					t.Errorf("SNI %s to %s got through: %q", name, srvV4, body)
				}
				if !enforce && (err != nil || !strings.Contains(body, "sni="+name)) {
					t.Errorf("audit mode blocked SNI %s: %q %v", name, body, err)
				}
				ev := tp.ev.wait(t, "SNI "+name, byFlow(c))
				check("SNI "+name, ev, policy.Deny, policy.ReasonPrivateRelay, "")
				if ev.Name != strings.ToLower(name) || ev.NameSource != audit.NameSNI {
					t.Errorf("SNI %s: recorded as %q (%s)", name, ev.Name, ev.NameSource)
				}
			}

			// Plain HTTP to the CIDR's address with the relay's Host.
			hc := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 80))
			hc.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(hc, "GET / HTTP/1.1\r\nHost: mask-h2.icloud.com\r\nConnection: close\r\n\r\n")
			got, _ := io.ReadAll(hc)
			hc.Close() // the event comes when both sides closed
			if enforce != strings.HasPrefix(string(got), "HTTP/1.1 403") {
				t.Errorf("Host mask-h2.icloud.com: %q", got)
			}
			check("Host", tp.ev.wait(t, "Host", byFlow(hc)), policy.Deny, policy.ReasonPrivateRelay, "")

			// Explicit proxy: CONNECT and an absolute-form request, which
			// "*.icloud.com" would allow.
			resp, _ := tp.proxyRequest(t, "CONNECT mask-h2.icloud.com:443 HTTP/1.1\r\nHost: mask-h2.icloud.com:443\r\n\r\n")
			if want := map[bool]int{true: http.StatusForbidden, false: http.StatusOK}[enforce]; resp.StatusCode != want {
				t.Errorf("CONNECT mask-h2.icloud.com:443: %d, want %d", resp.StatusCode, want)
			}
			if enforce && resp.Header.Get("X-Egressd-Reason") != policy.ReasonPrivateRelay {
				t.Errorf("CONNECT: reason %q", resp.Header.Get("X-Egressd-Reason"))
			}
			ev := tp.ev.wait(t, "CONNECT", func(ev audit.Event) bool {
				return ev.NameSource == audit.NameConnect && ev.Name == policy.PrivateRelayH2
			})
			check("CONNECT", ev, policy.Deny, policy.ReasonPrivateRelay, "")
			resp, _ = tp.proxyRequest(t, "CONNECT www.icloud.com:443 HTTP/1.1\r\nHost: www.icloud.com:443\r\n\r\n")
			if resp.StatusCode != http.StatusOK {
				t.Errorf("control CONNECT www.icloud.com:443: %d", resp.StatusCode)
			}
			resp, _ = tp.proxyRequest(t, "GET http://mask.icloud.com/ HTTP/1.1\r\nHost: mask.icloud.com\r\n\r\n")
			if enforce && (resp.StatusCode != http.StatusForbidden || resp.Header.Get("X-Egressd-Reason") != policy.ReasonPrivateRelay) {
				t.Errorf("GET http://mask.icloud.com/: %d %q", resp.StatusCode, resp.Header.Get("X-Egressd-Reason"))
			}
			ev = tp.ev.wait(t, "absolute-form", func(ev audit.Event) bool { return ev.Name == policy.PrivateRelayQUIC && ev.DestPort == 80 })
			check("absolute-form", ev, policy.Deny, policy.ReasonPrivateRelay, "")
		})
	}
}

// TestPrivateRelayNamedProxies: a rule that names the relay exactly
// allows it (the operator means it); the other name stays refused.
func TestPrivateRelayNamedProxies(t *testing.T) {
	tp := relayTopo(t, policy.ModeEnforce, `  - name: relay
    to: [mask-h2.icloud.com]
    ports: [443/tcp]
`)
	c := tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
	if body, err := tp.tlsGet(c, policy.PrivateRelayH2, "/", &tls.Config{InsecureSkipVerify: true}); err != nil || !strings.Contains(body, "sni=mask-h2.icloud.com") {
		t.Errorf("named relay: %q %v", body, err)
	}
	if ev := tp.ev.wait(t, "named relay", byFlow(c)); ev.Verdict != policy.Allow || ev.Rule != "relay" {
		t.Errorf("named relay: event %+v", ev)
	}
	c = tp.dialAtFirstWrite(t, netip.AddrPortFrom(srvV4, 443))
	if body, err := tp.tlsGet(c, policy.PrivateRelayQUIC, "/", &tls.Config{InsecureSkipVerify: true}); err == nil {
		t.Errorf("mask.icloud.com beside a rule naming mask-h2.icloud.com: %q", body)
	}
	if ev := tp.ev.wait(t, "the other name", byFlow(c)); ev.Reason != policy.ReasonPrivateRelay || !ev.Enforced {
		t.Errorf("the other name: event %+v", ev)
	}
	resp, _ := tp.proxyRequest(t, "CONNECT mask-h2.icloud.com:443 HTTP/1.1\r\nHost: mask-h2.icloud.com:443\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Errorf("CONNECT to the named relay: %d %q", resp.StatusCode, resp.Header.Get("X-Egressd-Reason"))
	}
}
