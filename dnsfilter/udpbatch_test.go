package dnsfilter

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestUDPBurst sends bursts of queries from several client sockets without
// waiting for answers, so a reader finds many queued (recvmmsg returns
// several, the fast path's answers leave in one sendmmsg), mixing cache
// hits, enforce denials, misses and general-path queries. Every query must
// get exactly one answer, to its own client, for its own ID and question,
// and one audit event. The same runs with batching off and on an IPv6
// socket (batched too: bound to ::1, no IPv4 client can reach it).
func TestUDPBurst(t *testing.T) {
	const clients, perClient = 4, 48
	var zone strings.Builder
	zone.WriteString(labZone)
	for i := range clients * perClient {
		fmt.Fprintf(&zone, "h%d.allowed.test. 300 IN A 192.0.2.%d\n", i, 1+i%250)
	}
	for _, tc := range []struct {
		name, listen string
		noBatch      bool
		raw          bool // UDPRawReads
	}{
		{"ipv4-batch", "127.0.0.1:0", false, false},
		{"ipv4-batch-raw", "127.0.0.1:0", false, true},
		{"ipv4-single", "127.0.0.1:0", true, false},
		{"ipv4-single-raw", "127.0.0.1:0", true, true}, // noBatch keeps the netpoller
		{"ipv6", "[::1]:0", false, false},
		{"ipv6-raw", "[::1]:0", false, true}, // IPv6 keeps the netpoller
	} {
		t.Run(tc.name, func(t *testing.T) {
			if strings.HasPrefix(tc.listen, "[") {
				if c, err := net.ListenPacket("udp", tc.listen); err != nil {
					t.Fatalf("no IPv6 loopback (CI runs with one): %v", err)
				} else {
					_ = c.Close()
				}
			}
			procsAtLeast(t, 2) // a processor besides the raw reader's
			up := newFakeUpstream(t, zone.String())
			ts := startServer(t, enforcePolicy, Config{Listen: []string{tc.listen}, Upstreams: []string{up.Addr}, UDPReaders: 1, noBatch: tc.noBatch, UDPRawReads: tc.raw}, Deps{})
			ts.mu.Lock()
			raw := isRawUDP(ts.udp[0])
			ts.mu.Unlock()
			if want := rawSupported && !tc.noBatch && tc.raw && !strings.HasPrefix(tc.listen, "["); raw != want {
				t.Fatalf("listener off the netpoller: %v, want %v", raw, want)
			}
			ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false) // warm the cache
			// Its event may be recorded just after the answer left: wait
			// for it, so that it is not counted as one of the burst's.
			const warm = 1
			for deadline := time.Now().Add(3 * time.Second); len(ts.Sink.Events()) < warm && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}

			type sent struct {
				name  string
				qtype uint16
				rcode int // -1: any
				addr  string
			}
			server := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(ts.Addr))
			conns := make([]*net.UDPConn, clients)
			want := make([]map[uint16]sent, clients)
			for c := range conns {
				conn, err := net.DialUDP("udp", nil, server)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = conn.Close() })
				conns[c], want[c] = conn, map[uint16]sent{}
				for i := range perClient {
					s := sent{qtype: dns.TypeA, rcode: dns.RcodeSuccess}
					switch i % 4 {
					case 0:
						s.name, s.addr = "www.allowed.test.", "192.0.2.10"
					case 1:
						s.name, s.rcode = "www.denied.test.", dns.RcodeRefused
					case 2:
						n := c*perClient + i
						s.name, s.addr = fmt.Sprintf("h%d.allowed.test.", n), fmt.Sprintf("192.0.2.%d", 1+n%250)
					case 3:
						s.name, s.qtype, s.rcode = "www.allowed.test.", dns.TypeANY, -1 // the general path
					}
					m := new(dns.Msg)
					m.SetQuestion(s.name, s.qtype)
					m.Id = uint16(1000*c + i + 1)
					if i%2 == 0 {
						m.SetEdns0(1232, false)
					}
					want[c][m.Id] = s
					wire, err := m.Pack()
					if err != nil {
						t.Fatal(err)
					}
					if _, err := conn.Write(wire); err != nil {
						t.Fatal(err)
					}
				}
			}
			buf := make([]byte, 65536)
			for c, conn := range conns {
				_ = conn.SetReadDeadline(time.Now().Add(8 * time.Second))
				for len(want[c]) > 0 {
					n, err := conn.Read(buf)
					if err != nil {
						t.Fatalf("client %d: %d answers missing (%v)", c, len(want[c]), err)
					}
					r := new(dns.Msg)
					if err := r.Unpack(buf[:n]); err != nil {
						t.Fatalf("client %d: bad answer: %v", c, err)
					}
					s, ok := want[c][r.Id]
					if !ok {
						t.Fatalf("client %d: unexpected or repeated answer ID %d: %v", c, r.Id, r)
					}
					delete(want[c], r.Id)
					if !r.Response || len(r.Question) != 1 || r.Question[0].Name != s.name || r.Question[0].Qtype != s.qtype {
						t.Fatalf("client %d: answer %d is not to %s: %v", c, r.Id, s.name, r)
					}
					if s.rcode >= 0 && r.Rcode != s.rcode {
						t.Fatalf("client %d: %s rcode %s, want %s", c, s.name, dns.RcodeToString[r.Rcode], dns.RcodeToString[s.rcode])
					}
					if s.addr != "" {
						if got := answerAddrs(r); len(got) != 1 || got[0].String() != s.addr {
							t.Fatalf("client %d: %s answered %v, want %s", c, s.name, got, s.addr)
						}
					}
				}
				// Nothing more may arrive (no answer twice).
				_ = conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				if n, err := conn.Read(buf); err == nil {
					t.Fatalf("client %d: an extra datagram of %d bytes", c, n)
				}
			}
			// The listener was served by the batching reader (or the raw
			// one, which batches its replies too) unless batching is off:
			// its reader, running since the first answer, keeps its writer.
			ts.mu.Lock()
			_, batched := ts.pcs.Load(ts.udp[0])
			ts.mu.Unlock()
			if batched != !tc.noBatch {
				t.Errorf("listener served by a batching reader: %v, want %v", batched, !tc.noBatch)
			}
			total := warm + clients*perClient
			deadline := time.Now().Add(3 * time.Second)
			for len(ts.Sink.Events()) < total && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := len(ts.Sink.Events()); n != total {
				t.Errorf("%d audit events, want %d (one per query)", n, total)
			}
		})
	}
}

// TestWildcardListen: a wildcard listen address (":port", what egressd run
// uses by default) gets an AF_INET socket and an IPv6-only one, both served
// by the batching reader; IPv4 and IPv6 clients are both answered, misses
// and cache hits, on UDP and TCP. A dual-stack socket is not batched. With
// UDPRawReads the IPv4 socket leaves the netpoller, by default it stays.
func TestWildcardListen(t *testing.T) {
	procsAtLeast(t, 3) // two raw readers (startServer's) and one more
	for _, rawReads := range []bool{false, true} {
		t.Run(fmt.Sprintf("raw=%v", rawReads), func(t *testing.T) {
			testWildcardListen(t, rawReads)
		})
	}
}

func testWildcardListen(t *testing.T, rawReads bool) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Listen: []string{":0"}, Upstreams: []string{up.Addr}, UDPRawReads: rawReads}, Deps{})
	port := ts.Addrs()[0].Port()
	var v4, v6, batched, raw, total int
	ts.mu.Lock()
	for _, c := range ts.udp {
		total++
		if c.LocalAddr().(*net.UDPAddr).IP.To4() != nil {
			v4++
		} else {
			v6++
		}
		if isRawUDP(c) {
			raw++
			batched++
		} else if batchConnFor(c.(*net.UDPConn)) != nil {
			batched++
		}
	}
	ts.mu.Unlock()
	if v4 == 0 || batched != total {
		t.Errorf("wildcard UDP sockets: %d IPv4, %d IPv6, %d of %d batched; want an IPv4 one and all batched", v4, v6, batched, total)
	}
	want := 0
	if rawSupported && rawReads {
		want = v4
	}
	if raw != want {
		t.Errorf("wildcard UDP sockets: %d of %d IPv4 ones off the netpoller, want %d (UDPRawReads %v)", raw, v4, want, rawReads)
	}
	addrs := []string{fmt.Sprintf("127.0.0.1:%d", port)}
	if c, err := net.ListenPacket("udp6", "[::1]:0"); err == nil {
		_ = c.Close()
		addrs = append(addrs, fmt.Sprintf("[::1]:%d", port))
		if v6 == 0 {
			t.Errorf("IPv6 is available but the wildcard has no IPv6 socket")
		}
		if ds, err := net.ListenPacket("udp", "[::]:0"); err == nil {
			if batchConnFor(ds.(*net.UDPConn)) != nil {
				t.Errorf("a dual-stack socket would be batched: its IPv4 clients could not be answered")
			}
			_ = ds.Close()
		}
	}
	for _, addr := range addrs {
		for _, proto := range []string{"udp", "tcp"} {
			for i := range 2 { // a miss, then a hit
				r := ask(t, proto, addr, "www.allowed.test.", dns.TypeA, i == 1)
				if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
					t.Errorf("%s %s query %d: %v", proto, addr, i, r)
				}
			}
		}
	}
}

func TestDefaultReaders(t *testing.T) {
	for cpus, want := range map[int]int{0: 1, 1: 1, 2: 2, 3: 3, 16: 16} {
		if got := defaultReaders(cpus); got != want {
			t.Errorf("defaultReaders(%d) = %d, want %d", cpus, got, want)
		}
	}
}

// batchMsgs reuses its slots: each datagram keeps its own bytes and
// address (as net.UDPAddrFromAddrPort would make it) until reset.
func TestBatchMsgs(t *testing.T) {
	var bm batchMsgs
	for round := 0; round < 2; round++ {
		dsts := []netip.AddrPort{
			netip.MustParseAddrPort("192.0.2.1:53"),
			netip.MustParseAddrPort("[2001:db8::1]:5353"),
			netip.MustParseAddrPort("[::ffff:198.51.100.7]:1"),
			{}, // a connected socket's datagram: no address
		}
		if round == 1 {
			dsts[0] = netip.MustParseAddrPort("203.0.113.9:40000")
		}
		for i, d := range dsts {
			bm.add([]byte{byte(round), byte(i)}, d, answerFrom{})
		}
		if len(bm.ms) != len(dsts) {
			t.Fatalf("round %d: %d messages, want %d", round, len(bm.ms), len(dsts))
		}
		for i, d := range dsts {
			m := bm.ms[i]
			if len(m.Buffers) != 1 || !bytes.Equal(m.Buffers[0], []byte{byte(round), byte(i)}) {
				t.Errorf("round %d, message %d: buffers %v", round, i, m.Buffers)
			}
			if !d.IsValid() {
				if m.Addr != nil {
					t.Errorf("round %d, message %d: address %v, want none", round, i, m.Addr)
				}
				continue
			}
			want := net.UDPAddrFromAddrPort(d)
			got, ok := m.Addr.(*net.UDPAddr)
			if !ok || !bytes.Equal(got.IP, want.IP) || got.Port != want.Port || got.Zone != want.Zone {
				t.Errorf("round %d, message %d: address %v, want %v", round, i, m.Addr, want)
			}
		}
		bm.reset()
		if len(bm.ms) != 0 || bm.slots[0].bufs[0] != nil {
			t.Fatalf("round %d: reset kept %d messages or a buffer", round, len(bm.ms))
		}
	}
}
