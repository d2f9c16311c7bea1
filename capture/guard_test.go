package capture

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// guardRig is a capture whose pipeline takes frames as if from a live
// socket on an interface with index 7 and MAC macGW, with a routing
// table that routes back the LAN's 198.18.5.0/24, a routed subnet
// 198.18.7.0/24, the LAN's 2001:db8:5::/64 and fe80::/64.
type guardRig struct {
	t     *testing.T
	c     *Capture
	rec   *recorder
	now   time.Time
	asked map[netip.Addr]int
}

func newGuardRig(t *testing.T, mode policy.Mode) *guardRig {
	return newGuardRigLog(t, mode, false, nil)
}

// newGuardRigLog is newGuardRig with Config.ProxyLines and a logger.
func newGuardRigLog(t *testing.T, mode policy.Mode, proxyLines bool, log *slog.Logger) *guardRig {
	return newGuardRigPolicy(t, testPolicy, mode, proxyLines, log)
}

// newGuardRigPolicy is newGuardRigLog with the policy src.
func newGuardRigPolicy(t *testing.T, src string, mode policy.Mode, proxyLines bool, log *slog.Logger) *guardRig {
	r := &guardRig{t: t, rec: &recorder{}, now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), asked: map[netip.Addr]int{}}
	own := []netip.Addr{netip.MustParseAddr("198.18.5.1"), netip.MustParseAddr("2001:db8:5::1")}
	c, err := New(Config{OwnAddrs: own, ProxyLines: func() bool { return proxyLines }}, Deps{Policy: policy.NewStore(testEngine(t, src).WithMode(mode)), Sink: r.rec, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	back := []netip.Prefix{netip.MustParsePrefix("198.18.5.0/24"), netip.MustParsePrefix("198.18.7.0/24"),
		netip.MustParsePrefix("2001:db8:5::/64"), netip.MustParsePrefix("fe80::/64")}
	c.routesBackHook = func(ifindex int, a netip.Addr) (bool, error) {
		if ifindex != 7 {
			t.Errorf("route lookup on interface %d, want 7", ifindex)
		}
		r.asked[a]++
		for _, p := range back {
			if p.Contains(a) && !slicesContains(own, a) {
				return true, nil
			}
		}
		return false, nil
	}
	c.proc.setSources([]source{{slot: 0, ifindex: 7, hasMAC: true, mac: [6]byte(macGW)}})
	c.proc.src = 1
	r.c = c
	return r
}

func slicesContains(s []netip.Addr, a netip.Addr) bool {
	for _, b := range s {
		if b == a {
			return true
		}
	}
	return false
}

// send runs one frame from a LAN host (fromGW: sent by the gateway) of
// the given IP protocol and transport through the pipeline.
func (r *guardRig) send(fromGW bool, src, dst string, proto layers.IPProtocol, ls ...gopacket.SerializableLayer) {
	r.t.Helper()
	r.liveIP(fromGW, ipLayer(netip.MustParseAddr(src), netip.MustParseAddr(dst), proto), ls...)
}

func (r *guardRig) udp(src string, sp uint16, dst string, dp uint16) {
	r.t.Helper()
	r.send(false, src, dst, layers.IPProtocolUDP, &layers.UDP{SrcPort: layers.UDPPort(sp), DstPort: layers.UDPPort(dp)}, gopacket.Payload("x"))
}

func (r *guardRig) icmp(src, dst string, typ uint8) {
	r.t.Helper()
	proto := layers.IPProtocolICMPv4
	if netip.MustParseAddr(src).Is6() {
		proto = layers.IPProtocolICMPv6
	}
	r.send(false, src, dst, proto, gopacket.Payload(icmpMsg(typ, "guard")))
}

// events ends the flows and returns their events by client.
func (r *guardRig) events() map[string][]audit.Event {
	r.c.proc.flush("shutdown")
	m := map[string][]audit.Event{}
	for _, ev := range r.rec.all() {
		m[ev.Client.String()] = append(m[ev.Client.String()], ev)
	}
	return m
}

// TestGuardedLANPackets: in both modes capture records, as denied with
// reasons of their own, the LAN packets enforce mode's antispoof chain
// and input guard drop: a source the LAN interface does not route back
// to (once per flow, three datagrams; 169.254/16 without a route among
// them), a destination in 127.0.0.0/8, a Router Advertisement, redirects
// to the gateway. It keeps the firewall's exceptions: DHCP from 0.0.0.0
// to the broadcast address, duplicate address detection from ::, IPv6
// link-local sources, a subnet routed via the LAN; frames the gateway
// sent are not checked, and each source is looked up once. Before
// session 26 the forged sources were recorded as clients (no-rule), and
// none of the rest.
func TestGuardedLANPackets(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := newGuardRig(t, mode)
			for range 3 {
				r.udp("198.51.100.77", 5000, "203.0.113.9", 9000)
				r.udp("2001:db8:99::77", 5000, "2001:db8:2::9", 9000)
			}
			r.udp("169.254.3.4", 5353, "224.0.0.251", 5353)
			r.udp("198.18.5.10", 5001, "203.0.113.9", 9000)                  // a LAN client
			r.udp("198.18.7.2", 5002, "203.0.113.9", 9000)                   // a routed subnet's
			r.udp("0.0.0.0", 68, "255.255.255.255", 67)                      // DHCP
			r.icmp("::", "ff02::1:ff00:10", 135)                             // DAD
			r.udp("fe80::1234", 5353, "ff02::fb", 5353)                      // link-local
			r.send(true, "203.0.113.9", "198.18.5.10", layers.IPProtocolUDP, // sent by the gateway
				&layers.UDP{SrcPort: 9000, DstPort: 5001}, gopacket.Payload("reply"))
			r.send(false, "198.18.5.10", "127.0.0.1", layers.IPProtocolTCP,
				&layers.TCP{SrcPort: 40000, DstPort: 9902, SYN: true, Seq: 1, Window: 1024})
			r.icmp("fe80::1234", "ff02::1", 134)       // RA
			r.icmp("fe80::1234", "2001:db8:5::1", 137) // IPv6 redirect to the gateway
			r.icmp("198.18.5.20", "198.18.5.1", 5)     // ICMP redirect to the gateway
			r.icmp("198.18.5.10", "203.0.113.9", 8)    // echo: no guard's
			evs := r.events()

			want := map[string]string{
				"198.51.100.77": ReasonForgedSource, "2001:db8:99::77": ReasonForgedSource, "169.254.3.4": ReasonForgedSource,
				"198.18.5.20": ReasonRedirect,
			}
			for cli, reason := range want {
				if len(evs[cli]) != 1 {
					t.Errorf("%s: %d events, want 1: %v", cli, len(evs[cli]), evs[cli])
					continue
				}
				ev := evs[cli][0]
				if ev.Verdict != policy.Deny || ev.Reason != reason || ev.Enforced != (mode == policy.ModeEnforce) {
					t.Errorf("%s: %s %q enforced=%v, want deny %q enforced=%v", cli, ev.Verdict, ev.Reason, ev.Enforced, reason, mode == policy.ModeEnforce)
				}
			}
			if evs["198.51.100.77"] != nil && evs["198.51.100.77"][0].BytesOut == 0 {
				t.Errorf("the forged flow counted no bytes: %+v", evs["198.51.100.77"][0])
			}
			reasons := map[string]int{}
			for cli, es := range evs {
				for _, ev := range es {
					reasons[ev.Reason]++
					guarded := ev.Reason == ReasonForgedSource || ev.Reason == ReasonLoopbackDestination || ev.Reason == ReasonRouterAdvertisement || ev.Reason == ReasonRedirect
					switch cli {
					case "198.18.5.10":
						if ev.Dest.String() == "127.0.0.1" {
							if ev.Reason != ReasonLoopbackDestination {
								t.Errorf("to loopback: %q, want %s", ev.Reason, ReasonLoopbackDestination)
							}
						} else if guarded {
							t.Errorf("a LAN client's flow: %+v", ev)
						}
					case "198.18.7.2", "0.0.0.0", "::", "203.0.113.9":
						if guarded {
							t.Errorf("%s: %q, want no guard's reason", cli, ev.Reason)
						}
					}
				}
			}
			if reasons[ReasonRouterAdvertisement] != 1 || reasons[ReasonRedirect] != 2 || reasons[ReasonLoopbackDestination] != 1 || reasons[ReasonForgedSource] != 3 {
				t.Errorf("reasons %v, want 1 router-advertisement, 2 redirects, 1 loopback-destination, 3 forged-source", reasons)
			}
			for _, a := range []string{"0.0.0.0", "::", "203.0.113.9"} {
				if n := r.asked[netip.MustParseAddr(a)]; n != 0 {
					t.Errorf("%s looked up %d times, want 0", a, n)
				}
			}
			if n := r.asked[netip.MustParseAddr("198.51.100.77")]; n != 1 {
				t.Errorf("198.51.100.77 looked up %d times, want once", n)
			}
			if st := r.c.Stats(); st.Own != 0 {
				t.Errorf("own flows %d: the redirect to the gateway must be recorded", st.Own)
			}
		})
	}
}

// TestGuardBounds: a flood of random forged sources asks the routing
// table at most rpfBudget times a second, keeps at most rpfMax answers,
// and at most Config.MaxFlows flows; sources over the budget are counted
// as unchecked, and an answer is asked again after rpfTTL.
func TestGuardBounds(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	r.c.cfg.MaxFlows = 1000
	total := 0
	const secs = rpfMax/rpfBudget + 8 // more answers than rpfMax
	for i := range secs * 2 * rpfBudget {
		if i%(rpfBudget*2) == 0 {
			r.now = r.now.Add(time.Second) // two budgets' worth a second
		}
		r.udp(fmt.Sprintf("100.%d.%d.%d", 64+i>>16&0x3f, i>>8&0xff, i&0xff), 5000, "203.0.113.9", 9000)
		total++
	}
	asked := 0
	for _, n := range r.asked {
		asked += n
	}
	if asked > secs*rpfBudget || asked <= rpfMax {
		t.Errorf("%d lookups for %d sources in %d s, want at most %d (and more than rpfMax %d)", asked, total, secs, secs*rpfBudget, rpfMax)
	}
	st := r.c.Stats()
	if st.RPFUnchecked == 0 || st.RPFUnchecked+uint64(asked) != uint64(total) {
		t.Errorf("unchecked %d + asked %d, want %d and some unchecked", st.RPFUnchecked, asked, total)
	}
	if n := len(r.c.proc.rpf.m); n > rpfMax {
		t.Errorf("%d answers kept, want at most %d", n, rpfMax)
	}
	if n := len(r.c.proc.flows); n > 1000 {
		t.Errorf("%d flows, want at most MaxFlows 1000", n)
	}
	r.now = r.now.Add(rpfTTL + time.Second)
	before := r.asked[netip.MustParseAddr("198.51.100.77")]
	r.udp("198.51.100.77", 5000, "203.0.113.9", 9000)
	r.udp("198.51.100.77", 5000, "203.0.113.9", 9000)
	r.now = r.now.Add(rpfTTL + time.Second)
	r.udp("198.51.100.77", 5000, "203.0.113.9", 9000)
	if n := r.asked[netip.MustParseAddr("198.51.100.77")] - before; n != 2 {
		t.Errorf("198.51.100.77 asked %d times in two TTLs, want 2", n)
	}
}

// TestGuardedFlowKeepsItsLine: in enforce mode beside the transparent
// proxy (Config.ProxyLines), a LAN client's connection to a redirected
// port has the proxy's decision line only, but a forged source's
// connection never reaches the proxy (the antispoof chain drops it
// first): capture's line is its only one.
func TestGuardedFlowKeepsItsLine(t *testing.T) {
	var out bytes.Buffer
	r := newGuardRigLog(t, policy.ModeEnforce, true, slog.New(slog.NewJSONHandler(&out, nil)))
	syn := func(src string) {
		r.send(false, src, "203.0.113.9", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: 443, SYN: true, Seq: 1, Window: 1024})
	}
	syn("198.51.100.77") // forged
	syn("198.18.5.10")   // a LAN client: the proxy's, once it completes the handshake
	r.send(false, "198.18.5.10", "203.0.113.9", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: 443, ACK: true, Seq: 2, Ack: 101, Window: 1024})
	evs := r.events()
	if len(evs["198.51.100.77"]) != 1 || evs["198.51.100.77"][0].Reason != ReasonForgedSource || len(evs["198.18.5.10"]) != 1 {
		t.Fatalf("events: %v", evs)
	}
	lines := linesByClient(out.String())
	if lines["198.51.100.77"] != 1 || lines["198.18.5.10"] != 0 {
		t.Errorf("decision lines by client %v, want one for the forged source, none for the proxied client\n%q", lines, out.String())
	}
}

// TestHalfOpenKeepsItsLine: beside the transparent proxy in enforce mode
// (Config.ProxyLines), the proxy writes the line of a connection it
// accepts, which it does once the client completes the handshake. A
// client that never does (a SYN scan's RST after the SYN-ACK, a SYN
// unanswered, a spoofed SYN) is never accepted, and the proxy never
// writes a line of it: capture's line is its only one.
func TestHalfOpenKeepsItsLine(t *testing.T) {
	var out bytes.Buffer
	r := newGuardRigLog(t, policy.ModeEnforce, true, slog.New(slog.NewJSONHandler(&out, nil)))
	tcp := func(src string, l *layers.TCP) {
		l.SrcPort, l.DstPort, l.Window = 40001, 443, 1024
		r.send(false, src, "203.0.113.9", layers.IPProtocolTCP, l)
	}
	tcp("198.18.5.10", &layers.TCP{SYN: true, Seq: 1})
	tcp("198.18.5.10", &layers.TCP{ACK: true, Seq: 2, Ack: 101}) // accepted: the proxy's line
	tcp("198.18.5.11", &layers.TCP{SYN: true, Seq: 1})
	tcp("198.18.5.11", &layers.TCP{RST: true, Seq: 2}) // a SYN scan
	tcp("198.18.5.12", &layers.TCP{SYN: true, Seq: 1}) // never completed
	evs := r.events()
	for _, cli := range []string{"198.18.5.10", "198.18.5.11", "198.18.5.12"} {
		if len(evs[cli]) != 1 {
			t.Fatalf("events of %s: %v", cli, evs[cli])
		}
	}
	lines := linesByClient(out.String())
	if lines["198.18.5.10"] != 0 || lines["198.18.5.11"] != 1 || lines["198.18.5.12"] != 1 {
		t.Errorf("decision lines by client %v, want none for the accepted connection, one each for the half-open ones\n%q", lines, out.String())
	}
}

// TestGuardedFlowKeepsItsReasonAcrossReload: a flow the gateway
// hardening drops (a forged source) is denied whatever the rules: a
// reload whose policy allows its destination, in audit mode or to
// enforce, leaves it denied with its reason (enforce's antispoof chain
// drops it before any rule). Before, the reload judged it as a forwarded
// flow and reported it allowed: the report took it off what enforce
// drops and counted it under the rule.
func TestGuardedFlowKeepsItsReasonAcrossReload(t *testing.T) {
	const open = `version: 1
mode: audit
rules:
  - name: everything
    to: [203.0.113.0/24]
    ports: [any]
`
	for _, to := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(to), func(t *testing.T) {
			r := newGuardRig(t, policy.ModeAudit)
			r.udp("198.51.100.77", 5000, "203.0.113.9", 9000) // forged
			r.c.proc.redecide(r.c.deps.Policy.Swap(testEngine(t, open).WithMode(to)), nil)
			r.udp("198.51.100.77", 5000, "203.0.113.9", 9000)
			// A LAN client's datagram to the same place: the reload's
			// policy and mode are in force (the forged flow's verdict
			// is not the old policy's, nor the same in both modes by
			// a reload not taken).
			r.udp("198.18.5.10", 5001, "203.0.113.9", 9000)
			all := r.events()
			evs := all["198.51.100.77"]
			if len(evs) == 0 {
				t.Fatal("no events of the forged source")
			}
			for _, ev := range evs {
				if ev.Verdict != policy.Deny || ev.Reason != ReasonForgedSource {
					t.Errorf("event %s %s %s after the reload, want deny %s", ev.Verdict, ev.Rule, ev.Reason, ReasonForgedSource)
				}
			}
			if lan := all["198.18.5.10"]; len(lan) != 1 || lan[0].Verdict != policy.Allow || lan[0].Rule != "everything" || lan[0].Mode != to {
				t.Errorf("the LAN client's flow after the reload: %+v, want one allowed by everything in %s mode", lan, to)
			}
		})
	}
}

// TestProxyLinesAtOpen: whether the proxy has a connection's line is
// settled when it opens (NAT applies to its first packet): one opened
// before the firewall redirected to the proxy (a start's first moments)
// keeps capture's line though the redirect is in by its report, and one
// opened while it was keeps none though the proxy stopped since (it
// accepted the connection, and writes its line when it closes it).
func TestProxyLinesAtOpen(t *testing.T) {
	var out bytes.Buffer
	redirecting := false
	r := newGuardRigLog(t, policy.ModeEnforce, true, slog.New(slog.NewJSONHandler(&out, nil)))
	r.c.cfg.ProxyLines = func() bool { return redirecting }
	conn := func(src string) {
		r.send(false, src, "203.0.113.9", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: 443, SYN: true, Seq: 1, Window: 1024})
		r.send(false, src, "203.0.113.9", layers.IPProtocolTCP, &layers.TCP{SrcPort: 40001, DstPort: 443, ACK: true, Seq: 2, Ack: 101, Window: 1024})
	}
	conn("198.18.5.10") // before the redirect
	redirecting = true
	conn("198.18.5.11") // redirected
	redirecting = false
	evs := r.events()
	if len(evs["198.18.5.10"]) != 1 || len(evs["198.18.5.11"]) != 1 {
		t.Fatalf("events: %v", evs)
	}
	lines := linesByClient(out.String())
	if lines["198.18.5.10"] != 1 || lines["198.18.5.11"] != 0 {
		t.Errorf("decision lines by client %v, want one for the connection opened before the redirect, none for the redirected one", lines)
	}
}

// TestGuardMappedAndZero keeps capture's guard to what Linux does (kernel
// 6.18, checked with raw frames in namespaces: nft counters, nstat). An
// IPv6 packet from an IPv4-mapped source (::ffff:198.18.5.77) reaches
// netfilter, and the antispoof chain's nft_fib looks it up in the IPv6
// table, where only the default route covers it: capture asks the routing
// table for the mapped address (not its IPv4 form, which the LAN routes
// back) and records it forged-source under the address the header
// carries, not as the IPv4 client's. An IPv6 packet to ::ffff:127.0.0.1
// is not a loopback destination (the kernel forwards it by its IPv6
// routes; the firewall's loopback rule is IPv4's): the policy decides it.
// A packet from 0.0.0.0 to anything but the broadcast address or a local
// multicast group is dropped by the kernel after prerouting in both modes
// (a martian source; it reaches neither the input nor the forward chain),
// so capture records no flow for it and asks nothing (Stats.Martian).
// Before, the mapped source was unmapped and passed as the LAN client's
// own, the mapped loopback recorded loopback-destination, and 0.0.0.0
// looked up and recorded forged-source.
func TestGuardMappedAndZero(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := newGuardRig(t, mode)
			r.udp("::ffff:198.18.5.77", 5000, "2001:db8:2::9", 9000)
			r.udp("::ffff:198.18.5.77", 5000, "2001:db8:2::9", 9000)
			r.udp("2001:db8:5::10", 5001, "::ffff:127.0.0.1", 9000)
			r.udp("0.0.0.0", 5002, "203.0.113.9", 9000)
			r.udp("0.0.0.0", 68, "198.18.5.1", 67)
			r.udp("0.0.0.0", 68, "255.255.255.255", 67) // DHCP: a flow
			evs := r.events()
			if es := evs["::ffff:198.18.5.77"]; len(es) != 1 || es[0].Reason != ReasonForgedSource || es[0].Verdict != policy.Deny || es[0].Enforced != (mode == policy.ModeEnforce) {
				t.Errorf("mapped source: %+v, want one forged-source deny", es)
			}
			if es := evs["198.18.5.77"]; len(es) != 0 {
				t.Errorf("the mapped source charged to the IPv4 client: %+v", es)
			}
			if n := r.asked[netip.MustParseAddr("::ffff:198.18.5.77")]; n != 1 || r.asked[netip.MustParseAddr("198.18.5.77")] != 0 {
				t.Errorf("asked %v, want ::ffff:198.18.5.77 once and not its IPv4 form", r.asked)
			}
			if es := evs["2001:db8:5::10"]; len(es) != 1 || es[0].Reason == ReasonLoopbackDestination {
				t.Errorf("to ::ffff:127.0.0.1: %+v, want one flow the policy decides", es)
			}
			zero := 0
			for _, ev := range evs["0.0.0.0"] {
				zero++
				if ev.Dest.String() != "255.255.255.255" {
					t.Errorf("0.0.0.0 to %s recorded: %+v", ev.Dest, ev)
				}
			}
			if zero != 1 {
				t.Errorf("%d flows from 0.0.0.0, want the broadcast one", zero)
			}
			if n := r.asked[netip.IPv4Unspecified()]; n != 0 {
				t.Errorf("0.0.0.0 looked up %d times, want 0", n)
			}
			if st := r.c.Stats(); st.Martian != 2 {
				t.Errorf("Stats.Martian %d, want 2", st.Martian)
			}
		})
	}
}

// TestGuardNotEnforcedWithoutFirewall: in enforce mode with no firewall
// of egressd's (--no-firewall, or one that did not install:
// Config.Firewall false) nothing of egressd's drops what the gateway
// hardening would: the forged source, the loopback destination, the
// Router Advertisement and the redirect are recorded denied with their
// reasons, as enforce would drop them, but not enforced; so is a LAN
// client's flow no rule allows, as nftables' forward chain is not there
// either. Before, each was recorded as an enforced drop.
func TestGuardNotEnforcedWithoutFirewall(t *testing.T) {
	for _, installed := range []bool{false, true} {
		t.Run(fmt.Sprintf("firewall=%v", installed), func(t *testing.T) {
			r := newGuardRig(t, policy.ModeEnforce)
			r.c.cfg.Firewall = func() bool { return installed }
			r.udp("198.51.100.77", 5000, "203.0.113.9", 9000) // forged
			r.send(false, "198.18.5.10", "127.0.0.1", layers.IPProtocolTCP,
				&layers.TCP{SrcPort: 40000, DstPort: 9902, SYN: true, Seq: 1, Window: 1024})
			r.icmp("fe80::1234", "ff02::1", 134)            // RA
			r.icmp("198.18.5.20", "198.18.5.1", 5)          // ICMP redirect to the gateway
			r.udp("198.18.5.11", 5001, "203.0.113.9", 9000) // no rule
			evs := r.events()
			want := map[string]string{
				"198.51.100.77": ReasonForgedSource, "198.18.5.10": ReasonLoopbackDestination,
				"fe80::1234": ReasonRouterAdvertisement, "198.18.5.20": ReasonRedirect, "198.18.5.11": "no-rule",
			}
			for cli, reason := range want {
				if len(evs[cli]) != 1 {
					t.Errorf("%s: %d events, want 1: %v", cli, len(evs[cli]), evs[cli])
					continue
				}
				if ev := evs[cli][0]; ev.Verdict != policy.Deny || ev.Reason != reason || ev.Enforced != installed {
					t.Errorf("%s: %s %q enforced=%v, want deny %q enforced=%v", cli, ev.Verdict, ev.Reason, ev.Enforced, reason, installed)
				}
			}
		})
	}
}

// TestProxyAcceptedHasTheLine: with no firewall of egressd's redirecting
// (--no-firewall: Config.ProxyLines false) an operator's own redirect may
// still bring a connection to the transparent proxy, which writes its
// line: the proxy says so (ProxyAccepted), and capture's report of that
// connection is then an event only. A connection the proxy did not
// report keeps capture's line, as does one to another destination from
// the same client port. Before session 27 such a connection had two
// lines, capture's and the proxy's.
func TestProxyAcceptedHasTheLine(t *testing.T) {
	var out bytes.Buffer
	r := newGuardRigLog(t, policy.ModeEnforce, false, slog.New(slog.NewJSONHandler(&out, nil)))
	tcp := func(src, dst string, l *layers.TCP) {
		l.SrcPort, l.DstPort, l.Window = 40001, 443, 1024
		r.send(false, src, dst, layers.IPProtocolTCP, l)
	}
	r.c.ProxyAccepted(netip.MustParseAddrPort("198.18.5.10:40001"), netip.MustParseAddrPort("203.0.113.9:443"), endedIs(false))
	r.c.ProxyAccepted(netip.MustParseAddrPort("198.18.5.12:40001"), netip.MustParseAddrPort("203.0.113.99:443"), endedIs(false))
	for _, cli := range []string{"198.18.5.10", "198.18.5.11", "198.18.5.12"} {
		tcp(cli, "203.0.113.9", &layers.TCP{SYN: true, Seq: 1})
		tcp(cli, "203.0.113.9", &layers.TCP{ACK: true, Seq: 2, Ack: 101})
	}
	evs := r.events()
	lines := linesByClient(out.String())
	for cli, want := range map[string]int{"198.18.5.10": 0, "198.18.5.11": 1, "198.18.5.12": 1} {
		if len(evs[cli]) != 1 {
			t.Errorf("events of %s: %v, want 1", cli, evs[cli])
		}
		if lines[cli] != want {
			t.Errorf("%s: %d decision lines, want %d\n%s", cli, lines[cli], want, out.String())
		}
	}
}

// TestProxyTellsOverload: where the proxy tells capture the connections
// it accepts (Config.ProxyTells, as in egressd run), that word alone
// makes a line the proxy's. A connection egressd's firewall redirected
// whose client completed the handshake but which the proxy never
// accepted (the kernel dropped the handshake's end on a full accept
// queue, and the client gave up) keeps capture's line. Before session 27
// capture left it to the proxy, and it had none. One the proxy accepts
// after capture's line has that line only (ProxyAccepted reports true).
func TestProxyTellsOverload(t *testing.T) {
	var out bytes.Buffer
	r := newGuardRigLog(t, policy.ModeEnforce, true, slog.New(slog.NewJSONHandler(&out, nil)))
	r.c.cfg.ProxyTells = true
	tcp := func(src string, l *layers.TCP) {
		l.SrcPort, l.DstPort, l.Window = 40001, 443, 1024
		r.send(false, src, "203.0.113.9", layers.IPProtocolTCP, l)
	}
	r.c.ProxyAccepted(netip.MustParseAddrPort("198.18.5.10:40001"), netip.MustParseAddrPort("203.0.113.9:443"), endedIs(false))
	for _, cli := range []string{"198.18.5.10", "198.18.5.11"} {
		tcp(cli, &layers.TCP{SYN: true, Seq: 1})
		tcp(cli, &layers.TCP{ACK: true, Seq: 2, Ack: 101})
		tcp(cli, &layers.TCP{FIN: true, ACK: true, Seq: 2, Ack: 101})
	}
	evs := r.events()
	lines := linesByClient(out.String())
	for cli, want := range map[string]int{"198.18.5.10": 0, "198.18.5.11": 1} {
		if len(evs[cli]) != 1 {
			t.Errorf("events of %s: %v, want 1", cli, evs[cli])
		}
		if lines[cli] != want {
			t.Errorf("%s: %d decision lines, want %d\n%s", cli, lines[cli], want, out.String())
		}
	}
	// The proxy that takes the second from its queue after capture wrote
	// its line (the client gone by then) is told so, once, and writes
	// none; told of another, it writes its own.
	late := netip.MustParseAddrPort("198.18.5.11:40001")
	for i, want := range []bool{true, false} {
		if got := r.c.ProxyAccepted(late, netip.MustParseAddrPort("203.0.113.9:443"), endedIs(true)); got != want {
			t.Errorf("ProxyAccepted of a connection capture lined, call %d: %v, want %v", i+1, got, want)
		}
	}
	if r.c.ProxyAccepted(late, netip.MustParseAddrPort("203.0.113.99:443"), endedIs(true)) {
		t.Errorf("ProxyAccepted of a connection to another destination: capture lined it")
	}
}

// tcpFrom11 sends the rig TCP segments of 198.18.5.11:40001 to
// 203.0.113.9:443, from the LAN.
func (r *guardRig) tcpFrom11() func(*layers.TCP) {
	return func(l *layers.TCP) {
		l.SrcPort, l.DstPort, l.Window = 40001, 443, 1024
		r.send(false, "198.18.5.11", "203.0.113.9", layers.IPProtocolTCP, l)
	}
}

// endedIs is ProxyAccepted's ended answering v.
func endedIs(v bool) func() bool { return func() bool { return v } }

// TestProxyAcceptedAsksEnded: ProxyAccepted asks whether the client ended
// a connection (in the proxy, a TCP_INFO system call) only for one whose
// 4-tuple capture lined already, not for every connection the proxy
// accepts. Before session 29 the proxy read TCP_INFO for each.
func TestProxyAcceptedAsksEnded(t *testing.T) {
	r := newGuardRigLog(t, policy.ModeEnforce, true, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	r.c.cfg.ProxyTells = true
	asked := 0
	ended := func() bool { asked++; return true }
	if r.c.ProxyAccepted(netip.MustParseAddrPort("198.18.5.10:40001"), netip.MustParseAddrPort("203.0.113.9:443"), ended) || asked != 0 {
		t.Errorf("a connection capture never saw: asked %d times whether it ended, want 0", asked)
	}
	tcp := r.tcpFrom11()
	tcp(&layers.TCP{SYN: true, Seq: 1})
	tcp(&layers.TCP{ACK: true, Seq: 2, Ack: 101})
	tcp(&layers.TCP{RST: true, Seq: 2})
	r.events()
	if !r.c.ProxyAccepted(netip.MustParseAddrPort("198.18.5.11:40001"), netip.MustParseAddrPort("203.0.113.9:443"), ended) || asked != 1 {
		t.Errorf("a connection capture lined: asked %d times whether it ended, want 1 (and lined)", asked)
	}
}

// linesByClient counts the canonical decision lines in a JSON log by
// their client.
func linesByClient(log string) map[string]int {
	lines := map[string]int{}
	for _, l := range strings.Split(strings.TrimSpace(log), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == audit.CanonicalMessage {
			cli, _ := m["client"].(string)
			lines[cli]++
		}
	}
	return lines
}

// TestProxyTellsReusedTuple: a connection capture lined that the proxy
// never accepted (its handshake's end dropped on a full accept queue,
// the client gave up with a reset) leaves a record that capture wrote
// its line, kept for a proxy that may accept it late. A new connection
// of the same 4-tuple (a new SYN) within that time is another flow: the
// proxy that accepts it writes its line, and capture's report of it is
// the event only.
func TestProxyTellsReusedTuple(t *testing.T) {
	var out bytes.Buffer
	r := newGuardRigLog(t, policy.ModeEnforce, true, slog.New(slog.NewJSONHandler(&out, nil)))
	r.c.cfg.ProxyTells = true
	tcp := r.tcpFrom11()
	// The first: capture lines it, the proxy never accepts it.
	tcp(&layers.TCP{SYN: true, Seq: 1})
	tcp(&layers.TCP{ACK: true, Seq: 2, Ack: 101})
	tcp(&layers.TCP{RST: true, Seq: 2})
	// The second, of the same 4-tuple: the proxy accepts it.
	tcp(&layers.TCP{SYN: true, Seq: 5000})
	tcp(&layers.TCP{ACK: true, Seq: 5001, Ack: 9001})
	if r.c.ProxyAccepted(netip.MustParseAddrPort("198.18.5.11:40001"), netip.MustParseAddrPort("203.0.113.9:443"), endedIs(false)) {
		t.Errorf("ProxyAccepted of the second connection: lined already (the first's record), the proxy writes no line")
	}
	tcp(&layers.TCP{FIN: true, ACK: true, Seq: 5001, Ack: 9001})
	evs := r.events()
	if len(evs["198.18.5.11"]) != 2 {
		t.Errorf("events: %v, want 2", evs["198.18.5.11"])
	}
	if n := linesByClient(out.String())["198.18.5.11"]; n != 1 {
		t.Errorf("%d decision lines of capture's, want 1 (the first connection's)\n%s", n, out.String())
	}
}
