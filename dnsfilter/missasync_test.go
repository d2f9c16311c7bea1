package dnsfilter

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/miekg/dns"
)

// The asynchronous miss path packs its upstream query by hand: it must be
// byte for byte what the general path packs with miekg/dns.
func TestUpstreamWire(t *testing.T) {
	s := &Server{cfg: Config{UDPSize: 1232}}
	for _, name := range []string{"a.allowed.test", "x", "_sip._tcp.allowed.test", "a-b.c0.allowed.test"} {
		for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeHTTPS} {
			for _, flags := range []byte{0, keyDO, keyCD, keyDO | keyCD} {
				buf := make([]byte, 256)
				n, err := dns.PackDomainName(dns.Fqdn(name), buf, 0, nil, false)
				if err != nil {
					t.Fatal(err)
				}
				key := binary.BigEndian.AppendUint16(buf[:n], qtype)
				key = binary.BigEndian.AppendUint16(key, dns.ClassINET)
				key = append(key, flags)
				q := s.upstreamQuery(name, qtype, dns.ClassINET, flags)
				q.Id = 0 // the mux writes the ID into both
				want, err := q.Pack()
				if err != nil {
					t.Fatal(err)
				}
				if got := s.upstreamWire(key); !bytes.Equal(got, want) {
					t.Errorf("%s %d flags %d:\n got % x\nwant % x", name, qtype, flags, got, want)
				}
			}
		}
	}
}
