package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestSyntheticKeepAliveReloadToEnforce: a plain-HTTP connection capture
// began following live in audit mode is still followed after a reload to
// enforce, but nothing refuses its requests one by one: it was never
// redirected to the proxy (NAT applies to a connection's first packet),
// and the enforce firewall judges its packets by address like a new
// connection's (firewall.CTMarkEnforced). Its later requests are reported
// in the mode the connection began in, audit: a request the policy
// refuses is "would deny", not enforced, as the connection's flow event
// is. Before, they were stamped with the new mode, so a refused request
// was marked enforced and closed "denied" although no 403 was sent.
func TestSyntheticKeepAliveReloadToEnforce(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.92")
	srv := netip.MustParseAddr("203.0.113.92")
	p := newPcap(t)
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 47200, sport: 80, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, []byte("GET /nirovision/a HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	c.send(true, []byte("GET /nirovision/b HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	p.now = p.now.Add(2 * time.Second)
	reload := p.now
	p.now = p.now.Add(2 * time.Second)
	c.send(true, []byte("GET /other HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(true, []byte("GET /nirovision/c HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.close()
	path := p.close()

	rec := &recorder{}
	store := policy.NewStore(testEngine(t, fmt.Sprintf(keepAlivePolicy, policy.ModeAudit)))
	capt, err := New(Config{}, Deps{Policy: store, Sink: rec, DNS: factsMap{srv: {"notion.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	swapped := false
	feed(t, capt, path, func(ts time.Time) {
		if !swapped && ts.After(reload) {
			store.Swap(testEngine(t, fmt.Sprintf(keepAlivePolicy, policy.ModeEnforce)))
			swapped = true
		}
	})
	if !swapped {
		t.Fatal("the policy was not swapped")
	}
	var got []string
	for _, ev := range rec.all() {
		if ev.Kind != audit.KindRequest {
			continue
		}
		got = append(got, fmt.Sprintf("%s %s %s %s enforced=%v %s", ev.Path, ev.Verdict, ev.Reason, ev.Mode, ev.Enforced, ev.Close))
	}
	want := []string{
		"/nirovision/b allow allowed audit enforced=false forwarded",
		"/other deny path-not-allowed audit enforced=false forwarded",
		"/nirovision/c allow allowed audit enforced=false forwarded",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("requests\n got %q\nwant %q", got, want)
	}
}

// TestSyntheticOpenedBeforeEnforce: a TCP connection that opened in audit
// mode and sends its first request head (or ClientHello) after a reload to
// enforce was never redirected to the proxy (NAT applies to a connection's
// first packet), and the enforce firewall's established rule passes only
// connections it marked (firewall.CTMarkEnforced): its packets meet the
// forward chain's rules as a new connection's, by address. Without
// --tcp-ports that chain has no TCP accept rule at all, so it is dropped,
// whatever its name; with --tcp-ports it is let through where a CIDR rule
// or the rule's learned set admits its address, and dropped elsewhere.
// Capture reports that, in enforce mode; a drop gets its own reason,
// opened-before-enforce, not a rule's. Before, capture judged it by its
// Host as the proxy would a new connection and stamped that enforce: the
// connection to notion.test was reported allowed, though nftables drops it,
// and a head with two Host headers http-malformed, though no proxy read it.
func TestSyntheticOpenedBeforeEnforce(t *testing.T) {
	const pol = `version: 1
mode: %s
rules:
  - name: web
    to: ["notion.test"]
    ports: [80/tcp]
  - name: lab
    to: [198.51.100.0/24]
    ports: [80/tcp]
`
	cli := netip.MustParseAddr("192.0.2.93")
	given := netip.MustParseAddr("203.0.113.93") // our DNS gave it out for notion.test
	other := netip.MustParseAddr("203.0.113.94")
	labSrv := netip.MustParseAddr("198.51.100.93")
	head := []byte("GET / HTTP/1.1\r\nHost: notion.test\r\n\r\n")
	p := newPcap(t)
	var conns []*tcpConn
	for i, srv := range []netip.Addr{given, other, labSrv} {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(47300 + i), sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		conns = append(conns, c)
	}
	bad := &tcpConn{p: p, cli: cli, srv: labSrv, cport: 47303, sport: 80, cseq: 1, sseq: 1}
	bad.handshake()
	p.now = p.now.Add(2 * time.Second)
	reload := p.now
	p.now = p.now.Add(2 * time.Second)
	for _, c := range conns {
		c.send(true, head, 1400, nil, nil)
	}
	// A head the proxy would refuse (two Host headers): no proxy reads it.
	bad.send(true, []byte("GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"), 1400, nil, nil)
	conns = append(conns, bad)
	// Opened after the reload: the proxy's, judged by its Host.
	after := &tcpConn{p: p, cli: cli, srv: other, cport: 47310, sport: 80, cseq: 1, sseq: 1}
	after.handshake()
	after.send(true, head, 1400, nil, nil)
	for _, c := range append(conns, after) {
		c.close()
	}
	path := p.close()

	for _, tc := range []struct {
		name  string
		ports []policy.PortRange
		want  map[uint16]string
	}{
		{"all TCP redirected", nil, map[uint16]string{
			47300: "deny opened-before-enforce enforce enforced=true notion.test host",
			47301: "deny opened-before-enforce enforce enforced=true notion.test host",
			47302: "deny opened-before-enforce enforce enforced=true notion.test host",
			47303: "deny opened-before-enforce enforce enforced=true  none",
			47310: "allow allowed enforce enforced=false notion.test host",
		}},
		{"--tcp-ports 80", []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}}, map[uint16]string{
			47300: "allow allowed enforce enforced=false notion.test host",
			47301: "deny opened-before-enforce enforce enforced=true notion.test host",
			47302: "allow allowed enforce enforced=false notion.test host",
			47303: "allow allowed enforce enforced=false  none",
			47310: "allow allowed enforce enforced=false notion.test host",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			store := policy.NewStore(testEngine(t, fmt.Sprintf(pol, policy.ModeAudit)))
			capt, err := New(Config{TCPPorts: tc.ports}, Deps{Policy: store, Sink: rec, DNS: factsMap{given: {"notion.test"}}})
			if err != nil {
				t.Fatal(err)
			}
			swapped := false
			feed(t, capt, path, func(ts time.Time) {
				if !swapped && ts.After(reload) {
					store.Swap(testEngine(t, fmt.Sprintf(pol, policy.ModeEnforce)))
					swapped = true
				}
			})
			got := map[uint16]string{}
			for _, ev := range rec.all() {
				if ev.Kind == audit.KindFlow {
					got[ev.ClientPort] = fmt.Sprintf("%s %s %s enforced=%v %s %s", ev.Verdict, ev.Reason, ev.Mode, ev.Enforced, ev.Name, ev.NameSource)
				}
			}
			for port, w := range tc.want {
				if got[port] != w {
					t.Errorf("port %d: got %q, want %q", port, got[port], w)
				}
			}
		})
	}
}
