package main

import (
	"encoding/json"
	"fmt"
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

// tcpExchange is one TCP connection of writeTCPPcap: a handshake, the
// client's data, one byte back, and both FINs.
type tcpExchange struct {
	cli, srv     netip.Addr
	cport, sport uint16
	data         string
}

// writeTCPPcap writes an Ethernet pcap holding each of conns, one after
// another (IPv6 where the client's address is).
func writeTCPPcap(t *testing.T, conns []tcpExchange) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tcp.pcap")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := pcapgo.NewWriter(f)
	if err := w.WriteFileHeader(65536, layers.LinkTypeEthernet); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	cmac, smac := []byte{2, 0, 0, 0, 0, 1}, []byte{2, 0, 0, 0, 0, 2}
	for _, c := range conns {
		cseq, sseq := uint32(1000), uint32(9000)
		seg := func(fromCli bool, flags string, payload string) {
			src, dst, sp, dp, seq, ack, sm, dm := c.cli, c.srv, c.cport, c.sport, cseq, sseq, cmac, smac
			if !fromCli {
				src, dst, sp, dp, seq, ack, sm, dm = c.srv, c.cli, c.sport, c.cport, sseq, cseq, smac, cmac
			}
			var ip gopacket.NetworkLayer = &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
			etype := layers.EthernetTypeIPv4
			if src.Is6() {
				ip, etype = &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}, layers.EthernetTypeIPv6
			}
			tcp := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Ack: ack, Window: 65535,
				SYN: strings.Contains(flags, "S"), ACK: strings.Contains(flags, "A"), FIN: strings.Contains(flags, "F"), PSH: payload != ""}
			if tcp.SYN && !tcp.ACK {
				tcp.Ack = 0
			}
			tcp.SetNetworkLayerForChecksum(ip)
			eth := &layers.Ethernet{SrcMAC: sm, DstMAC: dm, EthernetType: etype}
			buf := gopacket.NewSerializeBuffer()
			if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip.(gopacket.SerializableLayer), tcp, gopacket.Payload(payload)); err != nil {
				t.Fatal(err)
			}
			at = at.Add(time.Millisecond)
			if err := w.WritePacket(gopacket.CaptureInfo{Timestamp: at, CaptureLength: len(buf.Bytes()), Length: len(buf.Bytes())}, buf.Bytes()); err != nil {
				t.Fatal(err)
			}
			n := uint32(len(payload))
			if tcp.SYN || tcp.FIN {
				n++
			}
			if fromCli {
				cseq += n
			} else {
				sseq += n
			}
		}
		seg(true, "S", "")
		seg(false, "SA", "")
		seg(true, "A", "")
		seg(true, "A", c.data)
		seg(false, "A", "x")
		seg(true, "FA", "")
		seg(false, "FA", "")
		seg(true, "A", "")
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// auditReport is what these tests read of audit --json.
type auditReport struct {
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

func runAuditJSON(t *testing.T, args ...string) auditReport {
	t.Helper()
	code, out, stderr := runCLI(t, append([]string{"audit", "--json", "--no-progress"}, args...)...)
	if code != exitOK {
		t.Fatalf("%v: exit %d: %s", args, code, stderr)
	}
	var rep auditReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: report JSON: %v\n%s", args, err, out)
	}
	return rep
}

func writePolicy(t *testing.T, src string) string {
	t.Helper()
	pol := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return pol
}

// TestAuditTCPPorts: the offline audit takes egressd run's --tcp-ports,
// so a capture is judged as the live gateway with that list judges it
// (capture.Config.TCPPorts): TCP to a port the list leaves out is
// nftables' to forward, by address alone, never by its Host; without the
// list every port is the proxy's, which lets an allowed Host through.
func TestAuditTCPPorts(t *testing.T) {
	pol := writePolicy(t, "version: 1\nmode: audit\nrules:\n  - name: web\n    to: [x.allowed.test]\n    ports: [8080/tcp]\n")
	pcap := writeTCPPcap(t, []tcpExchange{{
		cli: netip.MustParseAddr("192.0.2.50"), srv: netip.MustParseAddr("203.0.113.21"), cport: 43000, sport: 8080,
		data: "GET / HTTP/1.1\r\nHost: x.allowed.test\r\n\r\n",
	}})
	for _, tc := range []struct {
		args    []string
		dropped bool
	}{
		{nil, false},
		{[]string{"--tcp-ports", "all"}, false},
		{[]string{"--tcp-ports", "443"}, true},
		{[]string{"--tcp-ports", "80,443,8000-8100"}, false},
	} {
		rep := runAuditJSON(t, append([]string{"--policy", pol, pcap}, tc.args...)...)
		if got := len(rep.Dropped) == 1 && rep.Dropped[0].Port == 8080; got != tc.dropped || len(rep.Dropped) > 1 {
			t.Errorf("%v: dropped %+v, want the 8080 flow dropped: %v", tc.args, rep.Dropped, tc.dropped)
		}
	}
	// run's validation: a bad list is a usage error naming the flag.
	code, _, stderr := runCLI(t, "audit", "--policy", pol, pcap, "--tcp-ports", "443,0")
	if code != exitUsage || !strings.Contains(stderr, "egressd audit: --tcp-ports") {
		t.Errorf("a bad --tcp-ports: exit %d: %s", code, stderr)
	}
}

// TestAuditGatewayAddrs: the offline audit takes the gateway's own
// addresses (--gateway-addr), which live capture reads from the
// interfaces (capture.Config.OwnAddrs): a flow to one of them (a
// client's ssh to the gateway) is the gateway's own traffic, not egress,
// and the report has no would-drop for it; a flow through the gateway is
// judged as before. Without the flag, the ssh connection is a drop.
func TestAuditGatewayAddrs(t *testing.T) {
	pol := writePolicy(t, "version: 1\nmode: audit\nrules:\n  - name: ssh-out\n    to: [198.51.100.0/24]\n    ports: [22/tcp]\n")
	cli := netip.MustParseAddr("192.0.2.50")
	pcap := writeTCPPcap(t, []tcpExchange{
		{cli: cli, srv: netip.MustParseAddr("192.0.2.1"), cport: 43000, sport: 22, data: "SSH-2.0-x\r\n"},
		{cli: cli, srv: netip.MustParseAddr("198.51.100.9"), cport: 43001, sport: 22, data: "SSH-2.0-x\r\n"},
	})
	for _, tc := range []struct {
		args    []string
		dropped int
	}{
		{nil, 1},
		{[]string{"--gateway-addr", "192.0.2.1"}, 0},
		{[]string{"--gateway-addr", "2001:db8::1,192.0.2.1"}, 0},
		{[]string{"--gateway-addr", "2001:db8::1", "--gateway-addr", "192.0.2.1"}, 0},
		{[]string{"--gateway-addr", "192.0.2.2"}, 1},
	} {
		rep := runAuditJSON(t, append([]string{"--policy", pol, pcap}, tc.args...)...)
		// The own flows are counted, and the count said, when the
		// addresses are given.
		_, _, stderr := runCLI(t, append([]string{"audit", "--json", "--no-progress", "--policy", pol, pcap}, tc.args...)...)
		if said := strings.Contains(stderr, fmt.Sprintf("capture: %d flows to or from the gateway's own addresses", 1-tc.dropped)); said != (tc.args != nil) {
			t.Errorf("%v: stderr %q", tc.args, stderr)
		}
		if len(rep.Dropped) != tc.dropped || tc.dropped == 1 && (rep.Dropped[0].IP != "192.0.2.1" || rep.Dropped[0].Reason != "no-rule") {
			t.Errorf("%v: dropped %+v, want %d (the ssh to the gateway)", tc.args, rep.Dropped, tc.dropped)
		}
		flows := 0
		for _, r := range rep.Rules {
			if r.Name == "ssh-out" {
				flows = r.Flows
			}
		}
		if flows != 1 {
			t.Errorf("%v: rules %+v, want the flow through the gateway under ssh-out", tc.args, rep.Rules)
		}
	}
	code, _, stderr := runCLI(t, "audit", "--policy", pol, pcap, "--gateway-addr", "192.0.2.0/24")
	if code != exitUsage || !strings.Contains(stderr, "egressd audit: --gateway-addr") {
		t.Errorf("a prefix for --gateway-addr: exit %d: %s", code, stderr)
	}
}

// TestAuditReplayRefusesCaptureFlags: --tcp-ports and --gateway-addr are
// a capture's; a replay decides recorded events again by name and
// address, which neither changes, so giving one with --replay is a usage
// error rather than a flag silently without effect.
func TestAuditReplayRefusesCaptureFlags(t *testing.T) {
	pol := writePolicy(t, "version: 1\nmode: audit\nrules:\n  - name: any\n    to: [\"*\"]\n    ports: [443/tcp]\n")
	events := filepath.Join(t.TempDir(), "events.ndjson")
	line := `{"kind":"flow","source":"proxy","time":"2026-12-06T10:00:00Z","client":"192.0.2.50","client_port":41000,"dest_ip":"203.0.113.5","dest_port":443,"proto":"tcp","verdict":"allow","mode":"audit","rule":"any","reason":"allowed"}` + "\n"
	if err := os.WriteFile(events, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI(t, "audit", "--policy", pol, "--replay", events, "--json"); code != exitOK {
		t.Fatalf("replay: exit %d: %s", code, stderr)
	}
	for _, extra := range [][]string{{"--tcp-ports", "443"}, {"--gateway-addr", "192.0.2.1"}} {
		code, _, stderr := runCLI(t, append([]string{"audit", "--policy", pol, "--replay", events}, extra...)...)
		if code != exitUsage || !strings.Contains(stderr, "egressd audit: "+extra[0]) {
			t.Errorf("replay with %v: exit %d: %s", extra, code, stderr)
		}
	}
}

// TestAuditGatewayAddrNAT64: with --nat64-prefix, the NAT64 form of one
// of the gateway's own IPv4 addresses is guarded as live capture guards
// it for a proxied flow (the proxy's special-range: it would dial the
// gateway itself), though "*" allows it; without --gateway-addr the
// audit cannot know and allows it.
func TestAuditGatewayAddrNAT64(t *testing.T) {
	pol := writePolicy(t, "version: 1\nmode: audit\nrules:\n  - name: any\n    to: [\"*\"]\n    ports: [8080/tcp]\n")
	pcap := writeTCPPcap(t, []tcpExchange{{
		cli: netip.MustParseAddr("2001:db8::50"), srv: netip.MustParseAddr("2001:db8:64::c000:201"), cport: 43000, sport: 8080, // 192.0.2.1
		data: "SSH-2.0-x\r\n",
	}})
	for _, tc := range []struct {
		args   []string
		reason string // of the one drop; "": none
	}{
		{[]string{"--nat64-prefix", "2001:db8:64::/96"}, ""},
		{[]string{"--nat64-prefix", "2001:db8:64::/96", "--gateway-addr", "192.0.2.1"}, "special-range"},
		// Forwarded by nftables (--tcp-ports leaves 8080 out): the
		// firewall's guarded sets hold none of the gateway's addresses.
		{[]string{"--nat64-prefix", "2001:db8:64::/96", "--gateway-addr", "192.0.2.1", "--tcp-ports", "443"}, ""},
	} {
		rep := runAuditJSON(t, append([]string{"--policy", pol, pcap}, tc.args...)...)
		got := ""
		if len(rep.Dropped) == 1 {
			got = rep.Dropped[0].Reason
		}
		if got != tc.reason || len(rep.Dropped) > 1 {
			t.Errorf("%v: dropped %+v, want reason %q", tc.args, rep.Dropped, tc.reason)
		}
	}
}
