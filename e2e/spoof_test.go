package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// Forged sources of the spoofing test: free addresses of the LAN's IPv4
// subnet and IPv6 prefix that no host holds (nobody answers ARP or NDP
// for them).
const (
	spoofV4Base = "198.18.1.%d" // .150 to .181
	spoofV6Base = "2001:db8:1::6:%x"
	spoofNV4    = 32
	spoofNV6    = 32
)

// TestSpoofedSources: a LAN host that sends DNS queries from source
// addresses it does not hold (forged, UDP: it needs no answer) for unique
// names under an allowed wildcard must not get a client's rate per forged
// address: each such query goes upstream. The sources have no usable
// entry in the gateway's neighbour table (nobody answers its ARP for
// them), so they are no device: together they share one client's budget
// (README, "Limits count a device"). Another device is served meanwhile.
//
// Before session 23 each forged address was a client of its own: from 64
// forged addresses (32 IPv4, 32 IPv6), each with a burst of 2,000,
// 15,983 of 16,000 queries in 4 s went upstream (one client's share:
// 4,000). The gateway asks the kernel to resolve an unresolved source
// whose query it drops: without that, a device's new addresses asking
// during the flood were starved (0 of 2 answered in one run, 1 of 2 in
// two others).
func TestSpoofedSources(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	fl := tp.newLANDevice(t, "e2s1sp", "198.18.1.149", "2001:db8:1::5:1")
	var srcs []netip.Addr
	for i := range spoofNV4 {
		srcs = append(srcs, netip.MustParseAddr(fmt.Sprintf(spoofV4Base, 150+i)))
	}
	for i := range spoofNV6 {
		srcs = append(srcs, netip.MustParseAddr(fmt.Sprintf(spoofV6Base, i)))
	}
	d := newDaemon(t, tp, "enforce")
	d.writePolicy(testPolicy(t))
	d.extra = []string{"--upstream-dns", u.addr}
	d.start()
	var wg sync.WaitGroup
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output (last 4 KiB):\n%s", tail(d.logs(), 4096))
		}
	})
	if rcode, addrs := tp.dig(t, dockerName, "A"); rcode != "NOERROR" || len(addrs) == 0 {
		t.Fatalf("dig %s: %s %v", dockerName, rcode, addrs)
	}

	// A device of the LAN that has the gateway's MAC already gives itself
	// new addresses (a second IPv4 address, a new IPv6 privacy address):
	// the gateway has no entry for them until it resolves them, so their
	// first queries share the forged sources' budget.
	nw := tp.newLANDevice(t, "e2s1nw", "198.18.1.148", "2001:db8:1::5:2")
	for _, a := range [][2]string{{"198.18.1.148", gwLAN4}, {"2001:db8:1::5:2", gwLAN6}} {
		if m, err := dnsAsk(nw, a[0], a[1], dockerName, dns.TypeA, false); err != nil || m.Rcode != dns.RcodeSuccess {
			t.Fatalf("the new-address device's first query from %s: %v", a[0], err)
		}
	}
	nw.AddAddr(t, "dev0", "198.18.1.147/24", "2001:db8:1::5:3/64")
	var fresh [2]int // answered, of the new addresses
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(time.Second) // the flood has spent the shared burst
		for i, a := range [][2]string{{"198.18.1.147", gwLAN4}, {"2001:db8:1::5:3", gwLAN6}} {
			if askRetry(nw, a[0], a[1], dockerName, 2, time.Second) {
				fresh[i] = 1
			}
		}
	}()

	limited0 := d.metric("egress_dnsfilter_rate_limited_total")
	up0Requests := d.metricSum("egress_dnsfilter_upstream_requests_total")
	up0Failures := d.metricSum("egress_dnsfilter_upstream_failures_total")
	up0 := u.recv.Load()
	var other atomic.Int64
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
	const n, dur = 16000, 4 * time.Second
	sent, took, err := spoofFlood(fl, srcs, netip.MustParseAddr(gwLAN4), netip.MustParseAddr(gwLAN6), n, dur)
	wg.Wait()
	if err != nil {
		t.Fatalf("forged flood: %v (%d sent)", err, sent)
	}
	// Wait (at most 20 s) for the last queries' upstream round trips:
	// until the gateway's DNS sockets hold no unread query and every
	// query the forwarder sent upstream has reached the upstream (or
	// timed out, a failure).
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		queued := udpRxQueued(t, tp.gw, 53)
		forwarded := int64(d.metricSum("egress_dnsfilter_upstream_requests_total") - up0Requests)
		failed := int64(d.metricSum("egress_dnsfilter_upstream_failures_total") - up0Failures)
		if queued == 0 && u.recv.Load()-up0+failed >= forwarded {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("20 s after the flood the gateway's DNS sockets hold %d bytes unread, and of the %d queries the forwarder sent upstream %d reached it, %d failed", queued, forwarded, u.recv.Load()-up0, failed)
		}
	}
	limited := d.metric("egress_dnsfilter_rate_limited_total") - limited0
	upstream := u.recv.Load() - up0
	share := 2000 + int(500*took.Seconds()) // one client's: burst 2,000 + 500/s
	out, _ := tp.gw.Run("ip", "neigh", "show", "dev", "lan0")
	t.Logf("forged DNS flood from %d addresses nobody holds (%d IPv4, %d IPv6): %d queries in %v, %v rate-limited, %d reached the upstream (one client's share %d); the other device got %d of 20 answers; the gateway's neighbour entries on lan0: %d FAILED, %d INCOMPLETE",
		len(srcs), spoofNV4, spoofNV6, sent, took.Round(time.Millisecond), limited, upstream, share, other.Load(), strings.Count(out, "FAILED"), strings.Count(out, "INCOMPLETE"))
	if other.Load() != 20 {
		t.Errorf("the other device got %d of 20 answers during the forged flood", other.Load())
	}
	t.Logf("a device's new addresses, asking during the flood (2 tries, 1 s each): IPv4 %d/1, IPv6 %d/1", fresh[0], fresh[1])
	if fresh != [2]int{1, 1} {
		t.Errorf("a device's new addresses got %v of [1 1] answers during the forged flood: starved by the forged sources' budget", fresh)
	}
	if sent < n/2 {
		t.Fatalf("only %d of %d forged queries sent", sent, n)
	}
	// The forged sources together are one client: the upstream gets at
	// most one client's share of the flood (and the other device's
	// queries, cached after the first). A client per forged address, it
	// got all of them.
	if bound := share + 20; int(upstream) > bound {
		t.Errorf("forged flood: %d queries reached the upstream; the forged sources together are one client, whose share is %d", upstream, share)
	}
}

// askRetry asks server (UDP port 53) for name's A records from address
// src of ns, as a stub resolver does: up to tries times, waiting each
// time at most wait; it reports whether an answer (NOERROR) came.
func askRetry(ns *testnet.NS, src, server, name string, tries int, wait time.Duration) bool {
	var pc net.PacketConn
	if err := ns.Do(func() (err error) { pc, err = net.ListenPacket("udp", net.JoinHostPort(src, "0")); return }); err != nil {
		return false
	}
	defer pc.Close()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	b, _ := m.Pack()
	to := &net.UDPAddr{IP: net.ParseIP(server), Port: 53}
	buf := make([]byte, 1500)
	for range tries {
		if _, err := pc.WriteTo(b, to); err != nil {
			return false
		}
		pc.SetReadDeadline(time.Now().Add(wait))
		for {
			k, _, err := pc.ReadFrom(buf)
			if err != nil {
				break // this try's wait is over
			}
			r := new(dns.Msg)
			if r.Unpack(buf[:k]) == nil && r.Id == m.Id && r.Rcode == dns.RcodeSuccess {
				return true
			}
		}
	}
	return false
}

// spoofFlood sends n DNS queries for unique names under nirovision.com
// from ns through raw sockets, with source addresses srcs (round robin;
// IPv4 ones to dst4, IPv6 ones to dst6) that ns need not hold, spread
// over about dur.
func spoofFlood(ns *testnet.NS, srcs []netip.Addr, dst4, dst6 netip.Addr, n int, dur time.Duration) (sent int, took time.Duration, err error) {
	for _, a := range append([]netip.Addr{dst4, dst6}, srcs...) {
		if !testRange(a) {
			return 0, 0, fmt.Errorf("flood address %s is not a test address", a)
		}
	}
	var fd4, fd6 int
	if err := ns.Do(func() (err error) {
		if fd4, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW); err != nil {
			return err
		}
		// An IPv6 raw socket of IPPROTO_RAW sends the header it is given
		// (IPV6_HDRINCL).
		fd6, err = syscall.Socket(syscall.AF_INET6, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		return err
	}); err != nil {
		return 0, 0, fmt.Errorf("raw socket: %w", err)
	}
	defer syscall.Close(fd4)
	defer syscall.Close(fd6)
	to4 := &syscall.SockaddrInet4{Addr: dst4.As4()}
	to6 := &syscall.SockaddrInet6{Addr: dst6.As16()}
	m := new(dns.Msg)
	tag := rand.Uint32()
	start := time.Now()
	// In batches of 4 (about a millisecond apart at 4,000/s): a flood
	// paced in large batches leaves the budget whole between them for
	// another client's query to find.
	const batch = 4
	per := dur / time.Duration(n/batch)
	for i := range n {
		m.SetQuestion(fmt.Sprintf("s%08x-%d.nirovision.com.", tag, i), dns.TypeA)
		m.Id = uint16(i)
		q, _ := m.Pack()
		src := srcs[i%len(srcs)]
		udp := make([]byte, 8+len(q))
		binary.BigEndian.PutUint16(udp[0:], uint16(20000+i%20000))
		binary.BigEndian.PutUint16(udp[2:], 53)
		binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
		copy(udp[8:], q)
		var pkt []byte
		var fd int
		var to syscall.Sockaddr
		if src.Is4() {
			// IPv4 (the kernel fills in the ID and checksum); UDP without
			// a checksum (0: none, allowed over IPv4).
			pkt = make([]byte, 20, 20+len(udp))
			pkt[0] = 0x45
			binary.BigEndian.PutUint16(pkt[2:], uint16(20+len(udp)))
			pkt[8], pkt[9] = 64, syscall.IPPROTO_UDP
			s4, d4 := src.As4(), dst4.As4()
			copy(pkt[12:16], s4[:])
			copy(pkt[16:20], d4[:])
			fd, to = fd4, to4
		} else {
			// IPv6; UDP's checksum is required over IPv6.
			pkt = make([]byte, 40, 40+len(udp))
			pkt[0] = 0x60
			binary.BigEndian.PutUint16(pkt[4:], uint16(len(udp)))
			pkt[6], pkt[7] = syscall.IPPROTO_UDP, 64
			s16, d16 := src.As16(), dst6.As16()
			copy(pkt[8:24], s16[:])
			copy(pkt[24:40], d16[:])
			binary.BigEndian.PutUint16(udp[6:], udp6Checksum(s16, d16, udp))
			fd, to = fd6, to6
		}
		pkt = append(pkt, udp...)
		if err := syscall.Sendto(fd, pkt, 0, to); err != nil {
			if errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.EAGAIN) {
				time.Sleep(time.Millisecond)
				continue
			}
			return sent, time.Since(start), err
		}
		sent++
		if i%batch == batch-1 {
			time.Sleep(time.Until(start.Add(per * time.Duration(i/batch+1))))
		}
	}
	return sent, time.Since(start), nil
}

// udp6Checksum is the UDP checksum over the IPv6 pseudo-header and seg
// (its checksum field zero).
func udp6Checksum(src, dst [16]byte, seg []byte) uint16 {
	var s uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			s += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			s += uint32(b[len(b)-1]) << 8
		}
	}
	add(src[:])
	add(dst[:])
	s += uint32(len(seg)) + syscall.IPPROTO_UDP
	add(seg)
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	if c := ^uint16(s); c != 0 {
		return c
	}
	return 0xffff
}

// udpRxQueued returns the bytes queued unread on the UDP sockets of ns
// (IPv4 and IPv6) bound to port (/proc/net/udp's rx_queue).
func udpRxQueued(t *testing.T, ns *testnet.NS, port uint16) int64 {
	t.Helper()
	out, err := ns.Run("cat", "/proc/net/udp", "/proc/net/udp6")
	if err != nil {
		t.Fatalf("/proc/net/udp in %s: %v\n%s", ns.Name, err, out)
	}
	var sum int64
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		// sl local_address rem_address st tx_queue:rx_queue ...
		if len(f) < 5 || !strings.HasSuffix(f[1], fmt.Sprintf(":%04X", port)) {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		n, err := strconv.ParseInt(rx, 16, 64)
		if err != nil {
			t.Fatalf("/proc/net/udp: %q: %v", line, err)
		}
		sum += n
	}
	return sum
}

// tail returns the last n bytes of s.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}
