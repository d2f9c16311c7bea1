package firewall

import (
	"net/netip"
	"slices"
	"testing"

	"egressd/policy"
)

// destOpensPolicy has name rules that open addresses by "*", a /0, wide
// prefixes, prefixes inside, across and holding guarded ranges (NAT64
// ones too), on UDP, TCP the proxy leaves to forward, ICMP echo and every
// port, from any client, a client prefix or a MAC.
const destOpensPolicy = `
version: 1
mode: enforce
rules:
  - {name: cidr, to: [n.test, 192.0.2.16/30, "2001:db8::/64"], ports: [123/udp]}
  - {name: star, to: ["*", n.test], ports: [123/udp]}
  - {name: zero4, to: [n.test, 0.0.0.0/0], ports: [123/udp]}
  - {name: zero6, to: [n.test, "::/0"], ports: [123/udp]}
  - {name: wide, to: [n.test, 0.0.0.0/1, "::/1"], ports: [123/udp]}
  - {name: meta, to: [n.test, 169.254.169.254/32, "fd00:ec2::254/128"], ports: [123/udp]}
  - {name: over, to: [n.test, 169.0.0.0/8, 100.0.0.0/8], ports: [123/udp]}
  - {name: cgnat, to: [n.test, 100.64.0.0/10, 127.0.0.1/32], ports: [123/udp]}
  - {name: priv, to: [n.test, 10.0.0.0/8, 192.168.1.0/24], ports: [123/udp]}
  - {name: wkp, to: [n.test, "64:ff9b::/96"], ports: [123/udp]}
  - {name: wkp104, to: [n.test, "64:ff9b::a00:0/104"], ports: [123/udp]}
  - {name: local48, to: [n.test, "64:ff9b:1::/48"], ports: [123/udp]}
  - {name: local64, to: [n.test, "64:ff9b:1::/64"], ports: [123/udp]}
  - {name: local96, to: [n.test, "64:ff9b:1::/96"], ports: [123/udp]}
  - {name: mapped, to: [n.test, "::ffff:0:0/96"], ports: [123/udp]}
  - {name: teredo, to: [n.test, "2001::/32", "2002::/16"], ports: [123/udp]}
  - {name: mac, from: ["aa:bb:cc:dd:ee:ff"], to: [n.test, 198.51.100.0/24], ports: [123/udp]}
  - {name: src, from: [198.18.0.0/24, "2001:db8:5::/48"], to: [n.test, 198.51.100.0/25, "2001:db8::/32"], ports: [123/udp]}
  - {name: tcp, to: [n.test, 203.0.113.0/24], ports: [8443/tcp]}
  - {name: echo, to: [n.test, 203.0.113.0/25], ports: [icmp]}
  - {name: all, to: [n.test, 198.51.100.128/25], ports: [any]}
`

// destOpensAddrs are the destinations asked: ordinary ones, one of each
// guarded range, IPv4-mapped ones, the NAT64 prefixes' corners.
var destOpensAddrs = []string{
	"192.0.2.17", "192.0.2.20", "198.51.100.1", "198.51.100.200", "203.0.113.9", "203.0.113.200",
	"169.254.169.254", "169.254.170.2", "169.1.1.1", "100.100.100.200", "100.1.1.1", "127.0.0.1",
	"10.1.2.3", "192.168.1.1", "168.63.129.16", "224.0.0.1", "0.0.0.1", "255.255.255.255",
	"2001:db8::1", "2001:db8:1::1", "2001:db8:5::1", "fe80::1", "::1", "::", "fd00:ec2::254", "ff02::1",
	"2002::1", "2001::1", "8000::1",
	"::ffff:198.51.100.1", "::ffff:169.254.169.254", "::ffff:10.1.2.3",
	"64:ff9b::1:2", "64:ff9b::a01:203", "64:ff9b::c633:6401", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1",
	"64:ff9b:1::c633:6401", "64:ff9b:1::a01:203", "64:ff9b:1::a9fe:a9fe",
	"64:ff9b:1:1::1", "64:ff9b:1:0:1::1", "64:ff9b:1::1:0:0:1", "64:ff9b:1:ffff::1",
	"2001:db8:64::c633:6401", "2001:db8:64::a9fe:a9fe", "2001:db8:64::a01:203", "2001:db8:64::1:0:1",
}

// opensByRule evaluates the forward chain of rs for a new packet of
// policy rule r to dst on port range pr (its first port) from a client r
// admits: whether one of r's own accept rules, its learned sets empty,
// lets it out, and the antispoof chain does not drop it first. A packet
// to an IPv4-mapped address leaves as IPv4 (a dual-stack socket's), so
// dst is unmapped. ok is false when r has no client of dst's family.
func opensByRule(rs *Ruleset, r policy.Rule, dst netip.Addr, pr policy.PortRange) (opens, ok bool) {
	dst = dst.Unmap()
	inSet := func(name string, a netip.Addr) bool {
		s := rs.Set(name)
		if s == nil || !a.IsValid() || s.Kind != SetPrefixes {
			return false // a learned set: empty
		}
		for _, x := range mergePrefixes(s.Prefixes) {
			if x.lo.Compare(a) <= 0 && a.Compare(x.hi) <= 0 {
				return true
			}
		}
		return false
	}
	fam := IPv4
	if dst.Is6() {
		fam = IPv6
	}
	var client netip.Addr
	for _, p := range r.From.Prefixes {
		if p.Addr().Is6() == dst.Is6() {
			client = p.Addr()
			break
		}
	}
	mac := len(r.From.MACs) > 0
	if !r.From.Any() && !client.IsValid() && !mac {
		return false, false
	}
	for _, c := range rs.Chains {
		if c.Name != chainAntispoof {
			continue
		}
		for _, ru := range c.Rules {
			if ru.DstSet != "" && ru.Verdict.Kind == Drop && (ru.Family == FamilyAny || ru.Family == fam) && inSet(ru.DstSet, dst) {
				return false, true
			}
		}
	}
	for _, c := range rs.Chains {
		if c.Name != chainForward {
			continue
		}
		for _, ru := range c.Rules {
			switch {
			case ru.Comment != "rule "+r.Name || ru.Verdict.Kind != Accept:
				continue
			case ru.Family != FamilyAny && ru.Family != fam:
				continue
			case pr.Proto == policy.ICMP && !ru.Echo:
				continue
			case pr.Proto != policy.ICMP && ru.Proto != pr.Proto:
				continue
			case ru.Ports.Lo != 0 && (pr.Lo < ru.Ports.Lo || pr.Lo > ru.Ports.Hi):
				continue
			case ru.SrcSet != "" && !inSet(ru.SrcSet, client):
				continue
			case ru.SrcMACSet != "" && !mac:
				continue
			case ru.DstSet != "" && !inSet(ru.DstSet, dst):
				continue
			case ru.DstNotSet != "" && inSet(ru.DstNotSet, dst):
				continue
			}
			return true, true
		}
	}
	return false, true
}

// TestDestOpensMatchesForward: for every rule of destOpensPolicy (each
// has names: learned sets, but for the families "*" or a /0 opens), every destination of destOpensAddrs and every forwarded
// port range of the rule, policy.Engine.DestOpens says the rule opens the
// destination exactly when the rendered firewall's accept rules of that
// rule (its learned sets empty) let a client of the rule out to it: a full
// learned set's refusal says it keeps the client out of nothing
// (SetFullError.Opened, DestOpens of the installed policy), and the DNS
// forwarder keeps the address in an answer, only where the firewall lets
// the client reach it all the same. With no
// NAT64 prefix, the well-known one, one inside the local-use /48, and one
// outside the guarded ranges.
func TestDestOpensMatchesForward(t *testing.T) {
	base := compile(t, destOpensPolicy)
	cfg := siteConfig
	cfg.TCPPorts = []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}, {Lo: 443, Hi: 443, Proto: policy.TCP}}
	for _, nat := range []string{"", "64:ff9b::/96", "64:ff9b:1::/96", "2001:db8:64::/96"} {
		var ps []netip.Prefix
		if nat != "" {
			ps = []netip.Prefix{netip.MustParsePrefix(nat)}
		}
		eng := base.WithNAT64(ps)
		rs, err := Render(cfg, eng)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range eng.Rules() {
			ports := forwardedPorts(cfg, r)
			if len(ports) == 0 {
				t.Fatalf("rule %s forwards nothing", r.Name)
			}
			for _, s := range destOpensAddrs {
				a := netip.MustParseAddr(s)
				got := eng.DestOpens(i, a)
				for _, pr := range ports {
					want, ok := opensByRule(rs, r, a, pr)
					if ok && got != want {
						t.Errorf("nat64 %q: rule %s, %s (%v): DestOpens %v, the firewall's accept %v", nat, r.Name, a, pr, got, want)
					}
				}
			}
		}
	}
	if !slices.ContainsFunc(base.Rules(), func(r policy.Rule) bool { return len(r.From.MACs) > 0 }) {
		t.Fatal("no MAC rule")
	}
}
