package dnsfilter

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Forms of query a hostile LAN client sends the forwarder, over UDP and
// TCP, beyond the shapes TestMalformedQueries and TestHardening send:
// what reaches the upstream, what comes back, and how long a connection
// is held.

// packQuery packs a query for name and qtype with the given header bits
// (opcode, flags) applied after SetQuestion.
func packQuery(t *testing.T, name string, qtype uint16, edit func(m *dns.Msg)) []byte {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	if edit != nil {
		edit(m)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatalf("pack %s: %v", name, err)
	}
	return b
}

// rcodeOf unpacks an answer's rcode; -1 for no answer.
func rcodeOf(t *testing.T, out []byte) int {
	t.Helper()
	if out == nil {
		return -1
	}
	m := new(dns.Msg)
	if err := m.Unpack(out); err != nil {
		if len(out) < 12 {
			t.Fatalf("unparsable answer %x", out)
		}
		return int(out[3] & 0xF)
	}
	return m.Rcode
}

// TestOpcodesNotForwarded: every opcode other than QUERY (IQUERY, STATUS,
// the unassigned 3, NOTIFY, UPDATE, DSO and the unassigned 7-15), for an
// allowed name, over UDP and TCP: NOTIMP with the client's opcode, and the
// upstream is never asked.
func TestOpcodesNotForwarded(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for op := 1; op <= 15; op++ {
		pkt := packQuery(t, "www.allowed.test.", dns.TypeA, func(m *dns.Msg) { m.Opcode = op; m.SetEdns0(1232, false) })
		for _, proto := range []string{"udp", "tcp"} {
			out := exchangeRaw(t, proto, ts.Addr, pkt, 2*time.Second)
			if got := rcodeOf(t, out); got != dns.RcodeNotImplemented {
				t.Errorf("opcode %d over %s: rcode %d, want NOTIMP", op, proto, got)
				continue
			}
			if got := int(out[2]>>3) & 0xF; got != op {
				t.Errorf("opcode %d over %s: answered with opcode %d", op, proto, got)
			}
		}
	}
	if seen := up.Seen(); len(seen) != 0 {
		t.Errorf("upstream asked %v", seen)
	}
	if r := ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, true); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("a query after them: %v", r)
	}
}

// TestResponseAsQueryNotAnswered: a response sent to the forwarder (QR
// set), over UDP and TCP, for an allowed name: no answer (an answer to an
// answer is how two servers loop, or a forged source is bounced at), the
// upstream not asked, and the TCP connection still serves the query
// after it.
func TestResponseAsQueryNotAnswered(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	resp := packQuery(t, "www.allowed.test.", dns.TypeA, func(m *dns.Msg) { m.Response = true })
	if out := exchangeRaw(t, "udp", ts.Addr, resp, 700*time.Millisecond); out != nil {
		t.Errorf("udp: a response was answered: %x", out)
	}
	c, err := net.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dc := &dns.Conn{Conn: c}
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	q := packQuery(t, "api.allowed.test.", dns.TypeA, nil)
	var buf []byte
	for _, p := range [][]byte{resp, q} {
		buf = binary.BigEndian.AppendUint16(buf, uint16(len(p)))
		buf = append(buf, p...)
	}
	if _, err := c.Write(buf); err != nil {
		t.Fatal(err)
	}
	r, err := dc.ReadMsg()
	if err != nil || r.Response && len(r.Question) == 1 && r.Question[0].Name != "api.allowed.test." {
		t.Fatalf("tcp: first message back %v, %v; want the answer to the query after the response", r, err)
	}
	if len(r.Question) != 1 || r.Question[0].Name != "api.allowed.test." || r.Rcode != dns.RcodeSuccess {
		t.Errorf("tcp: %v", r)
	}
	for _, s := range up.Seen() {
		if s.Name == "www.allowed.test" {
			t.Errorf("upstream asked the response's question: %v", s)
		}
	}
}

// TestEchoLoop: a LAN host's echo service (UDP 7) answers the forwarder's
// answer by sending it back, as a query forged from that port would have
// it. The forwarder sends one answer, not an endless exchange.
func TestEchoLoop(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	echo, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	to, err := net.ResolveUDPAddr("udp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"www.allowed.test.", "www.denied.test.", "b\\000d.allowed.test."} {
		if _, err := echo.WriteTo(packQuery(t, name, dns.TypeA, func(m *dns.Msg) { m.SetEdns0(1232, false) }), to); err != nil {
			t.Fatal(err)
		}
		got := 0
		buf := make([]byte, 65536)
		for {
			_ = echo.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
			n, _, err := echo.ReadFrom(buf)
			if err != nil {
				break
			}
			got++
			if got > 5 {
				break
			}
			if _, err := echo.WriteTo(buf[:n], to); err != nil { // the echo
				t.Fatal(err)
			}
		}
		if got != 1 {
			t.Errorf("%s: the echo host got %d datagrams, want the one answer", name, got)
		}
	}
}

// TestQClassesRefused: classes other than IN (NONE, ANY, HESIOD, and an
// unassigned one; CHAOS is TestHardening's) for an allowed name, over UDP
// and TCP: REFUSED, never forwarded.
func TestQClassesRefused(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, class := range []uint16{dns.ClassNONE, dns.ClassANY, dns.ClassHESIOD, 42} {
		pkt := packQuery(t, "www.allowed.test.", dns.TypeA, func(m *dns.Msg) { m.Question[0].Qclass = class })
		for _, proto := range []string{"udp", "tcp"} {
			if got := rcodeOf(t, exchangeRaw(t, proto, ts.Addr, pkt, 2*time.Second)); got != dns.RcodeRefused {
				t.Errorf("class %d over %s: rcode %d, want REFUSED", class, proto, got)
			}
		}
	}
	if seen := up.Seen(); len(seen) != 0 {
		t.Errorf("upstream asked %v", seen)
	}
}

// TestMetaTypesNotForwarded: a question of a type that is no data type
// (RFC 6895 §3.1: OPT, TSIG, TKEY, MAILA, MAILB, the 128-248 meta range)
// or the reserved type 0, for an allowed name, over UDP and TCP: answered
// here (FORMERR, as unbound does), never sent upstream, where the
// forwarder's own question would carry the client's meta type. Before,
// each was asked upstream and the answer cached.
func TestMetaTypesNotForwarded(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, qt := range []uint16{0, dns.TypeOPT, dns.TypeTSIG, dns.TypeTKEY, dns.TypeMAILA, dns.TypeMAILB, 128, 200, 248} {
		for _, proto := range []string{"udp", "tcp"} {
			pkt := packQuery(t, "www.allowed.test.", qt, func(m *dns.Msg) { m.SetEdns0(1232, false) })
			if got := rcodeOf(t, exchangeRaw(t, proto, ts.Addr, pkt, 2*time.Second)); got != dns.RcodeFormatError {
				t.Errorf("type %d over %s: rcode %d, want FORMERR", qt, proto, got)
			}
		}
	}
	if seen := up.Seen(); len(seen) != 0 {
		t.Errorf("upstream asked %v", seen)
	}
	ev, _ := ts.Sink.find("www.allowed.test")
	if ev.Reason != ReasonQType || !ev.Enforced {
		t.Errorf("event %+v, want reason %s, enforced", ev, ReasonQType)
	}
	// Data types past the meta range are forwarded as any other.
	if r := ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeCAA, true); r.Rcode == dns.RcodeFormatError {
		t.Errorf("CAA (257): %v", r)
	}
}

// optRecorder is an upstream that keeps the EDNS options and header bits
// of every query it receives, and answers with an A record, an ECS option
// of its own, an NSID and a server cookie.
type optRecorder struct {
	addr string
	mu   sync.Mutex
	opts [][]dns.EDNS0
	msgs []*dns.Msg
}

func newOptRecorder(t *testing.T) *optRecorder {
	o := &optRecorder{}
	o.addr = listenDNS(t, dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		o.mu.Lock()
		o.msgs = append(o.msgs, r.Copy())
		if opt := r.IsEdns0(); opt != nil {
			o.opts = append(o.opts, opt.Option)
		} else {
			o.opts = append(o.opts, nil)
		}
		o.mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(r)
		if len(r.Question) == 1 && r.Question[0].Qtype == dns.TypeA {
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.IPv4(192, 0, 2, 90)}}
		}
		m.SetEdns0(1232, false)
		m.IsEdns0().Option = append(m.IsEdns0().Option,
			&dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, SourceScope: 24, Address: net.IPv4(198, 18, 7, 0)},
			&dns.EDNS0_NSID{Code: dns.EDNS0NSID, Nsid: "6e732d7570"},
			&dns.EDNS0_COOKIE{Code: dns.EDNS0COOKIE, Cookie: "0102030405060708a1a2a3a4a5a6a7a8"})
		_ = w.WriteMsg(m)
	}))
	return o
}

// TestClientEDNSOptionsNotForwarded: a LAN client's EDNS options — Client
// Subnet naming its own and a forged subnet, a DNS cookie, NSID, padding,
// TCP keepalive, an option code nobody assigned — and the Z and AD bits
// do not reach the upstream: the forwarder asks its own question (its UDP
// size, the client's DO and CD), so the upstream learns nothing of the
// LAN's addressing from ECS and cannot track a client by its cookie. The
// upstream's own ECS, NSID and cookie do not reach the client either: it
// gets the forwarder's OPT.
func TestClientEDNSOptionsNotForwarded(t *testing.T) {
	up := newOptRecorder(t)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.addr}, CacheSize: -1}, Deps{})
	for i, proto := range []string{"udp", "tcp"} {
		name := []string{"ecs1.allowed.test.", "ecs2.allowed.test."}[i]
		m := new(dns.Msg)
		m.SetQuestion(name, dns.TypeA)
		m.SetEdns0(4096, true)
		m.AuthenticatedData = true
		m.Zero = true
		m.IsEdns0().SetZ(0x7fff)
		m.IsEdns0().Option = []dns.EDNS0{
			&dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 32, Address: net.IPv4(198, 18, 0, 25).To4()},
			&dns.EDNS0_COOKIE{Code: dns.EDNS0COOKIE, Cookie: "2464c4abcf10c957"},
			&dns.EDNS0_NSID{Code: dns.EDNS0NSID},
			&dns.EDNS0_PADDING{Padding: make([]byte, 64)},
			&dns.EDNS0_TCP_KEEPALIVE{Code: dns.EDNS0TCPKEEPALIVE},
			&dns.EDNS0_LOCAL{Code: 65001, Data: []byte("lan-secret")},
		}
		c := &dns.Client{Net: proto, Timeout: 3 * time.Second}
		r, _, err := c.Exchange(m, ts.Addr)
		if err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("%s: %v %v", proto, r, err)
		}
		if opt := r.IsEdns0(); opt == nil || len(opt.Option) != 0 {
			t.Errorf("%s: client got OPT %v, want the forwarder's, without options", proto, opt)
		}
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	if len(up.msgs) != 2 {
		t.Fatalf("upstream got %d queries, want 2", len(up.msgs))
	}
	for i, q := range up.msgs {
		opt := q.IsEdns0()
		if opt == nil {
			t.Errorf("query %d upstream without EDNS", i)
			continue
		}
		if len(up.opts[i]) != 0 {
			t.Errorf("query %d upstream carried the client's options %v", i, up.opts[i])
		}
		if opt.UDPSize() != 1232 || !opt.Do() || opt.Z() != 0 || q.Zero || q.AuthenticatedData {
			t.Errorf("query %d upstream: size %d do %v z %#x zero %v ad %v; want 1232, the client's DO, no Z or AD", i, opt.UDPSize(), opt.Do(), opt.Z(), q.Zero, q.AuthenticatedData)
		}
	}
}

// TestHugeEDNSSizeTruncated: a client that announces the largest EDNS
// size (65,535) and asks for a 5 KB answer over UDP gets at most the
// forwarder's own size (1232 bytes) with TC set, from upstream and from
// the cache: the answer it can draw to a forged source is bounded so.
func TestHugeEDNSSizeTruncated(t *testing.T) {
	up := newFakeUpstream(t, labZone+bigTXT(80))
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for i := range 3 { // a miss, then hits
		pkt := packQuery(t, "big.allowed.test.", dns.TypeTXT, func(m *dns.Msg) { m.SetEdns0(65535, true) })
		out := exchangeRaw(t, "udp", ts.Addr, pkt, 3*time.Second)
		if out == nil {
			t.Fatalf("#%d: no answer", i)
		}
		m := new(dns.Msg)
		if err := m.Unpack(out); err != nil {
			t.Fatalf("#%d: %v", i, err)
		}
		if len(out) > 1232 || !m.Truncated {
			t.Errorf("#%d: %d bytes, truncated %v; want at most 1232 and TC", i, len(out), m.Truncated)
		}
	}
	r := ask(t, "tcp", ts.Addr, "big.allowed.test.", dns.TypeTXT, true)
	if r.Truncated || len(r.Answer) != 80 {
		t.Errorf("tcp: truncated %v, %d records; want 80", r.Truncated, len(r.Answer))
	}
}

// TestTCPHalfClose: a client that shuts its sending side down right after
// its query (FIN) still gets the answer, for a cached name and for one the
// upstream takes its time over; so do two queries pipelined before the FIN.
func TestTCPHalfClose(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, true) // cached
	up.delay.Store(int64(300 * time.Millisecond))
	for _, names := range [][]string{{"www.allowed.test."}, {"api.allowed.test."}, {"www.allowed.test.", "cdn.allowed.test."}} {
		c, err := net.Dial("tcp", ts.Addr)
		if err != nil {
			t.Fatal(err)
		}
		var buf []byte
		for _, n := range names {
			p := packQuery(t, n, dns.TypeA, nil)
			buf = binary.BigEndian.AppendUint16(buf, uint16(len(p)))
			buf = append(buf, p...)
		}
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		dc := &dns.Conn{Conn: c}
		for _, n := range names {
			r, err := dc.ReadMsg()
			if err != nil || len(r.Question) != 1 || r.Question[0].Name != n || r.Rcode != dns.RcodeSuccess {
				t.Errorf("%v: answer to %s after FIN: %v %v", names, n, r, err)
			}
		}
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("%v: after the answers: %v, want the server's FIN", names, err)
		}
		c.Close()
	}
	waitTCPSlotsFree(t, ts)
}

// TestTCPSlowMessageCut: a client that announces a message and sends it a
// byte at a time (slowloris on TCP 53), as its first message or after a
// query, is cut when the read timeout (2s) or TCPIdleTimeout runs out,
// counted from the message's start, not from its last byte.
func TestTCPSlowMessageCut(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	const idle = 1500 * time.Millisecond
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, TCPIdleTimeout: idle}, Deps{})
	for _, first := range []bool{true, false} {
		c, err := net.Dial("tcp", ts.Addr)
		if err != nil {
			t.Fatal(err)
		}
		if !first {
			dc := &dns.Conn{Conn: c}
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			_ = dc.WriteMsg(new(dns.Msg).SetQuestion("www.allowed.test.", dns.TypeA))
			if _, err := dc.ReadMsg(); err != nil {
				t.Fatal(err)
			}
		}
		_ = c.SetDeadline(time.Time{})
		p := packQuery(t, "api.allowed.test.", dns.TypeA, nil)
		msg := append(binary.BigEndian.AppendUint16(nil, uint16(len(p))), p...)
		start := time.Now()
		cut := time.Duration(0)
		for i := range msg[:len(msg)-1] { // never the last byte
			if _, err := c.Write(msg[i : i+1]); err != nil {
				cut = time.Since(start)
				break
			}
			_ = c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); err != nil {
				if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
					cut = time.Since(start)
					break
				}
			}
		}
		c.Close()
		// 2 bytes a quarter second: ~8 s for the message.
		if cut == 0 || cut > 6*time.Second {
			t.Errorf("first=%v: a message sent a byte each 250ms still open after %v (cut %v)", first, time.Since(start).Round(time.Millisecond), cut)
		}
	}
}

// TestTCPManyQueriesOneConnection: a client asks query after query on one
// connection: TCPMaxQueries (128) are answered, then the forwarder closes
// it (FIN, no answer to the 129th); the client's next connection is
// served. A client that pipelines 1,000 in one go gets no more than 128
// answers either (RFC 7766 §6.2.1: it must be ready to retry the rest);
// the forwarder closes with its queries unread, so the kernel resets the
// connection and the client may lose some of the 128 too.
func TestTCPManyQueriesOneConnection(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	c, err := net.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dc := &dns.Conn{Conn: c}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	answered := 0
	for i := range defaultTCPMaxQueries + 10 {
		m := new(dns.Msg).SetQuestion("www.allowed.test.", dns.TypeA)
		m.Id = uint16(i)
		if err := dc.WriteMsg(m); err != nil {
			break
		}
		r, err := dc.ReadMsg()
		if err != nil {
			break
		}
		if r.Id != m.Id || r.Rcode != dns.RcodeSuccess {
			t.Fatalf("query %d: %v", i, r)
		}
		answered++
	}
	if answered != defaultTCPMaxQueries {
		t.Errorf("%d queries answered on one connection, want %d", answered, defaultTCPMaxQueries)
	}
	p, err := net.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var buf []byte
	for i := range 1000 {
		q := packQuery(t, "www.allowed.test.", dns.TypeA, func(m *dns.Msg) { m.Id = uint16(i) })
		buf = binary.BigEndian.AppendUint16(buf, uint16(len(q)))
		buf = append(buf, q...)
	}
	go func() { _, _ = p.Write(buf) }()
	_ = p.SetReadDeadline(time.Now().Add(10 * time.Second))
	pd := &dns.Conn{Conn: p}
	got := 0
	for {
		r, err := pd.ReadMsg()
		if err != nil {
			break
		}
		if r.Id != uint16(got) {
			t.Fatalf("pipelined: answer %d has id %d", got, r.Id)
		}
		got++
	}
	if got != defaultTCPMaxQueries {
		t.Errorf("pipelined: %d answers, want %d", got, defaultTCPMaxQueries)
	}
	if r := ask(t, "tcp", ts.Addr, "api.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess {
		t.Errorf("next connection: %v", r)
	}
	// p is still open: its slot comes back once the forwarder has read
	// the client's leftover bytes for tcpLingerTime.
	waitTCPSlotsFree(t, ts)
}

// waitTCPSlotsFree waits until every client TCP connection's slot is
// back: no path of a connection's end keeps one.
func waitTCPSlotsFree(t *testing.T, ts *testServer) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		total, _, _ := ts.tcpLim.slots.Counts()
		if total == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d TCP connection slots still held", total)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTCPLargestQueryAndEmptyFrames: over TCP, a query padded to the
// largest message (65,535 bytes) is answered; frames of length 0 are
// skipped, unanswered, and the query after them is answered.
func TestTCPLargestQueryAndEmptyFrames(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	m := new(dns.Msg)
	m.SetQuestion("www.allowed.test.", dns.TypeA)
	m.SetEdns0(1232, false)
	base := m.Len()
	m.IsEdns0().Option = []dns.EDNS0{&dns.EDNS0_PADDING{Padding: make([]byte, 65535-base-4)}}
	big, err := m.Pack()
	if err != nil || len(big) != 65535 {
		t.Fatalf("pack: %d bytes, %v", len(big), err)
	}
	if got := rcodeOf(t, exchangeRaw(t, "tcp", ts.Addr, big, 3*time.Second)); got != dns.RcodeSuccess {
		t.Errorf("65,535-byte query: rcode %d", got)
	}
	c, err := net.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p := packQuery(t, "api.allowed.test.", dns.TypeA, nil)
	buf := make([]byte, 2*20) // twenty empty frames
	buf = binary.BigEndian.AppendUint16(buf, uint16(len(p)))
	buf = append(buf, p...)
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(buf); err != nil {
		t.Fatal(err)
	}
	r, err := (&dns.Conn{Conn: c}).ReadMsg()
	if err != nil || r.Rcode != dns.RcodeSuccess || !strings.HasPrefix(r.Question[0].Name, "api.") {
		t.Errorf("query after empty frames: %v %v", r, err)
	}
}

// TestMalformedUDPRateLimited: queries the forwarder answers with an
// error for their shape (no question, two questions, an opcode other
// than QUERY, EDNS version 1) draw on the client's rate as every other
// UDP query does: past the burst they are dropped. Before, they were
// answered before the rate limit, each one, so a LAN host could bounce
// any number of them off the gateway at a forged source of the LAN.
func TestMalformedUDPRateLimited(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	const burst = 5
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, ClientRate: 0.01, ClientBurst: burst}, Deps{})
	hdr := func(flags, qd, ar uint16) []byte {
		b := binary.BigEndian.AppendUint16(nil, 0x4242)
		for _, v := range []uint16{flags, qd, 0, 0, ar} {
			b = binary.BigEndian.AppendUint16(b, v)
		}
		return b
	}
	q := packQuery(t, "www.allowed.test.", dns.TypeA, nil)[12:]
	for i, c := range []struct {
		name string
		pkt  []byte
	}{
		{"no question", hdr(0x0100, 0, 0)},
		{"two questions", append(append(hdr(0x0100, 2, 0), q...), q...)},
		{"opcode update", append(hdr(0x2800, 1, 0), q...)},
		{"EDNS version 1", append(append(hdr(0x0100, 1, 1), q...), 0, 0, 41, 4, 0xd0, 0, 1, 0, 0, 0, 0)},
	} {
		t.Run(strings.ReplaceAll(c.name, " ", "-"), func(t *testing.T) {
			// A client of its own (127.0.0.x) for each form.
			src := &net.UDPAddr{IP: net.IPv4(127, 0, 0, byte(10+i))}
			conn, err := net.ListenUDP("udp", src)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			to, _ := net.ResolveUDPAddr("udp", ts.Addr)
			const sent = 40
			for range sent {
				if _, err := conn.WriteTo(c.pkt, to); err != nil {
					t.Fatal(err)
				}
			}
			got := 0
			buf := make([]byte, 1500)
			for {
				_ = conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
				if _, _, err := conn.ReadFrom(buf); err != nil {
					break
				}
				got++
			}
			if got > burst {
				t.Errorf("%d of %d answered, with a burst of %d", got, sent, burst)
			}
			if got == 0 {
				t.Errorf("none answered: the first are within the burst")
			}
		})
	}
}

// TestMalformedUDPRateLimitOnRecord: a UDP query that cannot be unpacked
// (no question, two questions, an opcode other than QUERY) spends the
// client's rate like any other, so its drop past the rate is the first of
// the client's dropped queries as well: the rate-limited line and event of
// that episode, one and no more, are written for it. Before, its drop
// took the limiter's "first" and wrote nothing, so a client past its rate
// that led with one such datagram had none of its dropped queries on
// record, and a flood of them alone left no trace in the ledger.
func TestMalformedUDPRateLimitOnRecord(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	const burst = 3
	// One reader: the datagrams are decided in the order sent.
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, ClientRate: 0.01, ClientBurst: burst, UDPReaders: 1}, Deps{})
	to, _ := net.ResolveUDPAddr("udp", ts.Addr)
	noQuestion := []byte{0x42, 0x42, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0}
	good := packQuery(t, "www.allowed.test.", dns.TypeA, nil)
	limited := func(client netip.Addr) int {
		n := 0
		for _, ev := range ts.Sink.Events() {
			if ev.Client == client && ev.Reason == ReasonRateLimited {
				n++
			}
		}
		return n
	}
	for i, c := range []struct {
		name string
		pkts [][]byte // sent after the burst's answered queries
	}{
		{"malformed-first", append([][]byte{noQuestion}, slices.Repeat([][]byte{good}, 20)...)},
		{"malformed-only", slices.Repeat([][]byte{noQuestion}, 40)},
	} {
		t.Run(c.name, func(t *testing.T) {
			src := &net.UDPAddr{IP: net.IPv4(127, 0, 0, byte(40+i))}
			client := netip.AddrFrom4([4]byte{127, 0, 0, byte(40 + i)})
			conn, err := net.ListenUDP("udp", src)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			buf := make([]byte, 1500)
			for range burst {
				if _, err := conn.WriteTo(good, to); err != nil {
					t.Fatal(err)
				}
				_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, _, err := conn.ReadFrom(buf); err != nil {
					t.Fatalf("a query within the burst: %v", err)
				}
			}
			for j, p := range c.pkts {
				if _, err := conn.WriteTo(p, to); err != nil {
					t.Fatal(err)
				}
				if j == 0 {
					// The first is decided before the rest are sent
					// (a malformed query takes the general path, a
					// worker of its own, not the reader's fast path).
					waitFor(t, func() bool { return counterValue(ts.m.rateLimited) >= 1 })
				}
			}
			// The forwarder answers nothing past the burst; one query of
			// another client after them is answered once they are read
			// (the readers take datagrams in order).
			ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
			time.Sleep(200 * time.Millisecond)
			if n := limited(client); n != 1 {
				t.Errorf("%d rate-limited events for %d dropped datagrams, want 1 (the episode on record, once)", n, len(c.pkts))
			}
		})
	}
}

// waitFor polls cond until it holds, for at most 10 seconds.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10 s")
		}
	}
}

// TestMetaTypeRange pins metaType against the IANA registry's ranges
// (RFC 6895 §3.1): 1-127 and 256-61439 are data types and are asked
// upstream (OPT, 41, aside: a pseudo-record), 128-255 are question and
// meta types only (TKEY 249, TSIG 250, IXFR, AXFR, MAILB, MAILA, ANY; no
// data type can be assigned there), 0 is reserved; the reserved
// 61440-65279 and private-use 65280-65535 are left to the upstream.
func TestMetaTypeRange(t *testing.T) {
	for v := range 1 << 16 {
		qt := uint16(v)
		want := qt == 0 || qt == dns.TypeOPT || qt >= 128 && qt <= 255
		if got := metaType(qt); got != want {
			t.Errorf("metaType(%d) = %v, want %v", qt, got, want)
		}
	}
}
