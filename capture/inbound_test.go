package capture

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestLiveInbound: a gateway forwards between a LAN host and a WAN host,
// capture reads its LAN interface. A TCP connection and an unsolicited
// UDP datagram the WAN host starts toward the LAN host (the datagram
// from a port below 1024, which capture's guess of a server's port would
// take for the server) come out of the gateway's LAN interface first:
// they are no LAN client's egress. In audit mode each is recorded as
// what it is, from the WAN host to the LAN host, denied as inbound (the
// enforce firewall drops new connections from the WAN side), never as
// the WAN host's no-rule egress; in enforce mode capture seeing one
// means the firewall let it through, and it is counted, not recorded.
// The LAN host's own connection and datagram to the WAN host stay its
// egress in both modes.
func TestLiveInbound(t *testing.T) {
	testnet.RequireRoot(t)
	lan := testnet.New(t, "i1inl")
	wan := testnet.New(t, "i1inw")
	gw := testnet.New(t, "i1ing")
	testnet.Link(t, lan, "eth0", []string{"198.18.41.10/24"}, gw, "lan1", []string{"198.18.41.1/24"})
	testnet.Link(t, wan, "eth0", []string{"198.18.42.2/24"}, gw, "wan1", []string{"198.18.42.1/24"})
	lan.MustRun("ip", "route", "add", "default", "via", "198.18.41.1")
	wan.MustRun("ip", "route", "add", "198.18.41.0/24", "via", "198.18.42.1")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")

	serve := func(ns *testnet.NS, addr string) {
		ln, err := ns.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				buf := make([]byte, 16)
				n, _ := c.Read(buf)
				c.Write(append([]byte("got "), buf[:n]...))
				c.Close()
			}
		}()
	}
	serve(lan, "198.18.41.10:8081")
	serve(wan, "198.18.42.2:8082")
	packet := func(ns *testnet.NS, addr string) net.PacketConn {
		pc, err := ns.ListenPacket("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc
	}
	lanUDP := packet(lan, "198.18.41.10:40001")
	wanUDP := packet(wan, "198.18.42.2:500")

	rec, recEnf := &recorder{}, &recorder{}
	c := startLive(t, gw, Config{Interfaces: []string{"lan1"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
	enf := startLive(t, gw, Config{Interfaces: []string{"lan1"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy).WithMode(policy.ModeEnforce)), Sink: recEnf})

	talk := func(from *testnet.NS, addr string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		tc, err := from.DialContext(ctx, "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		tc.Write([]byte("hello"))
		buf := make([]byte, 64)
		n, _ := tc.Read(buf)
		tc.Close()
		if string(buf[:n]) != "got hello" {
			t.Fatalf("TCP to %s: %q", addr, buf[:n])
		}
	}
	talk(wan, "198.18.41.10:8081") // inbound
	talk(lan, "198.18.42.2:8082")  // egress
	// Unsolicited, from the WAN host's port 500 to the LAN host's 40001;
	// the LAN host answers it. Then the LAN host's own datagram from
	// 40001 to the WAN host's port 9000.
	if _, err := wanUDP.WriteTo([]byte("knock"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.18.41.10:40001"))); err != nil {
		t.Fatal(err)
	}
	lanUDP.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	n, from, err := lanUDP.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "knock" {
		t.Fatalf("the LAN host got %q from %v: %v", buf[:n], from, err)
	}
	lanUDP.WriteTo([]byte("who"), from)
	if _, err := lanUDP.WriteTo([]byte("out"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.18.42.2:9000"))); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(10 * time.Second)
	for (c.Stats().Flows < 2 || enf.Stats().Flows < 1) && time.Now().Before(deadline) { // the TCP flows, ended by FIN
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // TPACKET_V3 hands blocks over after 64 ms
	// The UDP flows are open (reported after 60 s of silence): the live
	// report's open flows hold the inbound one as emit would record it,
	// in audit mode only (in enforce mode it is counted, not recorded).
	for _, lc := range []struct {
		c    *liveCapture
		want int
	}{{c, 1}, {enf, 0}} {
		n := 0
		for _, ev := range lc.c.OpenFlows() {
			if ev.Reason == ReasonInbound {
				n++
			}
		}
		if n != lc.want {
			t.Errorf("%s mode: %d open flows inbound, want %d", lc.c.deps.Policy.Load().Mode(), n, lc.want)
		}
	}
	for _, lc := range []*liveCapture{c, enf} {
		if err := lc.stop(); err != nil {
			t.Fatalf("Run: %v", err)
		}
	}

	type flowOf struct {
		client, dest string
		proto        string
		verdict      policy.Verdict
		reason       string
	}
	got := func(r *recorder) map[flowOf]int {
		m := map[flowOf]int{}
		for _, ev := range r.all() {
			if ev.Kind == audit.KindFlow {
				m[flowOf{netip.AddrPortFrom(ev.Client, ev.ClientPort).String(), netip.AddrPortFrom(ev.Dest, ev.DestPort).String(), ev.Proto, ev.Verdict, ev.Reason}]++
			}
		}
		return m
	}
	inTCP := func(r flowOf) bool { return r.dest == "198.18.41.10:8081" && r.proto == "tcp" }
	check := func(mode string, r *recorder, st Stats, wantInbound bool) {
		t.Helper()
		m := got(r)
		var egressTCP, egressUDP, inboundTCP, inboundUDP int
		for f, n := range m {
			cli, _ := netip.ParseAddrPort(f.client)
			switch {
			case f.reason == ReasonInbound && inTCP(f) && cli.Addr() == netip.MustParseAddr("198.18.42.2") && f.verdict == policy.Deny:
				inboundTCP += n
			case f.reason == ReasonInbound && f.proto == "udp" && f.client == "198.18.42.2:500" && f.dest == "198.18.41.10:40001" && f.verdict == policy.Deny:
				inboundUDP += n
			case f.reason == policy.ReasonNoRule && f.dest == "198.18.42.2:8082" && cli.Addr() == netip.MustParseAddr("198.18.41.10"):
				egressTCP += n
			case f.reason == policy.ReasonNoRule && f.proto == "udp" && f.client == "198.18.41.10:40001" && f.dest == "198.18.42.2:9000":
				egressUDP += n
			default:
				t.Errorf("%s: unexpected flow %+v (%d)", mode, f, n)
			}
		}
		if egressTCP != 1 || egressUDP != 1 {
			t.Errorf("%s: the LAN host's egress: %d TCP and %d UDP flows, want 1 each: %v", mode, egressTCP, egressUDP, m)
		}
		want, wantStat := 0, uint64(2)
		if wantInbound {
			want = 1
		}
		if inboundTCP != want || inboundUDP != want {
			t.Errorf("%s: %d TCP and %d UDP inbound flows recorded, want %d each: %v", mode, inboundTCP, inboundUDP, want, m)
		}
		if st.Inbound != wantStat {
			t.Errorf("%s: Stats.Inbound %d, want %d", mode, st.Inbound, wantStat)
		}
	}
	check("audit", rec, c.Stats(), true)
	check("enforce", recEnf, enf.Stats(), false)
}
