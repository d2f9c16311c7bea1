package proxy

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestDecideLiteralMatchesProxy: DecideLiteral, which policy explain
// predicts the proxy with, decides each literal as the proxy's own
// deciding functions do: the explicit proxy's decideTarget asked for it
// as written (CONNECT), and the transparent proxy's redirected flow
// (handleTransparent: its destination unmapped, loopback from the LAN
// refused first, then decideAddr), with no DNS facts. The destinations
// are the IPv4-mapped forms of loopback, a LAN address and a public one
// (dotted and hex), NAT64 and 6to4 forms of loopback, the unspecified
// addresses, link-local metadata, CGNAT and one of the gateway's own
// addresses, under rules that hold them without opening them ("*", the
// /0s) and under CIDR rules naming them, with and without a NAT64 prefix
// and an exception (AllowSpecial). And DecideLiteral says which guard
// refused, special-range each time.
func TestDecideLiteralMatchesProxy(t *testing.T) {
	const (
		closed = `mode: enforce
rules:
  - {name: any, to: ["*"], ports: [80/tcp]}
  - {name: all, to: ["0.0.0.0/0", "::/0"], ports: [81/tcp]}
`
		named = `mode: audit
rules:
  - name: named
    to: ["127.0.0.1/32", "10.20.30.40/32", "198.51.100.7/32", "198.51.100.1/32", "0.0.0.0/32", "::/128",
         "169.254.169.254/32", "100.64.0.1/32", "64:ff9b::7f00:1/128", "2002:7f00:1::/48"]
    ports: [80/tcp, 81/tcp]
`
	)
	own := []netip.Addr{netip.MustParseAddr("198.51.100.1")}
	dests := []string{
		"127.0.0.1", "::ffff:127.0.0.1", "::ffff:7f00:1", "::1",
		"::ffff:10.20.30.40", "10.20.30.40",
		"::ffff:198.51.100.7", "::ffff:c633:6407", "198.51.100.7",
		"::ffff:0.0.0.0", "0.0.0.0", "::",
		"64:ff9b::7f00:1", "2002:7f00:1::1",
		"169.254.169.254", "::ffff:169.254.169.254", "100.64.0.1",
		"198.51.100.1", "::ffff:198.51.100.1",
	}
	client := netip.MustParseAddr("198.51.100.50")
	for _, src := range []string{closed, named} {
		for _, nat := range []string{"", "64:ff9b::/96"} {
			for _, allow := range [][]netip.Prefix{nil, {netip.MustParsePrefix("100.64.0.0/10")}} {
				nats, err := policy.ParseNAT64(nat)
				if err != nil {
					t.Fatal(err)
				}
				eng, err := policy.Compile("p.yaml", []byte(src))
				if err != nil {
					t.Fatal(err)
				}
				eng = eng.WithNAT64(nats)
				p, err := New(Config{OwnAddrs: own, AllowSpecial: allow}, Deps{Policy: policy.NewStore(eng), Sink: audit.Discard})
				if err != nil {
					t.Fatal(err)
				}
				for _, dst := range dests {
					for _, port := range []uint16{80, 81} {
						a := netip.MustParseAddr(dst)
						name := strings.SplitN(src, "\n", 2)[0] + " nat64 " + nat + " " + dst
						in := policy.Input{Client: client, Dest: a, Port: port, Proto: policy.TCP, Now: time.Now()}

						// The explicit proxy, asked for the literal.
						host := dst
						if a.Is6() {
							host = "[" + dst + "]"
						}
						v, _ := p.decideTarget(context.Background(), eng, client, nil, host, port, "", audit.NameConnect)
						d, r := DecideLiteral(eng, in, own, allow, true)
						check(t, name+" explicit", v.d, d, r)

						// The transparent proxy, its flow redirected.
						var want policy.Decision
						if _, ok := lanLoopback(a.Unmap()); ok {
							want = selfRefusal // handleTransparent
						} else {
							tin := in
							tin.Dest = a.Unmap() // origDst
							want = p.decideAddr(eng, tin, audit.NameNone).d
						}
						d, r = DecideLiteral(eng, in, own, allow, false)
						check(t, name+" transparent", want, d, r)
					}
				}
				p.Close()
			}
		}
	}
}

// check compares DecideLiteral's decision got (and its refusal r) with
// the proxy's want.
func check(t *testing.T, name string, want, got policy.Decision, r Refusal) {
	t.Helper()
	if got.Verdict != want.Verdict || got.Reason != want.Reason || got.Rule != want.Rule || got.Mode != want.Mode {
		t.Errorf("%s port: DecideLiteral %s %s rule %q mode %s, the proxy %s %s rule %q mode %s",
			name, got.Verdict, got.Reason, got.Rule, got.Mode, want.Verdict, want.Reason, want.Rule, want.Mode)
	}
	if (r.Guard != "") != (got.Reason == ReasonSpecialRange) || r.Guard != "" && !r.Range.IsValid() {
		t.Errorf("%s: %s %s, refusal %+v: a guard's refusal, special-range, names the guard and its range", name, got.Verdict, got.Reason, r)
	}
}

// TestLANLoopbackThisHost: the transparent proxy refuses "this host"
// (0.0.0.0, ::, in any form) as it refuses loopback, whatever the rules:
// a SYN forged to 0.0.0.0 and redirected reached the gateway's own
// services when dialled, under a rule naming 0.0.0.0/32.
func TestLANLoopbackThisHost(t *testing.T) {
	eng, err := policy.Compile("p.yaml", []byte(`mode: enforce
rules:
  - {name: zero, to: ["0.0.0.0/32", "::/128", "127.0.0.1/32"], ports: [80/tcp]}
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		dst     string
		refused bool
	}{
		{"0.0.0.0", true}, {"::", true}, {"::ffff:0.0.0.0", true},
		{"127.0.0.1", true}, {"::1", true}, {"::ffff:127.0.0.1", true},
		{"198.51.100.7", false},
	} {
		in := policy.Input{Client: netip.MustParseAddr("192.0.2.10"), Dest: netip.MustParseAddr(c.dst), Port: 80, Proto: policy.TCP, Now: time.Now()}
		d, r := DecideLiteral(eng, in, nil, nil, false)
		if got := r.Guard == GuardLANLoopback; got != c.refused || c.refused && d.Allowed() {
			t.Errorf("transparent %s: %s, refusal %+v; want refused as loopback: %v", c.dst, d.Verdict, r, c.refused)
		}
	}
}
