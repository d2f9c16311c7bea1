package dnsfilter

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"github.com/miekg/dns"
	dto "github.com/prometheus/client_model/go"
)

// pcapPath returns a capture from the shared corpus beside the repository
// (../shared/pcaps from the repository root). A missing corpus fails the
// test: it must not pass by skipping.
func pcapPath(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join("..", "..", "shared", "pcaps", name)
	if _, err := os.Stat(p); err != nil {
		abs, _ := filepath.Abs(p)
		t.Fatalf("capture %s missing (the shared corpus must be checked out beside the repository): %v", abs, err)
	}
	return p
}

// pcapQueries returns the DNS query payloads (QR=0) of UDP port 53 packets
// in a capture, and their question names as raw bytes.
func pcapQueries(t *testing.T, name string) (payloads [][]byte, names map[string]bool) {
	t.Helper()
	f, err := os.Open(pcapPath(t, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	names = map[string]bool{}
	for {
		data, _, err := r.ReadPacketData()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		pkt := gopacket.NewPacket(data, r.LinkType(), gopacket.Default)
		udp, ok := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
		if !ok || udp.DstPort != 53 || len(udp.Payload) < 12 {
			continue
		}
		if udp.Payload[2]&0x80 != 0 { // a response
			continue
		}
		payloads = append(payloads, append([]byte(nil), udp.Payload...))
		if d, ok := pkt.Layer(layers.LayerTypeDNS).(*layers.DNS); ok {
			for _, q := range d.Questions {
				names[string(q.Name)] = true
			}
		}
	}
	return payloads, names
}

// exchangeRaw sends a raw query over UDP or TCP and returns the raw answer,
// or nil when none came within the timeout.
func exchangeRaw(t *testing.T, proto, addr string, pkt []byte, timeout time.Duration) []byte {
	t.Helper()
	c, err := net.Dial(proto, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if proto == "tcp" {
		pkt = append(binary.BigEndian.AppendUint16(nil, uint16(len(pkt))), pkt...)
	}
	if _, err := c.Write(pkt); err != nil {
		return nil
	}
	if proto == "tcp" {
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return nil
		}
		buf := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, buf); err != nil {
			return nil
		}
		return buf
	}
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		return nil
	}
	return buf[:n]
}

// TestTunnelNamesNeverReachUpstream replays the queries of real iodine and
// dnscat2 tunnels at the forwarder in enforce mode: the recording upstream
// must receive none of them (THREATS.md E1), and every one is answered.
func TestTunnelNamesNeverReachUpstream(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, c := range []struct {
		file     string
		minNames int
	}{
		{"ndpi/dns-tunnel-iodine.pcap", 20},
		{"ndpi/dns_exfiltration.pcap", 100},
	} {
		payloads, names := pcapQueries(t, c.file)
		if len(names) < c.minNames {
			t.Fatalf("%s: only %d query names extracted, want at least %d", c.file, len(names), c.minNames)
		}
		t.Logf("%s: %d queries, %d names", c.file, len(payloads), len(names))
		rcodes := map[int]int{}
		for i, p := range payloads {
			proto := "udp"
			if i%4 == 3 {
				proto = "tcp"
			}
			out := exchangeRaw(t, proto, ts.Addr, p, 3*time.Second)
			m := new(dns.Msg)
			if out == nil || m.Unpack(out) != nil {
				t.Fatalf("%s query %d over %s: no usable answer (%x)", c.file, i, proto, out)
			}
			if m.Id != binary.BigEndian.Uint16(p) {
				t.Fatalf("answer ID %d for query %d", m.Id, binary.BigEndian.Uint16(p))
			}
			rcodes[m.Rcode]++
		}
		for rc := range rcodes {
			if rc != dns.RcodeRefused && rc != dns.RcodeFormatError {
				t.Errorf("%s: answers %v, want only REFUSED (or FORMERR)", c.file, rcodes)
			}
		}
	}
	if seen := up.Seen(); len(seen) != 0 {
		t.Fatalf("%d tunnel queries reached the upstream, first %+v", len(seen), seen[0])
	}
	// The recorder works: an allowed name does reach it.
	ask(t, "udp", ts.Addr, "api.allowed.test.", dns.TypeA, true)
	if seen := up.Seen(); len(seen) != 1 || seen[0].Name != "api.allowed.test" {
		t.Fatalf("control query: upstream saw %v", seen)
	}
}

// TestMalformedQueries sends broken packets and the public malformed
// captures: each gets FORMERR (or another error rcode) or is dropped, and
// the server keeps answering.
func TestMalformedQueries(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	valid := func() []byte {
		m := new(dns.Msg)
		m.SetQuestion("www.allowed.test.", dns.TypeA)
		m.Id = 0x1234
		b, _ := m.Pack()
		return b
	}
	hdr := func(flags uint16, qd, an, ns, ar uint16) []byte {
		b := binary.BigEndian.AppendUint16(nil, 0x4242)
		for _, v := range []uint16{flags, qd, an, ns, ar} {
			b = binary.BigEndian.AppendUint16(b, v)
		}
		return b
	}
	q := valid()[12:] // question section
	cases := []struct {
		name  string
		pkt   []byte
		rcode int // -1: no answer
	}{
		{"short", []byte{1, 2, 3, 4, 5}, -1},
		{"header only, claims a question", hdr(0x0100, 1, 0, 0, 0), dns.RcodeFormatError},
		{"two questions", append(append(hdr(0x0100, 2, 0, 0, 0), q...), q...), dns.RcodeFormatError},
		{"no question", hdr(0x0100, 0, 0, 0, 0), dns.RcodeFormatError},
		{"a response", append(hdr(0x8100, 1, 0, 0, 0), q...), -1},
		{"opcode update", append(hdr(0x2800, 1, 0, 0, 0), q...), dns.RcodeNotImplemented},
		{"label past the end", append(hdr(0x0100, 1, 0, 0, 0), 40, 'a', 'b'), dns.RcodeFormatError},
		{"compression loop", append(hdr(0x0100, 1, 0, 0, 0), 0xC0, 12, 0, 1, 0, 1), dns.RcodeFormatError},
		{"answer count lies", append(hdr(0x0100, 1, 3, 0, 0), q...), dns.RcodeFormatError},
		{"EDNS version 1", append(append(hdr(0x0100, 1, 0, 0, 1), q...), 0, 0, 41, 4, 0xd0, 0, 1, 0, 0, 0, 0), dns.RcodeBadVers},
		{"two OPT", append(append(hdr(0x0100, 1, 0, 0, 2), q...), 0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0, 0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0), dns.RcodeFormatError},
		// RFC 6891 §6.1.2: an OPT's owner is the root, else FORMERR.
		{"OPT owner a.", append(append(hdr(0x0100, 1, 0, 0, 1), q...), 1, 'a', 0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0), dns.RcodeFormatError},
		{"OPT owner the question's name", append(append(hdr(0x0100, 1, 0, 0, 1), q...), 0xC0, 12, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0), dns.RcodeFormatError},
		{"two OPT, the second's owner a.", append(append(hdr(0x0100, 1, 0, 0, 2), q...), 0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0, 1, 'a', 0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0), dns.RcodeFormatError},
		{"OPT owner the root by a pointer", append(append(hdr(0x0100, 1, 0, 0, 1), q...), 0xC0, byte(12+len(q)-5), 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0), dns.RcodeSuccess},
		{"trailing garbage", append(valid(), 1, 2, 3), dns.RcodeSuccess},
	}
	check := func(name, proto string, pkt []byte, want int) {
		out := exchangeRaw(t, proto, ts.Addr, pkt, 700*time.Millisecond)
		got := -1
		if out != nil {
			m := new(dns.Msg)
			if err := m.Unpack(out); err != nil {
				if len(out) < 12 {
					t.Errorf("%s over %s: unparsable answer %x", name, proto, out)
					return
				}
				got = int(out[3] & 0xF)
			} else {
				got = m.Rcode
			}
		}
		if want == -2 {
			if got == dns.RcodeSuccess {
				t.Errorf("%s over %s: NOERROR for a malformed query", name, proto)
			}
			return
		}
		if got != want && !(want == dns.RcodeFormatError && got == -1 && proto == "tcp") {
			t.Errorf("%s over %s: rcode %d, want %d", name, proto, got, want)
		}
	}
	for _, c := range cases {
		check(c.name, "udp", c.pkt, c.rcode)
		if len(c.pkt) >= 12 && c.rcode != -1 && c.name != "trailing garbage" {
			check(c.name, "tcp", c.pkt, c.rcode)
		}
	}
	for _, f := range []string{"ndpi/malformed_dns.pcap", "ndpi/dns-invalid-chars.pcap"} {
		payloads, _ := pcapQueries(t, f)
		if len(payloads) == 0 {
			t.Fatalf("%s: no queries extracted", f)
		}
		for i, p := range payloads {
			check(f+"#"+string(rune('0'+i%10)), "udp", p, -2)
		}
	}
	if r := ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, true); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("after malformed input: %v", r)
	}
	var pm dto.Metric
	_ = ts.m.dropped.WithLabelValues("panic").Write(&pm)
	if n := pm.GetCounter().GetValue(); n != 0 {
		t.Errorf("%v panics recovered", n)
	}
}

// TestUpstreamIDsAndPortsRandom checks THREATS.md E6: upstream query IDs
// and source ports show no pattern.
func TestUpstreamIDsAndPortsRandom(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, CacheSize: -1}, Deps{})
	const n = 2000
	c := &dns.Client{Timeout: 3 * time.Second}
	co, err := c.Dial(ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	for i := 0; i < n; i++ {
		m := new(dns.Msg)
		m.SetQuestion("www.allowed.test.", dns.TypeA)
		m.Id = uint16(i) // sequential client IDs must not show through
		if _, _, err := c.ExchangeWithConn(m, co); err != nil {
			t.Fatal(err)
		}
	}
	seen := up.Seen()
	if len(seen) != n {
		t.Fatalf("upstream saw %d queries, want %d", len(seen), n)
	}
	ids, ports := map[uint16]bool{}, map[uint16]int{}
	seqID, seqPort := 0, 0
	var lo, hi uint16 = 65535, 0
	for i, s := range seen {
		ids[s.ID] = true
		ports[s.Port]++
		lo, hi = min(lo, s.Port), max(hi, s.Port)
		if i > 0 && (s.ID == seen[i-1].ID+1 || s.ID == seen[i-1].ID) {
			seqID++
		}
		if i > 0 && s.Port == seen[i-1].Port+1 {
			seqPort++
		}
	}
	// 2000 draws from 65536 values collide about 30 times by chance.
	if len(ids) < n*95/100 || seqID > n/100 {
		t.Errorf("IDs: %d distinct of %d, %d sequential", len(ids), n, seqID)
	}
	// A socket (source port) carries at most queriesPerSocket queries; the
	// kernel picks each new port at random across the ephemeral range, so
	// a port comes back now and then, rarely thrice.
	for p, c := range ports {
		if c > 3*queriesPerSocket {
			t.Errorf("port %d carried %d queries", p, c)
		}
	}
	if len(ports) < n/queriesPerSocket*9/10 || seqPort > len(ports)/20 || hi-lo < 10000 {
		t.Errorf("source ports: %d distinct of %d queries, %d sequential, range %d-%d", len(ports), n, seqPort, lo, hi)
	}
	t.Logf("%d distinct IDs, %d distinct ports, %d/%d sequential", len(ids), len(ports), seqID, seqPort)
}
