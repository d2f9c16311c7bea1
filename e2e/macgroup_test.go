package e2e

import (
	"bufio"
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// Addresses of the MAC group test.
const (
	// kioskMAC is the LAN client's MAC (tp.lan's eth0), set by the test:
	// locally administered, the kiosks group's only member.
	kioskMAC = "02:00:00:00:e6:10"
	// routedClient4 is a client behind a router: the kiosk forwards for
	// it, so its packets reach the gateway in frames from kioskMAC, but
	// its address is not on the LAN's link.
	routedClient4 = "198.18.6.10"
	routedNet4    = "198.18.6.0/24"
	routerAddr4   = "198.18.6.1"
)

// macPolicy lets only the kiosks group, given by MAC, reach dockerName on
// 443/tcp (through the proxy) and ntpName on 123/udp (forwarded by
// nftables, to the addresses the forwarder gave out), and so resolve
// them.
const macPolicy = `version: 1
mode: enforce
groups:
  kiosks: ["` + kioskMAC + `"]
rules:
  - name: kiosk-web
    from: [kiosks]
    to: ["` + dockerName + `"]
    ports: [443/tcp]
  - name: kiosk-ntp
    from: [kiosks]
    to: ["` + ntpName + `"]
    ports: [123/udp]
`

// TestMACGroup: a rule whose clients are given by MAC address (a group
// that lists the LAN client's MAC) holds for that client in every part:
// the DNS forwarder answers it the name, the transparent proxy lets its
// HTTPS out, the explicit proxy its CONNECT; capture, deciding in audit
// mode, says the same. Another device of the LAN (its own MAC) is refused
// everywhere, and so is a client behind a router whose frames carry the
// listed MAC: its address is not on the link, the gateway's neighbour
// table has no MAC for it, so the proxy and the forwarder never see one,
// and capture goes by the same table, not by the frame. What nftables
// forwards (NTP, to the address the forwarder gave the kiosk, which its
// gate put into the rule's learned set with the kiosk's MAC) it matches
// by the frame's source address: the kiosk's NTP goes out, so does the
// routed client's (its frames carry the kiosk's MAC: README, "Clients
// named by MAC"), another device's is dropped; capture, judging
// forwarded flows by the frame too, says the same in audit mode.
//
// Before session 20 only capture (from frames) and the nftables forward
// chain matched MACs: in enforce mode the forwarder refused the kiosk's
// DNS and the proxies denied its connections (client-not-allowed), while
// audit mode reported them allowed; and capture credited the routed
// client with the router's MAC, which the proxy never sees.
func TestMACGroup(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) { macGroup(t, mode) })
	}
}

func macGroup(t *testing.T, mode string) {
	tp := newTopo(t)
	tp.lan.MustRun("ip", "link", "set", "dev", "eth0", "address", kioskMAC)
	other := tp.newLANDevice(t, "e2h6dev", otherDev4, otherDev6)
	// The kiosk routes for a network behind it.
	routed := testnet.New(t, "e2h6rt")
	testnet.Link(t, tp.lan, "rt0", []string{routerAddr4 + "/24"}, routed, "eth0", []string{routedClient4 + "/24"})
	tp.lan.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	routed.MustRun("ip", "route", "add", "default", "via", routerAddr4)
	tp.gw.MustRun("ip", "route", "add", routedNet4, "via", lanClient4, "dev", "lan0")
	tp.inet.MustRun("ip", "route", "add", routedNet4, "via", gwWAN4)
	// Whatever the gateway knew of the LAN before the MAC changed.
	tp.gw.MustRun("ip", "neigh", "flush", "dev", "lan0")

	d := newDaemon(t, tp, mode)
	d.writePolicy([]byte(macPolicy))
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
			t.Logf("flows:\n%s", d.events())
			out, _ := tp.gw.Run("ip", "neigh", "show", "dev", "lan0")
			t.Logf("the gateway's neighbours on lan0:\n%s", out)
		}
	})
	enforce := mode == "enforce"
	source := "proxy" // the component whose verdict counts for HTTPS
	if !enforce {
		source = "capture"
	}

	type client struct {
		what  string
		ns    *testnet.NS
		addr  string
		allow bool
	}
	clients := []client{
		{"the kiosk (its MAC in the group)", tp.lan, lanClient4, true},
		{"another device", other, otherDev4, false},
		{"a client behind the kiosk (routed)", routed, routedClient4, false},
	}
	ntpPorts := map[string]int{} // client address → its NTP flow's port
	verdictOf := func(allow bool) string {
		if allow {
			return "allow"
		}
		return "deny"
	}
	// The kiosk resolves the NTP name: the forwarder's gate puts the
	// address into kiosk-ntp's learned set, with the kiosk's MAC.
	if m, err := dnsAsk(tp.lan, lanClient4, gwLAN4, ntpName, dns.TypeA, false); err != nil || m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Errorf("the kiosk: DNS %s: %v %v", ntpName, m, err)
	}
	for _, c := range clients {
		want := verdictOf(c.allow)

		// DNS: answered to the kiosk; refused to the others in enforce
		// mode (audit mode answers, and records the would-deny).
		m, err := dnsAsk(c.ns, c.addr, gwLAN4, dockerName, dns.TypeA, false)
		switch {
		case err != nil:
			t.Errorf("%s: DNS %s: %v", c.what, dockerName, err)
		case c.allow || !enforce:
			if m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 || !strings.Contains(m.Answer[0].String(), dockerIP4) {
				t.Errorf("%s: DNS %s: %v; want the answer %s", c.what, dockerName, m, dockerIP4)
			}
		default:
			if m.Rcode != dns.RcodeRefused {
				t.Errorf("%s: DNS %s: %s; want REFUSED", c.what, dockerName, dns.RcodeToString[m.Rcode])
			}
		}
		if ev := d.waitEvent(t, c.what+": DNS", func(e flowEvent) bool {
			return e.Kind == "dns" && e.Client == c.addr && e.Name == dockerName
		}); ev.Kind != "" && ev.Verdict != want {
			t.Errorf("%s: DNS event %v; want %s", c.what, ev, want)
		}

		// HTTPS to the name's address: through the transparent proxy in
		// enforce mode, judged by capture in audit mode.
		dial := dialFrom(c.ns, c.addr)
		o := sendHelloVia(dial, net.JoinHostPort(dockerIP4, "443"), buildHello(helloSpec{sni: [][]string{{dockerName}}}), 0, 0)
		reached := o.err == nil && !o.denied
		if reached != (c.allow || !enforce) {
			t.Errorf("%s: HTTPS to %s: %v; want reached %v", c.what, dockerName, o, c.allow || !enforce)
		}
		since := dialedAt(o.port)
		if ev := d.waitEvent(t, c.what+": HTTPS", func(e flowEvent) bool {
			return e.Kind == "flow" && e.Source == source && e.Client == c.addr && e.ClientPort == o.port && !e.Time.Before(since)
		}); ev.Kind != "" && (ev.Verdict != want || !c.allow && ev.Reason != "client-not-allowed") {
			t.Errorf("%s: HTTPS event %v; want %s", c.what, ev, want)
		}

		// CONNECT through the explicit proxy: 200 to the kiosk, 403 to
		// the others in enforce mode (audit mode lets it through).
		status, port, err := connectVia(dial, net.JoinHostPort(gwLAN4, "3128"), dockerName+":443")
		status = firstLine(status, err)
		if ok := strings.Contains(status, " 200 "); ok != (c.allow || !enforce) {
			t.Errorf("%s: CONNECT %s: %q; want 200: %v", c.what, dockerName, status, c.allow || !enforce)
		}
		since = dialedAt(port)
		if ev := d.waitEvent(t, c.what+": CONNECT", func(e flowEvent) bool {
			return e.Kind == "flow" && e.Source == "proxy" && e.Client == c.addr && e.ClientPort == port && !e.Time.Before(since)
		}); ev.Kind != "" && ev.Verdict != want {
			t.Errorf("%s: CONNECT event %v; want %s", c.what, ev, want)
		}

		// NTP, forwarded: by the frame's MAC.
		ntpAllow := c.ns != other
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		uc, err := c.ns.DialContext(ctx, "udp", net.JoinHostPort(ntpIP, "123"))
		if err != nil {
			cancel()
			t.Fatalf("%s: NTP: %v", c.what, err)
		}
		req := ntpRequest()
		err = askWithin(uc, 2*time.Second, req, func(r []byte) bool { return ntpAnswers(req, r) })
		uc.Close()
		cancel()
		if (err == nil) != (ntpAllow || !enforce) {
			t.Errorf("%s: NTP to %s: %v; want answered %v", c.what, ntpName, err, ntpAllow || !enforce)
		}
		ntpPorts[c.addr] = uc.LocalAddr().(*net.UDPAddr).Port
	}
	// A clean stop ends the UDP flows: capture records each it has read.
	// It stops reading at once: first let it read what the LAN sent (its
	// packet count unchanged over three looks).
	last, same := d.metric("egress_capture_packets_total"), 0
	for i := 0; i < 50 && same < 3; i++ {
		time.Sleep(100 * time.Millisecond)
		n := d.metric("egress_capture_packets_total")
		if n == last {
			same++
		} else {
			last, same = n, 0
		}
	}
	d.stop()
	evs := d.allEvents()
	for _, c := range clients {
		want := verdictOf(c.ns != other)
		n := 0
		for _, ev := range evs {
			if ev.Kind == "flow" && ev.Source == "capture" && ev.Client == c.addr && ev.ClientPort == ntpPorts[c.addr] && ev.Proto == "udp" {
				n++
				if ev.Verdict != want || ev.ClientMAC != kioskMAC && c.ns != other {
					t.Errorf("%s: NTP event %v mac %s; want %s from %s", c.what, ev, ev.ClientMAC, want, kioskMAC)
				}
			}
		}
		if n != 1 {
			t.Errorf("%s: %d NTP flows recorded by capture, want 1", c.what, n)
		}
	}
}

// connectVia asks the explicit proxy at proxyAddr, over a connection dial
// makes, for a CONNECT tunnel to target, and returns the status line of
// its answer and the client's local port; it does not use the tunnel.
func connectVia(dial func(context.Context, string) (net.Conn, error), proxyAddr, target string) (string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dial(ctx, proxyAddr)
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	port := c.LocalAddr().(*net.TCPAddr).Port
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n")); err != nil {
		return "", port, err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return line, port, err
}
