package firewall

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"egressd/internal/fakemac"
	"egressd/policy"
)

var (
	kioskMAC    = net.HardwareAddr{0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff}
	kioskClient = netip.MustParseAddr("198.18.1.2")
	otherClient = netip.MustParseAddr("198.18.1.3")
)

// macNamesPolicy's UDP rule names its clients by MAC and its
// destinations by name: its learned sets take what the forwarder gave
// the kiosk.
const macNamesPolicy = `version: 1
mode: enforce
groups:
  kiosks: ["aa:bb:cc:dd:ee:ff"]
rules:
  - name: udp-name
    from: [kiosks]
    to: [ntp.test]
    ports: [9000/udp]
`

// TestSeedMACs: seeding a rule whose clients are given by MAC takes the
// answers the forwarder gave a client with that MAC (Deps.MACs, asked
// once per client, outside the lock), not another client's; a policy
// that names no MAC asks nothing.
func TestSeedMACs(t *testing.T) {
	eng := compile(t, macNamesPolicy)
	rs, err := render(Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: proxyPort, DNSPort: dnsPort}, eng, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	want := rs.seedRules(nil)
	given := []Given{
		{Client: kioskClient, Name: "ntp.test", Addr: netip.MustParseAddr("203.0.113.1"), Until: now.Add(time.Hour)},
		{Client: kioskClient, Name: "ntp.test", Addr: netip.MustParseAddr("203.0.113.2"), Until: now.Add(time.Hour)},
		{Client: otherClient, Name: "ntp.test", Addr: netip.MustParseAddr("203.0.113.3"), Until: now.Add(time.Hour)},
	}
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{kioskClient: kioskMAC})
	f := &Firewall{macs: macs}
	seq := func(yield func(netip.Addr) bool) {
		for _, g := range given {
			if !yield(g.Client) {
				return
			}
		}
	}
	if m := f.macsOf(compile(t, testPolicy), seq); m != nil || macs.Asked() != 0 {
		t.Errorf("a policy without MACs: macsOf %v, %d questions", m, macs.Asked())
	}
	m := f.macsOf(eng, seq)
	if macs.Asked() != 2 || m[kioskClient].String() != kioskMAC.String() || m[otherClient] != nil {
		t.Errorf("macsOf %v after %d questions; want the kiosk's MAC, none for the other, 2 questions", m, macs.Asked())
	}
	out, res := rs.seedsFrom(eng, want, given, m, nil, 100, now)
	set := out["dns4_udp-name"]
	if res.seeded != 2 || len(set) != 2 || !hasAddr(set, "203.0.113.1") || !hasAddr(set, "203.0.113.2") {
		t.Errorf("seeded %d: %v; want the kiosk's two addresses", res.seeded, set)
	}
	if out, res := rs.seedsFrom(eng, want, given, nil, nil, 100, now); res.seeded != 0 {
		t.Errorf("without MACs: seeded %v", out)
	}
}

func hasAddr(m map[netip.Addr]time.Time, a string) bool {
	_, ok := m[netip.MustParseAddr(a)]
	return ok
}

// TestCoveredByMAC: an answer decided under another policy than the
// installed one goes into the installed rule's set when that rule lets
// the client resolve the name with the MAC it was decided with.
func TestCoveredByMAC(t *testing.T) {
	eng := compile(t, macNamesPolicy)
	a := Address{Rule: "udp-name", Addr: netip.MustParseAddr("203.0.113.1"), Client: kioskClient, Name: "ntp.test"}
	if coveredBy(eng, a, time.Now()) {
		t.Error("covered without the client's MAC")
	}
	a.ClientMAC = kioskMAC
	if !coveredBy(eng, a, time.Now()) {
		t.Error("not covered with the client's MAC")
	}
}

// TestKeepsMAC: a reload decides a connection again with its client's
// MAC (the sweep asks it: conntrack holds none): a rule now naming that
// MAC keeps it, another MAC or none does not.
func TestKeepsMAC(t *testing.T) {
	old := renderEnforce(t, `  - {name: net, to: [198.51.100.0/24], ports: [9/udp]}`+"\n")
	rs := renderEnforce(t, `  - {name: kiosk, from: ["aa:bb:cc:dd:ee:ff"], to: [198.51.100.0/24], ports: [9/udp]}`+"\n")
	noLive := func(string, netip.Addr) bool { return false }
	for _, c := range []struct {
		name string
		mac  net.HardwareAddr
		want bool
	}{{"the kiosk's MAC", kioskMAC, true}, {"another MAC", net.HardwareAddr{2, 0, 0, 0, 0, 1}, false}, {"no MAC", nil, false}} {
		k := flowKey{client: kioskClient, dst: netip.MustParseAddr("198.51.100.9"), port: 9, proto: policy.UDP, mac: c.mac}
		if got, _ := rs.keeps([]*Ruleset{old, rs}, defaultMark(old.flows[0].tag), k, noLive); got != c.want {
			t.Errorf("%s: keeps = %v, want %v", c.name, got, c.want)
		}
	}
}
