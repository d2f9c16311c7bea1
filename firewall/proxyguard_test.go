package firewall

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"egressd/policy"
)

// proxyGuardRules are CIDR targets, "*" and /0s around every guarded
// range: inside it, exactly it, across and holding it, NAT64 prefixes
// inside and outside the local-use /48, IPv4-mapped forms, loopback and
// the gateway's own addresses (proxyGuardOwn). proxyGuardPolicy gives
// each its own TCP port, which forward handles (not one of the proxy's
// --tcp-ports), so that the proxy's guard of a flow on that port reads
// that rule alone.
var proxyGuardRules = [][]string{
	{"*"}, {"0.0.0.0/0"}, {"::/0"}, {"0.0.0.0/1", "::/1"}, {"192.0.2.0/24", "2001:db8::/32"},
	{"169.254.169.254/32", "fd00:ec2::254/128"}, {"169.254.0.0/16", "fe80::/10"}, {"169.0.0.0/8", "100.0.0.0/8"},
	{"100.64.0.0/10"}, {"100.100.100.200/32"}, {"168.63.129.16/32"}, {"168.63.0.0/16"},
	{"127.0.0.1/32", "::1/128"}, {"127.0.0.0/8"}, {"0.0.0.0/8", "::/128"}, {"224.0.0.0/4", "ff00::/8"}, {"240.0.0.0/4"},
	{"10.0.0.0/8", "192.168.1.0/24"}, {"10.1.2.3/32"}, {"172.16.0.0/12"},
	{"64:ff9b::/96"}, {"64:ff9b::/64"}, {"64:ff9b::a00:0/104"}, {"64:ff9b::a9fe:a9fe/128"}, {"64:ff9b::c633:6400/120"},
	{"64:ff9b:1::/48"}, {"64:ff9b:1::/64"}, {"64:ff9b:1::/96"}, {"64:ff9b:1:2::/96"}, {"64:ff9b:1::a9fe:a9fe/128"},
	{"64:ff9b:1::c633:6400/120"}, {"64:ff9b:1:1::/64"}, {"64:ff9b::/32"},
	{"2001:db8:64::/96"}, {"2001:db8:64::a9fe:a9fe/128"},
	{"::ffff:0:0/96"}, {"::ffff:169.254.169.254/128"}, {"::ffff:198.51.100.0/120"}, {"::/96"},
	{"2001::/32", "2002::/16"}, {"2000::/3"}, {"fd00:ec2::/32"},
	{"198.51.100.0/24"}, {"198.51.100.1/32", "2001:db8:ffff::1/128"},
}

// proxyGuardOwn are the gateway's own addresses, as the proxy knows them.
var proxyGuardOwn = []netip.Addr{netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("2001:db8:ffff::1")}

// proxyGuardPolicy is proxyGuardRules as a policy: rule gN on port 9000+N.
func proxyGuardPolicy() string {
	var b strings.Builder
	b.WriteString("version: 1\nmode: enforce\nrules:\n")
	for i, to := range proxyGuardRules {
		fmt.Fprintf(&b, "  - {name: g%d, to: [\"%s\"], ports: [%d/tcp]}\n", i, strings.Join(to, `", "`), 9000+i)
	}
	return b.String()
}

// proxyGuardAddrs are the destinations asked: destOpensAddrs, and more
// corners of the local-use /48 and of the NAT64 prefixes.
var proxyGuardAddrs = slices.Concat(destOpensAddrs, []string{
	"198.51.100.2", "2001:db8:ffff::1", "2001:db8:ffff::2", "::ffff:198.51.100.2", "::ffff:127.0.0.1",
	"::ffff:100.100.100.200", "::ffff:168.63.129.16", "::ffff:0.0.0.1", "::ffff:224.0.0.1", "::a9fe:a9fe", "::ffff:0:a9fe:a9fe",
	"64:ff9b::a9fe:1", "64:ff9b::6464:64c8", "64:ff9b::a83f:8110", "64:ff9b::ac10:1", "64:ff9b::c000:211", "64:ff9b::e000:1",
	"64:ff9b:0:1::1", "64:ff9b:1::7f00:1", "64:ff9b:1::ac10:1", "64:ff9b:1::6464:64c8", "64:ff9b:1::c000:211",
	"64:ff9b:1:2::a9fe:a9fe", "64:ff9b:1:2::c633:6401", "64:ff9b:1:2::c000:211", "64:ff9b:1:2:0:1::1", "64:ff9b:1:1::a9fe:a9fe",
	"64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "64:ff9b:2::1", "2001:db8:64::c633:6464", "2001:db8:64::7f00:1", "2001:db8:64::c000:211",
	"2001:db8:65::a9fe:a9fe", "2001:0:a9fe:a9fe::1", "2002:a9fe:a9fe::1", "fd00:ec2::253", "fe80::a9fe:a9fe",
})

// proxyOpens is the proxy's decision of a transparent TCP flow to in.Dest
// without a name (proxy/decide.go, decideAddr and selfDecision): the
// policy allows it, and the special-range guard the proxy calls
// (policy.Engine.GuardRefuses, under the gateway's own addresses own, no
// configured exception) does not refuse it.
func proxyOpens(eng *policy.Engine, in policy.Input, own []netip.Addr) bool {
	in.Proto = policy.TCP
	if !eng.Decide(in).Allowed() {
		return false
	}
	_, refused := eng.GuardRefuses(in, own, nil)
	return !refused
}

// TestProxyGuardMatchesForward: for every rule of proxyGuardPolicy, every
// destination of proxyGuardAddrs and NAT64 prefixes none, the well-known
// one, ones inside and outside the local-use /48, the proxy opens a TCP
// flow of the rule's port to the destination exactly when the rendered
// firewall's forward chain lets the same flow out by the rule's accept:
// the proxy must not open a guarded destination the firewall keeps
// closed (64:ff9b:1:1::1 under a 64:ff9b:1::/48 rule around a NAT64
// prefix 64:ff9b:1::/96), nor close one the rule opens there. The
// gateway's own addresses are no forward's (they are delivered to the
// gateway): the proxy opens one only by a rule naming exactly it.
func TestProxyGuardMatchesForward(t *testing.T) {
	base := compile(t, proxyGuardPolicy())
	cfg := siteConfig
	cfg.TCPPorts = []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}, {Lo: 443, Hi: 443, Proto: policy.TCP}}
	client4, client6 := netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("2001:db8:1::100")
	for _, nat := range []string{"", "64:ff9b::/96", "64:ff9b:1::/96", "64:ff9b:1:2::/96", "2001:db8:64::/96", "64:ff9b::/96,64:ff9b:1::/96"} {
		ps, err := policy.ParseNAT64(nat)
		if err != nil {
			t.Fatal(err)
		}
		eng := base.WithNAT64(ps)
		rs, err := Render(cfg, eng)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range eng.Rules() {
			to := proxyGuardRules[i]
			ports := forwardedPorts(cfg, r)
			if len(ports) != 1 {
				t.Fatalf("rule %s forwards %v", r.Name, ports)
			}
			pr := ports[0]
			for _, s := range proxyGuardAddrs {
				a := netip.MustParseAddr(s)
				client := client4
				if a.Is6() && !a.Is4In6() {
					client = client6
				}
				// The transparent proxy reads the destination unmapped
				// (proxy/transparent.go); the explicit one may be asked
				// for a mapped form, which it opens no wider.
				got := proxyOpens(eng, policy.Input{Client: client, Dest: a.Unmap(), Port: pr.Lo}, proxyGuardOwn)
				if a.Is4In6() {
					if mapped := proxyOpens(eng, policy.Input{Client: client, Dest: a, Port: pr.Lo}, proxyGuardOwn); mapped && !got {
						t.Errorf("nat64 %q: rule %s %v: the proxy opens %s, not %s", nat, r.Name, to, a, a.Unmap())
					}
				}
				var want bool
				if self, ok := selfAddr(eng, a); ok {
					// The gateway itself: never forwarded (the antispoof
					// chain drops loopback from the LAN), opened by the
					// proxy only by a rule naming it from inside: an own
					// address exactly, loopback inside 127.0.0.0/8.
					want = slices.ContainsFunc(r.To, func(t policy.Target) bool {
						if t.Kind != policy.TargetPrefix || !t.Prefix.Contains(self) {
							return false
						}
						if self.IsLoopback() {
							return t.Prefix.Bits() >= 8
						}
						return t.Prefix.Bits() == self.BitLen()
					})
				} else {
					var ok bool
					if want, ok = opensByRule(rs, r, a, pr); !ok {
						t.Fatalf("rule %s has no client for %s", r.Name, a)
					}
				}
				if got != want {
					t.Errorf("nat64 %q: rule %s %v, %s: the proxy opens %v, want %v", nat, r.Name, to, a, got, want)
				}
			}
		}
	}
}

// selfAddr returns the address of the gateway itself that a reaches, if
// any: a loopback address or one of proxyGuardOwn, IPv4-mapped or inside
// one of eng's NAT64 prefixes (a translator reaches the IPv4 address it
// embeds).
func selfAddr(eng *policy.Engine, a netip.Addr) (netip.Addr, bool) {
	a = a.Unmap()
	if v4, _, ok := policy.NAT64Embedded(eng.NAT64(), a); ok && slices.Contains(proxyGuardOwn, v4) {
		return v4, true
	}
	return a, (a.Is4() && a.IsLoopback()) || slices.Contains(proxyGuardOwn, a)
}
