package dnsfilter

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/internal/fakemac"
)

var (
	kioskMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0a}
	otherMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0b}
	loopback = netip.MustParseAddr("127.0.0.1")
)

// macPolicy names its only clients by MAC: a TCP rule (the proxy's) and a
// UDP rule whose addresses the firewall must take.
const macPolicy = `version: 1
mode: enforce
groups:
  kiosks: ["02:00:00:00:00:0a"]
rules:
  - name: web
    from: [kiosks]
    to: [api.allowed.test]
    ports: [443/tcp]
  - name: ntp
    from: [kiosks]
    to: ["*.allowed.test"]
    ports: [123/udp]
`

// TestClientMAC: under a policy that names clients by MAC the forwarder
// asks Deps.MACs the client's MAC and decides with it, over UDP (on the
// general path: the fast path leaves such queries alone, as the lookup
// may wait for the kernel) and TCP; the event says the MAC; the
// firewall's gate hands the addresses on with it, for the rules that let
// that MAC resolve the name. A client with another MAC, or none, is
// refused.
func TestClientMAC(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{loopback: kioskMAC})
	fw := &recFirewall{wants: map[string]bool{"ntp": true}}
	ts := startServer(t, macPolicy, Config{Upstreams: []string{up.Addr}, LearnTimeout: 5 * time.Second}, Deps{MACs: macs, Firewall: fw})

	lastEvent := func(proto string) audit.Event {
		t.Helper()
		evs := ts.Sink.Events()
		for i := len(evs) - 1; i >= 0; i-- {
			if evs[i].Proto == proto {
				return evs[i]
			}
		}
		t.Fatalf("no %s event", proto)
		return audit.Event{}
	}
	for _, proto := range []string{"udp", "tcp"} {
		for _, c := range []struct {
			what  string
			mac   net.HardwareAddr
			allow bool
		}{{"the kiosk's MAC", kioskMAC, true}, {"another MAC", otherMAC, false}, {"no MAC", nil, false}} {
			macs.Set(loopback, c.mac)
			asked := macs.Asked()
			before := len(fw.Calls())
			r := ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeA, false)
			if got := r.Rcode == dns.RcodeSuccess; got != c.allow {
				t.Errorf("%s, %s: %s, want allowed %v", proto, c.what, dns.RcodeToString[r.Rcode], c.allow)
			}
			if n := macs.Asked() - asked; n != 1 {
				t.Errorf("%s, %s: the MAC asked %d times for one query, want 1", proto, c.what, n)
			}
			ev := lastEvent(proto)
			if ev.ClientMAC != c.mac.String() || (ev.Verdict == "allow") != c.allow {
				t.Errorf("%s, %s: event %+v", proto, c.what, ev)
			}
			calls := fw.Calls()[before:]
			if !c.allow {
				if len(calls) != 0 {
					t.Errorf("%s, %s: the firewall was given %v", proto, c.what, calls)
				}
				continue
			}
			// The cache holds the answer after the first allowed query:
			// the gate asks the firewall once per entry and engine.
			if proto == "udp" {
				if len(calls) != 1 || len(calls[0]) != 1 || calls[0][0].Rule != "ntp" || calls[0][0].ClientMAC.String() != kioskMAC.String() {
					t.Errorf("%s, %s: the firewall was given %v, want one address for ntp with the kiosk's MAC", proto, c.what, calls)
				}
			}
		}
	}

	// The fast path leaves the policy's queries alone (a cached answer
	// too), without asking the MAC.
	pkt, src := fastQuery(t)
	conn := ts.firstUDP()
	asked := macs.Asked()
	if ts.fast(newScratch(), conn, pkt, src) {
		t.Error("the fast path answered a query of a policy that names MACs")
	}
	if n := macs.Asked() - asked; n != 0 {
		t.Errorf("the fast path asked the MAC %d times", n)
	}
}

// TestClientMACNotAsked: a policy that names no MAC never asks Deps.MACs,
// and its cached answers stay on the fast path.
func TestClientMACNotAsked(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{loopback: kioskMAC})
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{MACs: macs})
	for _, proto := range []string{"udp", "tcp"} {
		if r := ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess {
			t.Errorf("%s: %s", proto, dns.RcodeToString[r.Rcode])
		}
		if r := ask(t, proto, ts.Addr, "www.denied.test.", dns.TypeA, false); r.Rcode != dns.RcodeRefused {
			t.Errorf("%s: denied name: %s", proto, dns.RcodeToString[r.Rcode])
		}
	}
	if n := macs.Asked(); n != 0 {
		t.Errorf("the MAC asked %d times under a policy that names none", n)
	}
	for _, ev := range ts.Sink.Events() {
		if ev.ClientMAC != "" {
			t.Errorf("event with a MAC under a policy that names none: %+v", ev)
		}
	}
	pkt, src := fastQuery(t)
	conn := ts.firstUDP()
	if !ts.fast(newScratch(), conn, pkt, src) {
		t.Error("a cached answer left the fast path")
	}
}

// TestWouldLearnMAC: restoring the table under a policy that names
// clients by MAC keeps the items of the clients whose MAC it lets resolve
// the name, asking each client's MAC once.
func TestWouldLearnMAC(t *testing.T) {
	kiosk, other, routed := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.20"), netip.MustParseAddr("198.51.100.7")
	old := NewTable(0)
	exp := time.Now().Add(time.Hour)
	for i, c := range []netip.Addr{kiosk, other, routed} {
		for j := range 3 {
			old.Learn(Learned{Client: c, Name: "www.allowed.test", Addr: netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + 10*i + j)}), Rule: "ntp", Expires: exp})
		}
	}
	var file bytes.Buffer
	if _, err := old.Save(&file); err != nil {
		t.Fatal(err)
	}
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{kiosk: kioskMAC, other: otherMAC})
	tb := NewTable(0)
	n, err := tb.Load(bytes.NewReader(file.Bytes()), Config{}.WouldLearn(compile(t, macPolicy).Load(), macs))
	if err != nil || n != 3 {
		t.Fatalf("Load: %d, %v; want the kiosk's 3 items", n, err)
	}
	for _, l := range tb.HeldAll(nil) {
		if l.Client != kiosk {
			t.Errorf("restored %+v", l)
		}
	}
	if got := macs.Asked(); got != 3 {
		t.Errorf("the MAC asked %d times for 3 clients' 9 items, want 3", got)
	}
	// Without MACs, none.
	if n, err := NewTable(0).Load(bytes.NewReader(file.Bytes()), Config{}.WouldLearn(compile(t, macPolicy).Load(), nil)); err != nil || n != 0 {
		t.Errorf("Load without MACs: %d, %v; want none", n, err)
	}
}
