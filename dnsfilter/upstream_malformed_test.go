package dnsfilter

import (
	"encoding/binary"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestMalformedUpstreamAnswers (THREATS.md E5, section 2.3): answers from
// the upstream resolver are input too. Shapes of the miekg/dns bugs found
// by fuzzing (an OPT option running past its record, the goto loop of
// #1505), a compression loop, records cut short, SvcParams of an HTTPS
// record running past its data, a record count that lies: each query is
// answered (SERVFAIL or a clean answer) without hanging or crashing the
// forwarder, and it goes on serving.
func TestMalformedUpstreamAnswers(t *testing.T) {
	rr := func(typ uint16, rdata []byte) []byte {
		b := []byte{0xC0, 12} // the question's name
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint16(b, dns.ClassINET)
		b = binary.BigEndian.AppendUint32(b, 300)
		b = binary.BigEndian.AppendUint16(b, uint16(len(rdata)))
		return append(b, rdata...)
	}
	type shape struct {
		name       string
		an, ar     uint16
		records    []byte
		truncateRR int // cut this many bytes off the end
	}
	opt := func(rdata []byte) []byte {
		b := []byte{0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0}
		b = binary.BigEndian.AppendUint16(b, uint16(len(rdata)))
		return append(b, rdata...)
	}
	shapes := []shape{
		{"a record cut short", 1, 0, rr(dns.TypeA, []byte{192, 0, 2, 1}), 2},
		{"rdlength past the end", 1, 0, append(rr(dns.TypeA, []byte{192, 0, 2, 1})[:10], 0, 40, 1, 2), 0},
		{"answer count lies", 3, 0, rr(dns.TypeA, []byte{192, 0, 2, 1}), 0},
		// The answer's name points at itself (the server writes its
		// offset over the first two bytes).
		{"compression loop", 1, 0, rr(dns.TypeA, []byte{192, 0, 2, 1}), 0},
		{"CNAME target pointing into the header", 1, 0, rr(dns.TypeCNAME, []byte{0xC0, 0}), 0},
		{"OPT option past its record", 0, 1, opt([]byte{0, 10, 0, 200, 1, 2}), 0},
		{"OPT option length zero, then junk", 0, 1, opt([]byte{0, 8, 0, 0, 0, 8, 0xff, 0xff}), 0},
		{"two OPT records", 0, 2, append(opt(nil), opt(nil)...), 0},
		{"HTTPS SvcParams past the data", 1, 0, rr(dns.TypeHTTPS, []byte{0, 1, 0, 0, 5, 0, 200, 1, 2, 3}), 0},
		{"HTTPS ech of a wrong length", 1, 0, rr(dns.TypeHTTPS, []byte{0, 1, 0, 0, 5, 0, 3, 1}), 0},
		{"HTTPS ipv4hint not a multiple of 4", 1, 0, rr(dns.TypeHTTPS, []byte{0, 1, 0, 0, 4, 0, 5, 192, 0, 2, 1, 9}), 0},
		{"A record of 5 bytes", 1, 0, rr(dns.TypeA, []byte{192, 0, 2, 1, 7}), 0},
		{"trailing garbage", 1, 0, append(rr(dns.TypeA, []byte{192, 0, 2, 1}), 0xde, 0xad), 0},
	}
	var cur atomic.Int32
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := buf[:n]
			if n < 12 {
				continue
			}
			// The question as asked: name, type, class.
			end := 12
			for end < n && q[end] != 0 {
				end += int(q[end]) + 1
			}
			end += 5
			if end > n {
				continue
			}
			s := shapes[int(cur.Load())%len(shapes)]
			out := append([]byte{}, q[:2]...)
			out = append(out, 0x81, 0x80, 0, 1)
			out = binary.BigEndian.AppendUint16(out, s.an)
			out = append(out, 0, 0)
			out = binary.BigEndian.AppendUint16(out, s.ar)
			out = append(out, q[12:end]...)
			recs := s.records
			if s.truncateRR > 0 {
				recs = recs[:len(recs)-s.truncateRR]
			}
			at := len(out)
			out = append(out, recs...)
			if s.name == "compression loop" {
				out[at], out[at+1] = 0xC0|byte(at>>8), byte(at)
			}
			pc.WriteTo(out, from)
		}
	}()
	// An answer that does not parse is not taken for the answer (it could
	// be a forgery): the forwarder waits out the attempt, kept short here.
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{pc.LocalAddr().String()},
		UpstreamTimeout: 200 * time.Millisecond, QueryTimeout: time.Second}, Deps{})
	for i, s := range shapes {
		cur.Store(int32(i))
		for _, qt := range []uint16{dns.TypeA, dns.TypeHTTPS} {
			// A name of its own for each, so that no cache answers.
			name := string(rune('a'+i)) + dns.TypeToString[qt] + ".allowed.test."
			r, err := tryAsk("udp", ts.Addr, name, qt, true)
			if err != nil {
				t.Errorf("%s (%s): no answer: %v", s.name, dns.TypeToString[qt], err)
				continue
			}
			t.Logf("%s (%s): %s, %d answers", s.name, dns.TypeToString[qt], dns.RcodeToString[r.Rcode], len(r.Answer))
		}
	}
	// Still serving: a denied name is answered locally.
	if r := ask(t, "udp", ts.Addr, "evil.example.", dns.TypeA, true); r.Rcode != dns.RcodeRefused {
		t.Errorf("after the malformed answers: %s", dns.RcodeToString[r.Rcode])
	}
}
