package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// Addresses of the device fairness test: one LAN host (its own MAC) with
// many addresses of the LAN.
const (
	fairV4Base = "198.18.1.%d" // .130 to .145
	fairV6Base = "2001:db8:1::4:%x"
	fairNV4    = 16
	fairNV6    = 64
)

// TestDeviceFairness: one LAN host that sends from many addresses (64
// IPv6 addresses of the LAN's /64, 16 IPv4 addresses of its subnet, all
// behind its one MAC) must not take what every client shares: the DNS
// forwarder's per-client rate and the proxy's connection slots. Another
// device of the LAN is served meanwhile. egressd runs under a 128 MiB
// memory limit, so the proxy's caps are small (1,024 connections, 102 per
// client): the flooder's 16 IPv4 addresses could hold 1,632.
//
// Before session 21 each address was a client of its own: the flooder got
// the per-client DNS rate once per address and every query went upstream,
// and its 16 addresses took the proxy's every connection slot, so the
// other device's connection was refused.
func TestDeviceFairness(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	u.add(loadName + ". 300 IN A " + loadIP)
	tp.newWitness(t, []string{loadIP + ":443"}, nil)
	fl := tp.newLANDevice(t, "e2h4fl", fmt.Sprintf(fairV4Base, 130), fmt.Sprintf(fairV6Base, 0))
	var v4, v6 []string
	for i := range fairNV4 {
		a := fmt.Sprintf(fairV4Base, 130+i)
		if i > 0 {
			fl.MustRun("ip", "addr", "add", a+"/24", "dev", "dev0")
		}
		v4 = append(v4, a)
	}
	for i := range fairNV6 {
		a := fmt.Sprintf(fairV6Base, i)
		if i > 0 {
			fl.MustRun("ip", "-6", "addr", "add", a+"/64", "dev", "dev0", "nodad")
		}
		v6 = append(v6, a)
	}
	fl.WaitAddr(t, v6...)

	cg := newMemoryGroup(t, memoryMax)
	d := newDaemon(t, tp, "enforce")
	d.writePolicy(append(testPolicy(t), hardeningRules...))
	d.extra = []string{"--upstream-dns", u.addr}
	d.wrap = []string{"sh", "-c", cg.join + " && exec \"$@\"", "sh"}
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
			out, _ := tp.gw.Run("ip", "neigh", "show", "dev", "lan0")
			t.Logf("the gateway's neighbours on lan0:\n%s", out)
		}
	})
	for _, n := range []string{dockerName, loadName} {
		if rcode, addrs := tp.dig(t, n, "A"); rcode != "NOERROR" || len(addrs) == 0 {
			t.Fatalf("dig %s: %s %v", n, rcode, addrs)
		}
	}

	t.Run("dns", func(t *testing.T) {
		// The flooder asks unique names under the allowed *.nirovision.com
		// (each must go upstream) from all its addresses, 20,000 queries
		// in about 2 s; the other device asks 20 names meanwhile.
		limited0 := d.metric("egress_dnsfilter_rate_limited_total")
		up0 := u.recv.Load()
		var other atomic.Int64
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				if m, err := tp.dnsQueryFrom(lanClient4, dockerName, dns.TypeA); err == nil && m.Rcode == dns.RcodeSuccess {
					other.Add(1)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
		const n, dur = 20000, 2 * time.Second
		sent, answered, took := multiFlood(fl, append(v6, v4...), n, dur)
		wg.Wait()
		limited := d.metric("egress_dnsfilter_rate_limited_total") - limited0
		upstream := u.recv.Load() - up0
		share := 2000 + int(500*took.Seconds()) // one client's: burst 2,000 + 500/s
		t.Logf("DNS flood from one device's %d addresses: %d queries in %v, %d answered (%.0f/s; one client's share %d), %v rate-limited, %d reached the upstream; the other device got %d of 20 answers",
			len(v4)+len(v6), sent, took.Round(time.Millisecond), answered, float64(answered)/took.Seconds(), share, limited, upstream, other.Load())
		if other.Load() != 20 {
			t.Errorf("the other device got %d of 20 answers during the flood", other.Load())
		}
		// One client's share, and the queries of each new address before
		// the gateway's neighbour table knows its MAC (it learns it from
		// the first answer to it; counted against the address's own bucket,
		// at most about twice what the address sent before that answer):
		// bounded by twice the share here. Each address its own client, as
		// before session 21, the flood got all it asked (19,877 of 20,000,
		// every one upstream).
		if bound := 2 * share; answered > bound || int(upstream) > bound {
			t.Errorf("flood from one device: %d answered, %d upstream; one client's share is %d (bound %d)", answered, upstream, share, bound)
		}
	})

	t.Run("dns-tcp", func(t *testing.T) {
		// The flooder opens DNS TCP connections from its 16 IPv4
		// addresses, 16 each (the cap per client), and holds them: 256,
		// the forwarder's TCP cap in all, before session 21. The other
		// device then asks over TCP.
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		var mu sync.Mutex
		var wg sync.WaitGroup
		for w := range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < fairNV4*16; i += 32 {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					var c net.Conn
					err := fl.Do(func() (err error) {
						d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(v4[i%len(v4)])}}
						c, err = d.DialContext(ctx, "tcp", net.JoinHostPort(gwLAN4, "53"))
						return
					})
					cancel()
					if err == nil {
						mu.Lock()
						conns = append(conns, c)
						mu.Unlock()
					}
				}
			}()
		}
		wg.Wait()
		// The forwarder closes a connection over a cap as soon as it
		// accepts it, and one that sends nothing after its read timeout
		// (2 s): the other device asks now, and then the test counts the
		// flooder's connections still open.
		time.Sleep(200 * time.Millisecond)
		served := 0
		for range 5 {
			m := new(dns.Msg)
			m.SetQuestion(dns.Fqdn(dockerName), dns.TypeA)
			var c net.Conn
			err := tp.lan.Do(func() (err error) {
				c, err = net.DialTimeout("tcp", net.JoinHostPort(gwLAN4, "53"), time.Second)
				return
			})
			if err != nil {
				continue
			}
			dc := &dns.Conn{Conn: c}
			c.SetDeadline(time.Now().Add(time.Second))
			if dc.WriteMsg(m) == nil {
				if r, err := dc.ReadMsg(); err == nil && r.Rcode == dns.RcodeSuccess {
					served++
				}
			}
			c.Close()
		}
		open := 0
		for _, c := range conns {
			c.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); isTimeoutErr(err) {
				open++
			}
		}
		t.Logf("DNS TCP from one device's %d addresses: %d connections opened, %d held (caps: 16 a client, 256 in all); the other device got %d of 5 answers over TCP",
			len(v4), len(conns), open, served)
		if served != 5 {
			t.Errorf("the other device got %d of 5 answers over TCP while one device held connections", served)
		}
		if open > 16 {
			t.Errorf("one device holds %d DNS TCP connections, over a client's cap (16)", open)
		}
	})

	t.Run("proxy", func(t *testing.T) {
		// The flooder opens tunnels from its 16 IPv4 addresses, 1,632 at
		// most (16 × 102, each address's cap): past the global cap
		// (1,024) before session 21.
		const perClient, total = 102, 1024
		var mu sync.Mutex
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		var failed atomic.Int64
		var wg sync.WaitGroup
		jobs := make(chan string)
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for src := range jobs {
					c, err := openTunnelFrom(fl, src, loadIP+":443", loadName)
					if err != nil {
						failed.Add(1)
						continue
					}
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			}()
		}
		for i := range fairNV4 * perClient {
			jobs <- v4[i%len(v4)]
		}
		close(jobs)
		wg.Wait()
		active := d.metric("egress_proxy_active_connections")
		// The other device, while the flooder holds what it could get.
		served := 0
		for range 5 {
			c, err := openTunnelFrom(tp.lan, lanClient4, loadIP+":443", loadName)
			if err == nil {
				served++
				c.Close()
			}
		}
		t.Logf("proxy flood from one device's %d addresses: %d tunnels held, %d refused (caps: %d a client, %d in all), %v active; the other device got %d of 5 tunnels",
			len(v4), len(conns), failed.Load(), perClient, total, active, served)
		if served != 5 {
			t.Errorf("the other device got %d of 5 tunnels while one device flooded", served)
		}
		if len(conns) > perClient {
			t.Errorf("one device holds %d tunnels, over a client's cap (%d)", len(conns), perClient)
		}
	})
}

// multiFlood sends n queries for unique names under nirovision.com from
// the addresses srcs of ns (round robin, one socket each), spread over
// about dur, and counts the answers (waiting 1 s after the last).
func multiFlood(ns *testnet.NS, srcs []string, n int, dur time.Duration) (sent, answered int, took time.Duration) {
	var got atomic.Int64
	var pcs []net.PacketConn
	var readers sync.WaitGroup
	for _, src := range srcs {
		var pc net.PacketConn
		if err := ns.Do(func() (err error) { pc, err = net.ListenPacket("udp", net.JoinHostPort(src, "0")); return }); err != nil {
			continue
		}
		pcs = append(pcs, pc)
		readers.Add(1)
		go func() {
			defer readers.Done()
			buf := make([]byte, 1500)
			for {
				if _, _, err := pc.ReadFrom(buf); err != nil {
					return
				}
				got.Add(1)
			}
		}()
	}
	defer func() {
		for _, pc := range pcs {
			pc.Close()
		}
	}()
	if len(pcs) == 0 {
		return 0, 0, 0
	}
	gw4 := &net.UDPAddr{IP: net.ParseIP(gwLAN4), Port: 53}
	gw6 := &net.UDPAddr{IP: net.ParseIP(gwLAN6), Port: 53}
	m := new(dns.Msg)
	tag := rand.Uint32()
	start := time.Now()
	per := dur / time.Duration(n/100)
	for i := range n {
		m.SetQuestion(fmt.Sprintf("f%08x-%d.nirovision.com.", tag, i), dns.TypeA)
		m.Id = uint16(i)
		b, _ := m.Pack()
		pc := pcs[i%len(pcs)]
		to := gw4
		if pc.LocalAddr().(*net.UDPAddr).IP.To4() == nil {
			to = gw6
		}
		if _, err := pc.WriteTo(b, to); err == nil {
			sent++
		}
		if i%100 == 99 {
			time.Sleep(time.Until(start.Add(per * time.Duration(i/100+1))))
		}
	}
	took = time.Since(start)
	for _, pc := range pcs {
		pc.SetReadDeadline(time.Now().Add(time.Second))
	}
	readers.Wait()
	return sent, int(got.Load()), took
}

// openTunnelFrom opens a TLS-looking tunnel through the transparent proxy
// from address src of ns to the echo origin at addr: the origin says
// "hit" and echoes the hello (tunnelHello).
func openTunnelFrom(ns *testnet.NS, src, addr, sni string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var c net.Conn
	err := ns.Do(func() (err error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err = d.DialContext(ctx, "tcp", addr)
		return
	})
	if err != nil {
		return nil, err
	}
	return tunnelHello(c, sni)
}
