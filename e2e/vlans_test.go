package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// The second LAN segment of the VLAN topology: VLAN 20, the cameras.
const (
	camClient4 = "198.18.20.10"
	camClient6 = "2001:db8:20::10"
	camMAC     = "02:00:00:00:20:10"
	gwCam4     = "198.18.20.1"
	gwCam6     = "2001:db8:20::1"
)

// newTwoLANTopo is newTopo with a second LAN segment, a camera: a
// namespace of its own with its own subnet and MAC address. Where the
// kernel has 802.1Q, the LAN is split into two VLANs on the one veth
// between the LAN and the gateway: VLAN 10 (the gateway's lan0.10)
// carries the office client, tp.lan, with the addresses it had, and VLAN
// 20 (lan0.20) the camera, on the VLAN device made on the office client's
// veth and moved there; untagged, lan0 carries nothing. Without 802.1Q
// (CONFIG_VLAN_8021Q, which some VM kernels leave out) the office client
// stays on lan0 and the camera gets a veth of its own, the gateway's
// cams0. It returns the topology, a view of it from the camera (cam.lan
// is the camera's namespace, cam.lanGW4 the gateway's address on its
// segment; every server and counter is tp's) and the LAN interfaces,
// office first.
func newTwoLANTopo(t *testing.T) (tp, cam *topo, lans []string) {
	t.Helper()
	tp = newTopo(t)
	camNS := testnet.New(t, "h1cam")
	gw, lan := tp.gw, tp.lan

	if out, err := gw.Run("ip", "link", "add", "link", "lan0", "name", "lan0.10", "type", "vlan", "id", "10"); err != nil {
		if !strings.Contains(out, "Unknown device type") {
			t.Fatalf("ip link add ... type vlan: %v: %s", err, out)
		}
		t.Logf("no 802.1Q in this kernel (%s): the camera gets a veth of its own", strings.TrimSpace(out))
		testnet.Link(t, camNS, "eth0", []string{camClient4 + "/24", camClient6 + "/64"}, gw, "cams0", []string{gwCam4 + "/24", gwCam6 + "/64"})
		camNS.MustRun("ip", "link", "set", "eth0", "address", camMAC)
		lans = []string{"lan0", "cams0"}
	} else {
		gw.MustRun("ip", "addr", "flush", "dev", "lan0")
		gw.MustRun("ip", "link", "add", "link", "lan0", "name", "lan0.20", "type", "vlan", "id", "20")
		for _, v := range []struct{ dev, a4, a6 string }{{"lan0.10", gwLAN4, gwLAN6}, {"lan0.20", gwCam4, gwCam6}} {
			gw.MustRun("ip", "addr", "add", v.a4+"/24", "dev", v.dev)
			gw.MustRun("ip", "-6", "addr", "add", v.a6+"/64", "dev", v.dev, "nodad")
			gw.MustRun("ip", "link", "set", v.dev, "up")
		}
		lan.MustRun("ip", "addr", "flush", "dev", "eth0")
		lan.MustRun("ip", "link", "add", "link", "eth0", "name", "eth0.10", "type", "vlan", "id", "10")
		lan.MustRun("ip", "addr", "add", lanClient4+"/24", "dev", "eth0.10")
		lan.MustRun("ip", "-6", "addr", "add", lanClient6+"/64", "dev", "eth0.10", "nodad")
		lan.MustRun("ip", "link", "set", "eth0.10", "up")
		lan.MustRun("ip", "route", "replace", "default", "via", gwLAN4, "dev", "eth0.10")
		lan.MustRun("ip", "-6", "route", "replace", "default", "via", gwLAN6, "dev", "eth0.10")
		lan.MustRun("ip", "link", "add", "link", "eth0", "name", "eth0.20", "address", camMAC, "type", "vlan", "id", "20")
		lan.MustRun("ip", "link", "set", "eth0.20", "netns", camNS.Name)
		camNS.MustRun("ip", "link", "set", "eth0.20", "name", "eth0")
		camNS.MustRun("ip", "addr", "add", camClient4+"/24", "dev", "eth0")
		camNS.MustRun("ip", "-6", "addr", "add", camClient6+"/64", "dev", "eth0", "nodad")
		camNS.MustRun("ip", "link", "set", "eth0", "up")
		lans = []string{"lan0.10", "lan0.20"}
		// The addresses were added before their links came up.
		gw.WaitAddr(t, gwLAN6, gwCam6)
		lan.WaitAddr(t, lanClient6)
		camNS.WaitAddr(t, camClient6)
	}
	camNS.MustRun("ip", "route", "add", "default", "via", gwCam4)
	camNS.MustRun("ip", "-6", "route", "add", "default", "via", gwCam6)
	tp.inet.MustRun("ip", "route", "add", "198.18.20.0/24", "via", gwWAN4)
	tp.inet.MustRun("ip", "-6", "route", "add", "2001:db8:20::/64", "via", gwWAN6)

	// dig in the camera asks its gateway (as newTopo sets up the LAN's).
	nsEtc := filepath.Join("/etc/netns", camNS.Name)
	if err := os.MkdirAll(nsEtc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(nsEtc) })
	if err := os.WriteFile(filepath.Join(nsEtc, "resolv.conf"), []byte("nameserver "+gwCam4+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cam = &topo{lan: camNS, gw: tp.gw, inet: tp.inet, dir: tp.dir, caFile: tp.caFile, pool: tp.pool, lanGW4: gwCam4}
	return tp, cam, lans
}

// TestSeveralLANs: egressd run --lan lan0.10,lan0.20 serves two VLANs on
// one trunk (or, on a kernel without 802.1Q, --lan lan0,cams0 two veth
// segments: newTwoLANTopo), each with its client and subnet. In enforce mode, from both:
// DNS is filtered (an allowed name resolves, a denied one is REFUSED),
// allowed HTTPS passes, denied HTTPS is refused, forwarded UDP follows the
// policy (NTP to the address DNS gave out answers, a UDP port no rule
// opens does not), each VLAN has the explicit proxy on its gateway
// address, and the report names both clients; TCP from one VLAN to the
// other is LAN traffic, refused where no rule allows it. In audit mode
// capture records the flows of both clients, each with its own MAC
// address, and the flow from one VLAN to the other once. With rules for
// the camera's VLAN only (from: its subnet), in enforce mode: the camera
// resolves and reaches the name they allow and the office client's
// service; the office's VLAN does neither, nor reaches the camera's
// service. Every refusal is checked against the same exchange without
// egressd.
func TestSeveralLANs(t *testing.T) {
	tp, cam, lanIfs := newTwoLANTopo(t)
	clients := []struct {
		name      string
		tp        *topo
		addr, gw4 string
	}{{"office", tp, lanClient4, gwLAN4}, {"camera", cam, camClient4, gwCam4}}
	officeSvc := netip.AddrPortFrom(netip.MustParseAddr(lanClient4), lanSvcPort).String()

	// Without egressd: both VLANs route, to the internet and to each
	// other, so what egressd stops later is its doing.
	for _, c := range clients {
		if _, err := c.tp.curl(trackerName, 443, trackerIP, "/", true); err != nil {
			t.Fatalf("%s without egressd: %v", c.name, err)
		}
		if err := c.tp.udpEcho(fmt.Sprintf("%s:%d", udpDenyIP, udpDenyPort)); err != nil {
			t.Fatalf("%s without egressd: %v", c.name, err)
		}
	}
	if !cam.dialOK(officeSvc) {
		t.Fatalf("without egressd, the camera does not reach the office client's %s", officeSvc)
	}
	lans := []string{"--lan", strings.Join(lanIfs, ",")}

	t.Run("enforce", func(t *testing.T) {
		d := newDaemon(t, tp, "enforce")
		d.extra = lans
		d.start()
		defer d.stop()
		for _, w := range []string{"capture: listening on " + strings.Join(lanIfs, ", "), "explicit on " + gwLAN4 + ":3128, [" + gwLAN6 + "]:3128, " + gwCam4 + ":3128, [" + gwCam6 + "]:3128", "LAN " + strings.Join(lanIfs, ", ") + ", WAN wan0"} {
			if !strings.Contains(d.logs(), w) {
				t.Errorf("egressd's start-up lines lack %q:\n%s", w, d.logs())
			}
		}
		for _, c := range clients {
			t.Run(c.name, func(t *testing.T) {
				if rcode, addrs := c.tp.dig(t, dockerName, "A"); rcode != "NOERROR" || !slices.Equal(addrs, []string{dockerIP4}) {
					t.Errorf("dig %s: %s %v, want NOERROR %s", dockerName, rcode, addrs, dockerIP4)
				}
				if rcode, addrs := c.tp.dig(t, trackerName, "A"); rcode != "REFUSED" {
					t.Errorf("dig %s: %s %v, want REFUSED", trackerName, rcode, addrs)
				}
				if out, err := c.tp.curl(dockerName, 443, dockerIP4, "/", true); err != nil || !strings.Contains(out, "sni="+dockerName) {
					t.Errorf("allowed HTTPS: %q, %v", out, err)
				}
				if out, err := c.tp.curl(trackerName, 443, trackerIP, "/", true); err == nil {
					t.Errorf("denied HTTPS went through: %q", out)
				}
				f := openUDPFlows(t, c.tp)
				if err := f.ntp(); err != nil {
					t.Errorf("NTP to %s (the ntp rule): %v", f.ntpAddr, err)
				}
				if err := f.echo(); err == nil {
					t.Errorf("UDP to %s:%d (no rule) answered", udpDenyIP, udpDenyPort)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				conn, err := c.tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(c.gw4, "3128"))
				cancel()
				if err != nil {
					t.Errorf("the explicit proxy on %s: %v", c.gw4, err)
				} else {
					conn.Close()
				}
			})
		}
		// From one VLAN to the other: redirected to the proxy, which no
		// rule lets reach the office client's port.
		hits := tp.inboundHits.Load()
		if c, err := cam.dialTCP(context.Background(), officeSvc); err == nil {
			c.SetDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 3)
			n, _ := c.Read(buf)
			c.Close()
			if n > 0 {
				t.Errorf("the camera reached the office client's %s: %q", officeSvc, buf[:n])
			}
		}
		if n := tp.inboundHits.Load() - hits; n != 0 {
			t.Errorf("the office client's service accepted %d connections from the camera's VLAN", n)
		}

		// A clean stop ends the UDP flows (capture records them then);
		// the restart reads the event log back.
		d.stop()
		d.start()
		reportNamesBoth(t, d)
		for _, c := range clients {
			d.waitEvent(t, c.name+"'s denied HTTPS", func(ev flowEvent) bool {
				return ev.Kind == "flow" && ev.Client == c.addr && ev.Name == trackerName && ev.Verdict == "deny" && ev.Enforced
			})
		}
	})

	t.Run("audit", func(t *testing.T) {
		d := newDaemon(t, tp, "audit")
		d.extra = lans
		d.start()
		defer d.stop()
		for _, c := range clients {
			if out, err := c.tp.curl(dockerName, 443, dockerIP4, "/", true); err != nil || !strings.Contains(out, "sni="+dockerName) {
				t.Errorf("%s: allowed HTTPS: %q, %v", c.name, out, err)
			}
			if _, err := c.tp.curl(trackerName, 443, trackerIP, "/", true); err != nil {
				t.Errorf("%s: audit mode blocked HTTPS to %s: %v", c.name, trackerName, err)
			}
			f := openUDPFlows(t, c.tp)
			if err := f.ntp(); err != nil {
				t.Errorf("%s: NTP: %v", c.name, err)
			}
			if err := f.echo(); err != nil {
				t.Errorf("%s: audit mode blocked UDP to %s:%d: %v", c.name, udpDenyIP, udpDenyPort, err)
			}
		}
		hits := tp.inboundHits.Load()
		if !cam.dialOK(officeSvc) {
			t.Errorf("audit mode: the camera does not reach the office client's %s", officeSvc)
		}
		for deadline := time.Now().Add(5 * time.Second); tp.inboundHits.Load() == hits && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		office := "eth0"
		if lanIfs[0] == "lan0.10" {
			office = "eth0.10"
		}
		macs := map[string]string{lanClient4: macOf(t, tp.lan, office), camClient4: camMAC}
		for _, c := range clients {
			for _, w := range []struct {
				what, name, ip string
				verdict        string
			}{{"allowed HTTPS", dockerName, dockerIP4, "allow"}, {"HTTPS no rule allows", trackerName, trackerIP, "deny"}} {
				ev := d.waitEvent(t, c.name+"'s "+w.what, func(ev flowEvent) bool {
					return ev.Kind == "flow" && ev.Source == "capture" && ev.Client == c.addr && ev.Dest == w.ip && ev.DestPort == 443
				})
				if ev.Verdict != w.verdict || ev.Name != w.name || ev.ClientMAC != macs[c.addr] {
					t.Errorf("%s's %s: %v mac %s; want %s, named %s, from %s", c.name, w.what, ev, ev.ClientMAC, w.verdict, w.name, macs[c.addr])
				}
			}
		}
		// The camera's connection to the office client crosses both
		// capture sockets: one flow, the camera's.
		d.waitEvent(t, "the camera's connection to the office client", func(ev flowEvent) bool {
			return ev.Kind == "flow" && ev.DestPort == lanSvcPort
		})
		var between []flowEvent
		for _, ev := range d.allEvents() {
			if ev.Kind == "flow" && ev.DestPort == lanSvcPort {
				between = append(between, ev)
			}
		}
		if len(between) != 1 || between[0].Client != camClient4 || between[0].Dest != lanClient4 || between[0].ClientMAC != camMAC || between[0].Source != "capture" {
			t.Errorf("the camera's connection to the office client: %d events %v, want one from %s (%s) to %s", len(between), between, camClient4, camMAC, lanClient4)
		}
		// A clean stop ends the UDP flows: capture records each client's
		// NTP and echo flows, with the client's MAC address.
		d.stop()
		evs := d.allEvents()
		for _, c := range clients {
			for _, w := range []struct {
				port    int
				verdict string
			}{{123, "allow"}, {udpDenyPort, "deny"}} {
				n := 0
				for _, ev := range evs {
					if ev.Kind == "flow" && ev.Source == "capture" && ev.Client == c.addr && ev.DestPort == w.port && ev.Proto == "udp" {
						n++
						if ev.Verdict != w.verdict || ev.ClientMAC != macs[c.addr] {
							t.Errorf("%s's UDP to port %d: %v mac %s; want %s from %s", c.name, w.port, ev, ev.ClientMAC, w.verdict, macs[c.addr])
						}
					}
				}
				if n != 1 {
					t.Errorf("%s's UDP to port %d: %d flows recorded, want 1:\n%s", c.name, w.port, n, d.events())
				}
			}
		}
		d.start()
		reportNamesBoth(t, d)
	})

	// Rules for one VLAN's clients (from: its subnet) apply on that VLAN
	// only: the camera's VLAN resolves and reaches tracker.example and
	// the office client's service; the office's VLAN does neither, nor
	// reaches a service of the camera's.
	t.Run("per-VLAN rules", func(t *testing.T) {
		var camHits atomic.Int64
		ln, err := cam.lan.Listen("tcp", net.JoinHostPort(camClient4, fmt.Sprint(lanSvcPort)))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				camHits.Add(1)
				c.Write([]byte("in\n"))
				c.Close()
			}
		}()
		camSvc := net.JoinHostPort(camClient4, fmt.Sprint(lanSvcPort))
		if !tp.dialOK(camSvc) {
			t.Fatalf("without egressd, the office client does not reach the camera's %s", camSvc)
		}
		d := newDaemon(t, tp, "enforce")
		d.extra = lans
		d.writePolicy(append(testPolicy(t), []byte(camerasRules)...))
		d.start()
		defer d.stop()
		for _, c := range []struct {
			name    string
			tp      *topo
			allowed bool
		}{{"camera", cam, true}, {"office", tp, false}} {
			rcode, addrs := c.tp.dig(t, trackerName, "A")
			out, err := c.tp.curl(trackerName, 443, trackerIP, "/", true)
			if c.allowed {
				if rcode != "NOERROR" || !slices.Equal(addrs, []string{trackerIP}) {
					t.Errorf("%s: dig %s: %s %v, want NOERROR %s (rule e2e-cameras-tracker)", c.name, trackerName, rcode, addrs, trackerIP)
				}
				if err != nil || !strings.Contains(out, "sni="+trackerName) {
					t.Errorf("%s: HTTPS to %s (rule e2e-cameras-tracker): %q, %v", c.name, trackerName, out, err)
				}
			} else {
				if rcode != "REFUSED" {
					t.Errorf("%s: dig %s: %s %v, want REFUSED (the rule is the camera VLAN's)", c.name, trackerName, rcode, addrs)
				}
				if err == nil {
					t.Errorf("%s: HTTPS to %s went through (the rule is the camera VLAN's): %q", c.name, trackerName, out)
				}
			}
		}
		hits := tp.inboundHits.Load()
		if got := readFrom(cam, officeSvc); got != "in\n" {
			t.Errorf("the camera's VLAN to the office client's %s (rule e2e-cameras-to-office): read %q, want %q", officeSvc, got, "in\n")
		}
		if n := tp.inboundHits.Load() - hits; n != 1 {
			t.Errorf("the office client's service accepted %d connections from the camera's VLAN, want 1", n)
		}
		camBefore := camHits.Load()
		if got := readFrom(tp, camSvc); got != "" {
			t.Errorf("the office's VLAN reached the camera's %s (no rule): read %q", camSvc, got)
		}
		if n := camHits.Load() - camBefore; n != 0 {
			t.Errorf("the camera's service accepted %d connections from the office's VLAN, want 0", n)
		}
		d.waitEvent(t, "the camera's connection to the office client, allowed", func(ev flowEvent) bool {
			return ev.Kind == "flow" && ev.Client == camClient4 && ev.DestPort == lanSvcPort && ev.Verdict == "allow" && ev.Rule == "e2e-cameras-to-office"
		})
		d.waitEvent(t, "the office's connection to the camera, denied", func(ev flowEvent) bool {
			return ev.Kind == "flow" && ev.Client == lanClient4 && ev.Dest == camClient4 && ev.DestPort == lanSvcPort && ev.Verdict == "deny" && ev.Enforced
		})
	})
}

// camerasRules are rules for the camera's VLAN only (TestSeveralLANs),
// appended to the test policy.
const camerasRules = `
  - name: e2e-cameras-tracker
    why: the cameras' VLAN only
    from: [198.18.20.0/24]
    to: ["` + trackerName + `"]
    ports: [443/tcp]
  - name: e2e-cameras-to-office
    why: the cameras' VLAN reaches the office client's service
    from: [198.18.20.0/24]
    to: [198.18.1.0/24]
    ports: [8080/tcp]
`

// readFrom connects from tp's LAN namespace to addr and returns what it
// reads in 3s, up to 3 bytes ("" when the connection fails or nothing
// comes).
func readFrom(tp *topo, addr string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "tcp", addr)
	if err != nil {
		return ""
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 3)
	n, _ := io.ReadFull(c, buf)
	return string(buf[:n])
}

// reportNamesBoth waits up to 10s for `egressd report` to name both
// clients for the rules and drops the test's clients both made: the
// vendor-cloud and ntp rules, HTTPS to tracker.example, UDP to the echo
// no rule allows.
func reportNamesBoth(t *testing.T, d *daemon) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := d.report()
		got := map[string][]string{
			"rule vendor-cloud":                   ruleClients(r, "vendor-cloud"),
			"rule ntp":                            ruleClients(r, "ntp"),
			"dropped " + trackerName + ":443/tcp": droppedClients(r, trackerName, 443, "tcp"),
			fmt.Sprintf("dropped %s:%d/udp", udpDenyIP, udpDenyPort): droppedClients(r, udpDenyIP, udpDenyPort, "udp"),
		}
		var missing []string
		for what, clients := range got {
			if !bothClients(clients) {
				missing = append(missing, fmt.Sprintf("%s: clients %v", what, clients))
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			slices.Sort(missing)
			t.Errorf("report after 10s, want %s and %s in each:\n%s\nevents:\n%s", lanClient4, camClient4, strings.Join(missing, "\n"), d.events())
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// bothClients says whether clients names the office client and the
// camera.
func bothClients(clients []string) bool {
	return slices.Contains(clients, lanClient4) && slices.Contains(clients, camClient4)
}

// ruleClients are the clients the report credits rule with.
func ruleClients(r *report, rule string) []string {
	for _, ru := range r.Rules {
		if ru.Name == rule {
			return ru.Clients
		}
	}
	return nil
}

// droppedClients are the clients of the report's dropped entry for
// dest (a name, or an address) and port/proto.
func droppedClients(r *report, dest string, port uint16, proto string) []string {
	var out []string
	for _, dr := range r.Dropped {
		if (dr.Dest == dest || dr.IP == dest) && dr.Port == port && dr.Proto == proto {
			out = append(out, dr.Clients...)
		}
	}
	return out
}

// macOf is the MAC address of an interface of ns.
func macOf(t *testing.T, ns *testnet.NS, dev string) string {
	t.Helper()
	f := strings.Fields(ns.MustRun("cat", "/sys/class/net/"+dev+"/address"))
	if len(f) != 1 {
		t.Fatalf("MAC address of %s in %s: %q", dev, ns.Name, f)
	}
	return f[0]
}
