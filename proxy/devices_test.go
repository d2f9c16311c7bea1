package proxy

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/fakemac"
	"egressd/policy"
)

// TestConnLimitPerDevice: the addresses of one LAN device (one MAC in
// the neighbour table) share one client's connection cap, however many
// there are: before, ten addresses took every slot. Another device and an
// address without one (routed) keep their own cap; the peek budget's
// tenth is the device's too. The device table is asked when an address
// holds no connection, and at doubling counts while it has no device.
func TestConnLimitPerDevice(t *testing.T) {
	eng, err := policy.Compile("dev.yaml", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	p, err := New(Config{MaxConns: 100, MaxConnsPerClient: 10, PeekBudget: 1000}, Deps{Policy: policy.NewStore(eng), Devices: devs,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	flooder := net.HardwareAddr{2, 0, 0, 0, 0, 0xf}
	var addrs []netip.Addr
	for i := range 40 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 15: byte(i)})
		if i < 20 {
			a = netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + i)})
		}
		devs.Set(a, flooder)
		addrs = append(addrs, a)
	}
	var held []netip.Addr
	for range 5 {
		for _, a := range addrs {
			if p.acquire(a) {
				held = append(held, a)
			}
		}
	}
	if len(held) != 10 {
		t.Errorf("one device's 40 addresses hold %d connections, want one client's cap (10)", len(held))
	}
	other := netip.MustParseAddr("192.0.2.40")
	devs.Set(other, net.HardwareAddr{2, 0, 0, 0, 0, 0x40})
	routed := netip.MustParseAddr("198.51.100.9")
	for _, c := range []netip.Addr{other, routed} {
		n := 0
		for range 15 {
			if p.acquire(c) {
				n++
				held = append(held, c)
			}
		}
		if n != 10 {
			t.Errorf("%s holds %d of 15, want its own cap 10", c, n)
		}
	}
	// The peek budget's tenth (100 bytes) is the device's: two of its
	// addresses share it.
	s1 := peekShare{b: p.peekMem, client: addrs[0], keyOf: p.keyOf}
	s2 := peekShare{b: p.peekMem, client: addrs[1], keyOf: p.keyOf}
	if got := s1.fit(0, peekFree+80); got != peekFree+80 {
		t.Fatalf("first share: %d", got)
	}
	if got := s2.fit(0, peekFree+80); got == peekFree+80 {
		t.Errorf("a second address of the device took past the device's tenth of the peek budget (%d in use)", p.peekMem.inUse())
	}
	s1.release()
	s2.release()
	// Doubling: a routed address's many connections ask a few times.
	asks0 := devs.Asked()
	for range 8 {
		p.release(routed)
	}
	for range 200 {
		if p.acquire(routed) {
			p.release(routed)
		}
	}
	if d := devs.Asked() - asks0; d > 8 {
		t.Errorf("200 connections of an address that holds others asked the device table %d times", d)
	}
	p.release(routed)
	p.release(routed) // the 2 of its 10 still held
	for _, a := range held {
		if a != routed {
			p.release(a)
		}
	}
	if total, addrs, devs := p.slots.Counts(); total != 0 || addrs != 0 || devs != 0 {
		t.Errorf("after every release: total %d, %d addresses, %d devices", total, addrs, devs)
	}
}

// TestEventDeviceMAC: the explicit proxy's events carry the MAC of the
// client's device that its connection slot looked up (Deps.Devices),
// under a policy that names no MAC: a tunnel (CONNECT), a plain-HTTP
// request, a denied one; without asking the device table more than the
// slots do (once per connection of an address that holds none).
func TestEventDeviceMAC(t *testing.T) {
	dev := net.HardwareAddr{0x02, 0, 0, 0, 0x50, 0x23}
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{netip.MustParseAddr("127.0.0.1"): dev})
	sink := &events{}
	addr, plainPort, tlsPort, _, _ := loopbackExplicitDeps(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(cfg *Config) { cfg.Inspect = false }, sink, nil, func(d *Deps) { d.Devices = devs })

	conn, code := connectDocs(t, addr, tlsPort)
	conn.Close()
	if code != http.StatusOK {
		t.Fatalf("CONNECT: %d", code)
	}
	get := func(url string) int {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", url, strings.TrimSuffix(strings.TrimPrefix(url, "http://"), "/"))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(fmt.Sprintf("http://docs.paths.test:%d/", plainPort)); code != http.StatusOK {
		t.Errorf("GET allowed: %d", code)
	}
	if code := get(fmt.Sprintf("http://denied.paths.test:%d/", plainPort)); code != http.StatusForbidden {
		t.Errorf("GET denied: %d", code)
	}
	for _, what := range []struct {
		name  string
		port  int
		allow bool
	}{{"docs.paths.test", tlsPort, true}, {"docs.paths.test", plainPort, true}, {"denied.paths.test", plainPort, false}} {
		ev := sink.wait(t, what.name, func(ev audit.Event) bool {
			return ev.Kind == audit.KindFlow && ev.Name == what.name && int(ev.DestPort) == what.port && ev.Close != ""
		})
		if ev.ClientMAC != dev.String() || (ev.Verdict == policy.Allow) != what.allow {
			t.Errorf("%s:%d: event client_mac %q verdict %s, want %s, allowed %v", what.name, what.port, ev.ClientMAC, ev.Verdict, dev, what.allow)
		}
	}
	// No lookup of its own: the slots ask for an address new to them (no
	// slot held), so at most once a slot taken. Four are taken: the three
	// connections' at accept and the inspected CONNECT's inner stream's
	// (explicit.go); a connection that ends before the next one's accept
	// leaves the address new again. 20 runs under -race asked 2-4 times
	// (a fresh-clone CI run failed at a bound of 3).
	asks := devs.Asked()
	t.Logf("the device table was asked %d times", asks)
	if asks > 4 {
		t.Errorf("3 connections and a tunnel asked the device table %d times, want at most 4 (one a slot taken)", asks)
	}
}

// TestRequestEventDeviceMAC: the request events of an inspected
// connection carry the MAC of the client's device, as its flow's event
// does: a refused request goes to a dropped entry, where a client without
// a MAC counts as a device of its own. Before, requestEvent kept the
// flow's client but not its MAC.
func TestRequestEventDeviceMAC(t *testing.T) {
	dev := net.HardwareAddr{0x02, 0, 0, 0, 0x50, 0x24}
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{netip.MustParseAddr("127.0.0.1"): dev})
	sink := &events{}
	addr, _, tlsPort, caPool, _ := loopbackExplicitDeps(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, nil, sink, nil, func(d *Deps) { d.Devices = devs })
	conn, tc := inspectDocs(t, addr, tlsPort, caPool)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(tc)
	for _, r := range []struct {
		path string
		code int
	}{{"/public/a", http.StatusOK}, {"/private/c", http.StatusForbidden}} {
		fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", r.path, tlsPort)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", r.path, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != r.code {
			t.Fatalf("%s: %d, want %d", r.path, resp.StatusCode, r.code)
		}
	}
	port := localPort(conn)
	for _, path := range []string{"/public/a", "/private/c"} {
		ev := sink.wait(t, "request "+path, func(ev audit.Event) bool {
			return int(ev.ClientPort) == port && ev.Kind == audit.KindRequest && ev.Path == path
		})
		if ev.ClientMAC != dev.String() {
			t.Errorf("request %s: client_mac %q, want the device's %s", path, ev.ClientMAC, dev)
		}
	}
}
