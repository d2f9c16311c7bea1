package capture

import (
	"fmt"
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// guardPolicy opens every address on a few ports ("*"), which the proxy's
// special-range guard does not let reach the guarded ranges, and names
// CGNAT by a CIDR rule, which does.
const guardPolicy = `version: 1
mode: audit
rules:
  - name: any
    to: ["*"]
    ports: [80/tcp, 443/tcp, 5000/udp]
  - name: cgnat
    to: [100.64.0.0/10]
    ports: [8080/tcp]
  - name: half
    to: [128.0.0.0/1]
    ports: [5001/udp]
`

// TestSyntheticSpecialRange: capture judges flows and the later requests
// it follows with the proxy's special-range guard (proxy/guard.go,
// THREATS.md F1, F2): a flow to cloud metadata, loopback or a NAT64 form of
// metadata that a broad rule allows is reported denied (special-range), as
// enforce mode refuses it; a range a CIDR rule names is allowed.
func TestSyntheticSpecialRange(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.50")
	cli6 := netip.MustParseAddr("2001:db8::50")
	meta := netip.MustParseAddr("169.254.169.254")
	p := newPcap(t)
	type flowCase struct {
		what    string
		cli     netip.Addr
		dst     string
		port    uint16
		data    []byte
		verdict policy.Verdict
		reason  string
	}
	get := "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
	cases := []flowCase{
		{"metadata over plain HTTP, by address", cli, "169.254.169.254", 80, []byte(get + get), policy.Deny, ReasonSpecialRange},
		{"metadata with an allowed SNI", cli, "169.254.169.254", 443, realClientHello(t, "meta.example"), policy.Deny, ReasonSpecialRange},
		{"CGNAT named by a CIDR rule", cli, "100.64.0.1", 8080, []byte("SSH-2.0-x\r\n"), policy.Allow, policy.ReasonAllowed},
		{"loopback, no rule", cli, "127.0.0.1", 22, []byte("SSH-2.0-x\r\n"), policy.Deny, ReasonSpecialRange},
		{"NAT64 of metadata", cli6, "64:ff9b::a9fe:a9fe", 80, []byte("SSH-2.0-x\r\n"), policy.Deny, ReasonSpecialRange},
		{"an ordinary address", cli, "203.0.113.9", 80, []byte("SSH-2.0-x\r\n"), policy.Allow, policy.ReasonAllowed},
	}
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: tc.cli, srv: netip.MustParseAddr(tc.dst), cport: uint16(41000 + i), sport: tc.port, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, tc.data, 1400, nil, nil)
		c.send(false, []byte("x"), 1400, nil, nil)
		c.close()
	}
	p.udp(true, cli, meta, 41100, 5000, []byte("hello"))
	p.udp(true, cli, meta, 41101, 5001, []byte("hello"))
	r := synthRun(t, p.close(), guardPolicy, nil, Config{})
	flows := map[uint16]audit.Event{}
	var reqs []audit.Event
	for _, ev := range r.events {
		if ev.Kind == audit.KindRequest {
			reqs = append(reqs, ev)
			continue
		}
		flows[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev := flows[uint16(41000+i)]
		if ev.Verdict != tc.verdict || ev.Reason != tc.reason {
			t.Errorf("%s: %s %s (rule %q), want %s %s", tc.what, ev.Verdict, ev.Reason, ev.Rule, tc.verdict, tc.reason)
		}
	}
	if ev := flows[41100]; ev.Verdict != policy.Deny || ev.Reason != ReasonSpecialRange {
		t.Errorf("UDP to metadata: %s %s, want deny %s", ev.Verdict, ev.Reason, ReasonSpecialRange)
	}
	// UDP is nftables' to forward, which keeps the guarded ranges out of
	// a CIDR rule wider than them, as the proxy does (policy.OpensGuarded).
	if ev := flows[41101]; ev.Verdict != policy.Deny || ev.Reason != ReasonSpecialRange {
		t.Errorf("UDP to metadata under a wide CIDR rule: %s %s (rule %q), want deny %s", ev.Verdict, ev.Reason, ev.Rule, ReasonSpecialRange)
	}
	// The second request to metadata, followed, is judged so too.
	if len(reqs) != 1 || reqs[0].Verdict != policy.Deny || reqs[0].Reason != ReasonSpecialRange {
		t.Errorf("later requests: %+v, want one denied %s", reqs, ReasonSpecialRange)
	}
}

// TestSyntheticNoSNIAddressFirst: a ClientHello without SNI to an address
// egressd's DNS gave out for names is decided as the proxy's decideAddr
// decides it: by the address first (a CIDR rule that allows it decides, and
// is credited), and only then by the names.
func TestSyntheticNoSNIAddressFirst(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.60")
	hello := realClientHello(t, "")
	p := newPcap(t)
	dsts := []string{
		"198.51.100.7", // lab allows the address; DNS gave it out for a denied name
		"198.51.100.8", // lab allows the address; DNS gave it out for an allowed name too
		"203.0.113.8",  // only the name allows it
	}
	for i, d := range dsts {
		c := &tcpConn{p: p, cli: cli, srv: netip.MustParseAddr(d), cport: uint16(42000 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, hello, 1400, nil, nil)
		c.close()
	}
	facts := factsMap{
		netip.MustParseAddr("198.51.100.7"): {"evil.test"},
		netip.MustParseAddr("198.51.100.8"): {"a.allowed.test"},
		netip.MustParseAddr("203.0.113.8"):  {"evil.test", "b.allowed.test"},
	}
	r := synthRun(t, p.close(), testPolicy, facts, Config{})
	got := map[netip.Addr]audit.Event{}
	for _, ev := range r.events {
		got[ev.Dest] = ev
	}
	type want struct {
		rule, name string
		src        audit.NameSource
	}
	wants := []want{
		{"lab", "", audit.NameNoSNI},
		{"lab", "", audit.NameNoSNI},
		{"web", "b.allowed.test", audit.NameDNSLearned},
	}
	for i, d := range dsts {
		ev, w := got[netip.MustParseAddr(d)], wants[i]
		if ev.Verdict != policy.Allow || ev.Rule != w.rule || ev.Name != w.name || ev.NameSource != w.src {
			t.Errorf("%s: %s rule %q name %q (%s), want allow rule %q name %q (%s)", d, ev.Verdict, ev.Rule, ev.Name, ev.NameSource, w.rule, w.name, w.src)
		}
	}
}

// portsPolicy has names on a port the firewall does not redirect (8443),
// a host/path rule on another (8080, redirected all the same), a rule for
// every address and one for half of IPv4 on ports not redirected either.
const portsPolicy = `version: 1
mode: %s
rules:
  - name: web
    to: ["*.allowed.test"]
    ports: [443/tcp, 8443/tcp]
  - name: notion
    to: ["notion.test/nirovision/*"]
    ports: [8080/tcp]
  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
  - name: any
    to: ["*"]
    ports: [9000/tcp]
  - name: half
    to: [128.0.0.0/1]
    ports: [9001/tcp]
`

// TestSyntheticTCPPorts: with Config.TCPPorts (egressd run --tcp-ports),
// a TCP flow to a port enforce mode does not redirect to the proxy is
// judged as nftables judges it, at its first packet, by address and the
// addresses DNS gave out for a rule's names, never by its SNI or Host; the
// listed ports and those of host/path rules are judged as the proxy judges
// them. Without the list every port is the proxy's.
func TestSyntheticTCPPorts(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.70")
	p := newPcap(t)
	type flowCase struct {
		what  string
		dst   string
		port  uint16
		data  []byte
		fwd   verdictWant // with --tcp-ports 443
		proxy verdictWant // every port redirected
	}
	allowedHello := realClientHello(t, "x.allowed.test")
	evilHello := realClientHello(t, "evil.test")
	cases := []flowCase{
		{"a listed port, by SNI", "203.0.113.20", 443, allowedHello,
			verdictWant{policy.Allow, policy.ReasonAllowed, "x.allowed.test"}, verdictWant{policy.Allow, policy.ReasonAllowed, "x.allowed.test"}},
		{"an allowed SNI to an address no name was given out for", "203.0.113.21", 8443, allowedHello,
			verdictWant{policy.Deny, policy.ReasonPort, ""}, verdictWant{policy.Allow, policy.ReasonAllowed, "x.allowed.test"}},
		{"a denied SNI to an address given out for an allowed name", "203.0.113.22", 8443, evilHello,
			verdictWant{policy.Allow, policy.ReasonAllowed, "y.allowed.test"}, verdictWant{policy.Deny, policy.ReasonPort, "evil.test"}},
		{"a host/path rule's port", "203.0.113.23", 8080, []byte("GET /nirovision/a HTTP/1.1\r\nHost: notion.test\r\n\r\n"),
			verdictWant{policy.Allow, policy.ReasonAllowed, "notion.test"}, verdictWant{policy.Allow, policy.ReasonAllowed, "notion.test"}},
		{"a CIDR rule", "198.51.100.9", 22, []byte("SSH-2.0-x\r\n"),
			verdictWant{policy.Allow, policy.ReasonAllowed, ""}, verdictWant{policy.Allow, policy.ReasonAllowed, ""}},
		{"metadata under a rule for every address", "169.254.169.254", 9000, []byte("x"),
			verdictWant{policy.Deny, ReasonSpecialRange, ""}, verdictWant{policy.Deny, ReasonSpecialRange, ""}},
		{"metadata under a wide CIDR rule", "169.254.169.254", 9001, []byte("x"),
			verdictWant{policy.Deny, ReasonSpecialRange, ""}, verdictWant{policy.Deny, ReasonSpecialRange, ""}},
	}
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: netip.MustParseAddr(tc.dst), cport: uint16(43000 + i), sport: tc.port, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, tc.data, 1400, nil, nil)
		c.send(false, []byte("x"), 1400, nil, nil)
		c.close()
	}
	path := p.close()
	facts := factsMap{netip.MustParseAddr("203.0.113.22"): {"y.allowed.test"}}
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		for _, list := range []bool{true, false} {
			cfg := Config{}
			if list {
				cfg.TCPPorts = []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
			}
			r := synthRun(t, path, fmt.Sprintf(portsPolicy, mode), facts, cfg)
			flows := map[uint16]audit.Event{}
			for _, ev := range r.events {
				if ev.Kind == audit.KindFlow {
					flows[ev.ClientPort] = ev
				}
			}
			for i, tc := range cases {
				w := tc.proxy
				if list {
					w = tc.fwd
				}
				ev := flows[uint16(43000+i)]
				if ev.Verdict != w.verdict || ev.Reason != w.reason || ev.Name != w.name {
					t.Errorf("%s, list %v: %s: %s %s name %q, want %s %s name %q", mode, list, tc.what, ev.Verdict, ev.Reason, ev.Name, w.verdict, w.reason, w.name)
				}
				if enf := w.verdict == policy.Deny && mode == policy.ModeEnforce; ev.Mode != mode || ev.Enforced != enf {
					t.Errorf("%s, list %v: %s: mode %s enforced %v, want %s enforced %v", mode, list, tc.what, ev.Mode, ev.Enforced, mode, enf)
				}
			}
		}
	}
}

type verdictWant struct {
	verdict      policy.Verdict
	reason, name string
}

func TestConfigTCPPortsValidate(t *testing.T) {
	for _, pr := range []policy.PortRange{{Lo: 53, Hi: 53, Proto: policy.UDP}, {Lo: 0, Hi: 80, Proto: policy.TCP}, {Lo: 90, Hi: 80, Proto: policy.TCP}} {
		if err := (Config{TCPPorts: []policy.PortRange{pr}}).Validate(); err == nil {
			t.Errorf("TCPPorts %v: valid", pr)
		}
	}
	if err := (Config{TCPPorts: []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}}}).Validate(); err != nil {
		t.Error(err)
	}
}
