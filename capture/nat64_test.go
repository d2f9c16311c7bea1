package capture

import (
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestSyntheticNAT64: with NAT64 prefixes (egressd run --nat64-prefix, the
// engine's), audit mode judges a flow to a NAT64 destination as enforce
// mode would (proxy/TestDecideNAT64, firewall/TestRenderNAT64): an IPv4
// CIDR rule allows its NAT64 form, on its ports only; the guard judges the
// embedded IPv4 address, so "*" does not open the NAT64 form of
// metadata or of a private address, for TCP and forwarded UDP alike,
// while a CIDR rule inside a guarded range opens its NAT64 form. Without
// the prefixes the well-known prefix stays guarded whole.
func TestSyntheticNAT64(t *testing.T) {
	const src = `version: 1
mode: audit
rules:
  - name: any
    to: ["*"]
    ports: [443/tcp, 5000/udp]
  - name: apple
    to: [17.0.0.0/8]
    ports: [5223/tcp]
  - name: cgnat
    to: [100.64.0.0/10]
    ports: [8080/tcp]
`
	cli := netip.MustParseAddr("2001:db8::50")
	type flowCase struct {
		what    string
		dst     string
		port    uint16
		udp     bool
		with    string // the reason with the prefixes
		without string // and without
	}
	cases := []flowCase{
		{"IPv4 CIDR rule, its port", "64:ff9b::1100:1", 5223, false, policy.ReasonAllowed, policy.ReasonNoRule},
		{"IPv4 CIDR rule, another port", "64:ff9b::1100:1", 8080, false, policy.ReasonPort, policy.ReasonNoRule},
		{"*, public", "64:ff9b::c000:20a", 443, false, policy.ReasonAllowed, ReasonSpecialRange},
		{"*, metadata", "64:ff9b::a9fe:a9fe", 443, false, ReasonSpecialRange, ReasonSpecialRange},
		{"*, private", "64:ff9b::a01:101", 443, false, ReasonSpecialRange, ReasonSpecialRange},
		{"*, loopback", "64:ff9b::7f00:1", 443, false, ReasonSpecialRange, ReasonSpecialRange},
		{"CGNAT named by a CIDR rule", "64:ff9b::6440:1", 8080, false, policy.ReasonAllowed, policy.ReasonNoRule},
		{"UDP *, public", "64:ff9b::c000:20b", 5000, true, policy.ReasonAllowed, ReasonSpecialRange},
		{"UDP *, metadata", "64:ff9b::a9fe:a9fe", 5000, true, ReasonSpecialRange, ReasonSpecialRange},
		{"UDP *, private", "64:ff9b::c0a8:101", 5000, true, ReasonSpecialRange, ReasonSpecialRange},
	}
	for _, withNAT := range []bool{false, true} {
		p := newPcap(t)
		for i, tc := range cases {
			dst := netip.MustParseAddr(tc.dst)
			if tc.udp {
				p.udp(true, cli, dst, uint16(41000+i), tc.port, []byte("hello"))
				continue
			}
			c := &tcpConn{p: p, cli: cli, srv: dst, cport: uint16(41000 + i), sport: tc.port, cseq: 1, sseq: 1}
			c.handshake()
			c.send(true, []byte("SSH-2.0-x\r\n"), 1400, nil, nil)
			c.send(false, []byte("x"), 1400, nil, nil)
			c.close()
		}
		eng := testEngine(t, src)
		if withNAT {
			eng = eng.WithNAT64([]netip.Prefix{netip.MustParsePrefix("64:ff9b::/96")})
		}
		r := synthRunEngine(t, p.close(), eng, Deps{}, Config{})
		flows := map[uint16]audit.Event{}
		for _, ev := range r.events {
			flows[ev.ClientPort] = ev
		}
		for i, tc := range cases {
			want := tc.without
			if withNAT {
				want = tc.with
			}
			ev, ok := flows[uint16(41000+i)]
			if !ok || ev.Reason != want || (want == policy.ReasonAllowed) != (ev.Verdict == policy.Allow) {
				t.Errorf("%s (nat64 %v): %v %s %s (rule %q), want %s", tc.what, withNAT, ok, ev.Verdict, ev.Reason, ev.Rule, want)
			}
		}
	}
}

// TestSyntheticNAT64Own: the gateway's own IPv4 address in NAT64 form is
// judged as enforce mode does. The proxy refuses a TCP flow to it
// (special-range: its guard holds the gateway's own addresses, and under
// the NAT64 prefixes the address a destination embeds,
// policy.Engine.SpecialRange), unless a CIDR rule names that address; the
// firewall forwards UDP to it (its guarded sets hold no own addresses: the
// gateway's input chain judges what the translator brings back), so
// capture reports that as the rule's. An address beside the gateway's is
// an ordinary one.
func TestSyntheticNAT64Own(t *testing.T) {
	const src = `version: 1
mode: audit
rules:
  - name: any
    to: ["*"]
    ports: [443/tcp, 5000/udp]
  - name: wan
    to: [203.0.113.7/32]
    ports: [8443/tcp]
`
	cli := netip.MustParseAddr("2001:db8::50")
	own := []netip.Addr{netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("2001:db8::1")}
	ownNAT := netip.MustParseAddr("2001:db8:64::cb00:7107")   // 203.0.113.7
	otherNAT := netip.MustParseAddr("2001:db8:64::cb00:7108") // 203.0.113.8
	cases := []struct {
		what   string
		dst    netip.Addr
		port   uint16
		udp    bool
		reason string
	}{
		{"own, TCP under *", ownNAT, 443, false, ReasonSpecialRange},
		{"own, TCP under a CIDR rule naming it", ownNAT, 8443, false, policy.ReasonAllowed},
		{"own, forwarded UDP under *", ownNAT, 5000, true, policy.ReasonAllowed},
		{"another, TCP under *", otherNAT, 443, false, policy.ReasonAllowed},
	}
	p := newPcap(t)
	for i, tc := range cases {
		if tc.udp {
			p.udp(true, cli, tc.dst, uint16(41000+i), tc.port, []byte("hello"))
			continue
		}
		c := &tcpConn{p: p, cli: cli, srv: tc.dst, cport: uint16(41000 + i), sport: tc.port, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, []byte("SSH-2.0-x\r\n"), 1400, nil, nil)
		c.send(false, []byte("x"), 1400, nil, nil)
		c.close()
	}
	eng := testEngine(t, src).WithNAT64([]netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96")})
	r := synthRunEngine(t, p.close(), eng, Deps{}, Config{OwnAddrs: own})
	flows := map[uint16]audit.Event{}
	for _, ev := range r.events {
		flows[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev, ok := flows[uint16(41000+i)]
		if !ok || ev.Reason != tc.reason || (tc.reason == policy.ReasonAllowed) != (ev.Verdict == policy.Allow) {
			t.Errorf("%s: %v %s %s (rule %q), want %s", tc.what, ok, ev.Verdict, ev.Reason, ev.Rule, tc.reason)
		}
	}
}
