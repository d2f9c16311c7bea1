package capture

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// Insertion and evasion (Ptacek & Newsham): a client shows capture bytes
// the server never reads, or reads otherwise (e2e TestCaptureEvasion).

const (
	decoyName = "a.allowed.test" // allowed by testPolicy
	realName  = "a.denied0.test" // no rule
)

// TestStreamConflict: stream.add marks bytes that came twice, different,
// wherever the copies meet (in order, held out of order, pulled in), and
// only there: retransmissions of the same bytes, and bytes that never
// overlap, are no conflict.
func TestStreamConflict(t *testing.T) {
	a := []byte("0123456789abcdefghij")
	b := bytes.Clone(a)
	b[12] = 'X' // differs at offset 12 only
	type put struct {
		off  uint32
		data []byte
	}
	for _, c := range []struct {
		what     string
		puts     []put
		conflict bool
	}{
		{"in order", []put{{0, a[:10]}, {10, a[10:]}}, false},
		{"retransmission, same", []put{{0, a}, {0, a}, {5, a[5:15]}}, false},
		{"retransmission, different", []put{{0, a}, {10, b[10:15]}}, true},
		{"retransmission, different elsewhere", []put{{0, a}, {0, b[:12]}}, false},
		{"extends, different in the overlap", []put{{0, a[:15]}, {10, b[10:]}}, true},
		{"out of order, same", []put{{10, a[10:]}, {10, a[10:]}, {0, a[:10]}}, false},
		{"out of order, different pieces", []put{{10, a[10:15]}, {10, b[10:]}}, true},
		{"out of order, then in order over it, different", []put{{11, a[11:14]}, {0, b}}, true},
		{"out of order, then in order over it, same", []put{{11, a[11:14]}, {0, a}}, false},
		{"out of order, pulled in over another, different", []put{{10, a[10:20]}, {12, b[12:16]}, {0, a[:10]}}, true},
		{"Linux replaces, capture kept the first", []put{{5, a[5:14]}, {5, b[5:]}, {0, a[:5]}}, true},
	} {
		var s stream
		for _, p := range c.puts {
			s.add(p.off, p.data)
		}
		if s.conflict != c.conflict {
			t.Errorf("%s: conflict %v, want %v", c.what, s.conflict, c.conflict)
		}
		if !c.conflict && !bytes.Equal(s.buf, a) && len(s.pending) == 0 {
			t.Errorf("%s: buf %q, want %q", c.what, s.buf, a)
		}
	}
}

// eventsByPort returns the last of evs of each client port.
func eventsByPort(evs []audit.Event) map[uint16]audit.Event {
	got := map[uint16]audit.Event{}
	for _, ev := range evs {
		got[ev.ClientPort] = ev
	}
	return got
}

// evasionEvents runs conns, each writing one connection to port 443 of a
// pcap, and returns the event of each, by client port.
func evasionEvents(t *testing.T, conns ...func(c *tcpConn)) map[uint16]audit.Event {
	t.Helper()
	got := map[uint16]audit.Event{}
	for _, ev := range evasionRun(t, 443, conns...) {
		got[ev.ClientPort] = ev
	}
	return got
}

// evasionRun runs conns, each writing one connection to port sport of a
// pcap (client port 47000 + its index), and returns the run's events.
func evasionRun(t *testing.T, sport uint16, conns ...func(c *tcpConn)) []audit.Event {
	t.Helper()
	p := newPcap(t)
	cli, srv := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.10")
	for i, f := range conns {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(47000 + i), sport: sport, cseq: 1000, sseq: 5000}
		c.handshake()
		f(c)
	}
	return synthRun(t, p.close(), testPolicy, factsMap{srv: {decoyName}}, Config{}).events
}

// TestDecidedHelloWatched: a TCP flow capture allowed on its ClientHello
// (or first request head) is denied as stream-conflict when the client sends those bytes again,
// different, before the server acknowledged them (the first copy was a
// decoy the server's kernel dropped: a bad TCP checksum), or after: a
// LAN client can forge the acknowledgement (e2e
// TestCaptureEvasion/forged-ack; before session 29 (R16) a different
// copy after it was allowed). A copy of the same bytes changes nothing;
// nor does the next data.
func TestDecidedHelloWatched(t *testing.T) {
	decoy := realClientHello(t, decoyName)
	real := realClientHello(t, realName)
	cases := []struct {
		what   string
		run    func(c *tcpConn)
		reason string
	}{
		{"a different copy before the ack", func(c *tcpConn) {
			c.seg(true, "A", c.cseq, decoy)
			c.seg(true, "A", c.cseq, real)
		}, ReasonStreamConflict},
		{"the same copy before the ack", func(c *tcpConn) {
			c.seg(true, "A", c.cseq, decoy)
			c.seg(true, "A", c.cseq, decoy)
			c.cseq += uint32(len(decoy))
			c.seg(true, "A", c.cseq, []byte("more"))
		}, policy.ReasonAllowed},
		{"a first request head, then a different copy", func(c *tcpConn) {
			c.seg(true, "A", c.cseq, []byte("GET / HTTP/1.1\r\nHost: "+decoyName+"\r\n\r\n"))
			c.seg(true, "A", c.cseq, []byte("GET / HTTP/1.1\r\nHost: "+realName+"\r\n\r\n"))
		}, ReasonStreamConflict},
		{"a different copy after the ack", func(c *tcpConn) {
			c.seg(true, "A", c.cseq, decoy)
			c.cseq += uint32(len(decoy))
			c.seg(false, "A", c.sseq, nil)
			c.seg(true, "A", c.cseq-uint32(len(decoy)), real)
		}, ReasonStreamConflict},
	}
	var runs []func(c *tcpConn)
	for _, c := range cases {
		runs = append(runs, c.run)
	}
	got := evasionEvents(t, runs...)
	for i, c := range cases {
		if ev := got[uint16(47000+i)]; ev.Reason != c.reason {
			t.Errorf("%s: %+v, want %s", c.what, ev, c.reason)
		}
	}
}

// TestFollowedHeadWatched: a later request head of a followed plain-HTTP
// connection that capture allowed is kept until the server acknowledges
// it, as the first one is (TestDecidedHelloWatched): a copy of it that
// differs (the first was a decoy with a wrong TCP checksum, which the
// server's kernel dropped) is a request denied as stream-conflict, and
// the connection is no longer followed. A copy of the same bytes, one
// after the server's acknowledgement, or a copy of body bytes is none;
// heads with a body between them are each kept. Before, the follower had
// consumed the decoy and skipped the copy as a retransmission: the
// request the server read was in no event.
func TestFollowedHeadWatched(t *testing.T) {
	first := []byte("GET / HTTP/1.1\r\nHost: " + decoyName + "\r\n\r\n")
	post := []byte("POST /up HTTP/1.1\r\nHost: " + decoyName + "\r\nContent-Length: 5\r\n\r\nhello")
	decoy := []byte("GET /next HTTP/1.1\r\nHost: " + decoyName + "\r\n\r\n")
	real := []byte("GET /next HTTP/1.1\r\nHost: " + realName + "\r\n\r\n")
	// later sends the first head (the server acknowledging it, or not),
	// then b, and returns b's sequence number.
	later := func(c *tcpConn, ack bool, head, b []byte) uint32 {
		c.seg(true, "A", c.cseq, head)
		c.cseq += uint32(len(head))
		if ack {
			c.seg(false, "A", c.sseq, nil)
		}
		c.seg(true, "A", c.cseq, b)
		seq := c.cseq
		c.cseq += uint32(len(b))
		return seq
	}
	cases := []struct {
		what     string
		run      func(c *tcpConn)
		conflict bool
	}{
		{"a different copy before the ack", func(c *tcpConn) {
			seq := later(c, true, first, decoy)
			c.seg(true, "A", seq, real)
		}, true},
		{"a different copy of its end, the first head not acknowledged", func(c *tcpConn) {
			seq := later(c, false, first, decoy)
			c.seg(true, "A", seq+10, real[10:])
		}, true},
		{"after a body, a different copy", func(c *tcpConn) {
			seq := later(c, false, post, decoy)
			c.seg(true, "A", seq, real)
		}, true},
		{"the same copy", func(c *tcpConn) {
			seq := later(c, true, first, decoy)
			c.seg(true, "A", seq, decoy)
			c.seg(true, "A", c.cseq, decoy)
		}, false},
		{"a different copy after the ack", func(c *tcpConn) {
			seq := later(c, true, first, decoy)
			c.seg(false, "A", c.sseq, nil)
			c.seg(true, "A", seq, real)
		}, false},
		{"a different copy of the body", func(c *tcpConn) {
			seq := later(c, true, post, decoy)
			c.seg(true, "A", seq-5, []byte("HELLO"))
		}, false},
	}
	var runs []func(c *tcpConn)
	for _, c := range cases {
		runs = append(runs, c.run)
	}
	conflicts, requests := map[uint16]int{}, map[uint16]int{}
	for _, ev := range evasionRun(t, 80, runs...) {
		switch {
		case ev.Kind == audit.KindRequest && ev.Reason == ReasonStreamConflict:
			conflicts[ev.ClientPort]++
		case ev.Kind == audit.KindRequest:
			requests[ev.ClientPort]++
		case ev.Reason != policy.ReasonAllowed:
			t.Errorf("flow event %+v, want allowed", ev)
		}
	}
	for i, c := range cases {
		port := uint16(47000 + i)
		if got := conflicts[port] == 1; got != c.conflict || conflicts[port] > 1 {
			t.Errorf("%s: %d stream-conflict requests, want conflict %v", c.what, conflicts[port], c.conflict)
		}
		if requests[port] == 0 {
			t.Errorf("%s: the later request is in no event", c.what)
		}
	}
}

// TestFollowedHeadsBounded: a flow keeps at most maxSentHeads later heads
// the server has not acknowledged; a client pipelining more is no longer
// followed, and counted (Stats.Unfollowed), as at capture's other
// bounds.
func TestFollowedHeadsBounded(t *testing.T) {
	head := []byte("GET /next HTTP/1.1\r\nHost: " + decoyName + "\r\n\r\n")
	p := newPcap(t)
	for i, n := range []int{maxSentHeads + 1, maxSentHeads + 2} {
		c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.10"), srv: netip.MustParseAddr("203.0.113.10"),
			cport: uint16(47000 + i), sport: 80, cseq: 1000, sseq: 5000}
		c.handshake()
		for range n {
			c.seg(true, "A", c.cseq, head)
			c.cseq += uint32(len(head))
		}
	}
	r := synthRun(t, p.close(), testPolicy, nil, Config{})
	if r.stats.Unfollowed != 1 {
		t.Errorf("unfollowed: %d, want 1 (the flow with %d heads)", r.stats.Unfollowed, maxSentHeads+2)
	}
}

// TestResetOutOfWindow: a client's reset that the server ignores (not at
// the next byte it expects) does not end a flow capture still reads: the
// hello after it is read and decides the flow. Before, capture ended the
// flow at the reset and decided it by address (the name DNS gave out for
// it: allowed). A reset where the server's acknowledgement says it
// expects it is taken, past a segment capture lost (TestHelloAsTheProxy).
func TestResetOutOfWindow(t *testing.T) {
	real := realClientHello(t, realName)
	got := evasionEvents(t,
		func(c *tcpConn) {
			c.seg(true, "RA", c.cseq+1<<20, nil)
			c.seg(true, "A", c.cseq, real)
		},
		func(c *tcpConn) {
			c.seg(true, "RA", c.cseq-1, nil)
			c.seg(true, "A", c.cseq, real)
		},
		func(c *tcpConn) {
			c.seg(true, "RA", c.cseq, nil) // taken: the flow ends, no hello read
			c.seg(true, "A", c.cseq, real)
		})
	for i := range 2 {
		if ev := got[uint16(47000+i)]; ev.Name != realName || ev.Verdict != policy.Deny {
			t.Errorf("reset %d: %+v, want %s denied", i, ev, realName)
		}
	}
	if ev := got[47002]; ev.Name == realName || ev.Close != "rst" {
		t.Errorf("reset at the next byte: %+v, want the flow ended there", ev)
	}
}

// liveTCP writes one client segment (or, fromGW, one the gateway sent)
// through r's pipeline with the TTL (hop limit) given, after spoil.
func (r *guardRig) liveTCP(fromGW bool, src, dst netip.Addr, sp, dp uint16, flags string, seq uint32, data []byte, ttl uint8, spoil func([]byte)) {
	r.t.Helper()
	ip := ipLayer(src, dst, layers.IPProtocolTCP)
	et := layers.EthernetTypeIPv4
	if l, ok := ip.(*layers.IPv4); ok {
		l.TTL = ttl
	} else {
		ip.(*layers.IPv6).HopLimit = ttl
		et = layers.EthernetTypeIPv6
	}
	smac, dmac := macClient, macGW
	if fromGW {
		smac, dmac = macGW, macClient
	}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Window: 65535,
		SYN: bytes.ContainsRune([]byte(flags), 'S'), ACK: bytes.ContainsRune([]byte(flags), 'A'), RST: bytes.ContainsRune([]byte(flags), 'R')}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: smac, DstMAC: dmac, EthernetType: et}, ip.(gopacket.SerializableLayer), tcp, gopacket.Payload(data)); err != nil {
		r.t.Fatal(err)
	}
	b := buf.Bytes()
	if spoil != nil {
		spoil(b)
	}
	r.now = r.now.Add(1e6)
	r.c.proc.packet(b, r.now, layers.LinkTypeEthernet)
}

// TestUnforwardedDecoy: live, a client frame the gateway does not
// forward (TTL or hop limit 1 or 0 toward an address not its own, a
// wrong IPv4 header checksum) is skipped and counted: a decoy hello in
// one, then the real hello at the same sequence number, has capture read
// the real one. Before, capture read the decoy (first copy wins) and
// recorded the allowed name. A frame sent to a MAC address not the
// gateway's (broadcast, multicast, another host's), at any TTL, is
// skipped too, not counted. A TTL of 1 to the gateway's own address
// (delivered, not forwarded) is read, and so is a TTL of 2.
func TestUnforwardedDecoy(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	decoy := realClientHello(t, decoyName)
	real := realClientHello(t, realName)
	badSum := func(b []byte) { b[14+10] ^= 0x5a }
	toMAC := func(mac ...byte) func([]byte) { return func(b []byte) { copy(b[:6], mac) } }
	cli4, cli6 := netip.MustParseAddr("198.18.5.10"), netip.MustParseAddr("2001:db8:5::10")
	srv4, srv6 := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8:99::10")
	cases := []struct {
		what     string
		cli, srv netip.Addr
		ttl      uint8
		spoil    func([]byte)
		name     string // the name capture must record
	}{
		{"ttl 1", cli4, srv4, 1, nil, realName},
		{"ttl 0", cli4, srv4, 0, nil, realName},
		{"bad ipv4 header checksum", cli4, srv4, 64, badSum, realName},
		{"hop limit 1", cli6, srv6, 1, nil, realName},
		// Forwarded, so read: the real hello then differs from it.
		// Sent to a MAC address not the gateway's: Linux routes it at
		// no TTL (ip_forward drops what is not PACKET_HOST), capture's
		// socket reads it (veth, bridge, promiscuous NIC); not counted.
		// Before session 29 (R16) read, and the real hello was a
		// stream-conflict.
		{"broadcast MAC", cli4, srv4, 64, toMAC(0xff, 0xff, 0xff, 0xff, 0xff, 0xff), realName},
		{"another host's MAC", cli4, srv4, 64, toMAC(0x02, 0, 0x5e, 0x16, 0, 0x99), realName},
		{"IPv4 multicast MAC", cli4, srv4, 64, toMAC(0x01, 0, 0x5e, 0, 0, 0xfb), realName},
		{"IPv6 all-nodes MAC", cli6, srv6, 64, toMAC(0x33, 0x33, 0, 0, 0, 1), realName},
		{"another host's MAC, IPv6", cli6, srv6, 64, toMAC(0x02, 0, 0x5e, 0x16, 0, 0x99), realName},
		{"ttl 2: forwarded", cli4, srv4, 2, nil, ""},
		// Own traffic, in no event: only not counted.
		{"ttl 1 to the gateway", cli4, netip.MustParseAddr("198.18.5.1"), 1, nil, ""},
	}
	for i, c := range cases {
		sp := uint16(48000 + i)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "S", 100, nil, 64, nil)
		r.liveTCP(true, c.srv, c.cli, 443, sp, "SA", 500, nil, 64, nil)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "A", 101, nil, 64, nil)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "A", 101, decoy, c.ttl, c.spoil)
		r.liveTCP(false, c.cli, c.srv, sp, 443, "A", 101, real, 64, nil)
	}
	if n := r.c.Stats().Unforwarded; n != 4 {
		t.Errorf("unforwarded frames: %d, want 4", n)
	}
	r.c.proc.flush("shutdown")
	got := map[uint16]audit.Event{}
	for _, ev := range r.rec.all() {
		got[ev.ClientPort] = ev
	}
	for i, c := range cases {
		ev := got[uint16(48000+i)]
		switch {
		case c.name != "" && ev.Name != c.name:
			t.Errorf("%s: %+v, want the name %s", c.what, ev, c.name)
		case c.ttl == 2 && ev.Reason != ReasonStreamConflict:
			t.Errorf("%s: %+v, want %s", c.what, ev, ReasonStreamConflict)
		}
	}
}

// clientInitial seals a QUIC v1 client Initial packet to dcid, numbered
// pn, carrying one CRYPTO frame of data at offset off, padded to 1200
// bytes (RFC 9001 §5: the keys any observer derives from dcid).
func clientInitial(t *testing.T, dcid []byte, pn uint32, off int, data []byte) []byte {
	t.Helper()
	return clientInitialV(t, quicV1, dcid, nil, pn, off, data)
}

// clientInitialV is clientInitial of a QUIC version (v1 or v2) with a
// token (a Retry's, RFC 9000 §17.2.5.2).
func clientInitialV(t testing.TB, version uint32, dcid, token []byte, pn uint32, off int, data []byte) []byte {
	t.Helper()
	return clientInitialKeyed(t, version, dcid, dcid, token, pn, off, data)
}

// clientInitialKeyed is clientInitialV sealed with the keys of keyDCID,
// sent to dcid: a client's later Initial to the server's chosen DCID
// (RFC 9001 §5.2: the keys stay those of its first DCID, or after a
// Retry of the Retry's).
func clientInitialKeyed(t testing.TB, version uint32, keyDCID, dcid, token []byte, pn uint32, off int, data []byte) []byte {
	t.Helper()
	k, err := initialKeys(version, keyDCID)
	if err != nil {
		t.Fatal(err)
	}
	v2 := func(n int) []byte { return []byte{0x40 | byte(n>>8), byte(n)} } // a two-byte varint
	plain := append([]byte{0x06}, v2(off)...)
	plain = append(append(plain, v2(len(data))...), data...)
	b0 := byte(0xc3) // Initial, a 4-byte packet number
	if version == quicV2 {
		b0 = 0xd3 // RFC 9369 §3.2: Initial is type 01
	}
	hdr := append([]byte{b0, byte(version >> 24), byte(version >> 16), byte(version >> 8), byte(version), byte(len(dcid))}, dcid...)
	hdr = append(hdr, 0) // no SCID
	hdr = append(append(hdr, v2(len(token))...), token...)
	pad := 1200 - len(hdr) - 2 - 4 - len(plain) - k.aead.Overhead()
	if pad > 0 {
		plain = append(plain, make([]byte, pad)...)
	}
	hdr = append(hdr, v2(4+len(plain)+k.aead.Overhead())...)
	pnOff := len(hdr)
	hdr = append(hdr, byte(pn>>24), byte(pn>>16), byte(pn>>8), byte(pn))
	nonce := k.iv
	for j := 0; j < 4; j++ {
		nonce[11-j] ^= byte(pn >> (8 * j))
	}
	pkt := k.aead.Seal(hdr, nonce[:], plain, hdr)
	var mask [16]byte
	k.hp.Encrypt(mask[:], pkt[pnOff+4:pnOff+20])
	pkt[0] ^= mask[0] & 0x0f
	for j := 0; j < 4; j++ {
		pkt[pnOff+j] ^= mask[1+j]
	}
	return pkt
}

// TestQUICCryptoConflict: CRYPTO data of a QUIC client's Initials sent
// twice at the same offset, different, denies the flow as stream-conflict,
// whether the Initials go to one DCID or to two (a server demultiplexes
// by DCID: each reads its own copy; one whose UDP checksum is wrong, no
// server reads). RFC 9000 §2.2: the data at an offset must not change; a
// receiver keeps the first copy or closes the connection. Copies of the
// same bytes are retransmissions. Before, capture's stream marked the
// conflict and nobody read the mark: the hello of the first copy's bytes,
// naming the allowed host, was recorded allowed.
func TestQUICCryptoConflict(t *testing.T) {
	decoy := handHello(sniExt(decoyName))[5:] // CRYPTO carries no record header
	real := handHello(sniExt(realName))[5:]
	cut := len(decoy) - 4 // the first Initial: all but the end, names included
	dcid1, dcid2 := []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9, 9, 9, 9, 9}
	cases := []struct {
		what    string
		initial [2][]byte
		reason  string
	}{
		{"a different copy", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy[:cut]), clientInitial(t, dcid1, 1, 0, real)}, ReasonStreamConflict},
		{"a different copy to another DCID", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy[:cut]), clientInitial(t, dcid2, 0, 0, real)}, ReasonStreamConflict},
		{"the same copy", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy[:cut]), clientInitial(t, dcid1, 1, 0, decoy)}, policy.ReasonAllowed},
		{"the rest, no overlap", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy[:cut]), clientInitial(t, dcid1, 1, cut, decoy[cut:])}, policy.ReasonAllowed},
		// After the decision: the first hello, whole, was a decoy (in a
		// datagram no server read, or to a DCID the client drops).
		{"a whole hello, then another to another DCID", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy), clientInitial(t, dcid2, 0, 0, real)}, ReasonStreamConflict},
		{"a whole hello, then another", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy), clientInitial(t, dcid1, 1, 0, real)}, ReasonStreamConflict},
		{"a whole hello, then the same again", [2][]byte{clientInitial(t, dcid1, 0, 0, decoy), clientInitial(t, dcid2, 0, 0, decoy)}, policy.ReasonAllowed},
	}
	p := newPcap(t)
	cli, srv := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.10")
	for i, c := range cases {
		for _, in := range c.initial {
			p.udp(true, cli, srv, uint16(47000+i), 443, in)
		}
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {decoyName}}, Config{})
	got := eventsByPort(r.events)
	for i, c := range cases {
		if ev := got[uint16(47000+i)]; ev.Reason != c.reason || ev.Proto != "udp" {
			t.Errorf("%s: %+v, want %s", c.what, ev, c.reason)
		}
	}
	if r.stats.QUICOpened != 2*uint64(len(cases)) {
		t.Errorf("%d Initials opened, want %d", r.stats.QUICOpened, 2*len(cases))
	}
}
