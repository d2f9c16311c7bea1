package dnsfilter

import (
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// TestUDPAnswerFromAddressAsked: a forwarder listening on the wildcard
// address ("[::]:0": 0.0.0.0 and [::]) answers each UDP query from the
// address the client asked, on a LAN interface with two IPv4 addresses,
// two ULA ones and two link-local ones. A client drops an answer from
// another address (a connected socket never sees it; dig says "reply
// from unexpected source"). Every way an answer leaves: a denied name
// (answered locally on the fast path), an allowed one the upstream is
// asked for (the asynchronous miss path, the answers sent together), the
// same again from the cache (fast path), the DoH canary (the general
// path, from a goroutine), a name both upstreams refuse (the miss path
// handed to the general path, serveMiss) and one whose UDP answer is
// truncated (fetched over TCP, written on its own). Readers outside the
// netpoller (UDPRawReads), batching ones, and one datagram per call. Over
// TCP the answer comes on the connection to the address asked. Two
// namespaces joined by a veth pair, the forwarder in one, the client in
// the other; the upstreams on the host's loopback.
func TestUDPAnswerFromAddressAsked(t *testing.T) {
	gw := testnet.New(t, "a2srcgw")
	cl := testnet.New(t, "a2srccl")
	testnet.Link(t, gw, "lan0", []string{"192.0.2.1/24", "192.0.2.2/24", "fd00:a2::1/64", "fd00:a2::2/64", "fe80::1/64", "fe80::2/64"},
		cl, "eth0", []string{"192.0.2.10/24", "fd00:a2::10/64", "fe80::10/64"})
	onlyLinkLocal(t, cl, "eth0", "fe80::10")
	procsAtLeast(t, 2)
	const zone = "www.allowed.test. 300 IN A 192.0.2.10\nwww.allowed.test. 300 IN AAAA 2001:db8::10\n" +
		"refused.allowed.test. 300 IN A 192.0.2.11\nbig.allowed.test. 300 IN A 192.0.2.12"
	refuse := func(m *dns.Msg, proto string) {
		switch strings.ToLower(m.Question[0].Name) {
		case "refused.allowed.test.":
			m.Rcode, m.Answer = dns.RcodeRefused, nil
		case "big.allowed.test.":
			if proto == "udp" {
				m.Truncated, m.Answer = true, nil
			}
		}
	}
	up, up2 := newFakeUpstream(t, zone), newFakeUpstream(t, zone)
	up.mangle.Store(&refuse)
	up2.mangle.Store(&refuse)
	for _, tc := range []struct {
		name    string
		readers int
		raw     bool // UDPRawReads
		noBatch bool
	}{
		{"raw", 1, true, false},
		{"batch-2-readers", 2, false, false},
		{"one-per-call", 1, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(Config{Listen: []string{"[::]:0"}, Upstreams: []string{up.Addr, up2.Addr}, UDPReaders: tc.readers, UDPRawReads: tc.raw, noBatch: tc.noBatch, ClientRate: -1},
				Deps{Policy: compile(t, enforcePolicy), Sink: &recSink{}})
			if err != nil {
				t.Fatal(err)
			}
			runServer(t, s, gw)
			if tc.raw && rawSupported {
				s.mu.Lock()
				raw := isRawUDP(s.udp[0])
				s.mu.Unlock()
				if !raw {
					t.Fatalf("IPv4 listener on the netpoller, want it raw (GOMAXPROCS %d)", runtime.GOMAXPROCS(0))
				}
			}
			port := s.Addrs()[0].Port()
			zone := cl.IfIndex(t, "eth0")
			var pc net.PacketConn
			if err := cl.Do(func() (err error) { pc, err = net.ListenPacket("udp", "[::]:0"); return }); err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			uc := pc.(*net.UDPConn)
			buf := make([]byte, 4096)
			for _, a := range []string{"192.0.2.1", "192.0.2.2", "fd00:a2::1", "fd00:a2::2", "fe80::1%" + zone, "fe80::2%" + zone} {
				dst := netip.AddrPortFrom(netip.MustParseAddr(a), port)
				for _, q := range []struct {
					name  string
					qtype uint16
					rcode int
				}{
					{"www.denied.test.", dns.TypeA, dns.RcodeRefused},
					{"www.allowed.test.", dns.TypeA, dns.RcodeSuccess},
					{"www.allowed.test.", dns.TypeAAAA, dns.RcodeSuccess},
					{"www.allowed.test.", dns.TypeA, dns.RcodeSuccess},
					{canaryName + ".", dns.TypeA, dns.RcodeNameError},
					{"refused.allowed.test.", dns.TypeA, -1},
					{"big.allowed.test.", dns.TypeA, dns.RcodeSuccess},
				} {
					m := new(dns.Msg).SetQuestion(q.name, q.qtype)
					wire, _ := m.Pack()
					if _, err := uc.WriteToUDPAddrPort(wire, dst); err != nil {
						t.Fatalf("send to %v: %v", dst, err)
					}
					_ = uc.SetReadDeadline(time.Now().Add(5 * time.Second))
					n, from, err := uc.ReadFromUDPAddrPort(buf)
					if err != nil {
						t.Errorf("%s %s to %v: no answer: %v", q.name, dns.TypeToString[q.qtype], dst, err)
						continue
					}
					r := new(dns.Msg)
					if err := r.Unpack(buf[:n]); err != nil || r.Id != m.Id || q.rcode >= 0 && r.Rcode != q.rcode {
						t.Errorf("%s to %v: answer %v (%v), want rcode %d", q.name, dst, r, err, q.rcode)
					}
					if got := netip.AddrPortFrom(from.Addr().Unmap().WithZone(""), from.Port()); got != netip.AddrPortFrom(dst.Addr().WithZone(""), port) {
						t.Errorf("%s %s to %v: answered from %v", q.name, dns.TypeToString[q.qtype], dst, from)
					}
				}
				// TCP: the answer comes on the connection to dst, so
				// from dst.
				var c net.Conn
				if err := cl.Do(func() (err error) { c, err = net.DialTimeout("tcp", dst.String(), 3*time.Second); return }); err != nil {
					t.Errorf("tcp to %v: %v", dst, err)
					continue
				}
				dc := &dns.Conn{Conn: c}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				m := new(dns.Msg).SetQuestion("www.allowed.test.", dns.TypeA)
				if err := dc.WriteMsg(m); err != nil {
					t.Errorf("tcp to %v: %v", dst, err)
				} else if r, err := dc.ReadMsg(); err != nil || r.Id != m.Id || r.Rcode != dns.RcodeSuccess {
					t.Errorf("tcp to %v: answer %v (%v)", dst, r, err)
				}
				if ra := c.RemoteAddr().(*net.TCPAddr).AddrPort(); ra.Addr().Unmap().WithZone("") != dst.Addr().WithZone("") {
					t.Errorf("tcp to %v: connected to %v", dst, ra)
				}
				_ = c.Close()
			}
		})
	}
}
