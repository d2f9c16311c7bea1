package capture

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"egressd/audit"
	"egressd/internal/tlshello"
	"egressd/policy"
)

// pcapWriter writes synthetic captures with gopacket, for the cases the
// real captures miss.
type pcapWriter struct {
	t    testing.TB
	f    *os.File
	w    *pcapgo.Writer
	now  time.Time
	vlan uint16 // when set, frames carry an 802.1Q tag
	// ext6, when set, is an IPv6 extension header (its first byte, the
	// next header, is filled in) that IPv6 packets carry before their
	// payload.
	ext6 []byte
	// snap, when set, cuts frames to that many bytes, as a capture taken
	// with a snap length (tcpdump -s) does; their length on the wire stays.
	snap int
	// afterFrag6, when set, is an IPv6 extension header (its first byte,
	// the next header, is filled in) that ipFragments puts after the
	// Fragment header.
	afterFrag6 []byte
	path       string
}

func newPcap(t testing.TB) *pcapWriter {
	t.Helper()
	path := filepath.Join(t.TempDir(), "synthetic.pcap")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := pcapgo.NewWriter(f)
	if err := w.WriteFileHeader(65536, layers.LinkTypeEthernet); err != nil {
		t.Fatal(err)
	}
	return &pcapWriter{t: t, f: f, w: w, path: path, now: time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)}
}

var (
	macClient = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	macGW     = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
)

// frame writes one Ethernet frame around an IP packet's layers.
func (p *pcapWriter) frame(fromClient bool, ls ...gopacket.SerializableLayer) {
	p.t.Helper()
	src, dst := macClient, macGW
	if !fromClient {
		src, dst = dst, src
	}
	et := layers.EthernetTypeIPv4
	if ip6, ok := ls[0].(*layers.IPv6); ok {
		et = layers.EthernetTypeIPv6
		if p.ext6 != nil {
			ext := append([]byte{byte(ip6.NextHeader)}, p.ext6[1:]...)
			ip6.NextHeader = layers.IPProtocol(p.ext6[0])
			ls = append([]gopacket.SerializableLayer{ip6, gopacket.Payload(ext)}, ls[1:]...)
		}
	}
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: et}
	all := []gopacket.SerializableLayer{eth}
	if p.vlan != 0 {
		eth.EthernetType = layers.EthernetTypeDot1Q
		all = append(all, &layers.Dot1Q{VLANIdentifier: p.vlan, Type: et})
	}
	all = append(all, ls...)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, all...); err != nil {
		p.t.Fatal(err)
	}
	p.raw(buf.Bytes())
}

func (p *pcapWriter) raw(b []byte) {
	p.t.Helper()
	p.now = p.now.Add(time.Millisecond)
	ci := gopacket.CaptureInfo{Timestamp: p.now, CaptureLength: len(b), Length: len(b)}
	if p.snap > 0 && len(b) > p.snap {
		b = b[:p.snap]
		ci.CaptureLength = p.snap
	}
	if err := p.w.WritePacket(ci, b); err != nil {
		p.t.Fatal(err)
	}
}

func (p *pcapWriter) close() string {
	p.t.Helper()
	if err := p.f.Close(); err != nil {
		p.t.Fatal(err)
	}
	return p.path
}

// ipLayer returns the network layer for src -> dst (v4 or v6).
func ipLayer(src, dst netip.Addr, proto layers.IPProtocol) gopacket.NetworkLayer {
	if src.Is4() {
		return &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	}
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
}

// tcpConn writes one TCP connection's packets.
type tcpConn struct {
	p            *pcapWriter
	cli, srv     netip.Addr
	cport, sport uint16
	cseq, sseq   uint32
}

func (c *tcpConn) seg(fromClient bool, flags string, seq uint32, data []byte) {
	src, dst, sp, dp := c.cli, c.srv, c.cport, c.sport
	ack := c.sseq
	if !fromClient {
		src, dst, sp, dp = dst, src, dp, sp
		ack = c.cseq
	}
	ip := ipLayer(src, dst, layers.IPProtocolTCP)
	t := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Ack: ack, Window: 65535,
		SYN: bytes.ContainsRune([]byte(flags), 'S'), ACK: bytes.ContainsRune([]byte(flags), 'A'),
		FIN: bytes.ContainsRune([]byte(flags), 'F'), RST: bytes.ContainsRune([]byte(flags), 'R'), PSH: len(data) > 0}
	t.SetNetworkLayerForChecksum(ip)
	c.p.frame(fromClient, ip.(gopacket.SerializableLayer), t, gopacket.Payload(data))
}

func (c *tcpConn) handshake() {
	c.seg(true, "S", c.cseq, nil)
	c.seg(false, "SA", c.sseq, nil)
	c.cseq++
	c.sseq++
	c.seg(true, "A", c.cseq, nil)
}

// send writes data from one side in segments of size mss, in the order
// given by order (indexes of segments; nil = in order), skipping those in
// skip.
func (c *tcpConn) send(fromClient bool, data []byte, mss int, order []int, skip map[int]bool) {
	seq := &c.sseq
	if fromClient {
		seq = &c.cseq
	}
	segs, order := pieces(data, mss, order)
	offs := make([]uint32, len(segs))
	o := *seq
	for i, s := range segs {
		offs[i] = o
		o += uint32(len(s))
	}
	// Indexes past the end are ignored.
	for _, i := range order {
		if i < len(segs) && !skip[i] {
			c.seg(fromClient, "A", offs[i], segs[i])
		}
	}
	*seq = o
}

// pieces cuts data into pieces of size bytes (the last one shorter) and
// completes order (indexes of pieces) with the indexes it leaves out, in
// order.
func pieces(data []byte, size int, order []int) ([][]byte, []int) {
	var ps [][]byte
	for len(data) > 0 {
		n := min(size, len(data))
		ps = append(ps, data[:n])
		data = data[n:]
	}
	seen := map[int]bool{}
	for _, i := range order {
		seen[i] = true
	}
	for i := range ps {
		if !seen[i] {
			order = append(order, i)
		}
	}
	return ps, order
}

func (c *tcpConn) close() {
	c.seg(true, "FA", c.cseq, nil)
	c.seg(false, "FA", c.sseq, nil)
	c.cseq++
	c.sseq++
	c.seg(true, "A", c.cseq, nil)
}

// namedConn writes a whole connection that names name: the handshake,
// then a request head with Host name where the server's port is 80, else
// a real ClientHello with SNI name, then the close.
func (c *tcpConn) namedConn(t testing.TB, name string) {
	t.Helper()
	c.handshake()
	if c.sport == 80 {
		c.send(true, []byte("GET / HTTP/1.1\r\nHost: "+name+"\r\n\r\n"), 1400, nil, nil)
	} else {
		c.send(true, realClientHello(t, name), 1400, nil, nil)
	}
	c.close()
}

// realClientHello makes Go's crypto/tls client send its ClientHello to a
// local listener and returns the bytes as they went on the wire (whole
// TLS records). Go's default key shares include X25519MLKEM768, so the
// hello is larger than one Ethernet frame.
func realClientHello(t testing.TB, sni string) []byte {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		var buf []byte
		hdr := make([]byte, 5)
		// Read whole records until the handshake message is complete.
		for {
			if _, err := io.ReadFull(c, hdr); err != nil {
				got <- buf
				return
			}
			body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
			if _, err := io.ReadFull(c, body); err != nil {
				got <- nil
				return
			}
			buf = append(append(buf, hdr...), body...)
			if _, err := tlshello.Read(buf, nil); err != tlshello.ErrShort {
				got <- buf
				return
			}
		}
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tc := tls.Client(conn, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
	go tc.Handshake() // fails when the listener hangs up; we only want the hello
	hello := <-got
	if len(hello) == 0 {
		t.Fatal("no ClientHello captured")
	}
	return hello
}

func synthRun(t *testing.T, path string, src string, dns DNSFacts, cfg Config) fileResult {
	t.Helper()
	return synthRunDeps(t, path, src, Deps{DNS: dns}, cfg)
}

// synthRunDeps is synthRun with more of Deps (its Policy and Sink are the
// run's own).
func synthRunDeps(t *testing.T, path string, src string, deps Deps, cfg Config) fileResult {
	t.Helper()
	return synthRunEngine(t, path, testEngine(t, src), deps, cfg)
}

// synthRunEngine is synthRunDeps with the policy engine given.
func synthRunEngine(t *testing.T, path string, eng *policy.Engine, deps Deps, cfg Config) fileResult {
	t.Helper()
	rec := &recorder{}
	deps.Policy, deps.Sink = policy.NewStore(eng), rec
	c, err := New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	var res fileResult
	c.observe = func(o observation) { res.obs = append(res.obs, o) }
	res.stats, res.err = c.ReadFile(context.Background(), path, nil)
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.stats.Panics != 0 || res.stats.Malformed != 0 {
		t.Errorf("synthetic capture: %d malformed, %d panics", res.stats.Malformed, res.stats.Panics)
	}
	res.events = rec.all()
	return res
}

func TestSyntheticSplitMLKEMHello(t *testing.T) {
	hello := realClientHello(t, "mlkem.allowed.test")
	if len(hello) < 1500 {
		t.Fatalf("ClientHello of %d bytes: want an ML-KEM key share (> 1500 bytes)", len(hello))
	}
	cases := []struct {
		name    string
		cli     netip.Addr
		srv     netip.Addr
		vlan    uint16
		mss     int
		order   []int
		skip    map[int]bool
		wantSrc audit.NameSource
		verdict policy.Verdict
	}{
		{"in order over IPv4", netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.5"), 0, 600, nil, nil, audit.NameSNI, policy.Allow},
		{"out of order with a retransmission", netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.5"), 0, 300, []int{0, 2, 1, 1, 4, 3, 5, 6, 0}, nil, audit.NameSNI, policy.Allow},
		{"VLAN tagged", netip.MustParseAddr("192.0.2.11"), netip.MustParseAddr("203.0.113.5"), 42, 500, nil, nil, audit.NameSNI, policy.Allow},
		{"IPv6 in 100-byte segments", netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("2001:db8:1::5"), 0, 100, nil, nil, audit.NameSNI, policy.Allow},
		{"missing segment gives up", netip.MustParseAddr("192.0.2.12"), netip.MustParseAddr("203.0.113.5"), 0, 400, nil, map[int]bool{1: true}, audit.NameNoSNI, policy.Deny},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newPcap(t)
			p.vlan = tc.vlan
			c := &tcpConn{p: p, cli: tc.cli, srv: tc.srv, cport: 40000, sport: 443, cseq: 0xfffffe00, sseq: 7}
			c.handshake()
			c.send(true, hello, tc.mss, tc.order, tc.skip)
			c.send(false, bytes.Repeat([]byte{0x17}, 3000), 1400, nil, nil)
			c.close()
			// Our DNS gave the server's address out for the name, so the
			// SNI matches the destination (see TestSNIMismatch). Where the
			// hello is lost nothing names the flow.
			var facts DNSFacts
			if tc.wantSrc == audit.NameSNI {
				facts = factsMap{tc.srv: {"mlkem.allowed.test"}}
			}
			res := synthRun(t, p.close(), testPolicy, facts, Config{})
			if len(res.events) != 1 {
				t.Fatalf("events %+v", res.events)
			}
			ev := res.events[0]
			wantName := "mlkem.allowed.test"
			if tc.wantSrc != audit.NameSNI {
				wantName = ""
			}
			if ev.Name != wantName || ev.NameSource != tc.wantSrc || ev.Verdict != tc.verdict {
				t.Errorf("event name %q (%s) verdict %s, want %q (%s) %s", ev.Name, ev.NameSource, ev.Verdict, wantName, tc.wantSrc, tc.verdict)
			}
			if ev.Client != tc.cli || ev.Dest != tc.srv || ev.ClientPort != 40000 || ev.DestPort != 443 || ev.Proto != "tcp" {
				t.Errorf("5-tuple %v:%d -> %v:%d %s", ev.Client, ev.ClientPort, ev.Dest, ev.DestPort, ev.Proto)
			}
			if ev.ClientMAC != macClient.String() {
				t.Errorf("client MAC %q", ev.ClientMAC)
			}
			sent := uint64(len(hello))
			if tc.skip != nil {
				sent -= uint64(tc.mss)
			}
			if ev.BytesIn != 3000 || ev.BytesOut < sent {
				t.Errorf("bytes out %d in %d, want >= %d and 3000", ev.BytesOut, ev.BytesIn, sent)
			}
			if ev.Close != "fin" || !ev.Time.Equal(time.Date(2026, 11, 24, 10, 0, 0, int(time.Millisecond), time.UTC)) {
				t.Errorf("close %q time %v", ev.Close, ev.Time)
			}
		})
	}
}

// dnsResponse builds a DNS answer to client for name with n A records in
// 198.51.100.0/24 and 203.0.113.0/24 (big enough to be fragmented).
func dnsResponse(t testing.TB, name string, addrs []netip.Addr) []byte {
	t.Helper()
	return dnsResponseTTL(t, name, addrs, 30)
}

// dnsResponseTTL is dnsResponse with answers of the given TTL (seconds).
func dnsResponseTTL(t testing.TB, name string, addrs []netip.Addr, ttl uint32) []byte {
	t.Helper()
	d := &layers.DNS{ID: 7, QR: true, RD: true, RA: true, ResponseCode: layers.DNSResponseCodeNoErr,
		Questions: []layers.DNSQuestion{{Name: []byte(name), Type: layers.DNSTypeA, Class: layers.DNSClassIN}}}
	for _, a := range addrs {
		typ := layers.DNSTypeA
		if a.Is6() {
			typ = layers.DNSTypeAAAA
		}
		d.Answers = append(d.Answers, layers.DNSResourceRecord{Name: []byte(name), Type: typ, Class: layers.DNSClassIN, TTL: ttl, IP: a.AsSlice()})
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, d); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// udpFragments writes a UDP datagram from src to dst as IP fragments of at
// most size bytes, in the order given, as ipFragments does.
func (p *pcapWriter) udpFragments(fromClient bool, src, dst netip.Addr, sp, dp uint16, payload []byte, size int, order []int) {
	p.t.Helper()
	ip := ipLayer(src, dst, layers.IPProtocolUDP)
	u := &layers.UDP{SrcPort: layers.UDPPort(sp), DstPort: layers.UDPPort(dp)}
	u.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, u, gopacket.Payload(payload)); err != nil {
		p.t.Fatal(err)
	}
	p.ipFragments(fromClient, src, dst, layers.IPProtocolUDP, buf.Bytes(), size, order)
}

func (p *pcapWriter) udp(fromClient bool, src, dst netip.Addr, sp, dp uint16, payload []byte) {
	ip := ipLayer(src, dst, layers.IPProtocolUDP)
	u := &layers.UDP{SrcPort: layers.UDPPort(sp), DstPort: layers.UDPPort(dp)}
	u.SetNetworkLayerForChecksum(ip)
	p.frame(fromClient, ip.(gopacket.SerializableLayer), u, gopacket.Payload(payload))
}

func dnsQuery(t testing.TB, name string) []byte {
	d := &layers.DNS{ID: 7, RD: true, Questions: []layers.DNSQuestion{{Name: []byte(name), Type: layers.DNSTypeA, Class: layers.DNSClassIN}}}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, d); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// A fragmented DNS answer (IPv4 and IPv6, fragments out of order) teaches
// capture the name of an address; a later raw-IP TLS flow without SNI to
// that address is named from it and classified by the name.
func TestSyntheticFragmentedDNSNamesFlows(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		name := "IPv4"
		cli, res := netip.MustParseAddr("192.0.2.20"), netip.MustParseAddr("198.51.100.53")
		if v6 {
			name, cli, res = "IPv6", netip.MustParseAddr("2001:db8::20"), netip.MustParseAddr("2001:db8:53::53")
		}
		t.Run(name, func(t *testing.T) {
			var addrs []netip.Addr
			unknown := netip.MustParseAddr("203.0.113.200")
			for i := 1; i <= 120; i++ { // 120 A records: about 4 KB
				a := netip.AddrFrom4([4]byte{203, 0, 113, byte(i)})
				if v6 {
					a = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0x01, 0x13, 15: byte(i)})
					unknown = netip.MustParseAddr("2001:db8:113::200")
				}
				addrs = append(addrs, a)
			}
			p := newPcap(t)
			p.udp(true, cli, res, 5353, 53, dnsQuery(t, "cdn.allowed.test"))
			p.udpFragments(false, res, cli, 53, 5353, dnsResponse(t, "cdn.allowed.test", addrs), 600, []int{2, 0, 3, 1})
			// TLS without SNI to a learned address, and one to an unknown one.
			hello := realClientHello(t, "")
			for _, dst := range []netip.Addr{addrs[77], unknown} {
				c := &tcpConn{p: p, cli: cli, srv: dst, cport: 40001, sport: 443, cseq: 1, sseq: 1}
				c.handshake()
				c.send(true, hello, 1400, nil, nil)
				c.close()
			}
			r := synthRun(t, p.close(), testPolicy, nil, Config{})
			if r.stats.Reassembled != 1 || r.stats.Fragments < 4 || r.stats.DNSAnswers != 1 {
				t.Errorf("fragments %d reassembled %d answers %d", r.stats.Fragments, r.stats.Reassembled, r.stats.DNSAnswers)
			}
			got := map[netip.Addr]audit.Event{}
			for _, ev := range r.events {
				got[ev.Dest] = ev
			}
			if ev := got[addrs[77]]; ev.Name != "cdn.allowed.test" || ev.NameSource != audit.NameDNSAnswer || ev.Verdict != policy.Allow || ev.Rule != "web" {
				t.Errorf("learned flow: %+v", ev)
			}
			if ev := got[unknown]; ev.Name != "" || ev.Verdict != policy.Deny || ev.Reason != policy.ReasonNoRule {
				t.Errorf("unknown flow: %+v", ev)
			}
			if ev := got[res]; ev.Proto != "udp" || ev.DestPort != 53 || ev.Client != cli || ev.Rule != "dns" {
				t.Errorf("DNS flow: %+v", ev)
			}
		})
	}
}

// factsMap is a DNSFacts backed by a map, as dnsfilter's table would be.
type factsMap map[netip.Addr][]string

func (m factsMap) NamesFor(_, addr netip.Addr) []string { return m[addr] }

// Given reports the names as given out to no particular client: rules
// without a from cover it.
func (m factsMap) Given(addr netip.Addr) []DNSGrant {
	var out []DNSGrant
	for _, n := range m[addr] {
		out = append(out, DNSGrant{Name: n})
	}
	return out
}

func TestSyntheticDNSFactsAndModes(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.30")
	p := newPcap(t)
	write := func(dst netip.Addr, port uint16) {
		c := &tcpConn{p: p, cli: cli, srv: dst, cport: 40100 + port, sport: port, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, []byte("SSH-2.0-test\r\n"), 1400, nil, nil)
		c.seg(true, "RA", c.cseq, nil)
	}
	write(netip.MustParseAddr("203.0.113.40"), 443) // our DNS gave this out for a.allowed.test
	write(netip.MustParseAddr("203.0.113.41"), 443) // nothing knows it
	write(netip.MustParseAddr("198.51.100.9"), 22)  // allowed by CIDR
	path := p.close()
	facts := factsMap{netip.MustParseAddr("203.0.113.40"): {"evil.test", "a.allowed.test"}}
	for _, mode := range []string{"audit", "enforce"} {
		t.Run(mode, func(t *testing.T) {
			src := testPolicy
			if mode == "enforce" {
				src = "version: 1\nmode: enforce\n" + testPolicy[len("version: 1\nmode: audit\n"):]
			}
			r := synthRun(t, path, src, facts, Config{})
			got := map[netip.Addr]audit.Event{}
			for _, ev := range r.events {
				got[ev.Dest] = ev
			}
			if len(r.events) != 3 {
				t.Fatalf("events: %+v", r.events)
			}
			ev := got[netip.MustParseAddr("203.0.113.40")]
			if ev.Name != "a.allowed.test" || ev.NameSource != audit.NameDNSLearned || ev.Verdict != policy.Allow || ev.Enforced {
				t.Errorf("learned: %+v", ev)
			}
			ev = got[netip.MustParseAddr("203.0.113.41")]
			if ev.Verdict != policy.Deny || ev.NameSource != audit.NameNone || ev.Enforced != (mode == "enforce") || string(ev.Mode) != mode {
				t.Errorf("unknown: %+v", ev)
			}
			ev = got[netip.MustParseAddr("198.51.100.9")]
			if ev.Verdict != policy.Allow || ev.Rule != "lab" || ev.Close != "rst" || ev.BytesOut != 14 {
				t.Errorf("cidr: %+v", ev)
			}
		})
	}
}

func TestSyntheticTableBoundsAndIdle(t *testing.T) {
	p := newPcap(t)
	cli := netip.MustParseAddr("192.0.2.50")
	for i := 0; i < 50; i++ {
		p.udp(true, cli, netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), 30000, 9999, []byte("x"))
	}
	// One UDP exchange, silent for 61 s, then again: two flows.
	srv := netip.MustParseAddr("198.51.100.7")
	p.udp(true, cli, srv, 30001, 123, []byte("ntp"))
	p.udp(false, srv, cli, 123, 30001, []byte("ntp-reply"))
	p.now = p.now.Add(61 * time.Second)
	p.udp(true, cli, srv, 30001, 123, []byte("ntp"))
	// A reply seen before its query: the client is still the one on the
	// high port.
	p.udp(false, srv, cli, 53, 30002, dnsResponse(t, "x.allowed.test", []netip.Addr{netip.MustParseAddr("203.0.113.77")}))
	r := synthRun(t, p.close(), testPolicy, nil, Config{MaxFlows: 10})
	if r.stats.Evicted < 40 {
		t.Errorf("evicted %d, want >= 40 with a table of 10", r.stats.Evicted)
	}
	if uint64(len(r.events)) != r.stats.Flows || r.stats.Flows != 50+2+1 {
		t.Errorf("events %d flows %d, want 53", len(r.events), r.stats.Flows)
	}
	ntp := 0
	for _, ev := range r.events {
		if ev.Dest == srv && ev.DestPort == 123 {
			ntp++
			if ev.Client != cli {
				t.Errorf("ntp flow client %v", ev.Client)
			}
		}
		if ev.DestPort == 53 && (ev.Client != cli || ev.ClientPort != 30002) {
			t.Errorf("reply-first DNS flow: %+v", ev)
		}
	}
	if ntp != 2 {
		t.Errorf("ntp flows %d, want 2 (60 s idle splits them)", ntp)
	}
}

// A UDP exchange silent for more than 60 s is two flows (DESIGN.md) even
// when the periodic sweep ran shortly before the silence ended: another
// flow's packet 58 s in runs it, so the next runs only at 63 s, after the
// exchange resumed at 62 s.
func TestSyntheticUDPSilenceBetweenSweeps(t *testing.T) {
	p := newPcap(t)
	cli := netip.MustParseAddr("192.0.2.50")
	srv := netip.MustParseAddr("198.51.100.7")
	start := p.now
	p.udp(true, cli, srv, 30001, 123, []byte("ntp"))
	p.now = start.Add(58 * time.Second)
	p.udp(true, cli, netip.MustParseAddr("198.51.100.8"), 30002, 123, []byte("ntp"))
	p.now = start.Add(62 * time.Second)
	p.udp(true, cli, srv, 30001, 123, []byte("ntp"))
	r := synthRun(t, p.close(), testPolicy, nil, Config{})
	var starts []time.Time
	for _, ev := range r.events {
		if ev.Dest == srv {
			starts = append(starts, ev.Time)
		}
	}
	if len(starts) != 2 {
		t.Fatalf("flows to %v start at %v, want 2 (62 s of silence splits them)", srv, starts)
	}
}

// IPv6 packets may carry extension headers before TCP or UDP (Destination
// Options, Routing): routers forward them, so capture must still see the
// flow, or in audit mode it is in no report at all.
func TestSyntheticIPv6ExtensionHeaders(t *testing.T) {
	exts := map[string][]byte{
		// The first byte says which header it is (the test writer puts the
		// next header there); a PadN option fills the 8 bytes.
		"destination options":                {byte(layers.IPProtocolIPv6Destination), 0, 1, 4, 0, 0, 0, 0},
		"routing (type 4, no segments left)": {byte(layers.IPProtocolIPv6Routing), 0, 4, 0, 0, 0, 0, 0},
	}
	for what, ext := range exts {
		t.Run(what, func(t *testing.T) {
			p := newPcap(t)
			p.ext6 = ext
			cli := netip.MustParseAddr("2001:db8::50")
			srv := netip.MustParseAddr("2001:db8:1::80")
			c := &tcpConn{p: p, cli: cli, srv: srv, cport: 44000, sport: 443, cseq: 1, sseq: 1}
			c.handshake()
			c.send(true, handHello(sniExt("blocked.example")), 1400, nil, nil)
			c.close()
			p.udp(true, cli, srv, 30000, 7777, []byte("datagram"))
			r := synthRun(t, p.close(), testPolicy, nil, Config{})
			got := map[string]audit.Event{}
			for _, ev := range r.events {
				got[ev.Proto] = ev
			}
			if ev, ok := got["tcp"]; !ok || ev.Name != "blocked.example" || ev.NameSource != audit.NameSNI || ev.Verdict != policy.Deny {
				t.Errorf("TCP flow: %+v (present %v), want blocked.example by SNI, denied", ev, ok)
			}
			if ev, ok := got["udp"]; !ok || ev.DestPort != 7777 || ev.Client != cli {
				t.Errorf("UDP flow: %+v (present %v), want one to port 7777", ev, ok)
			}
			if r.stats.NotIP != 0 {
				t.Errorf("%d packets counted as not TCP or UDP over IP", r.stats.NotIP)
			}
		})
	}
}

// A capture taken with a snap length cuts UDP payloads as well as TCP
// ones: a flow's bytes are still those on the wire.
func TestSyntheticSnapLengthBytes(t *testing.T) {
	p := newPcap(t)
	p.snap = 96
	cli := netip.MustParseAddr("192.0.2.50")
	srv := netip.MustParseAddr("198.51.100.7")
	p.udp(true, cli, srv, 30001, 9999, make([]byte, 1000))
	p.udp(false, srv, cli, 9999, 30001, make([]byte, 1200))
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 44000, sport: 8443, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, make([]byte, 1000), 1400, nil, nil)
	c.send(false, make([]byte, 1200), 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), testPolicy, nil, Config{})
	if r.stats.Snapped == 0 {
		t.Fatalf("no frame was cut")
	}
	for _, ev := range r.events {
		if ev.BytesOut != 1000 || ev.BytesIn != 1200 {
			t.Errorf("%s flow: %d bytes out, %d in; want 1000 and 1200, as on the wire", ev.Proto, ev.BytesOut, ev.BytesIn)
		}
	}
	if len(r.events) != 2 {
		t.Errorf("%d flows, want 2", len(r.events))
	}
}

// TestSyntheticSnapCutHead: a request head longer than what the capture
// kept of its packet (the live snap filter keeps 16 KiB) is given up and
// decided by address at once, as the snap filter's documentation says,
// not judged on the bytes kept nor left waiting to be called a
// hello-timeout while the connection stays open.
func TestSyntheticSnapCutHead(t *testing.T) {
	p := newPcap(t)
	p.snap = 300
	cli := netip.MustParseAddr("192.0.2.51")
	srv := netip.MustParseAddr("203.0.113.51")
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 44001, sport: 80, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, []byte("GET / HTTP/1.1\r\nHost: evil.test\r\n"+padHeaders(8000)+"\r\n"), 9000, nil, nil)
	p.now = p.now.Add(classifyWait + time.Second)
	c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	if len(r.events) != 1 || r.events[0].Reason != policy.ReasonAllowed || r.events[0].NameSource != audit.NameDNSLearned {
		t.Errorf("events %+v, want one flow allowed by address (a.allowed.test from DNS)", r.events)
	}
}

// A frame whose timestamp no report can hold (a corrupt pcapng block
// read as the year 294247) moves neither the capture's clock nor a flow's
// times: the connection stays one flow, and the report, whose JSON holds
// only the years 0 to 9999, can still be written.
func TestSyntheticAbsurdTimestamp(t *testing.T) {
	p := newPcap(t)
	cli := netip.MustParseAddr("192.0.2.50")
	srv := netip.MustParseAddr("203.0.113.80")
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 44000, sport: 443, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, handHello(sniExt("blocked.example")), 1400, nil, nil)
	c.send(false, []byte("server data"), 1400, nil, nil)
	c.close()
	rec := &recorder{}
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	feed(t, capt, p.close(), func(time.Time) {})
	events := rec.all()
	if len(events) != 1 {
		t.Fatalf("control: %d flows, want 1", len(events))
	}

	rec = &recorder{}
	capt, err = New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			break
		}
		if i == 4 { // the server's data
			ci.Timestamp = time.Date(294247, 1, 10, 4, 0, 54, 0, time.UTC)
		}
		capt.proc.packet(data, ci.Timestamp, r.LinkType())
	}
	capt.proc.flush("end-of-capture")
	events = rec.all()
	if len(events) != 1 {
		t.Fatalf("%d flows, want 1: %+v", len(events), events)
	}
	ev := events[0]
	if ev.Time.Year() > 9999 || ev.Duration > 3600 || ev.BytesIn != uint64(len("server data")) {
		t.Errorf("flow starts %v, lasts %v s, %d bytes in", ev.Time, ev.Duration, ev.BytesIn)
	}
	l := audit.NewLedger(nil, audit.LedgerOptions{})
	l.Emit(ev)
	if err := l.Report(audit.ReportOptions{}).WriteJSON(io.Discard); err != nil {
		t.Errorf("report: %v", err)
	}
}

// The defragmenter holds at most 64 KiB per datagram, however its
// fragments overlap: a hostile capture (or LAN client) sending 64 large
// fragments of one datagram, all at offset 0, to each of 256 datagrams
// would otherwise make it hold a gigabyte. Those after the first are
// duplicates, dropped as Linux drops them; fragments that overlap partly
// discard the datagram.
func TestDefragBoundsOverlappingFragments(t *testing.T) {
	d := newDefragger()
	now := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	k := fragKey{src: netip.MustParseAddr("192.0.2.1"), dst: netip.MustParseAddr("203.0.113.1"), id: 7, proto: 17}
	big := make([]byte, 60000)
	for i := range maxFragsPer {
		// Every other one partly over the first: the datagram is given
		// up and begun again.
		if full, _ := d.add(k, 17, (i%2)*8, true, big, now); full != nil {
			t.Fatalf("an incomplete datagram came out")
		}
		held := 0
		if dg := d.m[k]; dg != nil {
			for _, p := range dg.parts {
				held += len(p.data)
			}
		}
		if held > 65535 {
			t.Fatalf("one datagram holds %d bytes of fragments", held)
		}
	}
	if d.dropped == 0 {
		t.Errorf("the datagram of overlapping fragments was not given up")
	}
}

// An offline audit answers what the policy would do now: a rule that has
// expired since the capture was taken no longer allows its flows (the
// report lists it as expired, and policy check says it no longer
// matches), however old the capture.
func TestReadFileJudgesExpiryNow(t *testing.T) {
	p := newPcap(t)
	p.now = time.Now().AddDate(-1, 0, 0) // a capture a year old
	cli := netip.MustParseAddr("192.0.2.50")
	srv := netip.MustParseAddr("203.0.113.80")
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 44000, sport: 443, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, handHello(sniExt("a.old.test")), 1400, nil, nil)
	c.close()
	expired := time.Now().AddDate(0, 0, -2).Format("2006-01-02")
	src := "version: 1\nrules:\n  - name: old\n    to: [\"*.old.test\"]\n    ports: [443/tcp]\n    expires: " + expired + "\n"
	r := synthRun(t, p.close(), src, nil, Config{})
	if len(r.events) != 1 {
		t.Fatalf("%d flows, want 1", len(r.events))
	}
	if ev := r.events[0]; ev.Verdict != policy.Deny || ev.Reason != policy.ReasonExpired || ev.Rule != "old" {
		t.Errorf("flow of a rule expired on %s: %s %q reason %q, want denied as expired", expired, ev.Verdict, ev.Rule, ev.Reason)
	}
}

// The real QUIC capture whose ClientHello spans several Initial packets,
// rewritten with the client's packets in reverse order: the CRYPTO stream
// is reassembled by offset, so the SNI-less hello is still found whole.
func TestSyntheticQUICInitialsOutOfOrder(t *testing.T) {
	in := filepath.Join(pcapDir, "ndpi/quic_frags_ch_in_multiple_packets.pcapng")
	f, err := os.Open(in)
	if err != nil {
		t.Fatalf("real capture missing: %v", err)
	}
	defer f.Close()
	r, err := pcapgo.NewNgReader(f, pcapgo.DefaultNgReaderOptions)
	if err != nil {
		t.Fatal(err)
	}
	type pkt struct {
		ci   gopacket.CaptureInfo
		data []byte
	}
	var pkts []pkt
	for {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			break
		}
		pkts = append(pkts, pkt{ci, data})
	}
	want := runFile(t, in, testPolicy, nil)
	var wantSize int
	for _, o := range want.obs {
		if o.Kind == obsHello {
			wantSize = o.Size
		}
	}
	out := filepath.Join(t.TempDir(), "rev.pcap")
	of, _ := os.Create(out)
	w := pcapgo.NewWriter(of)
	w.WriteFileHeader(65536, r.LinkType())
	for i := len(pkts) - 1; i >= 0; i-- {
		w.WritePacket(pkts[i].ci, pkts[i].data)
	}
	of.Close()
	got := runFile(t, out, testPolicy, nil)
	var sizes []int
	for _, o := range got.obs {
		if o.Kind == obsHello {
			sizes = append(sizes, o.Size)
		}
	}
	if len(sizes) != 1 || sizes[0] != wantSize || wantSize == 0 {
		t.Errorf("reversed: hellos %v, want one of %d bytes", sizes, wantSize)
	}
}

// TestSyntheticOwnAddresses: flows to or from the gateway's own addresses
// (a client's CONNECT to the explicit proxy, the gateway's own ssh to a
// LAN host) are not egress: counted, never recorded as flows, so the
// report has no would-drop for the proxy's port. DNS to the gateway's
// forwarder and flows through the gateway are recorded as before.
func TestSyntheticOwnAddresses(t *testing.T) {
	gw := netip.MustParseAddr("192.0.2.1")
	cli := netip.MustParseAddr("192.0.2.50")
	remote := netip.MustParseAddr("198.51.100.7")
	write := func() string {
		p := newPcap(t)
		explicit := &tcpConn{p: p, cli: cli, srv: gw, cport: 40001, sport: 3128, cseq: 100, sseq: 900}
		explicit.handshake()
		explicit.send(true, []byte("CONNECT www.allowed.test:443 HTTP/1.1\r\nHost: www.allowed.test:443\r\n\r\n"), 1400, nil, nil)
		explicit.close()
		fromGW := &tcpConn{p: p, cli: gw, srv: cli, cport: 40002, sport: 22, cseq: 100, sseq: 900}
		fromGW.handshake()
		fromGW.close()
		p.udp(true, cli, gw, 40003, 53, dnsQuery(t, "www.allowed.test"))
		through := &tcpConn{p: p, cli: cli, srv: remote, cport: 40004, sport: 8080, cseq: 100, sseq: 900}
		through.handshake()
		through.close()
		return p.close()
	}
	flowsTo := func(evs []audit.Event) map[uint16]int {
		m := map[uint16]int{}
		for _, ev := range evs {
			m[ev.DestPort]++
		}
		return m
	}

	r := synthRun(t, write(), testPolicy, nil, Config{OwnAddrs: []netip.Addr{gw}})
	got := flowsTo(r.events)
	if got[3128] != 0 || got[22] != 0 {
		t.Errorf("flows to or from the gateway recorded: %v", r.events)
	}
	if got[53] != 1 || got[8080] != 1 {
		t.Errorf("flows by port %v, want one DNS flow to the gateway and one through it", got)
	}
	if r.stats.Own != 2 || r.stats.Flows != 2 {
		t.Errorf("stats: own %d, flows %d; want 2 and 2", r.stats.Own, r.stats.Flows)
	}

	// Without the gateway's addresses (an offline capture of another
	// box), the proxy connection is an egress flow like any other.
	r = synthRun(t, write(), testPolicy, nil, Config{})
	if got := flowsTo(r.events); got[3128] != 1 || r.stats.Own != 0 {
		t.Errorf("without OwnAddrs: flows by port %v, own %d; want the 3128 flow recorded", got, r.stats.Own)
	}
}

// TestSetOwnAddrs: the gateway's own addresses follow SetOwnAddrs (egressd
// run calls it when the interfaces' addresses change): an address given
// after New is the gateway's (its flows counted, not recorded), one taken
// off again is egress. SetOwnAddrs is called meanwhile from another
// goroutine, as egressd run does while capture runs (the race detector
// watches the swap).
func TestSetOwnAddrs(t *testing.T) {
	gw := netip.MustParseAddr("192.0.2.1")
	cli := netip.MustParseAddr("192.0.2.50")
	p := newPcap(t)
	for i := range 3 {
		c := &tcpConn{p: p, cli: cli, srv: gw, cport: uint16(40001 + i), sport: 8080, cseq: 100, sseq: 900}
		c.handshake()
		c.close()
	}
	path := p.close()
	run := func(set func(c *Capture)) Stats {
		rec := &recorder{}
		c, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
		if err != nil {
			t.Fatal(err)
		}
		set(c)
		st, err := c.ReadFile(context.Background(), path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if st.Own+st.Flows != 3 || len(rec.all()) != int(st.Flows) {
			t.Errorf("own %d, flows %d, events %d; want 3 flows in all, each flow's event", st.Own, st.Flows, len(rec.all()))
		}
		return st
	}
	if st := run(func(c *Capture) { c.SetOwnAddrs([]netip.Addr{netip.MustParseAddr("::ffff:192.0.2.1")}) }); st.Own != 3 {
		t.Errorf("with the gateway's address given by SetOwnAddrs: own %d, want 3", st.Own)
	}
	if st := run(func(c *Capture) {
		c.SetOwnAddrs([]netip.Addr{gw})
		c.SetOwnAddrs([]netip.Addr{netip.MustParseAddr("192.0.2.2")})
	}); st.Own != 0 {
		t.Errorf("with the address taken off again: own %d, want 0", st.Own)
	}
	done := make(chan struct{})
	run(func(c *Capture) {
		go func() {
			defer close(done)
			for i := range 200 {
				c.SetOwnAddrs([]netip.Addr{gw, netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})})
			}
		}()
	})
	<-done
}

// TestSyntheticStreamBytesBound: many flows holding partial ClientHellos
// fill at most Config.MaxStreamBytes; a flow whose bytes do not fit gives
// up its name search (decided by address, counted), and once the partial
// hellos are decided (classifyWait) their buffers are free for new flows.
func TestSyntheticStreamBytesBound(t *testing.T) {
	const limit = 32 << 10
	hello := realClientHello(t, "a.allowed.test")
	cli := netip.MustParseAddr("192.0.2.90")
	srv := netip.MustParseAddr("203.0.113.90")
	p := newPcap(t)
	conn := func(port uint16) *tcpConn {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: port, sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		return c
	}
	// 100 connections send the first 1000 bytes of their hello and wait.
	var partial []*tcpConn
	for i := range 100 {
		c := conn(uint16(47000 + i))
		c.send(true, hello[:1000], 1400, nil, nil)
		partial = append(partial, c)
	}
	whole := func(port uint16) {
		c := conn(port)
		c.send(true, hello, 1400, nil, nil)
		c.close()
	}
	whole(48000) // while the partial hellos hold the buffers
	p.now = p.now.Add(classifyWait + time.Second)
	whole(48001) // after they were decided (hello-timeout) and freed theirs
	for _, c := range partial {
		c.close()
	}
	path := p.close()

	c, err := New(Config{MaxStreamBytes: limit}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), DNS: factsMap{srv: {"a.allowed.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	c.deps.Sink = rec
	peak := 0
	feed(t, c, path, func(time.Time) { peak = max(peak, c.proc.streamBytes) })
	// A flow may pass the bound by its buffer's growth past the bytes it
	// was let in (append rounds capacities up).
	if peak > limit+2<<10 || peak < limit/2 {
		t.Errorf("name-search buffers peaked at %d bytes, bound %d", peak, limit)
	}
	if c.proc.streamBytes != 0 {
		t.Errorf("%d bytes still counted after every flow ended", c.proc.streamBytes)
	}
	st := c.Stats()
	if st.StreamLimited < 60 {
		t.Errorf("StreamLimited %d, want the partial hellos past the bound and the whole one among them", st.StreamLimited)
	}
	got := map[uint16]audit.Event{}
	for _, ev := range rec.all() {
		got[ev.ClientPort] = ev
	}
	if ev := got[48000]; ev.NameSource == audit.NameSNI {
		t.Errorf("a hello arriving while the buffers were full was read: %+v", ev)
	}
	if ev := got[48001]; ev.NameSource != audit.NameSNI || ev.Name != "a.allowed.test" || ev.Verdict != policy.Allow {
		t.Errorf("a hello after the partial ones were decided: %+v, want its SNI, allowed", ev)
	}
	if ev := got[47000]; ev.Reason != ReasonHelloTimeout {
		t.Errorf("a partial hello within the bound: %+v, want %s", ev, ReasonHelloTimeout)
	}
}

// keepAlivePolicy allows one host's /nirovision/ paths over plain HTTP.
const keepAlivePolicy = `version: 1
mode: %s
rules:
  - name: notion
    to: ["notion.test/nirovision/*"]
    ports: [80/tcp]
`

// keepAliveStream is one keep-alive connection's requests: an allowed
// first request, a second the path rule refuses, an allowed chunked POST
// whose body holds bytes that look like a request, after it a request to
// another host in absolute form, and one whose path an origin may read as
// another (path-form).
var keepAliveStream = "GET /nirovision/a HTTP/1.1\r\nHost: notion.test\r\n\r\n" +
	"GET /other?q=1 HTTP/1.1\r\nHost: notion.test\r\n\r\n" +
	"POST /nirovision/b HTTP/1.1\r\nHost: notion.test\r\nTransfer-Encoding: chunked\r\n\r\n" +
	"21\r\nGET /inside HTTP/1.1\r\nHost: x\r\n\r\n\r\n" + "0\r\nX-Trailer: 1\r\n\r\n" +
	"GET http://evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n" +
	"GET /nirovision/../admin HTTP/1.1\r\nHost: notion.test\r\n\r\n"

// TestSyntheticKeepAliveRequests: capture judges every request of a
// plain-HTTP keep-alive connection, as the transparent proxy does (its
// request follower, httpwire.ReqStream; THREATS.md C6): the connection is
// one flow, decided on its first request, and each later request is a
// request event decided on its own Host and path, so audit mode reports
// the later requests enforce mode would refuse. It holds however the
// stream is cut into segments and in whatever order they come. A request
// stream the parser refuses (Content-Length with Transfer-Encoding) is a
// refused request, after which the connection is not followed (the proxy
// splices it in audit mode).
func TestSyntheticKeepAliveRequests(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.90")
	srv := netip.MustParseAddr("203.0.113.90")
	type req struct {
		name, path, reason string
		verdict            policy.Verdict
	}
	want := []req{
		{"notion.test", "/other", policy.ReasonPath, policy.Deny},
		{"notion.test", "/nirovision/b", policy.ReasonAllowed, policy.Allow},
		{"evil.test", "/x", policy.ReasonNoRule, policy.Deny},
		{"notion.test", "/nirovision/../admin", ReasonPathForm, policy.Deny},
	}
	smuggle := "GET /nirovision/a HTTP/1.1\r\nHost: notion.test\r\n\r\n" +
		"POST /nirovision/c HTTP/1.1\r\nHost: notion.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" +
		"GET /other HTTP/1.1\r\nHost: notion.test\r\n\r\n"
	cases := []struct {
		what   string
		stream string
		mss    int
		order  []int
		want   []req
	}{
		{"whole segments", keepAliveStream, 1400, nil, want},
		{"seven bytes a segment", keepAliveStream, 7, nil, want},
		{"out of order", keepAliveStream, 40, []int{0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9}, want},
		{"a refused stream", smuggle, 1400, nil, []req{{"", "", ReasonHTTPFraming, policy.Deny}}},
	}
	p := newPcap(t)
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(47000 + i), sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, []byte(tc.stream), tc.mss, tc.order, nil)
		c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
		c.close()
	}
	r := synthRun(t, p.close(), fmt.Sprintf(keepAlivePolicy, policy.ModeAudit), factsMap{srv: {"notion.test"}}, Config{})
	flows := map[uint16]audit.Event{}
	reqs := map[uint16][]req{}
	for _, ev := range r.events {
		switch ev.Kind {
		case audit.KindFlow:
			flows[ev.ClientPort] = ev
		case audit.KindRequest:
			if ev.Source != audit.SourceCapture || ev.Dest != srv || ev.DestPort != 80 || ev.Close != "forwarded" || ev.Enforced {
				t.Errorf("request event %+v", ev)
			}
			reqs[ev.ClientPort] = append(reqs[ev.ClientPort], req{ev.Name, ev.Path, ev.Reason, ev.Verdict})
		}
	}
	total, dropped := 0, 0
	for i, tc := range cases {
		port := uint16(47000 + i)
		if f := flows[port]; f.Verdict != policy.Allow || f.Path != "/nirovision/a" || f.Name != "notion.test" {
			t.Errorf("%s: flow %+v, want allowed /nirovision/a", tc.what, f)
		}
		if got := reqs[port]; fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: requests\n got %v\nwant %v", tc.what, got, tc.want)
		}
		total += len(tc.want)
		for _, w := range tc.want {
			if w.verdict == policy.Deny {
				dropped++
			}
		}
	}
	if r.stats.Requests != uint64(total) || r.stats.Flows != uint64(len(cases)) || r.stats.Unfollowed != 0 {
		t.Errorf("stats: %d requests, %d flows, %d unfollowed; want %d, %d, 0", r.stats.Requests, r.stats.Flows, r.stats.Unfollowed, total, len(cases))
	}
	// The ledger counts the refused later requests as dropped requests
	// of the connection's destination, beside the allowed flow.
	l := audit.NewLedger(nil, audit.LedgerOptions{})
	for _, ev := range r.events {
		l.Emit(ev)
	}
	if tot := l.Report(audit.ReportOptions{}).Totals; tot.Requests != uint64(total) || tot.DroppedRequests != uint64(dropped) || tot.Flows != uint64(len(cases)) {
		t.Errorf("ledger totals %+v", tot)
	}
}

// TestSyntheticKeepAliveBounds: following a keep-alive connection holds no
// bytes for its bodies. A 200 KB upload whose frames the capture cut short
// (a snap length, as the live socket's filter cuts them) is skipped, not
// held, and the request after it is still found; a later head that does
// not complete within classifyWait is refused (hello-timeout), as the
// proxy refuses it at its HelloTimeout. Live in enforce mode capture does
// not follow at all: the proxy sees those connections and records their
// requests itself.
func TestSyntheticKeepAliveBounds(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.91")
	srv := netip.MustParseAddr("203.0.113.91")
	p := newPcap(t)
	p.snap = 300
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 47100, sport: 80, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, []byte("GET /nirovision/a HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(true, []byte("POST /nirovision/up HTTP/1.1\r\nHost: notion.test\r\nContent-Length: 200000\r\n\r\n"), 1400, nil, nil)
	c.send(true, bytes.Repeat([]byte("GET /inside HTTP/1.1\r\n\r\n"), 200000/24+1)[:200000], 1400, nil, nil)
	c.send(true, []byte("GET /other HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(true, []byte("GET /slow HTTP/1.1\r\nHost: no"), 1400, nil, nil)
	p.now = p.now.Add(classifyWait + time.Second)
	c.send(true, []byte("tion.test\r\n\r\n"), 1400, nil, nil)
	c.close()
	path := p.close()

	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		rec := &recorder{}
		cp, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, fmt.Sprintf(keepAlivePolicy, mode))), Sink: rec, DNS: factsMap{srv: {"notion.test"}}})
		if err != nil {
			t.Fatal(err)
		}
		peak := 0
		feed(t, cp, path, func(time.Time) { peak = max(peak, cp.proc.streamBytes) })
		var got []string
		for _, ev := range rec.all() {
			if ev.Kind == audit.KindRequest {
				got = append(got, ev.Path+" "+ev.Reason)
			}
		}
		want := "[/nirovision/up allowed /other path-not-allowed  hello-timeout]"
		if mode == policy.ModeEnforce {
			want = "[]"
		}
		if fmt.Sprint(got) != want {
			t.Errorf("%s: requests %q, want %s", mode, got, want)
		}
		if peak > 4<<10 {
			t.Errorf("%s: buffers peaked at %d bytes over a 200 KB body", mode, peak)
		}
		if st := cp.Stats(); st.Unfollowed != 0 {
			t.Errorf("%s: %d flows unfollowed", mode, st.Unfollowed)
		}
	}
}
