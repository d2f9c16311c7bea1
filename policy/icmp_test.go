package policy

import (
	"net/netip"
	"strings"
	"testing"
)

const icmpPolicy = `version: 1
mode: enforce
rules:
  - name: web
    to: ["*"]
    ports: [any]
  - name: monitoring
    from: [192.168.1.0/24]
    to: [198.51.100.0/24, status.vendor.example, "2001:db8:1::/48"]
    ports: [icmp]
  - name: both
    to: [203.0.113.9]
    ports: [icmp, 443/tcp]
`

// TestParseICMP: "icmp" in ports is ICMP echo (both families), apart from
// "any", which stays TCP and UDP.
func TestParseICMP(t *testing.T) {
	e := mustCompile(t, icmpPolicy)
	rules := e.Rules()
	if got := rules[0].Ports; len(got) != 2 || got[0].Proto != TCP || got[1].Proto != UDP {
		t.Errorf("any = %v, want tcp and udp only", got)
	}
	if got := rules[1].Ports; len(got) != 1 || got[0] != (PortRange{Proto: ICMP}) || got[0].String() != "icmp" {
		t.Errorf("icmp = %v", got)
	}
	if got := rules[2].Ports; len(got) != 2 || got[0].Proto != ICMP || got[1].Proto != TCP {
		t.Errorf("icmp, 443/tcp = %v", got)
	}
	for _, tc := range []struct{ ports, want string }{
		{"icmp/tcp", `"icmp/tcp": icmp takes no protocol`},
		{"7/icmp", `"7/icmp": icmp takes no port`},
		{"any/icmp", `"any/icmp": icmp takes no port`},
		{"icmpv6", `protocol`},
		{"1/ipv6-icmp", `is not tcp or udp`},
	} {
		src := "version: 1\nrules:\n  - name: a\n    to: [198.51.100.1]\n    ports: [" + tc.ports + "]\n"
		_, err := Parse("p.yaml", []byte(src))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ports [%s]: err %v, want it to say %q", tc.ports, err, tc.want)
		}
	}
	// A rule's ports: message lists icmp.
	_, err := Parse("p.yaml", []byte("version: 1\nrules:\n  - name: a\n    to: [198.51.100.1]\n    ports: [443]\n"))
	if err == nil || !strings.Contains(err.Error(), "icmp") {
		t.Errorf("ports [443]: %v, want the expected forms to include icmp", err)
	}
}

// TestDecideICMP: the protocol ICMP (port 0) matches only rules that list
// icmp; "*" with any does not open it.
func TestDecideICMP(t *testing.T) {
	e := mustCompile(t, icmpPolicy)
	client := netip.MustParseAddr("192.168.1.5")
	other := netip.MustParseAddr("192.168.2.5")
	for _, tc := range []struct {
		in     Input
		rule   string
		reason string
	}{
		{Input{Client: client, Dest: netip.MustParseAddr("198.51.100.7"), Proto: ICMP}, "monitoring", ReasonAllowed},
		{Input{Client: client, Dest: netip.MustParseAddr("2001:db8:1::7"), Proto: ICMP}, "monitoring", ReasonAllowed},
		{Input{Client: client, Dest: netip.MustParseAddr("192.0.2.1"), Name: "status.vendor.example", Proto: ICMP}, "monitoring", ReasonAllowed},
		{Input{Client: other, Dest: netip.MustParseAddr("198.51.100.7"), Proto: ICMP}, "", ReasonClient},
		{Input{Client: other, Dest: netip.MustParseAddr("203.0.113.9"), Proto: ICMP}, "both", ReasonAllowed},
		// "*" on any: TCP and UDP, not ICMP.
		{Input{Client: client, Dest: netip.MustParseAddr("192.0.2.1"), Proto: ICMP}, "", ReasonNoRule},
		// An icmp rule opens no port.
		{Input{Client: client, Dest: netip.MustParseAddr("198.51.100.7"), Port: 443, Proto: TCP}, "web", ReasonAllowed},
		{Input{Client: client, Dest: netip.MustParseAddr("2001:db8:1::7"), Port: 0, Proto: UDP}, "", ReasonPort},
	} {
		d := e.Decide(tc.in)
		if d.Rule != tc.rule || d.Reason != tc.reason {
			t.Errorf("Decide(%+v) = %s %s %s, want %s %s", tc.in, d.Verdict, d.Rule, d.Reason, tc.rule, tc.reason)
		}
	}
}

// TestDecideICMPManyPorts: icmp beyond the two ports a rule check holds
// inline is found in the extra ports too.
func TestDecideICMPManyPorts(t *testing.T) {
	e := mustCompile(t, "version: 1\nrules:\n  - name: r\n    to: [198.51.100.0/24]\n    ports: [80/tcp, 443/tcp, 123/udp, icmp]\n")
	d := e.Decide(Input{Dest: netip.MustParseAddr("198.51.100.1"), Proto: ICMP})
	if !d.Allowed() {
		t.Errorf("icmp as the fourth port: %+v", d)
	}
	d = e.Decide(Input{Dest: netip.MustParseAddr("198.51.100.1"), Port: 0, Proto: TCP})
	if d.Allowed() {
		t.Errorf("TCP port 0 allowed: %+v", d)
	}
}

// TestWarnPathRuleOnICMP: a host/path target cannot be checked on ICMP
// echo; the warning says the whole host is opened to ping.
func TestWarnPathRuleOnICMP(t *testing.T) {
	e := mustCompile(t, `rules:
  - {name: ping, to: ["status.example.com/health"], ports: [443/tcp, icmp]}
  - {name: plain, to: [example.org], ports: [icmp]}
`)
	var got []string
	for _, w := range e.Warnings() {
		if contains(w.Msg, "ICMP") {
			got = append(got, w.Msg)
		}
	}
	if len(got) != 1 || !contains(got[0], "rule ping") || !contains(got[0], "status.example.com") {
		t.Errorf("ICMP warnings %q, want one for rule ping", got)
	}
}
