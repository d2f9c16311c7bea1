package main

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/dnsfilter"
	"egressd/firewall"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestFirewallGateOtherPolicy: the forwarder's answers reach the firewall
// with the policy they were decided under. One decided under a policy
// that is not installed (a reload that nftables then refused widened the
// rule to evil.test) does not open the installed rule's set to its
// address; one the installed rule covers still does.
func TestFirewallGateOtherPolicy(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.New(t, "gate")
	const src = "version: 1\nmode: enforce\nrules:\n  - {name: ntp, to: [ntp.test], ports: [123/udp]}\n"
	running, err := policy.Compile("p.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	refused, err := policy.Compile("p.yaml", []byte(strings.Replace(src, "[ntp.test]", "[ntp.test, evil.test]", 1)))
	if err != nil {
		t.Fatal(err)
	}
	fw, err := firewall.New(firewall.Config{NetNS: "/var/run/netns/" + ns.Name, LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: 3129, DNSPort: 53}, firewall.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Install(running); err != nil {
		t.Fatal(err)
	}
	g := &firewallGate{}
	g.fw.Store(fw)
	client := netip.MustParseAddr("198.18.1.2")
	exp := time.Now().Add(time.Minute)
	err = g.Learn(context.Background(), refused, []dnsfilter.Learned{{Client: client, Name: "evil.test", Addr: netip.MustParseAddr("203.0.113.66"), Rule: "ntp", Expires: exp}})
	if !errors.Is(err, firewall.ErrNotCovered) {
		t.Errorf("evil.test under the refused policy: %v, want ErrNotCovered", err)
	}
	if err := g.Learn(context.Background(), refused, []dnsfilter.Learned{{Client: client, Name: "ntp.test", Addr: netip.MustParseAddr("203.0.113.67"), Rule: "ntp", Expires: exp}}); err != nil {
		t.Fatal(err)
	}
	out := ns.MustRun("nft", "list", "set", "inet", "egressd", "dns4_ntp")
	if strings.Contains(out, "203.0.113.66") || !strings.Contains(out, "203.0.113.67") {
		t.Errorf("set after the answers: want 203.0.113.67 only\n%s", out)
	}
}
