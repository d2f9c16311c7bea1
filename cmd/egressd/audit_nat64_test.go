package main

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// writeUDPPcap writes an Ethernet pcap holding one UDP datagram from
// client to each of dests, on port ports[i], from client port 41000+i
// (IPv4 where the client's address is).
func writeUDPPcap(t *testing.T, client netip.Addr, dests []netip.Addr, ports []uint16) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "udp.pcap")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := pcapgo.NewWriter(f)
	if err := w.WriteFileHeader(65536, layers.LinkTypeEthernet); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	for i, dst := range dests {
		var ip gopacket.NetworkLayer = &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: client.AsSlice(), DstIP: dst.AsSlice()}
		etype := layers.EthernetTypeIPv6
		if client.Is4() {
			ip, etype = &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: client.AsSlice(), DstIP: dst.AsSlice()}, layers.EthernetTypeIPv4
		}
		eth := &layers.Ethernet{SrcMAC: []byte{2, 0, 0, 0, 0, 1}, DstMAC: []byte{2, 0, 0, 0, 0, 2}, EthernetType: etype}
		udp := &layers.UDP{SrcPort: layers.UDPPort(41000 + i), DstPort: layers.UDPPort(ports[i])}
		udp.SetNetworkLayerForChecksum(ip)
		buf := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip.(gopacket.SerializableLayer), udp, gopacket.Payload("hello")); err != nil {
			t.Fatal(err)
		}
		at = at.Add(time.Millisecond)
		if err := w.WritePacket(gopacket.CaptureInfo{Timestamp: at, CaptureLength: len(buf.Bytes()), Length: len(buf.Bytes())}, buf.Bytes()); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestAuditNAT64: the offline audit takes --nat64-prefix as egressd run
// does, so a capture from an IPv6-only site behind a network-specific
// NAT64 prefix is judged as the live gateway judges it: an IPv4 CIDR rule
// allows the NAT64 form of its range, and the NAT64 form of
// 169.254.169.254, which "*" opens as an ordinary IPv6 address without the
// flag, is special-range. A prefix run refuses is a usage error here too.
func TestAuditNAT64(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	src := "version: 1\nmode: audit\nrules:\n  - name: apple\n    to: [17.0.0.0/8]\n    ports: [5223/udp]\n  - name: any\n    to: [\"*\"]\n    ports: [5000/udp]\n"
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	apple := netip.MustParseAddr("2001:db8:64::1100:1") // 17.0.0.1
	meta := netip.MustParseAddr("2001:db8:64::a9fe:a9fe")
	pcap := writeUDPPcap(t, netip.MustParseAddr("2001:db8::50"), []netip.Addr{apple, meta}, []uint16{5223, 5000})
	type report struct {
		Rules []struct {
			Name  string `json:"name"`
			Flows int    `json:"flows"`
		} `json:"rules"`
		Dropped []struct {
			IP     string `json:"ip"`
			Port   uint16 `json:"port"`
			Reason string `json:"reason"`
		} `json:"dropped"`
	}
	for _, tc := range []struct {
		args     []string
		allowed  string // the rule with the one allowed flow
		dropped  netip.Addr
		dropPort uint16
		reason   string
	}{
		{nil, "any", apple, 5223, "no-rule"},
		{[]string{"--nat64-prefix", "2001:db8:64::/96"}, "apple", meta, 5000, "special-range"},
	} {
		code, out, stderr := runCLI(t, append([]string{"audit", "--policy", pol, pcap, "--json", "--no-progress"}, tc.args...)...)
		if code != exitOK {
			t.Fatalf("%v: exit %d: %s", tc.args, code, stderr)
		}
		var rep report
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("%v: report JSON: %v\n%s", tc.args, err, out)
		}
		flows := map[string]int{}
		for _, r := range rep.Rules {
			flows[r.Name] = r.Flows
		}
		if flows[tc.allowed] != 1 || flows["any"]+flows["apple"] != 1 {
			t.Errorf("%v: rules' flows %v, want one under %s", tc.args, flows, tc.allowed)
		}
		if len(rep.Dropped) != 1 || rep.Dropped[0].IP != tc.dropped.String() || rep.Dropped[0].Port != tc.dropPort || rep.Dropped[0].Reason != tc.reason {
			t.Errorf("%v: dropped %+v, want %s port %d (%s)", tc.args, rep.Dropped, tc.dropped, tc.dropPort, tc.reason)
		}
	}
	// A replay too: a flow recorded without the prefix (no-rule) is
	// allowed by the IPv4 CIDR rule under it.
	events := filepath.Join(dir, "events.ndjson")
	line := `{"kind":"flow","source":"capture","time":"2026-12-06T10:00:00Z","client":"2001:db8::50","client_port":41000,"dest_ip":"2001:db8:64::1100:1","dest_port":5223,"proto":"udp","verdict":"deny","mode":"audit","reason":"no-rule"}` + "\n"
	if err := os.WriteFile(events, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, withNAT := range []bool{false, true} {
		args := []string{"audit", "--policy", pol, "--replay", events, "--json"}
		if withNAT {
			args = append(args, "--nat64-prefix", "2001:db8:64::/96")
		}
		code, out, stderr := runCLI(t, args...)
		var res struct {
			Flows        int `json:"flows"`
			NewlyAllowed []struct {
				NewRule string `json:"new_rule"`
			} `json:"newly_allowed"`
		}
		if code != exitOK || json.Unmarshal([]byte(out), &res) != nil || res.Flows != 1 {
			t.Fatalf("replay (nat64 %v): exit %d: %s%s", withNAT, code, out, stderr)
		}
		if got := len(res.NewlyAllowed) == 1 && res.NewlyAllowed[0].NewRule == "apple"; got != withNAT {
			t.Errorf("replay (nat64 %v): newly allowed %+v", withNAT, res.NewlyAllowed)
		}
	}
	// run's validation: a /64 is refused, and said so as run says it.
	code, _, stderr := runCLI(t, "audit", "--policy", pol, pcap, "--nat64-prefix", "2001:db8:64::/64")
	if code != exitUsage || !strings.Contains(stderr, "--nat64-prefix") || !strings.Contains(stderr, "only /96 prefixes are supported") {
		t.Errorf("a /64: exit %d: %s", code, stderr)
	}
}

// TestAuditReplayNAT64Guard: a replay under --nat64-prefix judges a
// recorded flow to metadata's NAT64 form as egressd run with the prefix
// does: the special-range guard refuses it though "*" allows it (the
// firewall's guarded sets and the proxy hold the NAT64 forms of the
// guarded ranges), so a gateway that recorded it allowed without the
// prefix shows it newly dropped. Without the flag nothing changes.
func TestAuditReplayNAT64Guard(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	src := "version: 1\nmode: audit\nrules:\n  - name: any\n    to: [\"*\"]\n    ports: [5000/udp, 443/tcp]\n"
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	events := filepath.Join(dir, "events.ndjson")
	lines := `{"kind":"flow","source":"capture","time":"2026-12-06T10:00:00Z","client":"2001:db8::50","client_port":41000,"dest_ip":"2001:db8:64::a9fe:a9fe","dest_port":5000,"proto":"udp","verdict":"allow","mode":"audit","rule":"any","reason":"allowed"}` + "\n" +
		`{"kind":"flow","source":"proxy","time":"2026-12-06T10:00:01Z","client":"2001:db8::50","client_port":41001,"dest_ip":"2001:db8:64::a9fe:a9fe","dest_port":443,"proto":"tcp","verdict":"allow","mode":"audit","rule":"any","reason":"allowed"}` + "\n"
	if err := os.WriteFile(events, []byte(lines), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, withNAT := range []bool{false, true} {
		args := []string{"audit", "--policy", pol, "--replay", events, "--json"}
		if withNAT {
			args = append(args, "--nat64-prefix", "2001:db8:64::/96")
		}
		code, out, stderr := runCLI(t, args...)
		var res struct {
			Flows        int `json:"flows"`
			Unchanged    int `json:"unchanged"`
			NewlyDropped []struct {
				Port      uint16 `json:"port"`
				Flows     int    `json:"flows"`
				NewReason string `json:"new_reason"`
			} `json:"newly_dropped"`
		}
		if code != exitOK || json.Unmarshal([]byte(out), &res) != nil || res.Flows != 2 {
			t.Fatalf("replay (nat64 %v): exit %d: %s%s", withNAT, code, out, stderr)
		}
		dropped := 0
		for _, d := range res.NewlyDropped {
			if d.NewReason == "special-range" {
				dropped += d.Flows
			}
		}
		if want := map[bool]int{false: 0, true: 2}[withNAT]; dropped != want || res.Unchanged != 2-want {
			t.Errorf("replay (nat64 %v): %d flows newly dropped as special-range, %d unchanged; want %d and %d\n%s", withNAT, dropped, res.Unchanged, want, 2-want, out)
		}
	}
}
