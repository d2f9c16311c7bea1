package dnsfilter

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/internal/fakemac"
	"egressd/policy"
)

// relayZone answers Private Relay's ingress names, as Apple's servers do,
// beside another name of the zone.
const relayZone = `
mask.icloud.com. 300 IN A 192.0.2.60
mask.icloud.com. 300 IN AAAA 2001:db8::60
mask.icloud.com. 300 IN HTTPS 1 . alpn=h3
mask-h2.icloud.com. 300 IN A 192.0.2.61
mask-h2.icloud.com. 300 IN AAAA 2001:db8::61
mask-h2.icloud.com. 300 IN HTTPS 1 . alpn=h2
www.icloud.com. 300 IN A 192.0.2.62
`

// relayPolicies open the relay's names by a wildcard (common for Apple
// device management) or "*", beside Apple's 17.0.0.0/8.
var relayPolicies = map[string]string{
	"wildcard": `
  - name: apple
    to: [17.0.0.0/8, "*.push.apple.com"]
    ports: [443/tcp, 5223/tcp]
  - name: icloud
    to: ["*.icloud.com"]
    ports: [443/tcp]
`,
	"star": `
  - name: all
    to: ["*"]
    ports: [443/tcp]
`,
}

// TestPrivateRelayNXDOMAIN (THREATS.md B3): the forwarder answers iCloud
// Private Relay's ingress names NXDOMAIN, whatever the type, in audit mode
// as in enforce mode, under a wildcard or "*" that would resolve them, as
// Apple asks of networks that must not carry the relay: the name is never
// asked upstream, and each query is one event and one decision line
// (private-relay, enforced). Another icloud.com name resolves.
func TestPrivateRelayNXDOMAIN(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		for pname, rules := range relayPolicies {
			t.Run(string(mode)+"-"+pname, func(t *testing.T) {
				up := newFakeUpstream(t, relayZone)
				var logs syncBuffer
				ts := startServer(t, fmt.Sprintf("version: 1\nmode: %s\nrules:%s", mode, rules), Config{Upstreams: []string{up.Addr}},
					Deps{Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
				asked := map[string]int{}
				for _, proto := range []string{"udp", "tcp"} {
					for _, edns := range []bool{false, true} {
						for _, name := range []string{"mask.icloud.com.", "mask-h2.icloud.com.", "MASK-H2.iCloud.COM."} {
							for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeHTTPS, dns.TypeANY} {
								r := ask(t, proto, ts.Addr, name, qt, edns)
								asked[strings.ToLower(strings.TrimSuffix(name, "."))]++
								if r.Rcode != dns.RcodeNameError || len(r.Answer) != 0 {
									t.Errorf("%s %s %s edns=%v: %s %v, want NXDOMAIN", proto, name, dns.TypeToString[qt], edns, dns.RcodeToString[r.Rcode], r.Answer)
								}
								if len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != dns.TypeSOA {
									t.Errorf("%s %s %s: authority %v, want the SOA a negative answer carries", proto, name, dns.TypeToString[qt], r.Ns)
								}
								if (r.IsEdns0() != nil) != edns {
									t.Errorf("%s %s %s: OPT in the answer %v, query had EDNS %v", proto, name, dns.TypeToString[qt], r.IsEdns0() != nil, edns)
								}
							}
						}
					}
				}
				if r := ask(t, "udp", ts.Addr, "www.icloud.com.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
					t.Errorf("control www.icloud.com: %v", r)
				}
				for _, q := range up.Seen() {
					if strings.HasPrefix(strings.ToLower(q.Name), "mask") {
						t.Errorf("upstream asked %v", q)
					}
				}
				for name, n := range asked {
					var evs []audit.Event
					for _, ev := range ts.Sink.Events() {
						if ev.Name == name {
							evs = append(evs, ev)
						}
					}
					if len(evs) != n {
						t.Errorf("%s: %d events for %d queries", name, len(evs), n)
					}
					for _, ev := range evs {
						if ev.Verdict != policy.Deny || ev.Reason != policy.ReasonPrivateRelay || !ev.Enforced || ev.Mode != mode || ev.Rule != "" {
							t.Errorf("%s: event %+v, want a deny %s, enforced, in mode %s", name, ev, policy.ReasonPrivateRelay, mode)
							break
						}
					}
					lines := 0
					for _, l := range bytes.Split([]byte(logs.String()), []byte("\n")) {
						var m map[string]any
						if json.Unmarshal(l, &m) == nil && m[audit.LogName] == name {
							lines++
							if m[audit.LogReason] != policy.ReasonPrivateRelay || m["level"] != "WARN" {
								t.Errorf("%s: log line %s", name, l)
							}
						}
					}
					if lines != n {
						t.Errorf("%s: %d decision lines for %d queries", name, lines, n)
					}
				}
			})
		}
	}
}

// TestPrivateRelayNamedExactly: a rule that names a relay name exactly
// resolves it like any allowed name (learned for the rule); the other
// name stays NXDOMAIN. A reload that drops the rule puts the name back to
// NXDOMAIN, cached answer or not (the fast path does not answer it).
func TestPrivateRelayNamedExactly(t *testing.T) {
	up := newFakeUpstream(t, relayZone)
	named := "version: 1\nmode: enforce\nrules:" + relayPolicies["wildcard"] + `
  - name: relay
    to: [mask-h2.icloud.com]
    ports: [443/tcp]
`
	ts := startServer(t, named, Config{Upstreams: []string{up.Addr}}, Deps{})
	for range 2 { // the second from the cache
		for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
			r := ask(t, "udp", ts.Addr, "mask-h2.icloud.com.", qt, false)
			if r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
				t.Errorf("named mask-h2.icloud.com %s: %v", dns.TypeToString[qt], r)
			}
		}
		if r := ask(t, "udp", ts.Addr, "mask.icloud.com.", dns.TypeA, false); r.Rcode != dns.RcodeNameError {
			t.Errorf("mask.icloud.com beside a rule naming mask-h2.icloud.com: %s", dns.RcodeToString[r.Rcode])
		}
	}
	if ev, _ := ts.Sink.find("mask-h2.icloud.com"); ev.Verdict != policy.Allow || ev.Rule != "relay" {
		t.Errorf("named relay event %+v", ev)
	}
	if got := ts.Server.table.NamesFor(netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.0.2.61")); len(got) != 1 || got[0] != "mask-h2.icloud.com" {
		t.Errorf("learned names for 192.0.2.61: %v", got)
	}
	wide, err := policy.Compile("p.yaml", []byte("version: 1\nmode: audit\nrules:"+relayPolicies["wildcard"]))
	if err != nil {
		t.Fatal(err)
	}
	ts.Server.pol.Swap(wide)
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		if r := ask(t, "udp", ts.Addr, "mask-h2.icloud.com.", qt, false); r.Rcode != dns.RcodeNameError {
			t.Errorf("after the reload, mask-h2.icloud.com %s: %s (a cached answer?)", dns.TypeToString[qt], dns.RcodeToString[r.Rcode])
		}
	}
	if ev, _ := ts.Sink.find("mask-h2.icloud.com"); ev.Reason != policy.ReasonPrivateRelay || ev.CacheHit || ev.RCode != "NXDOMAIN" {
		t.Errorf("after the reload: event %+v", ev)
	}
	// The learned-address file brings back only what the forwarder would
	// learn now: not the relay's addresses under the wildcard.
	keep := Config{}.WouldLearn(wide, nil)
	if keep(&Learned{Client: netip.MustParseAddr("192.0.2.9"), Name: "mask-h2.icloud.com", Addr: netip.MustParseAddr("192.0.2.61")}) {
		t.Error("WouldLearn keeps mask-h2.icloud.com under *.icloud.com")
	}
}

// TestPrivateRelayNamedForOthers: a rule that names a relay name exactly
// for some clients only (or one that expired) leaves the name
// NXDOMAIN for every client it does not allow, in both modes, never asked
// upstream: the answer Apple's devices read as "turn the relay off here",
// not the policy's REFUSED (which only delays them) nor, in audit mode,
// the relay's address.
func TestPrivateRelayNamedForOthers(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		for how, rule := range map[string]string{
			"other clients": "    from: [192.0.2.10]\n",
			"expired":       "    expires: 2020-01-01\n",
		} {
			t.Run(string(mode)+"-"+how, func(t *testing.T) {
				up := newFakeUpstream(t, relayZone)
				pol := fmt.Sprintf("version: 1\nmode: %s\nrules:%s", mode, relayPolicies["wildcard"]) + `
  - name: relay
    to: [mask-h2.icloud.com]
    ports: [443/tcp]
` + rule
				ts := startServer(t, pol, Config{Upstreams: []string{up.Addr}}, Deps{})
				for _, qt := range []uint16{dns.TypeA, dns.TypeHTTPS} {
					if r := ask(t, "udp", ts.Addr, "mask-h2.icloud.com.", qt, false); r.Rcode != dns.RcodeNameError || len(r.Answer) != 0 {
						t.Errorf("mask-h2.icloud.com %s from a client the rule does not allow: %s %v, want NXDOMAIN", dns.TypeToString[qt], dns.RcodeToString[r.Rcode], r.Answer)
					}
				}
				for _, q := range up.Seen() {
					if strings.HasPrefix(strings.ToLower(q.Name), "mask") {
						t.Errorf("upstream asked %v", q)
					}
				}
				if ev, _ := ts.Sink.find("mask-h2.icloud.com"); ev.Verdict != policy.Deny || !ev.Enforced || ev.RCode != "NXDOMAIN" || ev.Mode != mode {
					t.Errorf("event %+v, want an enforced deny answered NXDOMAIN in %s mode", ev, mode)
				}
			})
		}
	}
}

// TestPrivateRelayNamedForMAC: a rule naming the relay exactly for a MAC
// group lets the client with that MAC resolve it (the relay's check asks
// the client's MAC as the policy's does); a client with another MAC gets
// NXDOMAIN.
func TestPrivateRelayNamedForMAC(t *testing.T) {
	const pol = `version: 1
mode: enforce
groups:
  kiosks: ["02:00:00:00:00:0a"]
rules:
  - name: relay
    from: [kiosks]
    to: [mask-h2.icloud.com]
    ports: [443/tcp]
`
	up := newFakeUpstream(t, relayZone)
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{loopback: kioskMAC})
	ts := startServer(t, pol, Config{Upstreams: []string{up.Addr}}, Deps{MACs: macs})
	if r := ask(t, "udp", ts.Addr, "mask-h2.icloud.com.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) == 0 {
		t.Errorf("the kiosk's MAC, named by the relay's exact rule: %s %v", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	macs.Set(loopback, otherMAC)
	if r := ask(t, "udp", ts.Addr, "mask-h2.icloud.com.", dns.TypeAAAA, false); r.Rcode != dns.RcodeNameError {
		t.Errorf("another MAC: %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
}
