package dnsfilter

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/internal/testnet"
)

// TestLinkLocalClientEventsCarryNoZone: a LAN client asking over its
// link-local address reaches the forwarder's socket as fe80::2%lan0; the
// query events and the tunnel alarms name it fe80::2, as the proxy's
// events and capture's do (audit.ClientAddr), so the report counts one
// device once. They carried the zone: the same device's DNS queries
// counted as a second client. Two namespaces joined by a veth pair, the
// forwarder in one, the client in the other.
func TestLinkLocalClientEventsCarryNoZone(t *testing.T) {
	gw := testnet.New(t, "n2llgw")
	cl := testnet.New(t, "n2llcl")
	testnet.Link(t, gw, "lan0", []string{"fe80::1/64"}, cl, "eth0", []string{"fe80::2/64"})
	// lan0 keeps the kernel's own link-local address (EUI-64) beside
	// fe80::1: the answers still leave from fe80::1, the address asked
	// (TestUDPAnswerFromAddressAsked).
	onlyLinkLocal(t, cl, "eth0", "fe80::2")
	up := newFakeUpstream(t, "") // on the host's loopback: the forwarder's upstream sockets are made outside gw
	cfg := Config{Listen: []string{"[::]:0"}, Upstreams: []string{up.Addr}, UDPReaders: 1, ClientRate: -1, TunnelThreshold: 3}
	sink := &recSink{}
	s, err := New(cfg, Deps{Policy: compile(t, tunnelPolicy), Sink: sink})
	if err != nil {
		t.Fatal(err)
	}
	runServer(t, s, gw)
	port := s.Addrs()[0].Port()
	zone := cl.IfIndex(t, "eth0")
	server := netip.AddrPortFrom(netip.MustParseAddr("fe80::1").WithZone(zone), port).String()
	client := netip.MustParseAddr("fe80::2")
	exchange := func(proto, name string) (*dns.Msg, error) {
		var r *dns.Msg
		err := cl.Do(func() error {
			m := new(dns.Msg).SetQuestion(name, dns.TypeA)
			d := &net.Dialer{Timeout: 6 * time.Second}
			src := net.IP(client.AsSlice())
			if proto == "tcp" {
				d.LocalAddr = &net.TCPAddr{IP: src, Zone: zone}
			} else {
				d.LocalAddr = &net.UDPAddr{IP: src, Zone: zone}
			}
			var err error
			r, _, err = (&dns.Client{Net: proto, Timeout: 6 * time.Second, Dialer: d}).Exchange(m, server)
			return err
		})
		return r, err
	}
	for i, proto := range []string{"tcp", "udp", "tcp", "udp", "tcp", "udp", "tcp", "udp"} {
		name := fmt.Sprintf("n%d.t.allowed.test.", i)
		r, err := exchange(proto, name)
		if err != nil {
			t.Fatalf("%s %s: %v", proto, name, err)
		}
		if r.Rcode != dns.RcodeNameError {
			t.Fatalf("%s %s: %v, want the upstream's NXDOMAIN", proto, name, r)
		}
	}
	var queries, alarms int
	for _, ev := range sink.Events() {
		switch ev.Kind {
		case audit.KindDNS:
			queries++
		case audit.KindAlarm:
			alarms++
			if len(ev.TopClients) != 0 {
				if !slices.Equal(ev.TopClients, []string{client.String()}) {
					t.Errorf("alarm %s: top clients %q, want [%s]", ev.Reason, ev.TopClients, client)
				}
				continue // zone-wide: no one client
			}
		default:
			continue
		}
		if ev.Client != client {
			t.Errorf("%s event (%s %s): client %v, want %v", ev.Kind, ev.Proto, ev.Name, ev.Client, client)
		}
	}
	if queries != 8 || alarms == 0 {
		t.Errorf("%d query events and %d alarms, want 8 and at least 1", queries, alarms)
	}
}

// onlyLinkLocal removes the link-local addresses of dev in ns other than
// keep.
func onlyLinkLocal(t *testing.T, ns *testnet.NS, dev, keep string) {
	t.Helper()
	out := ns.MustRun("ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		i := slices.Index(f, "inet6")
		if i < 0 || i+1 >= len(f) {
			continue
		}
		if p, err := netip.ParsePrefix(f[i+1]); err == nil && p.Addr().String() != keep {
			ns.MustRun("ip", "-6", "addr", "del", f[i+1], "dev", dev)
		}
	}
}
