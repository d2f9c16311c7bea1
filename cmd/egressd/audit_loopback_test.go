package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// loopbackNamedPolicy names the gateway's loopback (127.0.0.1/32) on TCP
// and UDP, and 0.0.0.0/0 on other ports; ntp is an ordinary rule.
const loopbackNamedPolicy = `version: 1
mode: audit
rules:
  - name: x-loop
    to: ["127.0.0.1/32"]
    ports: [9902/tcp, 7780/udp]
  - name: x-wide
    to: ["0.0.0.0/0"]
    ports: [7777/udp]
  - name: ntp
    to: ["198.51.100.200/30"]
    ports: [123/udp]
`

// TestAuditLoopbackNamed: audit predicts enforce for what a LAN host sends
// to the gateway's loopback under a rule naming 127.0.0.1/32: enforce
// mode's antispoof chain drops every packet from the LAN to 127.0.0.0/8,
// TCP, UDP and ICMP, whatever the rules (policy explain says DENY
// special-range), so an offline audit of a capture and audit --replay
// report such a flow dropped, special-range, not allowed by the rule (live
// capture records it loopback-destination, its guard). Before session 32
// both allowed it under x-loop.
func TestAuditLoopbackNamed(t *testing.T) {
	pol := writePolicy(t, loopbackNamedPolicy)
	cli := netip.MustParseAddr("192.0.2.50")
	loop := netip.MustParseAddr("127.0.0.1")
	udp := writeUDPPcap(t, cli, []netip.Addr{loop, loop, netip.MustParseAddr("198.51.100.201")}, []uint16{7780, 7777, 123})
	tcp := writeTCPPcap(t, []tcpExchange{{cli: cli, srv: loop, cport: 43000, sport: 9902, data: "GET / HTTP/1.0\r\n\r\n"}})
	for _, c := range []struct {
		pcap    string
		dropped []string // "port reason" of each drop, all to 127.0.0.1
	}{
		{udp, []string{"7777 special-range", "7780 special-range"}},
		{tcp, []string{"9902 special-range"}},
	} {
		rep := runAuditJSON(t, "--policy", pol, c.pcap)
		var got []string
		for _, d := range rep.Dropped {
			if d.IP != loop.String() {
				t.Errorf("dropped %+v, want only 127.0.0.1's flows", d)
			}
			got = append(got, fmt.Sprintf("%d %s", d.Port, d.Reason))
		}
		slices.Sort(got)
		flows := map[string]int{}
		for _, r := range rep.Rules {
			flows[r.Name] = r.Flows
		}
		if !slices.Equal(got, c.dropped) || flows["x-loop"] != 0 || flows["x-wide"] != 0 || c.pcap == udp && flows["ntp"] != 1 {
			t.Errorf("%s: dropped %q, rules' flows %v; want dropped %q, none under x-loop or x-wide", filepath.Base(c.pcap), got, flows, c.dropped)
		}
	}

	// A replay of flows recorded without x-loop: loopback stays dropped,
	// the ntp flow is newly allowed.
	events := filepath.Join(t.TempDir(), "events.ndjson")
	var lines string
	for i, f := range []struct {
		dst   string
		port  int
		proto string
	}{{"127.0.0.1", 7780, "udp"}, {"127.0.0.1", 9902, "tcp"}, {"198.51.100.201", 123, "udp"}} {
		lines += fmt.Sprintf(`{"kind":"flow","source":"capture","time":"2026-12-06T10:00:0%dZ","client":"192.0.2.50","client_port":%d,"dest_ip":%q,"dest_port":%d,"proto":%q,"verdict":"deny","mode":"audit","reason":"no-rule"}`+"\n",
			i, 41000+i, f.dst, f.port, f.proto)
	}
	if err := os.WriteFile(events, []byte(lines), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := runCLI(t, "audit", "--policy", pol, "--replay", events, "--json")
	var res struct {
		Flows        int `json:"flows"`
		NewlyAllowed []struct {
			IP      string `json:"ip"`
			NewRule string `json:"new_rule"`
		} `json:"newly_allowed"`
	}
	if code != exitOK || json.Unmarshal([]byte(out), &res) != nil || res.Flows != 3 {
		t.Fatalf("replay: exit %d: %s%s", code, out, stderr)
	}
	if len(res.NewlyAllowed) != 1 || res.NewlyAllowed[0].NewRule != "ntp" {
		t.Errorf("replay: newly allowed %+v, want only the ntp flow (x-loop opens no loopback from the LAN)\n%s", res.NewlyAllowed, out)
	}
}
