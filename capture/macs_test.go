package capture

import (
	"net"
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/internal/fakemac"
	"egressd/policy"
)

// grantsMap is a DNSFacts whose answers name the client that asked.
type grantsMap map[netip.Addr][]DNSGrant

func (m grantsMap) NamesFor(client, addr netip.Addr) []string {
	var out []string
	for _, g := range m[addr] {
		if !client.IsValid() || g.Client == client {
			out = append(out, g.Name)
		}
	}
	return out
}

func (m grantsMap) Given(addr netip.Addr) []DNSGrant { return m[addr] }

// kioskPolicy names its clients by the synthetic frames' source MAC
// (macClient): a rule the proxy decides (443/tcp) and one nftables
// forwards (123/udp, by learned address).
const kioskPolicy = `version: 1
mode: enforce
groups:
  kiosks: ["02:00:00:00:00:01"]
rules:
  - name: web
    from: [kiosks]
    to: ["*.allowed.test"]
    ports: [443/tcp]
  - name: ntp
    from: [kiosks]
    to: [ntp.allowed.test]
    ports: [123/udp]
`

// TestClientMACs: live (Deps.MACs), a flow the proxy or the forwarder
// decides is judged with the client's MAC as they see it, the LAN's
// neighbour table: a client behind a router, whose frames carry the
// router's MAC (a listed one here), has none there and is refused, as the
// proxy refuses it; its event carries no MAC. A forwarded flow is judged
// with the frame's MAC, as nftables' ether saddr matches it, by the
// learned addresses of the answers the forwarder's gate passed with their
// asker's MAC. Offline (no Deps.MACs) every flow, and every answer's
// asker, is judged with the frames' MAC. A policy that names no MAC asks
// nothing.
func TestClientMACs(t *testing.T) {
	kiosk := netip.MustParseAddr("192.0.2.60")
	routed := netip.MustParseAddr("198.51.100.60") // behind a router whose MAC is macClient
	web, ntpK, ntpR := netip.MustParseAddr("203.0.113.1"), netip.MustParseAddr("203.0.113.2"), netip.MustParseAddr("203.0.113.3")
	facts := grantsMap{
		web:  {{Client: kiosk, Name: "a.allowed.test"}, {Client: routed, Name: "a.allowed.test"}},
		ntpK: {{Client: kiosk, Name: "ntp.allowed.test"}},  // the kiosk asked: its MAC fed ntp's set
		ntpR: {{Client: routed, Name: "ntp.allowed.test"}}, // the routed client asked: no MAC, nothing fed
	}
	p := newPcap(t)
	type flowCase struct {
		what    string
		cli     netip.Addr
		port    uint16
		dst     netip.Addr
		live    policy.Verdict // with Deps.MACs
		liveMAC string
		offline policy.Verdict
	}
	frame := macClient.String()
	cases := []flowCase{
		{"HTTPS from the kiosk", kiosk, 443, web, policy.Allow, frame, policy.Allow},
		{"HTTPS from the routed client", routed, 443, web, policy.Deny, "", policy.Allow},
		{"NTP from the routed client to what the kiosk was given", routed, 123, ntpK, policy.Allow, frame, policy.Allow},
		// Offline the routed client's frames carry the listed MAC: its
		// answers count as a kiosk's.
		{"NTP from the kiosk to what the routed client was given", kiosk, 123, ntpR, policy.Deny, frame, policy.Allow},
	}
	for i, c := range cases {
		cport := uint16(44000 + i)
		if c.port == 123 {
			p.udp(true, c.cli, c.dst, cport, 123, make([]byte, 48))
			p.udp(false, c.dst, c.cli, 123, cport, make([]byte, 48))
			continue
		}
		tc := &tcpConn{p: p, cli: c.cli, srv: c.dst, cport: cport, sport: 443, cseq: 1, sseq: 1}
		tc.handshake()
		tc.send(true, realClientHello(t, "a.allowed.test"), 1400, nil, nil)
		tc.close()
	}
	path := p.close()
	find := func(r fileResult, i int) *audit.Event {
		for j := range r.events {
			if e := &r.events[j]; e.ClientPort == uint16(44000+i) && e.Kind == audit.KindFlow {
				return e
			}
		}
		return nil
	}
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{kiosk: macClient})
	for _, live := range []bool{true, false} {
		deps := Deps{DNS: facts}
		if live {
			deps.MACs = macs
		}
		r := synthRunDeps(t, path, kioskPolicy, deps, Config{})
		for i, c := range cases {
			ev := find(r, i)
			if ev == nil {
				t.Errorf("%s (live %v): no event", c.what, live)
				continue
			}
			want, wantMAC := c.offline, frame
			if live {
				want, wantMAC = c.live, c.liveMAC
			}
			if ev.Verdict != want || ev.ClientMAC != wantMAC {
				t.Errorf("%s (live %v): %s %q mac %q; want %s, mac %q", c.what, live, ev.Verdict, ev.Reason, ev.ClientMAC, want, wantMAC)
			}
			if live && want == policy.Deny && c.port == 443 && ev.Reason != policy.ReasonClient {
				t.Errorf("%s: reason %q, want %s", c.what, ev.Reason, policy.ReasonClient)
			}
		}
	}
	if macs.Asked() == 0 {
		t.Error("the MACs never asked under a policy that names them")
	}

	// A policy that names no MAC asks nothing, and events carry the
	// frame's MAC.
	none := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	r := synthRunDeps(t, path, mismatchPolicyEnforce, Deps{DNS: facts, MACs: none}, Config{})
	if none.Asked() != 0 {
		t.Errorf("the MACs asked %d times under a policy that names none", none.Asked())
	}
	for i := range cases {
		if ev := find(r, i); ev == nil || ev.ClientMAC != frame {
			t.Errorf("%s, a policy without MACs: event %+v", cases[i].what, ev)
		}
	}
}

const mismatchPolicyEnforce = `version: 1
mode: enforce
rules:
  - name: web
    to: ["*.allowed.test"]
    ports: [443/tcp]
`

// TestLanMACZone: a link-local client is asked its MAC with the zone of
// the LAN interface its frames came in on, as the DNS forwarder asks it
// (its sockets give the zone): the same fe80:: address on another LAN
// interface is another device.
func TestLanMACZone(t *testing.T) {
	ll := netip.MustParseAddr("fe80::5")
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{
		ll.WithZone("l0"): {0x02, 0, 0, 0, 0, 1}, // the kiosk, on the first LAN
		ll:                {0x02, 0, 0, 0, 0, 1}, // without a zone: the first LAN's entry (egressd run's lanMACs)
	})
	c := &Capture{cfg: Config{Interfaces: []string{"l0", "l1"}}, deps: Deps{MACs: macs}}
	p := &proc{c: c}
	eng := testEngine(t, kioskPolicy)
	for _, tc := range []struct {
		src  int
		want string
	}{{1, "02:00:00:00:00:01"}, {2, ""}} {
		f := &flow{cli: ll, src: tc.src}
		if got := p.lanMAC(eng, f).String(); got != tc.want {
			t.Errorf("fe80::5 on socket %d: MAC %q, want %q", tc.src, got, tc.want)
		}
	}
}
