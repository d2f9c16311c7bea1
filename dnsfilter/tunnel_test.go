package dnsfilter

import (
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/internal/fakemac"
	"egressd/policy"
)

const tunnelPolicy = `version: 1
mode: audit
rules:
  - name: tenant
    to: ["*.t.allowed.test", "exact.allowed.test"]
    ports: [443/tcp]
`

// askFrom sends one UDP query from the loopback address src (any of
// 127/8 is the host's own on Linux) and returns the answer's rcode.
func askFrom(t *testing.T, src, addr, name string) int {
	t.Helper()
	return exchangeFrom(t, src, "udp", addr, name, dns.TypeA).Rcode
}

func tunnelAlarms(s *recSink) []audit.Event {
	var out []audit.Event
	for _, ev := range s.Events() {
		if ev.Kind == audit.KindAlarm {
			out = append(out, ev)
		}
	}
	return out
}

// A client sending 2,000 distinct names under an allowed wildcard raises
// one alarm (not one per name past the threshold), every query answered;
// a client resolving 50 names of the same zone, and names a rule names
// exactly, raise none.
func TestTunnelAlarm(t *testing.T) {
	up := newFakeUpstream(t, "")
	reg := prometheus.NewRegistry()
	ts := startServer(t, tunnelPolicy, Config{Upstreams: []string{up.Addr}, TunnelThreshold: 500}, Deps{Registerer: reg})
	for i := range 50 {
		if rc := askFrom(t, "127.0.0.2", ts.Addr, fmt.Sprintf("cdn%d.t.allowed.test", i)); rc != dns.RcodeNameError {
			t.Fatalf("rcode %d", rc)
		}
	}
	for range 600 {
		askFrom(t, "127.0.0.2", ts.Addr, "exact.allowed.test")
	}
	if a := tunnelAlarms(ts.Sink); len(a) != 0 {
		t.Fatalf("50 names and one exact name raised %d alarms: %+v", len(a), a)
	}
	for i := range 2000 {
		if rc := askFrom(t, "127.0.0.3", ts.Addr, fmt.Sprintf("mzxw6ytboi%04d.t.allowed.test", i)); rc != dns.RcodeNameError {
			t.Fatalf("query %d: rcode %d, want the upstream's NXDOMAIN (an alarm, not a block)", i, rc)
		}
	}
	a := tunnelAlarms(ts.Sink)
	if len(a) != 1 {
		t.Fatalf("2,000 names raised %d alarms, want 1: %+v", len(a), a)
	}
	ev := a[0]
	if ev.Client != netip.MustParseAddr("127.0.0.3") || ev.Name != "t.allowed.test" || ev.Reason != ReasonTunnel ||
		ev.Source != audit.SourceDNS || ev.Rule != "tenant" || ev.Count < 475 || ev.Count > 600 {
		t.Errorf("alarm %+v: want client 127.0.0.3, zone t.allowed.test, rule tenant, about 500 names", ev)
	}
	if n := up.count("mzxw6ytboi1999.t.allowed.test"); n != 1 {
		t.Errorf("the last name reached the upstream %d times, want 1", n)
	}
	if got := gatheredCounter(t, reg, "egress_dnsfilter_tunnel_alarms_total"); got != 1 {
		t.Errorf("egress_dnsfilter_tunnel_alarms_total %v, want 1", got)
	}
}

// Each window alarms once: the same client past the threshold in the
// next window alarms again.
func TestTunnelAlarmPerWindow(t *testing.T) {
	up := newFakeUpstream(t, "")
	var offset atomic.Int64 // the clock runs, and jumps a window ahead between windows
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	ts := startServer(t, tunnelPolicy, Config{Upstreams: []string{up.Addr}, TunnelThreshold: 100, TunnelWindow: time.Minute, CacheSize: -1}, Deps{Now: now})
	for w := range 2 {
		for i := range 300 {
			askFrom(t, "127.0.0.4", ts.Addr, fmt.Sprintf("w%dn%d.t.allowed.test", w, i))
		}
		if a := tunnelAlarms(ts.Sink); len(a) != w+1 {
			t.Fatalf("window %d: %d alarms, want %d", w, len(a), w+1)
		}
		offset.Add(int64(61 * time.Second))
	}
}

// Random names from many clients of many zones keep each watch (pairs,
// zones, the long window) within its bound, and a name costs no
// allocation once they are full (the sketches of evicted pairs are
// reused).
func TestTunnelWatchBounded(t *testing.T) {
	tun := newTunnels(500, time.Minute)
	now := time.Now().UnixNano()
	rng := rand.New(rand.NewPCG(1, 2))
	clients := make([]string, 4*tunnelKeys)
	for i := range clients {
		clients[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String()
	}
	zones := make([]string, 2*tunnelKeys)
	for i := range zones {
		zones[i] = fmt.Sprintf("z%d.allowed.test", i)
	}
	names := make([]string, 4096)
	for i := range names {
		names[i] = fmt.Sprintf("%016x.t.allowed.test", rng.Uint64())
	}
	bounded := func() {
		t.Helper()
		for _, w := range []*tunnelWatch{tun.pair, tun.zone, tun.slow, tun.zoneSlow} {
			if n := w.len(); n > tunnelKeys {
				t.Fatalf("%d pairs held, bound %d", n, tunnelKeys)
			}
		}
	}
	for i := range 50_000 {
		tun.observe(clients[rng.IntN(len(clients))], zones[rng.IntN(len(zones))], names[i%len(names)], now)
	}
	bounded()
	i := 0
	allocs := testing.AllocsPerRun(2000, func() {
		i++
		tun.observe(clients[i%len(clients)], zones[i%len(zones)], names[i%len(names)], now)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per name with the pairs full, want 0", allocs)
	}
	bounded()
}

var testSeed = maphash.MakeSeed()

// observeName is observe of name's hash.
func (w *tunnelWatch) observeName(client, zone, name string, now int64) (int, bool) {
	return w.observe(client, zone, maphash.String(testSeed, name), now)
}

// The sketch counts distinct names: repeats do not add, and its estimate
// stays near the truth up to the largest threshold.
func TestTunnelSketchEstimate(t *testing.T) {
	for _, n := range []int{50, 500, maxTunnelThreshold} {
		w := newTunnelWatch(maxTunnelThreshold, time.Minute)
		var got int
		for range 2 {
			for i := range n {
				got, _ = w.observeName("c", "z", fmt.Sprintf("n%d.z", i), 1)
			}
		}
		if d := float64(got-n) / float64(n); d > 0.06 || d < -0.06 {
			t.Errorf("%d distinct names (each twice) estimated %d", n, got)
		}
	}
}

func TestTunnelZone(t *testing.T) {
	eng, err := policy.Compile("p.yaml", []byte(`version: 1
rules:
  - name: a
    to: ["*.tenant.cloud", "*.t.tenant.cloud", "api-*.example.com", "www.tenant.cloud"]
    ports: [443/tcp]
  - name: any
    from: [192.0.2.9]
    to: ["*"]
    ports: [443/tcp]
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		client, name, zone string
	}{
		{"192.0.2.1", "x.tenant.cloud", "tenant.cloud"},
		{"192.0.2.1", "abc.t.tenant.cloud", "t.tenant.cloud"},
		{"192.0.2.1", "api-q.example.com", "example.com"},
		{"192.0.2.1", "www.tenant.cloud", ""},
		{"192.0.2.9", "chunk.evil.example.net", "example.net"},
	} {
		d := eng.DecideName(policy.Input{Client: netip.MustParseAddr(c.client), Name: c.name})
		if !d.Allowed() {
			t.Fatalf("%s: %+v", c.name, d)
		}
		z, ok := tunnelZone(eng, d, c.name)
		if z != c.zone || ok != (c.zone != "") {
			t.Errorf("%s from %s: zone %q %v, want %q", c.name, c.client, z, ok, c.zone)
		}
	}
}

// gatheredCounter returns the value of the unlabelled counter name in reg.
func gatheredCounter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no %s in the registry", name)
	return 0
}

// Forged sources of the LAN (addresses of a link nobody answers ARP/NDP
// for, which the rate limit counts as one client) count as one client
// here too: a host that spreads 1,000 distinct names of an allowed zone
// over 20 such sources, 50 each, raises the alarm (once). Before, each
// forged source was a client of its own, and the names of a one-way
// tunnel (the attacker's server needs no answer) spread over enough of
// them never alarmed.
func TestTunnelAlarmForgedSources(t *testing.T) {
	up := newFakeUpstream(t, "")
	devs := &linkedTable{Table: fakemac.New(nil), link: netip.MustParsePrefix("127.0.1.0/24"), resolved: map[netip.Addr]int{}}
	ts := startServer(t, tunnelPolicy, Config{Upstreams: []string{up.Addr}, TunnelThreshold: 500, ClientRate: 500}, Deps{Devices: devs})
	for i := range 1000 {
		src := fmt.Sprintf("127.0.1.%d", 10+i%20)
		if rc := askFrom(t, src, ts.Addr, fmt.Sprintf("mzxw6ytboi%04d.t.allowed.test", i)); rc != dns.RcodeNameError {
			t.Fatalf("query %d from %s: rcode %d", i, src, rc)
		}
	}
	if a := tunnelAlarms(ts.Sink); len(a) != 1 || a[0].Name != "t.allowed.test" {
		t.Fatalf("1,000 names over 20 forged sources raised %d alarms, want 1: %+v", len(a), a)
	}
}

// A name counts once however the client spells its case: 300 names each
// asked as `N.T.Allowed.Test` and `n.t.allowed.test`, with the cache off
// (both spellings go upstream), are 300 distinct names, under the
// threshold of 500.
func TestTunnelAlarmCase(t *testing.T) {
	up := newFakeUpstream(t, "")
	ts := startServer(t, tunnelPolicy, Config{Upstreams: []string{up.Addr}, TunnelThreshold: 500, CacheSize: -1}, Deps{})
	for i := range 300 {
		askFrom(t, "127.0.0.5", ts.Addr, fmt.Sprintf("N%d.T.Allowed.Test", i))
		askFrom(t, "127.0.0.5", ts.Addr, fmt.Sprintf("n%d.t.allowed.test", i))
	}
	if n := up.count("n299.t.allowed.test"); n != 2 {
		t.Fatalf("the last name reached the upstream %d times, want 2 (the test needs the cache off)", n)
	}
	if a := tunnelAlarms(ts.Sink); len(a) != 0 {
		t.Errorf("300 names in two spellings raised %d alarms: %+v", len(a), a)
	}
}

// A client cannot push its own pair out of the watch to start its count
// again: with the pairs full, sending 20 names of new zones (a "*" rule
// lets it resolve any) between each of its tunnel's names, its 600 names
// still alarm. A new pair takes the place of one whose window is over,
// else of the one with the fewest names. Before, it took an arbitrary
// pair's: the tunnel's was evicted every 50 names or so and never
// alarmed.
func TestTunnelWatchEvictionKeepsBusyPair(t *testing.T) {
	w := newTunnelWatch(500, time.Minute)
	now := time.Now().UnixNano()
	for i := range tunnelKeys {
		w.observeName("other", fmt.Sprintf("z%d.example", i), "a.z.example", now)
	}
	alarms, junk := 0, 0
	for i := range 600 {
		if _, a := w.observeName("c", "tunnel.example", fmt.Sprintf("n%d.tunnel.example", i), now); a {
			alarms++
		}
		for range 20 {
			junk++
			w.observeName("c", fmt.Sprintf("j%d.example", junk), "x.j.example", now)
		}
	}
	if alarms != 1 {
		t.Errorf("600 names of a zone between %d new zones' names: %d alarms, want 1", junk, alarms)
	}
	if n := w.len(); n > tunnelKeys {
		t.Fatalf("%d pairs held, bound %d", n, tunnelKeys)
	}
}

// A tunnel spread over many clients alarms zone-wide: 24 clients sending
// 50 distinct names each of one zone (1,200 in the window, each client
// far under its own threshold of 500) raise one alarm of reason
// dns-tunnel-zone, past twice the threshold, that names no client (the
// zero address: the alarm is the zone's, not one client's). Before, each
// client counted alone and nothing alarmed.
func TestTunnelAlarmZoneWide(t *testing.T) {
	up := newFakeUpstream(t, "")
	reg := prometheus.NewRegistry()
	ts := startServer(t, tunnelPolicy, Config{Upstreams: []string{up.Addr}, TunnelThreshold: 500}, Deps{Registerer: reg})
	for i := range 1200 {
		src := fmt.Sprintf("127.0.2.%d", 10+i%24)
		if rc := askFrom(t, src, ts.Addr, fmt.Sprintf("mzxw6ytboi%04d.t.allowed.test", i)); rc != dns.RcodeNameError {
			t.Fatalf("query %d from %s: rcode %d", i, src, rc)
		}
	}
	a := tunnelAlarms(ts.Sink)
	if len(a) != 1 {
		t.Fatalf("1,200 names over 24 clients raised %d alarms, want 1 zone-wide: %+v", len(a), a)
	}
	if ev := a[0]; ev.Reason != ReasonTunnelZone || ev.Client.IsValid() || ev.ClientMAC != "" || ev.Name != "t.allowed.test" ||
		ev.Rule != "tenant" || ev.Count < 950 || ev.Count > 1150 {
		t.Errorf("alarm %+v: want reason %s, no client, zone t.allowed.test, about 1,000 names", ev, ReasonTunnelZone)
	}
	if got := gatheredCounter(t, reg, "egress_dnsfilter_tunnel_alarms_total"); got != 1 {
		t.Errorf("egress_dnsfilter_tunnel_alarms_total %v, want 1", got)
	}
	checkTopClients(t, a[0], "127.0.2.")
}

// checkTopClients holds a zone-wide alarm's event to naming the clients
// that added the most names (the report shows them): at least two, at
// most audit.MaxAlarmClients, each once and each one of the clients that
// sent (an address starting with prefix). Before, they were in the log
// line only.
func checkTopClients(t *testing.T, ev audit.Event, prefix string) {
	t.Helper()
	if len(ev.TopClients) < 2 || len(ev.TopClients) > audit.MaxAlarmClients {
		t.Fatalf("alarm names top clients %q, want 2 to %d", ev.TopClients, audit.MaxAlarmClients)
	}
	seen := map[string]bool{}
	for _, c := range ev.TopClients {
		if !strings.HasPrefix(c, prefix) || seen[c] {
			t.Errorf("top clients %q: %q is not one of the senders %s*, or twice", ev.TopClients, c, prefix)
		}
		seen[c] = true
	}
}

// A slow tunnel spread over many clients alarms zone-wide over the long
// window: 20 clients sending 4 distinct names a minute each of one zone
// (80 a minute, under the zone's 100 a minute at a threshold of 50; 60
// an hour each, under the pair's 500 an hour) for 15 minutes, 1,200 in
// all, pass twice the long window's threshold (1,000) once: one alarm of
// reason dns-tunnel-zone-slow, no client, its top clients named. Before,
// nothing alarmed: no client, and no minute of the zone, crossed its
// threshold.
func TestTunnelAlarmZoneSlow(t *testing.T) {
	a := slowTunnel(t, 50, func(i int) string { return fmt.Sprintf("127.0.3.%d", 10+i%20) })
	if len(a) != 1 {
		t.Fatalf("4 names a minute from each of 20 clients for 15 minutes raised %d alarms, want 1: %+v", len(a), a)
	}
	ev := a[0]
	if ev.Reason != ReasonTunnelZoneSlow || ev.Client.IsValid() || ev.ClientMAC != "" || ev.Name != "t.allowed.test" ||
		ev.Count < 950 || ev.Count > 1150 {
		t.Errorf("alarm %+v: want reason %s, no client, zone t.allowed.test, about 1,000 names", ev, ReasonTunnelZoneSlow)
	}
	checkTopClients(t, ev, "127.0.3.")
}

// One client's slow tunnel is the pair's slow alarm only: 12,000
// distinct names of one client in the long window (past twice its
// threshold of 5,000) raise dns-tunnel-slow once and never
// dns-tunnel-zone-slow, which says the names came from many clients.
func TestTunnelZoneSlowNotForOneClient(t *testing.T) {
	tun := newTunnels(500, time.Minute)
	slow := 0
	for i := range 12000 {
		now := int64(i) * int64(time.Minute) / 200 // 200 names a minute: an hour
		h := tun.observe("02:00:00:00:00:01", "t.allowed.test", fmt.Sprintf("n%d.t.allowed.test", i), now)
		if h.slow > 0 {
			slow++
		}
		if h.zoneSlow > 0 {
			t.Fatalf("name %d of one client raised a zone-wide slow alarm of %d names, top %q", i, h.zoneSlow, h.topSlow)
		}
	}
	if slow != 1 {
		t.Errorf("12,000 names of one client in an hour: %d slow alarms, want 1", slow)
	}
}

// One device's slow tunnel from many of its addresses (a host with 20
// addresses behind one MAC, as IPv6 privacy addresses are) is one
// client's: the alarms name its MAC, and none is zone-wide, which would
// say the names came from many clients. The tunnel watch keys a client
// by its device as the rate limit does.
func TestTunnelZoneSlowNotForOneDevice(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x14}
	devs := fakemac.New(nil)
	for i := range 20 {
		devs.Set(netip.AddrFrom4([4]byte{127, 0, 3, byte(10 + i)}), mac)
	}
	a := slowTunnelDevices(t, 50, func(i int) string { return fmt.Sprintf("127.0.3.%d", 10+i%20) }, devs)
	slow := 0
	for _, ev := range a {
		switch ev.Reason {
		case ReasonTunnelZone, ReasonTunnelZoneSlow:
			t.Errorf("one device's 20 addresses raised a zone-wide alarm: %+v", ev)
		case ReasonTunnelSlow:
			slow++
		}
		if ev.ClientMAC != mac.String() {
			t.Errorf("alarm %+v does not name the device %s", ev, mac)
		}
	}
	if slow != 1 {
		t.Errorf("%d slow alarms of the device, want 1: %+v", slow, a)
	}
}

// slowTunnel sends 80 distinct names of one zone a minute for 15 minutes
// (the clock jumps a minute ahead between), name i of a minute from
// src(i), to a forwarder of the threshold and a one-minute window, and
// returns the alarms.
func slowTunnel(t *testing.T, threshold int, src func(i int) string) []audit.Event {
	t.Helper()
	return slowTunnelDevices(t, threshold, src, nil)
}

// slowTunnelDevices is slowTunnel with devs (non-nil) as the device
// table: a client is a device, as the rate limit counts it.
func slowTunnelDevices(t *testing.T, threshold int, src func(i int) string, devs ClientDevices) []audit.Event {
	t.Helper()
	up := newFakeUpstream(t, "")
	var offset atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	cfg := Config{Upstreams: []string{up.Addr}, TunnelThreshold: threshold, TunnelWindow: time.Minute, CacheSize: -1}
	if devs != nil {
		cfg.ClientRate = 10000
	}
	ts := startServer(t, tunnelPolicy, cfg, Deps{Now: now, Devices: devs})
	for m := range 15 {
		for i := range 80 {
			askFrom(t, src(i), ts.Addr, fmt.Sprintf("m%dn%d.t.allowed.test", m, i))
		}
		offset.Add(int64(61 * time.Second))
	}
	return tunnelAlarms(ts.Sink)
}

// A slow tunnel alarms over the long window: a client sending 80
// distinct names a minute of one zone (under its threshold of 100 a
// minute) for 15 minutes, 1,200 in all, crosses ten times the threshold
// in the hour-long window (sixty short ones) once: one alarm of reason
// dns-tunnel-slow. Before, no window ever held 100 and nothing alarmed.
func TestTunnelAlarmSlow(t *testing.T) {
	a := slowTunnel(t, 100, func(int) string { return "127.0.0.6" })
	if len(a) != 1 {
		t.Fatalf("80 names a minute for 15 minutes raised %d alarms, want 1: %+v", len(a), a)
	}
	if ev := a[0]; ev.Reason != ReasonTunnelSlow || ev.Client != netip.MustParseAddr("127.0.0.6") || ev.Name != "t.allowed.test" ||
		ev.Count < 950 || ev.Count > 1100 {
		t.Errorf("alarm %+v: want reason %s, client 127.0.0.6, zone t.allowed.test, about 1,000 names", ev, ReasonTunnelSlow)
	}
}

// Nested wildcards count a name once, under the most specific zone of the
// rule that allowed it: 150 names under `*.b.a.test` (threshold 100) raise
// one alarm, naming b.a.test, not one for each level.
func TestTunnelAlarmNested(t *testing.T) {
	up := newFakeUpstream(t, "")
	ts := startServer(t, `version: 1
mode: audit
rules:
  - name: nested
    to: ["*.a.test", "*.b.a.test"]
    ports: [443/tcp]
`, Config{Upstreams: []string{up.Addr}, TunnelThreshold: 100}, Deps{})
	for i := range 150 {
		askFrom(t, "127.0.0.7", ts.Addr, fmt.Sprintf("n%d.b.a.test", i))
	}
	if a := tunnelAlarms(ts.Sink); len(a) != 1 || a[0].Name != "b.a.test" || a[0].Reason != ReasonTunnel {
		t.Fatalf("150 names under nested wildcards raised %+v, want one %s alarm for b.a.test", a, ReasonTunnel)
	}
}

// The long window's and the zone's sketches sample names past the range
// one sketch counts well (a threshold of 5,000 a minute is 50,000 an
// hour): the estimate stays near the truth, from the same 512 bytes.
func TestTunnelSampledEstimate(t *testing.T) {
	w := newTunnelWatch(10*maxTunnelThreshold, time.Hour)
	if w.shift == 0 {
		t.Fatalf("a threshold of %d samples no names", 10*maxTunnelThreshold)
	}
	seed := maphash.MakeSeed()
	const n = 50_000
	var got int
	for i := range n {
		got, _ = w.observe("c", "z", maphash.String(seed, fmt.Sprintf("n%d.z", i)), 1)
	}
	if d := float64(got-n) / n; d > 0.1 || d < -0.1 {
		t.Errorf("%d distinct names estimated %d", n, got)
	}
}

// A tunnel on one client is the pair's alarm only, however fast: one
// client sending 5,000 distinct names of a zone in a window (ten times
// the threshold) raises dns-tunnel once and never dns-tunnel-zone, which
// says the names came from many clients. Before, the zone-wide check took
// the client's share in bits set from the estimate of names: past some
// 2,200 names the bits one client's names collided on counted as other
// clients' names, and the zone alarmed for a client alone.
func TestTunnelZoneNotForOneClient(t *testing.T) {
	tun := newTunnels(500, time.Minute)
	pair, zone := 0, 0
	for i := range 5000 {
		h := tun.observe("02:00:00:00:00:01", "t.allowed.test", fmt.Sprintf("n%d.t.allowed.test", i), 1)
		if h.pair > 0 {
			pair++
		}
		if h.zone > 0 {
			zone++
			t.Errorf("name %d of one client raised a zone-wide alarm of %d names, top %q", i, h.zone, h.top)
			break
		}
	}
	if pair != 1 || zone != 0 {
		t.Errorf("5,000 names of one client: %d pair alarms, %d zone alarms; want 1 and 0", pair, zone)
	}
}
