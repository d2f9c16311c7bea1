package dnsfilter

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/fakemac"
)

// TestEventDeviceMAC: where the rate limiter looked up the client's
// device (Deps.Devices), the query's event carries the device's MAC,
// under a policy that names no MAC, on every path (the UDP fast path's
// miss and cache hit, the general path over TCP, a query the limit
// dropped), without asking the table more than the limiter does. A
// client without a device has none.
func TestEventDeviceMAC(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	dev := net.HardwareAddr{0x02, 0, 0, 0, 0x50, 0x23}
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{loopback: dev})
	const burst = 6
	ts := startServer(t, auditPolicy, Config{Upstreams: []string{up.Addr}, ClientRate: 0.001, ClientBurst: burst}, Deps{Devices: devs})

	for _, proto := range []string{"udp", "udp", "tcp", "udp"} {
		ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeA, false)
	}
	// Over the burst: dropped (UDP, no answer), refused (TCP).
	tryAsk("udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	tryAsk("tcp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	tryAsk("tcp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	var evs []dnsEvent
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		evs = eventsOf(ts)
		if len(evs) >= 7 {
			break
		}
	}
	if len(evs) != 7 {
		t.Fatalf("%d events, want 7: %+v", len(evs), evs)
	}
	hits, limited := 0, 0
	for _, ev := range evs {
		if ev.mac != dev.String() {
			t.Errorf("event %+v: client_mac %q, want the device's %s", ev, ev.mac, dev)
		}
		if ev.hit {
			hits++
		}
		if ev.reason == ReasonRateLimited {
			limited++
		}
	}
	if hits == 0 || limited == 0 {
		t.Errorf("%d cache hits, %d limited: the test did not reach the fast path's hit or the limit", hits, limited)
	}
	// No lookup of its own: the limiter asked once (the address is new
	// to it; it has a device, so not again), and the TCP connections'
	// slots once each at most (an address holding no slot, 3 of them).
	asks := devs.Asked()
	if asks > 1+3 {
		t.Errorf("the device table was asked %d times for 7 queries (3 over TCP) of a client it knows, want at most 4", asks)
	}

	// A client without a device: no MAC.
	devs.Set(loopback, nil)
	ts2 := startServer(t, auditPolicy, Config{Upstreams: []string{up.Addr}, ClientRate: 100, ClientBurst: 100}, Deps{Devices: devs})
	ask(t, "udp", ts2.Addr, "www.allowed.test.", dns.TypeA, false)
	if ev, ok := ts2.Sink.find("www.allowed.test"); !ok || ev.ClientMAC != "" {
		t.Errorf("a client without a device: event %+v (found %v), want no MAC", ev, ok)
	}
}

type dnsEvent struct {
	mac, reason string
	hit         bool
}

func eventsOf(ts *testServer) []dnsEvent {
	var out []dnsEvent
	for _, ev := range ts.Sink.Events() {
		out = append(out, dnsEvent{ev.ClientMAC, ev.Reason, ev.CacheHit})
	}
	return out
}
