package dnsfilter

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// TestDropFrom: a forwarder whose sockets drop what arrives on one
// interface ("wan") answers dig over the other ("lan") and over loopback,
// and gives dig over "wan" nothing, UDP and TCP, IPv4 and IPv6; its UDP
// readers in batches and outside the netpoller (UDPRawReads) alike.
// SetDropFrom takes the filters off the open sockets and puts them back,
// and attaches them to sockets opened without (TCP: plain TCP listeners,
// not MPTCP, which refuses filters).
func TestDropFrom(t *testing.T) {
	needTool(t, "dig", "dnsutils")
	procsAtLeast(t, 3)
	peer := testnet.New(t, "dfp")
	host := testnet.New(t, "dfh")
	testnet.Link(t, peer, "eth0", []string{"198.18.20.1/24", "2001:db8:20::1/64"}, host, "lan", []string{"198.18.20.2/24", "2001:db8:20::2/64"})
	testnet.Link(t, peer, "eth1", []string{"198.18.21.1/24", "2001:db8:21::1/64"}, host, "wan", []string{"198.18.21.2/24", "2001:db8:21::2/64"})
	var wan int
	if err := host.Do(func() error {
		i, err := net.InterfaceByName("wan")
		wan = i.Index
		return err
	}); err != nil {
		t.Fatal(err)
	}

	for _, initial := range []int{wan, 0} {
		t.Run(map[bool]string{true: "filtered-at-start", false: "filtered-later"}[initial != 0], func(t *testing.T) {
			// Run binds in the goroutine that calls it: that goroutine's thread
			// is in the host namespace. The answers to the canary are the
			// forwarder's own: no upstream is asked.
			s, err := New(Config{Listen: []string{":5353"}, Upstreams: []string{"127.0.0.1:9"}, UDPReaders: 2, UDPRawReads: true, ClientRate: -1,
				DropUDPFrom: initial, DropTCPFrom: initial}, Deps{Policy: compile(t, enforcePolicy), Sink: &recSink{}})
			if err != nil {
				t.Fatal(err)
			}
			runServer(t, s, host)
			s.mu.Lock()
			raw := 0
			for _, c := range s.udp {
				if isRawUDP(c) {
					raw++
				}
			}
			s.mu.Unlock()
			if raw == 0 {
				t.Error("no UDP listener socket outside the netpoller: the test does not cover them")
			}

			check := func(dropped bool) {
				t.Helper()
				for _, c := range []struct {
					ns   *testnet.NS
					to   string
					want bool
				}{
					{peer, "198.18.20.2", true},
					{peer, "2001:db8:20::2", true},
					{peer, "198.18.21.2", !dropped},
					{peer, "2001:db8:21::2", !dropped},
					{host, "127.0.0.1", true},
					{host, "::1", true},
					{host, "198.18.21.2", true}, // the host's own query: over loopback
				} {
					for _, tr := range []string{"+notcp", "+tcp"} {
						out, err := c.ns.Run("dig", "@"+c.to, "-p", "5353", "+tries=2", "+time=1", tr, canaryName, "A")
						answered := err == nil && strings.Contains(out, "status: NXDOMAIN")
						if answered != c.want {
							t.Errorf("dig %s from %s to %s: answered %v, want %v (%v)\n%s", tr, c.ns.Name, c.to, answered, c.want, err, out)
						}
					}
				}
			}
			if initial == 0 {
				// No filter at start (the WAN interface did not exist yet):
				// SetDropFrom attaches them to the open sockets.
				check(false)
				if err := s.SetDropFrom(wan, wan); err != nil {
					t.Fatal(err)
				}
			}
			check(true)
			if err := s.SetDropFrom(0, 0); err != nil {
				t.Fatal(err)
			}
			check(false)
			if err := s.SetDropFrom(wan, wan); err != nil {
				t.Fatal(err)
			}
			check(true)
			if err := s.SetDropFrom(-1, 0); err == nil {
				t.Error("SetDropFrom(-1, 0): no error")
			}
		})
	}
}

// BenchmarkForwarderCached: cached queries a second over loopback UDP,
// closed loop (each client goroutine sends one query and waits for its
// answer), with and without the listening sockets' socket filter. The
// filter's index is one no interface has: the kernel runs the same
// instructions for every datagram (load the interface's index, compare,
// keep), and keeps them all.
//
//	go test ./dnsfilter -run '^$' -bench 'ForwarderCached$' -benchtime 200000x
//
// Run "filter=off" and "filter=on" in turn (README, "DNS forwarder"): the
// box's drift is larger than the filter's cost. "wildcard" listens on
// ":0" (0.0.0.0 and [::], as egressd's default ":53"), whose sockets read
// each query's destination address (IP_PKTINFO) and answer from it; the
// clients ask 127.0.0.1. It listens on every address of the namespace:
// run it in a namespace of your own.
func BenchmarkForwarderCached(b *testing.B) {
	for _, bc := range []struct {
		name   string
		drop   int
		listen string
	}{{"filter=off", 0, ""}, {"filter=on", 1 << 20, ""}, {"wildcard", 0, ":0"}} {
		b.Run(bc.name, func(b *testing.B) {
			up := newFakeUpstream(b, labZone)
			cfg := Config{Upstreams: []string{up.Addr}, DropUDPFrom: bc.drop, DropTCPFrom: bc.drop}
			if bc.listen != "" {
				cfg.Listen = []string{bc.listen}
			}
			ts := startServer(b, enforcePolicy, cfg, Deps{})
			if bc.listen != "" {
				ts.Addr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ts.Addrs()[0].Port()).String()
			}
			benchUDPQueries(b, ts.Addr, "www.allowed.test.")
		})
	}
}

// benchUDPQueries asks addr for name's A records from 4 client goroutines
// per core, each on a UDP socket of its own, one query at a time, b.N in
// all, after one query that caches the answer; it reports queries/s.
func benchUDPQueries(b *testing.B, addr, name string) {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	q, err := m.Pack()
	if err != nil {
		b.Fatal(err)
	}
	ask(b, "udp", addr, name, dns.TypeA, false) // cached from now on
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, err := net.Dial("udp", addr)
		if err != nil {
			b.Error(err)
			return
		}
		defer c.Close()
		qq := append([]byte(nil), q...)
		buf := make([]byte, 1500)
		var id uint16
		for pb.Next() {
			id++
			qq[0], qq[1] = byte(id>>8), byte(id)
			if _, err := c.Write(qq); err != nil {
				b.Error(err)
				return
			}
			_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, err := c.Read(buf)
			if err != nil || n < 12 || buf[0] != qq[0] || buf[1] != qq[1] {
				b.Errorf("answer %d: %v", n, err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
}

// BenchmarkForwarderCachedTCP is BenchmarkForwarderCached over TCP: each
// client goroutine keeps one connection and asks on it, one query at a
// time; the filter runs for every segment the connection receives.
//
//	go test ./dnsfilter -run '^$' -bench 'ForwarderCachedTCP$' -benchtime 100000x
func BenchmarkForwarderCachedTCP(b *testing.B) {
	for _, bc := range []struct {
		name string
		drop int
	}{{"filter=off", 0}, {"filter=on", 1 << 20}} {
		b.Run(bc.name, func(b *testing.B) {
			up := newFakeUpstream(b, labZone)
			ts := startServer(b, enforcePolicy, Config{Upstreams: []string{up.Addr}, DropUDPFrom: bc.drop, DropTCPFrom: bc.drop,
				TCPMaxQueries: 1 << 30, TCPIdleTimeout: time.Minute}, Deps{})
			ask(b, "tcp", ts.Addr, "www.allowed.test.", dns.TypeA, false) // cached from now on
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				c, err := dns.Dial("tcp", ts.Addr)
				if err != nil {
					b.Error(err)
					return
				}
				defer c.Close()
				m := new(dns.Msg)
				m.SetQuestion("www.allowed.test.", dns.TypeA)
				for pb.Next() {
					m.Id++
					_ = c.SetDeadline(time.Now().Add(2 * time.Second))
					if err := c.WriteMsg(m); err != nil {
						b.Error(err)
						return
					}
					r, err := c.ReadMsg()
					if err != nil || r.Id != m.Id {
						b.Errorf("answer: %v", err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
		})
	}
}
