package dnsfilter

import (
	"context"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"egressd/audit"
)

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

// FuzzServeWire feeds arbitrary packets to the query handler, both the UDP
// fast path and the general path, in enforce mode with a real in-process
// upstream. It must never panic, and an answer must parse and carry the
// query's ID.
func FuzzServeWire(f *testing.F) {
	q := func(name string, qtype uint16, edns bool) []byte {
		m := new(dns.Msg)
		m.SetQuestion(name, qtype)
		m.Id = 0xBEEF
		if edns {
			m.SetEdns0(1232, true)
		}
		b, _ := m.Pack()
		return b
	}
	f.Add(q("www.allowed.test.", dns.TypeA, false))               // allowed, cache miss then hit
	f.Add(q("WWW.Allowed.Test.", dns.TypeAAAA, true))             // case, EDNS with DO
	f.Add(q("tracker.evil.example.", dns.TypeTXT, true))          // denied: REFUSED + EDE
	f.Add(q("svc.allowed.test.", dns.TypeHTTPS, true))            // HTTPS with ech to strip
	f.Add(q("use-application-dns.net.", dns.TypeA, false))        // canary
	f.Add(q("Mask-H2.icloud.com.", dns.TypeHTTPS, true))          // Private Relay's canary
	f.Add(q("allowed.test.", dns.TypeAXFR, false))                // zone transfer
	f.Add(q("www.allowed.test.", dns.TypeTSIG, true))             // a meta type: FORMERR
	f.Add([]byte{0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}) // header claims a question, none follows
	f.Add([]byte{0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
		0xC0, 0x0C, 0, 1, 0, 1}) // question name is a pointer to itself
	f.Add([]byte{0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1,
		1, 'a', 0, 0, 1, 0, 1, // a. A IN
		0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 4, 0, 15, 0, 9}) // OPT whose option overruns rdata
	f.Add([]byte{0xBE, 0xEF, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0}) // a response: ignored

	up := newFakeUpstream(f, labZone)
	ts := startServer(f, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{Sink: audit.Discard})
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		f.Fatal(err)
	}
	defer c.Close()
	sc := newScratch()
	src := netip.MustParseAddrPort("127.0.0.1:5353")
	f.Fuzz(func(t *testing.T, pkt []byte) {
		// Fast path: writes to a socket nobody reads.
		ts.fast(sc, c, pkt, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(c.LocalAddr().(*net.UDPAddr).Port)))
		out := ts.serveWire(context.Background(), pkt, src, "udp")
		if out == nil {
			return
		}
		m := new(dns.Msg)
		if err := m.Unpack(out); err != nil && len(out) != 12 {
			t.Fatalf("answer does not parse: %v (%x)", err, out)
		}
		if out[0] != pkt[0] || out[1] != pkt[1] {
			t.Fatalf("answer ID %x, query %x", out[:2], pkt[:2])
		}
		if len(out) > 512 && m.IsEdns0() == nil {
			t.Fatalf("%d-byte UDP answer without EDNS", len(out))
		}
	})
}
