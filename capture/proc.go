package capture

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/maphash"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/internal/httpwire"
	"egressd/internal/logjson"
	"egressd/internal/tlshello"
	"egressd/policy"
)

// How long a closed TCP flow stays in the table to absorb its last ACKs,
// and how often idle flows are looked for (in packet time).
const (
	closedLinger  = 10 * time.Second
	sweepInterval = 5 * time.Second
)

// obsKind says what a wire observation is (for tests and debugging).
type obsKind uint8

const (
	obsHello    obsKind = iota // a TLS ClientHello (TCP or QUIC) was parsed
	obsSNI                     // its SNI, over TCP
	obsQUICSNI                 // its SNI, from QUIC Initial packets
	obsHost                    // an HTTP Host header
	obsDNSQuery                // a DNS question in a query
)

type observation struct {
	Kind  obsKind
	Name  string
	QType uint16
	Size  int // of a ClientHello, in bytes
	Flow  flowKey
}

// flowKey is the 5-tuple in canonical order (a before b), so that both
// directions find the same flow with one lookup.
type flowKey struct {
	a, b   netip.Addr
	pa, pb uint16
	proto  uint8
}

func makeKey(src netip.Addr, sp uint16, dst netip.Addr, dp uint16, proto uint8) flowKey {
	c := src.Compare(dst)
	if c < 0 || (c == 0 && sp <= dp) {
		return flowKey{src, dst, sp, dp, proto}
	}
	return flowKey{dst, src, dp, sp, proto}
}

// What the client side of a flow speaks, as far as naming goes.
type app uint8

const (
	appUnknown app = iota
	appTLS
	appHTTP
	appDNS
	appQUIC
	appOther
)

// flow is one entry of the flow table. Direction 0 is client to server.
type flow struct {
	cli, srv     netip.Addr
	cport, sport uint16
	proto        uint8
	mac          [6]byte
	hasMAC       bool
	// lanMAC is the client's MAC as the proxy and the DNS forwarder see
	// it (Deps.MACs), asked once, when a decision needs it: lanMACState
	// is 0 before, 1 when there is none, 2 when lanMAC holds it.
	lanMAC      [6]byte
	lanMACState uint8
	// src is the capture socket the flow was first seen on (proc.src);
	// its packets on another are copies, skipped.
	src int

	first, last time.Time
	pkts        [2]uint64
	bytes       [2]uint64

	name    string
	nameSrc audit.NameSource
	path    string // of an HTTP flow's first request, without its query (cut once decided: boundPath)
	pathLen int    // path's length before the cut; 0 when not cut
	app     app
	inspect bool // still looking for a name
	gaveUp  bool // a segment was missing or a limit was hit
	syn     bool // the client's SYN was seen: stream offset 0 is its first byte
	started bool // the client's first bytes were examined
	fin     [2]bool
	closed  bool // ended and emitted; lingers for trailing packets
	own     bool // to or from the gateway itself: tracked, never recorded
	// inbound: started from outside the LAN toward a LAN host (see
	// inbound), decided so at its first packet and never again.
	inbound bool
	// forwarded: a TCP port enforce mode does not redirect to the proxy
	// (Config.TCPPorts): nftables judges it by address (see redirected).
	forwarded bool
	// echo: a flow of another protocol (other.go) an ICMP or ICMPv6 echo
	// request started, decided by the policy with the protocol icmp.
	echo bool
	// openedInAudit: the policy was in audit mode at the flow's first
	// packet (see beforeEnforce).
	openedInAudit bool
	// enforceJudged: a reload to enforce judged the flow, opened in
	// audit mode, as the forward chain judges its next packet (reload.go,
	// redecide); a later reload to enforce leaves it to the firewall.
	enforceJudged bool
	// redirectedAtOpen: at the flow's first packet the policy was in
	// enforce mode and the firewall redirected to a listening proxy
	// (Config.ProxyLines), a reload or a stopped proxy since
	// notwithstanding: NAT applies to a connection's first packet
	// (proxiedLine).
	redirectedAtOpen bool
	// guarded: the gateway hardening drops the flow's packets (guard.go),
	// so it never reaches the proxy (proxiedLine).
	guarded bool
	// acked: the client sent a packet with ACK, neither SYN nor RST (the
	// end of the handshake, or any later one): a redirected connection
	// the proxy can accept; one that never got so far (a SYN scan's RST
	// after the SYN-ACK, an unanswered SYN) it never sees (proxiedLine).
	acked bool

	base     [2]uint32 // TCP sequence number of stream offset 0
	haveBase [2]bool
	st       [2]*stream
	dnsOff   [2]int
	quic     *quicOpener
	held     int // bytes of st, sent and quic counted in proc.streamBytes
	// sent: the client bytes an allowed TCP flow was decided on, and the
	// heads of later requests the follower allowed, kept until the
	// server acknowledges them (watchSent, watchHead), in sequence order.
	sent []sentHead
	// srvAck: the highest acknowledgement the server sent while capture
	// read the client's stream (resetTaken).
	srvAck   uint32
	srvAcked bool
	// rstHeld: a client reset capture did not take (resetTaken) came at
	// rstSeq, the end of what the client sent (holdReset).
	rstHeld bool
	rstSeq  uint32
	// synNew: the client sent a SYN at another initial sequence number,
	// synISN, on the port pair (tcpPacket): a new connection if the server
	// answers it.
	synNew bool
	// again: how many times a packet of the client judged the flow
	// again (judgeAgain: a retransmitted SYN, a later datagram).
	again  uint8
	synISN uint32
	// urg: the client's urgent mark (see urgent): the byte at sequence
	// number urgSeq is out of the stream a receiver without SO_OOBINLINE
	// reads, and out of st[0]; urgGot: a segment holding it arrived.
	urg    bool
	urgGot bool
	urgSeq uint32
	// cliEnd: the sequence number after the furthest client byte
	// clientData took (cliSeen: one came), in or out of order.
	cliEnd   uint32
	cliSeen  bool
	headScan int // HTTP: bytes of st[0] already searched for the end of the first head

	// req follows the client's request stream of a plain-HTTP flow
	// after its first request, as the proxy does, so that every later
	// request is decided and recorded (see follow); nil when the flow is
	// not followed. st[0] then holds only the bytes not yet consumed,
	// from base[0] on.
	req *httpwire.ReqStream
	// reqHead is when the bytes held inside a later request head began
	// (zero when none are held): the head must complete within
	// classifyWait, as the proxy's HelloTimeout bounds it.
	reqHead time.Time

	// The verdict, decided once when the flow first became classifiable
	// (see classify) with the policy of that moment, and kept for every
	// event of the flow.
	est      time.Time // when the wait for a name began (TCP: the client's first non-SYN packet)
	decided  bool
	reported bool // its first event went out (while open, or at its end)
	dec      policy.Decision
	evName   string
	evSrc    audit.NameSource
	// otherNames: a QUIC flow's later connections' hello names that
	// differ from its first's, each allowed by its own name when read
	// (quicAttempt), normalized, maxOtherNames at most: its events'
	// OtherNames, and what a reload judges again (redecide).
	otherNames []string
	// learned: a forwarded flow's (UDP, TCP to a port not redirected, an
	// echo) name of the answer whose rule's learned set admitted its
	// address when decided (decideForwarded), whatever name its hello
	// carried: a reload in audit mode keeps the flow allowed while a
	// rule allows that name, as the firewall keeps the flow of its
	// mark's rule (redecide). Zero where a CIDR rule admitted it and no
	// earlier rule's learned set did (the chain's first accept marks it).
	learned admitName
	noPath  bool // decided as showing no path (showsNoPath), for its events
	// ruled: decided by the policy's rules (classify: decide), not denied
	// by capture for what the client sent (deny) nor as a connection
	// opened before enforce: a reload in audit mode judges it again
	// (reload.go, rejudge).
	ruled bool
	// echAnswer: a DNS answer of the flow held an HTTPS/SVCB record with
	// an ech SvcParam, which egressd's forwarder strips (Event.Filtered).
	echAnswer bool
	// revoked: a reload's policy denied the flow while it ran and the
	// firewall cut it, or drops it (reload.go); its events close
	// "policy-revoked".
	revoked bool
}

// proc is the packet pipeline: decoding, flows, names, classification. It
// is used by one goroutine at a time (Run or ReadFile).
type proc struct {
	c *Capture

	roomSweep time.Time // last sweep makeRoom ran (at most one a second)

	eth     layers.Ethernet
	dot1q   layers.Dot1Q
	ip4     ip4Layer
	ip6     ip6Layer
	ip6ext  ip6ExtLayer
	ip6frag layers.IPv6Fragment
	tcp     layers.TCP
	udp     layers.UDP
	gtp     layers.GTPv1U
	payload gopacket.Payload
	dns     layers.DNS

	ethParser, ip4Parser, ip6Parser *gopacket.DecodingLayerParser
	decoded                         []gopacket.LayerType

	flows     map[flowKey]*flow
	defrag    *defragger
	now       time.Time
	nextSweep time.Time
	// openReport, when positive, reports a flow still open this long
	// after it started (live capture only; see emit).
	openReport time.Duration
	// decideAt, when set (ReadFile), is the time the policy judges rule
	// expiry at; else the packet time, which live is the wall clock.
	decideAt time.Time
	// own are the gateway's own addresses (Config.OwnAddrs, or the
	// interfaces' for live capture, then what Capture.SetOwnAddrs
	// gave): swapped whole by another goroutine, read at each new flow.
	own     atomic.Pointer[ownAddrs]
	scratch []byte
	cands   []candidate
	grants  []DNSGrant // decideForwarded's answers
	// src is the live socket the current packet came from (1 + its
	// interface's place in Config.Interfaces, the same for a socket
	// opened again on it; 0 reading a file), and gwMACs the MAC
	// addresses of the sockets' interfaces: a frame from one of them was
	// sent by the gateway, so its source address is no client's.
	src    int
	gwMACs [][6]byte
	// ifindexes are the interface indexes of the live sockets with a
	// MAC address, by slot (0: none), for guardReason; rpf its answers;
	// guarding says guardPacket is making a flow (lookup: no own flow).
	ifindexes []int
	rpf       rpfCache
	guarding  bool
	// frameMACs are the clients' frame source addresses, by client
	// address, without Deps.MACs (offline): what an answer's asker is
	// matched by there (askerMAC). At most maxFrameMACs.
	frameMACs map[netip.Addr][6]byte
	// pathPorts are the host/path rules' TCP ports of pathEng, the
	// policy they were read from (redirected).
	pathEng   *policy.Engine
	pathPorts []policy.PortRange
	// candNames are the names of cands, for policy.DecideLearned.
	candNames []string
	cut       int // bytes of the current frame the capture cut off
	// streamBytes are the bytes all flows hold to read names (flow.held),
	// at most about Config.MaxStreamBytes (streamRoom).
	streamBytes int

	// pendingRetry is when cuts that found no flow are tried again
	// (reload.go).
	pendingRetry time.Time

	// resumable remembers who started the flows capture ended while
	// open (idle, evicted), for as long as conntrack may still hold them
	// (see remember). At most Config.MaxFlows.
	resumable map[flowKey]resumeMemo

	stats counters
}

type candidate struct {
	name string
	src  audit.NameSource
}

func newProc(c *Capture) *proc {
	p := &proc{c: c, flows: make(map[flowKey]*flow), defrag: newDefragger()}
	p.setOwn(c.cfg.OwnAddrs)
	// The skipper steps over IPv6 extension headers (Destination Options,
	// Routing) to the TCP or UDP after them: routers forward such packets,
	// and a flow capture cannot decode is in no report. It comes before
	// ip6frag, which takes the Fragment header back from it.
	dl := []gopacket.DecodingLayer{&p.eth, &p.dot1q, &p.ip4, &p.ip6, &p.ip6ext, &p.ip6frag, &p.tcp, &p.udp, &p.gtp, &p.payload}
	mk := func(first gopacket.LayerType) *gopacket.DecodingLayerParser {
		dp := gopacket.NewDecodingLayerParser(first)
		// A sparse array indexed by layer type: faster than the default map.
		var dlc gopacket.DecodingLayerContainer = gopacket.DecodingLayerSparse(nil)
		for _, d := range dl {
			dlc = dlc.Put(d)
		}
		dp.SetDecodingLayerContainer(dlc)
		dp.IgnoreUnsupported = true
		return dp
	}
	p.ethParser = mk(layers.LayerTypeEthernet)
	p.ip4Parser = mk(layers.LayerTypeIPv4)
	p.ip6Parser = mk(layers.LayerTypeIPv6)
	p.decoded = make([]gopacket.LayerType, 0, 12)
	return p
}

// packet runs one whole captured frame through the pipeline.
func (p *proc) packet(data []byte, ts time.Time, link layers.LinkType) {
	p.packetLen(data, len(data), ts, link)
}

// packetLen runs one captured frame through the pipeline; wireLen is its
// length on the wire, more than len(data) when the capture cut it short
// (the live snap filter, a pcap written with a snap length). Bytes are
// counted from wireLen: what was cut is TCP or UDP payload (snap lengths
// keep every header). A frame that does not decode is counted and skipped; a
// panic in any decoder is recovered and counted the same way.
func (p *proc) packetLen(data []byte, wireLen int, ts time.Time, link layers.LinkType) {
	p.cut = 0
	if wireLen > len(data) {
		p.cut = wireLen - len(data)
		p.stats.snapped.Add(1)
	} else {
		wireLen = len(data)
	}
	p.stats.packets.Add(1)
	p.stats.bytes.Add(uint64(wireLen))
	p.stats.captured.Add(uint64(len(data)))
	// A time no report can hold (JSON and RFC 3339 stop at the year 9999)
	// comes from a corrupt capture file, such as a pcapng block read as
	// the year 294247: taken, it would end every open flow as idle and
	// make the report unwritable. The frame counts at the latest good time.
	if ts.After(p.now) && ts.Year() <= 9999 {
		p.now = ts
	}
	p.applyPending(p.now)
	if p.now.After(p.nextSweep) {
		p.sweep()
		p.nextSweep = p.now.Add(sweepInterval)
	}
	defer func() {
		if r := recover(); r != nil {
			p.stats.malformed.Add(1)
			p.stats.panics.Add(1)
		}
	}()
	parser := p.ethParser
	switch link {
	case layers.LinkTypeEthernet:
	case layers.LinkTypeLinuxSLL:
		if len(data) < 16 {
			p.stats.malformed.Add(1)
			return
		}
		parser = p.byEtherType(binary.BigEndian.Uint16(data[14:16]))
		data = data[16:]
	case layers.LinkTypeLinuxSLL2:
		if len(data) < 20 {
			p.stats.malformed.Add(1)
			return
		}
		parser = p.byEtherType(binary.BigEndian.Uint16(data[0:2]))
		data = data[20:]
	case layers.LinkTypeRaw, layers.LinkTypeIPv4, layers.LinkTypeIPv6, 12, 14:
		parser = p.byVersion(data)
	case layers.LinkTypeNull, layers.LinkTypeLoop:
		if len(data) < 4 {
			p.stats.malformed.Add(1)
			return
		}
		data = data[4:]
		parser = p.byVersion(data)
	default:
		parser = nil
	}
	if parser == nil {
		p.stats.notIP.Add(1)
		return
	}
	err := parser.DecodeLayers(data, &p.decoded)
	var hasEth, has4, has6, hasFrag6, hasTCP, hasUDP, hasGTP bool
	// proto and payload: the IP protocol of what follows the last IP
	// header and its extension headers, and those bytes (otherPacket).
	var proto layers.IPProtocol
	var payload []byte
	for _, t := range p.decoded {
		switch t {
		case layers.LayerTypeEthernet:
			hasEth = true
		case layers.LayerTypeIPv4:
			// The last IP layer wins: inside a tunnel (GTP-U) the inner
			// packet is the flow, not the UDP that carried it.
			has4, has6, hasFrag6, hasTCP, hasUDP = true, false, false, false, false
			proto, payload = p.ip4.Protocol, p.ip4.Payload
		case layers.LayerTypeIPv6:
			has4, has6, hasFrag6, hasTCP, hasUDP = false, true, false, false, false
			proto, payload = p.ip6.next(), p.ip6.Payload
		case layers.LayerTypeIPv6Fragment:
			hasFrag6 = true
			proto, payload = p.ip6frag.NextHeader, p.ip6frag.Payload
		case layers.LayerTypeIPv6Destination, layers.LayerTypeIPv6Routing, layers.LayerTypeIPv6HopByHop:
			proto, payload = p.ip6ext.NextHeader, p.ip6ext.Payload
		case layers.LayerTypeTCP:
			hasTCP = true
		case layers.LayerTypeUDP:
			hasUDP = true
		case layers.LayerTypeGTPv1U:
			hasGTP = true
		}
	}
	if err != nil {
		p.stats.malformed.Add(1)
		return
	}
	var src, dst netip.Addr
	switch {
	case has4:
		src, _ = netip.AddrFromSlice(p.ip4.SrcIP)
		dst, _ = netip.AddrFromSlice(p.ip4.DstIP)
	case has6:
		src, _ = netip.AddrFromSlice(p.ip6.SrcIP)
		dst, _ = netip.AddrFromSlice(p.ip6.DstIP)
	default:
		p.stats.notIP.Add(1)
		return
	}
	var mac []byte
	if hasEth {
		mac = p.eth.SrcMAC
	}
	client := p.src != 0 && hasEth && !hasGTP && !p.sentByGateway(mac)
	if client {
		var dport uint16
		switch {
		case hasTCP:
			dport = uint16(p.tcp.DstPort)
		case hasUDP:
			dport = uint16(p.udp.DstPort)
		}
		if skip, count := p.unforwarded(has4, dst, p.eth.DstMAC, dport, hasTCP, hasUDP); skip {
			if count {
				p.stats.unforwarded.Add(1)
			}
			return
		}
	}
	if client && p.guard(src, dst, uint8(proto), payload, has4 && p.ip4.FragOffset != 0 || hasFrag6 && p.ip6frag.FragmentOffset != 0, hasTCP, hasUDP) {
		return
	}
	switch {
	case has4 && (p.ip4.Flags&layers.IPv4MoreFragments != 0 || p.ip4.FragOffset != 0):
		p.stats.fragments.Add(1)
		if other(p.ip4.Protocol) {
			p.otherPacket(src, dst, uint8(p.ip4.Protocol), p.ip4.Payload, p.ip4.FragOffset != 0, mac)
			return
		}
		k := fragKey{src: src, dst: dst, id: uint32(p.ip4.Id), proto: uint8(p.ip4.Protocol)}
		full, proto := p.defrag.add(k, uint8(p.ip4.Protocol), int(p.ip4.FragOffset)*8, p.ip4.Flags&layers.IPv4MoreFragments != 0, p.ip4.Payload, p.now)
		p.reassembled(src, dst, proto, full, mac)
	case hasFrag6 && (p.ip6frag.FragmentOffset != 0 || p.ip6frag.MoreFragments):
		p.stats.fragments.Add(1)
		p.fragment6(src, dst, mac)
	case hasTCP:
		p.tcpPacket(src, dst, mac)
	case hasUDP:
		p.udpPacket(src, dst, p.udp.SrcPort, p.udp.DstPort, p.udp.Payload, mac)
	case other(proto):
		p.otherPacket(src, dst, uint8(proto), payload, false, mac)
	default:
		p.stats.notIP.Add(1)
	}
}

func (p *proc) byEtherType(et uint16) *gopacket.DecodingLayerParser {
	switch et {
	case 0x0800:
		return p.ip4Parser
	case 0x86dd:
		return p.ip6Parser
	}
	return nil
}

func (p *proc) byVersion(data []byte) *gopacket.DecodingLayerParser {
	if len(data) == 0 {
		return nil
	}
	switch data[0] >> 4 {
	case 4:
		return p.ip4Parser
	case 6:
		return p.ip6Parser
	}
	return nil
}

// fragment6 handles an IPv6 fragment (p.ip6frag). Every one goes to the
// defragmenter, keyed as Linux keys it, without the protocol: what the
// datagram carries is what the fragment at offset 0 says, after any
// extension headers that follow its Fragment header. That first fragment
// of another protocol than TCP and UDP also counts as a whole packet
// (other.go), and a later one counts in its flow when its Fragment header
// names the protocol, or, extension headers first, when the first
// fragment came before it.
func (p *proc) fragment6(src, dst netip.Addr, mac []byte) {
	h := &p.ip6frag
	k := fragKey{src: src, dst: dst, id: h.Identification}
	var upper uint8 // the other protocol a first fragment's headers lead to
	switch {
	case h.FragmentOffset == 0:
		proto, rest, ok := skipExt6(uint8(h.NextHeader), h.Payload)
		if ok && len(rest) < minTransport6(proto) {
			// The first fragment ends inside the transport's header:
			// Linux drops it (RFC 8200 4.5, ipv6frag_thdr_truncated).
			p.defrag.dropped++
			p.stats.fragDropped.Store(p.defrag.dropped)
			return
		}
		if ok && other(layers.IPProtocol(proto)) {
			upper = proto
			p.otherPacket(src, dst, proto, rest, false, mac)
		}
	case !ext6(uint8(h.NextHeader)):
		if other(h.NextHeader) {
			p.otherPacket(src, dst, uint8(h.NextHeader), h.Payload, true, mac)
		}
	default:
		// Extension headers first: the protocol is the first
		// fragment's, if it came.
		if dg := p.defrag.m[k]; dg != nil && dg.upper != 0 {
			p.otherPacket(src, dst, dg.upper, h.Payload, true, mac)
		}
	}
	full, proto := p.defrag.add(k, uint8(h.NextHeader), int(h.FragmentOffset)*8, h.MoreFragments, h.Payload, p.now)
	if full == nil {
		if dg := p.defrag.m[k]; dg != nil && upper != 0 {
			dg.upper = upper
		}
		p.stats.fragDropped.Store(p.defrag.dropped)
		return
	}
	proto, full, ok := skipExt6(proto, full)
	if !ok || other(layers.IPProtocol(proto)) {
		// Another protocol's: counted fragment by fragment.
		p.stats.fragDropped.Store(p.defrag.dropped)
		return
	}
	p.reassembled(src, dst, proto, full, mac)
}

// ext6 reports whether proto is an IPv6 extension header skipExt6 steps
// over.
func ext6(proto uint8) bool {
	switch layers.IPProtocol(proto) {
	case layers.IPProtocolIPv6HopByHop, layers.IPProtocolIPv6Routing, layers.IPProtocolIPv6Destination,
		layers.IPProtocolAH, layers.IPProtocolIPv6Fragment:
		return true
	}
	return false
}

// skipExt6 walks the IPv6 extension headers at the start of b, the first
// of type proto, as Linux's ipv6_skip_exthdr does: it returns the protocol
// after them and its bytes. A Fragment header of a later fragment ends the
// walk (its protocol is then the Fragment header's). ok is false when a
// header is cut short; the walk is bounded by b, each header being at
// least 8 bytes.
func skipExt6(proto uint8, b []byte) (uint8, []byte, bool) {
	for ext6(proto) {
		if len(b) < 8 {
			return 0, nil, false
		}
		var n int
		switch layers.IPProtocol(proto) {
		case layers.IPProtocolIPv6Fragment:
			if binary.BigEndian.Uint16(b[2:4])&^7 != 0 {
				return proto, b, true
			}
			n = 8
		case layers.IPProtocolAH:
			n = (int(b[1]) + 2) * 4
		default:
			n = (int(b[1]) + 1) * 8
		}
		if len(b) < n {
			return 0, nil, false
		}
		proto, b = b[0], b[n:]
	}
	return proto, b, true
}

// minTransport6 is how many bytes of protocol proto Linux wants in an
// IPv6 first fragment (ipv6frag_thdr_truncated).
func minTransport6(proto uint8) int {
	switch layers.IPProtocol(proto) {
	case layers.IPProtocolTCP:
		return 20
	case layers.IPProtocolUDP, layers.IPProtocolICMPv6:
		return 8
	}
	return 1
}

// reassembled handles a TCP or UDP (proto) datagram rebuilt from fragments
// (nil: not yet).
func (p *proc) reassembled(src, dst netip.Addr, proto uint8, full []byte, mac []byte) {
	p.stats.fragDropped.Store(p.defrag.dropped)
	if full == nil {
		return
	}
	p.stats.reassembled.Add(1)
	switch layers.IPProtocol(proto) {
	case layers.IPProtocolTCP:
		if err := p.tcp.DecodeFromBytes(full, gopacket.NilDecodeFeedback); err != nil {
			p.stats.malformed.Add(1)
			return
		}
		p.tcpPacket(src, dst, mac)
	case layers.IPProtocolUDP:
		if err := p.udp.DecodeFromBytes(full, gopacket.NilDecodeFeedback); err != nil {
			p.stats.malformed.Add(1)
			return
		}
		p.udpPacket(src, dst, p.udp.SrcPort, p.udp.DstPort, p.udp.Payload, mac)
	}
}

// servicePort guesses that a port is a server's when no handshake says who
// opened a flow.
func servicePort(port uint16) bool { return port < 1024 }

// setSources records the MAC addresses of the live sockets' interfaces.
func (p *proc) setSources(srcs []source) {
	p.gwMACs = p.gwMACs[:0]
	clear(p.ifindexes)
	for _, s := range srcs {
		if s.hasMAC {
			p.gwMACs = append(p.gwMACs, s.mac)
			for len(p.ifindexes) <= s.slot {
				p.ifindexes = append(p.ifindexes, 0)
			}
			p.ifindexes[s.slot] = s.ifindex
		}
	}
}

// gatewayMAC reports whether mac (6 bytes) is one of the capture
// interfaces' addresses.
func (p *proc) gatewayMAC(mac []byte) bool {
	return slices.Contains(p.gwMACs, [6]byte(mac))
}

// clientMAC keeps mac, the source address of a frame from f's client, as
// f's client's, unless f has one or the gateway sent the frame (a packet
// it forwarded out of a LAN interface carries the gateway's address).
func (p *proc) clientMAC(f *flow, mac []byte) {
	if f.hasMAC || len(mac) != 6 || p.gatewayMAC(mac) {
		return
	}
	copy(f.mac[:], mac)
	f.hasMAC = true
	if p.c.deps.MACs == nil {
		if p.frameMACs == nil {
			p.frameMACs = map[netip.Addr][6]byte{}
		}
		a := f.cli.Unmap()
		if _, ok := p.frameMACs[a]; !ok && len(p.frameMACs) >= maxFrameMACs {
			for k := range p.frameMACs {
				delete(p.frameMACs, k)
				break
			}
		}
		p.frameMACs[a] = f.mac
	}
}

// maxFrameMACs bounds proc.frameMACs: a LAN's clients, with room.
const maxFrameMACs = 65536

// lookup finds or makes the flow of a packet and returns its direction.
// srcIsClient says whether the packet's source is the client of a flow it
// starts: sure when the packet says so (a TCP SYN), else a guess, which a
// flow capture ended while conntrack still holds it overrules (recall).
// outside says that the packet, if it starts a flow, starts it from
// outside the LAN (see inbound). It returns a nil flow for a copy: a packet of a flow first seen on
// another live socket (forwarded from one LAN interface to another, the
// packet crosses both), which counts nothing, but may give the flow its
// client's MAC address.
func (p *proc) lookup(src netip.Addr, sp uint16, dst netip.Addr, dp uint16, proto uint8, srcIsClient, sure, outside bool, mac []byte) (*flow, int) {
	k := makeKey(src, sp, dst, dp, proto)
	return p.lookupAt(k, p.flows[k], src, sp, dst, dp, proto, srcIsClient, sure, outside, mac)
}

// lookupAt is lookup of the flow of k, the packet's key, where the caller
// looked already: f is p.flows[k] (nil: none), which saves tcpPacket a
// second look in the table per packet.
func (p *proc) lookupAt(k flowKey, f *flow, src netip.Addr, sp uint16, dst netip.Addr, dp uint16, proto uint8, srcIsClient, sure, outside bool, mac []byte) (*flow, int) {
	if f != nil && f.src != p.src {
		p.stats.copies.Add(1)
		if src == f.cli && sp == f.cport {
			p.clientMAC(f, mac)
		}
		return nil, 0
	}
	if f != nil && p.endIdle(k, f) {
		f = nil
	}
	if f == nil {
		// Before makeRoom, which may remember the flow it evicts in the
		// place of this one.
		if m, ok := p.recall(k); ok && !sure {
			srcIsClient = (src == k.a && sp == k.pa) == m.cliIsA
			outside = m.inbound
		}
		if len(p.flows) >= p.c.cfg.MaxFlows {
			p.makeRoom()
		}
		f = &flow{proto: proto, first: p.now, inspect: true, src: p.src}
		f.openedInAudit = p.c.deps.Policy.Load().Mode() == policy.ModeAudit
		f.redirectedAtOpen = !f.openedInAudit && proto == 6 && p.c.cfg.ProxyLines != nil && p.c.cfg.ProxyLines()
		if srcIsClient {
			f.cli, f.cport, f.srv, f.sport = src, sp, dst, dp
		} else {
			f.cli, f.cport, f.srv, f.sport = dst, dp, src, sp
		}
		if !p.guarding && p.isOwn(f) {
			f.own, f.inspect = true, false
			p.stats.own.Add(1)
		} else if outside {
			p.inbound(f)
		}
		p.flows[k] = f
		p.stats.active.Store(int64(len(p.flows)))
	}
	dir := 1
	if src == f.cli && sp == f.cport {
		dir = 0
		p.clientMAC(f, mac)
	}
	f.last = p.now
	return f, dir
}

// unforwarded reports whether the gateway drops the current frame, a
// client's read live on a LAN interface, to dst before it forwards it
// (skip): an IPv4 header whose checksum is wrong (its IP layer drops it),
// or a TTL (hop limit) of 1 or 0 toward a unicast address not the
// gateway's own (time exceeded). Such a frame reaches no server, and
// capture reads nothing of it: else a client could show capture a decoy
// (a ClientHello naming an allowed host) that no server reads, and send
// the server another at the same sequence number (Ptacek & Newsham's
// insertion; e2e TestCaptureEvasion). In enforce mode a frame the
// firewall redirects to the proxy or to the DNS forwarder (redirectedNow)
// is delivered to the gateway, not forwarded, whatever its TTL: the proxy
// reads it, and so does capture. count says whether the frame is one the
// gateway would have routed (routedFrame), for
// egress_capture_unforwarded_frames_total: a frame to the gateway itself,
// or a broadcast one (a TTL-1 frame to the LAN's subnet broadcast), is no
// forwarding decision. Nor does Linux route a frame, whatever its TTL,
// that was not sent to the receiving interface's MAC address (ip_forward
// drops what is not PACKET_HOST): to the broadcast address, a multicast
// one, or another host's, which capture's socket reads on a veth, a
// bridge or a promiscuous NIC. Toward a unicast address not the
// gateway's own and not redirected, such a frame is skipped too (a decoy
// no server reads; not counted: no frame the gateway would have routed).
// Offline (a capture file) nothing is known of where the frame was read,
// and none is skipped.
func (p *proc) unforwarded(has4 bool, dst netip.Addr, dmac []byte, dport uint16, tcp, udp bool) (skip, count bool) {
	if has4 && !ip4SumOK(p.ip4.Contents) {
		return true, p.routedFrame(dst, dmac, dport, tcp, udp)
	}
	if !routed(dst) {
		return false, false // loopback, multicast, broadcast: not forwarded anyway
	}
	if _, own := p.own.Load().set[dst.Unmap()]; own || p.redirectedNow(dport, tcp, udp) {
		return false, false
	}
	if p.srcHasMAC() && (len(dmac) != 6 || !p.gatewayMAC(dmac)) {
		return true, false
	}
	if has4 && p.ip4.TTL > 1 || !has4 && p.ip6.HopLimit > 1 {
		return false, false
	}
	return true, p.routedFrame(dst, dmac, dport, tcp, udp)
}

// srcHasMAC reports whether the interface of the current live socket has
// a MAC address (setSources): on one without, frames carry no address of
// the gateway's to check.
func (p *proc) srcHasMAC() bool {
	return p.src > 0 && p.src <= len(p.ifindexes) && p.ifindexes[p.src-1] != 0
}

// routedFrame reports whether the gateway would route the current client
// frame, to dst at port dport, were its TTL and checksum good: sent to
// the gateway's MAC address (Linux forwards no frame sent to another
// address or to a broadcast or multicast one), toward a unicast address
// not its own, not redirected to the proxy or the forwarder.
func (p *proc) routedFrame(dst netip.Addr, dmac []byte, dport uint16, tcp, udp bool) bool {
	if len(dmac) != 6 || !p.gatewayMAC(dmac) || !routed(dst) {
		return false
	}
	_, own := p.own.Load().set[dst.Unmap()]
	return !own && !p.redirectedNow(dport, tcp, udp)
}

// redirectedNow reports whether enforce mode's firewall redirects a
// client's TCP or UDP frame to port dport to the gateway itself: DNS to
// the forwarder, TCP to a port the transparent proxy takes, whether it
// listens or not (firewall/render.go, redirectRules), while egressd's
// firewall is installed (Config.Firewall) beside the proxy (egressd run:
// Config.ProxyLines set). Such a frame is delivered locally, not
// forwarded, whatever its TTL. The mode and ports are those now: a
// connection opened before a reload keeps its first packet's NAT in the
// kernel (residual, README "Capture in audit mode").
func (p *proc) redirectedNow(dport uint16, tcp, udp bool) bool {
	if !tcp && !udp || p.c.cfg.ProxyLines == nil || p.c.deps.Policy.Load().Mode() != policy.ModeEnforce || !p.c.firewallDrops() {
		return false
	}
	return dport == 53 || tcp && p.redirected(dport)
}

// ip4SumOK reports whether the IPv4 header h sums to its checksum (RFC
// 1071). The kernel computes a header's checksum in software always, for
// GRO as for GSO packets (no offload leaves it unset).
func ip4SumOK(h []byte) bool {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return sum == 0xffff
}

// sentByGateway reports whether the current frame, read from a live
// socket, is one the gateway sent out of that LAN interface (the kernel's
// PACKET_OUTGOING): its source address is one of the capture interfaces'.
// A client's frame comes in with the client's (or its router's) address.
// Offline no interface is known and it reports false.
func (p *proc) sentByGateway(mac []byte) bool {
	return p.src != 0 && len(mac) == 6 && p.gatewayMAC(mac)
}

// inbound decides f, a new flow whose first packet the gateway sent out
// of a LAN interface toward a LAN host (a TCP SYN, or a UDP datagram with
// none the other way before it): started from outside the LAN, from the
// WAN side, not from the gateway (its own addresses are Config.OwnAddrs).
// It is no LAN client's egress, and no rule decides it: the policy names
// destinations LAN clients may reach, and the enforce firewall drops new
// connections from the WAN side (firewall/render.go, the WAN guard of the
// forward chain). Its initiator is the client and the LAN host its
// destination, whatever the ports (UDP: no guess of a server's port). In
// audit mode it is recorded denied with ReasonInbound, what enforce would
// do to it; in enforce mode, seen on the LAN, the firewall let it through
// (from another interface than the WAN, or without egressd's firewall),
// and it is counted (Stats.Inbound) and not recorded. Either way capture
// reads nothing of it (no name, no DNS answer learned). A flow forwarded
// from one LAN interface to another is not inbound: its first packet
// comes in on the first, where its flow is made, and the copy sent out of
// the second is skipped (lookup). Offline (a capture file) packets carry
// no direction and no flow is inbound (see README).
func (p *proc) inbound(f *flow) {
	f.inbound, f.inspect = true, false
	p.stats.inbound.Add(1)
	f.decided = true
	f.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonInbound, Mode: p.c.deps.Policy.Load().Mode()}
	f.evName, f.evSrc = "", audit.NameNone
}

// setOwn sets the gateway's own addresses. It is safe to call while the
// pipeline runs: flows it sees after take the new set, those it follows
// already keep what they were.
func (p *proc) setOwn(addrs []netip.Addr) {
	own := ownAddrs{set: make(map[netip.Addr]struct{}, len(addrs))}
	for _, a := range addrs {
		if _, ok := own.set[a.Unmap()]; !ok {
			own.set[a.Unmap()] = struct{}{}
			own.list = append(own.list, a.Unmap())
		}
	}
	p.own.Store(&own)
}

// ownAddrs are the gateway's own addresses, as a set (isOwn) and as the
// list the special-range guard takes (special).
type ownAddrs struct {
	set  map[netip.Addr]struct{}
	list []netip.Addr
}

// isOwn reports whether f is the gateway's own traffic (Config.OwnAddrs):
// from one of its addresses, or to one of them other than DNS to its
// forwarder.
func (p *proc) isOwn(f *flow) bool {
	own := p.own.Load().set
	if len(own) == 0 {
		return false
	}
	if _, ok := own[f.cli.Unmap()]; ok {
		return true
	}
	_, ok := own[f.srv.Unmap()]
	return ok && f.sport != 53
}

// endIdle ends and forgets f, the flow of k, when it has been idle past
// its timeout, and reports whether it did. The sweep does the same only
// every sweepInterval: without this check a packet that ends a longer
// silence before the next sweep would continue a flow that is over (a UDP
// exchange after 62 s of silence is a new flow, DESIGN.md).
func (p *proc) endIdle(k flowKey, f *flow) bool {
	if f.closed {
		return false
	}
	if p.now.Sub(f.last) <= p.idleLimit(f) {
		return false
	}
	p.end(f, "idle")
	delete(p.flows, k)
	p.remember(k, f)
	p.stats.active.Store(int64(len(p.flows)))
	return true
}

// conntrack's default timeouts (nf_conntrack_udp_timeout,
// nf_conntrack_udp_timeout_stream, nf_conntrack_tcp_timeout_syn_sent,
// nf_conntrack_tcp_timeout_established): how long after its last packet
// the kernel may still hold a flow capture ended, and so forward what
// comes next as part of it. A replied UDP exchange is held 120 s by
// current kernels, 180 s by older ones: the longer is taken.
const (
	ctUDPUnreplied   = 30 * time.Second
	ctUDPReplied     = 180 * time.Second
	ctTCPOneWay      = 120 * time.Second
	ctTCPEstablished = 5 * 24 * time.Hour
	// ctOther: the other protocols' (nf_conntrack_generic_timeout; GRE's
	// replied stream is 180 s): the longer is taken.
	ctOther = 600 * time.Second
)

// resumeMemo is who started a flow capture ended while it was open
// (idle, evicted): its client is the key's a side (cliIsA), it was
// inbound; until is when conntrack has forgotten it too (Unix seconds,
// rounded up: UnixNano cannot hold every time a capture file may carry).
type resumeMemo struct {
	until   int64
	cliIsA  bool
	inbound bool
}

// remember keeps the orientation of f, the flow of k, which capture
// ended while it was open (idle past UDPIdle or TCPIdle, or evicted from
// a full table), for as long as conntrack may still hold the connection
// (its default timeouts, counted from f's last packet: UDP 30 s
// unreplied and 180 s replied, TCP 120 s one way (inbound only) and 5 days both ways,
// the other protocols but ICMP 600 s).
// Its next packet then continues it as what it was (recall): a LAN
// client's exchange resumed from the WAN side is not inbound (the
// firewall passes it: conntrack knows it), an inbound one resumed from
// the LAN side is not the LAN host's egress. A new flow on the same
// 5-tuple after that is judged by its first packet, as any. The memory
// holds at most MaxFlows flows (one arbitrary flow is forgotten for a
// new one), and the sweep drops those past their time. The gateway's own
// flows are not kept: their addresses say what they are.
func (p *proc) remember(k flowKey, f *flow) {
	if f.own || icmpProto(f.proto) {
		return // an ICMP request says who sent it; a reply starts no flow (other.go)
	}
	replied := f.pkts[0] > 0 && f.pkts[1] > 0
	if f.proto == 6 && !replied && !f.inbound {
		// A LAN client's SYNs with no answer (a SYN flood evicts 65,536
		// of them a round): its next packet is a SYN again, which says
		// who the client is, or the server's SYN-ACK, whose flags do.
		// Remembering them cost the flooded daemon some 6 MB it needs
		// at its stop under a memory limit (TestMemoryMaxUnderFlood).
		return
	}
	ct := ctTCPOneWay
	switch {
	case f.proto != 6 && f.proto != 17:
		ct = ctOther
	case f.proto == 17 && replied:
		ct = ctUDPReplied
	case f.proto == 17:
		ct = ctUDPUnreplied
	case replied:
		ct = ctTCPEstablished
	}
	until := f.last.Add(ct).Unix() + 1
	if p.now.Unix() > until {
		return
	}
	if p.resumable == nil {
		p.resumable = make(map[flowKey]resumeMemo)
	}
	if _, ok := p.resumable[k]; !ok && len(p.resumable) >= p.c.cfg.MaxFlows {
		for old := range p.resumable {
			delete(p.resumable, old)
			break
		}
	}
	p.resumable[k] = resumeMemo{until: until, cliIsA: f.cli == k.a && f.cport == k.pa, inbound: f.inbound}
}

// recall takes back what remember kept of the flow of k, if conntrack
// may still hold it.
func (p *proc) recall(k flowKey) (resumeMemo, bool) {
	if len(p.resumable) == 0 {
		return resumeMemo{}, false
	}
	m, ok := p.resumable[k]
	if !ok {
		return resumeMemo{}, false
	}
	delete(p.resumable, k)
	return m, p.now.Unix() <= m.until
}

// idleLimit is how long f may be silent before it ends: Config.TCPIdle
// for TCP, Config.UDPIdle for UDP and the other protocols (other.go).
func (p *proc) idleLimit(f *flow) time.Duration {
	if f.proto == 6 {
		return p.c.cfg.TCPIdle
	}
	return p.c.cfg.UDPIdle
}

// waited decides a flow that has waited classifyWait for its name since
// it was established (see settle).
func (p *proc) waited(f *flow) {
	if !f.decided && !f.est.IsZero() && p.now.Sub(f.est) >= classifyWait {
		p.settle(f)
	}
}

// swap turns a flow around when capture guessed its client wrong.
func (f *flow) swap() {
	f.cli, f.srv, f.cport, f.sport = f.srv, f.cli, f.sport, f.cport
	f.pkts[0], f.pkts[1] = f.pkts[1], f.pkts[0]
	f.bytes[0], f.bytes[1] = f.bytes[1], f.bytes[0]
	f.hasMAC, f.lanMACState = false, 0
}

func (p *proc) tcpPacket(src, dst netip.Addr, mac []byte) {
	t := &p.tcp
	sp, dp := uint16(t.SrcPort), uint16(t.DstPort)
	k := makeKey(src, sp, dst, dp, 6)
	f := p.flows[k]
	if f != nil && p.endIdle(k, f) {
		f = nil
	}
	if f != nil && f.closed && t.SYN && !t.ACK && !(f.src != p.src && f.haveBase[0] && t.Seq+1 == f.base[0]) {
		// The port pair is reused by a new connection (not the copy, on
		// another socket, of the SYN that began this one).
		delete(p.flows, k)
		f = nil
	} else if f == nil && (t.RST || t.FIN) && len(t.Payload) == 0 {
		return // the end of a connection we never saw
	} else if f != nil && t.SYN && !t.ACK && f.haveBase[0] && t.Seq+1 != f.base[0] && dst == f.srv && dp == f.sport {
		// A new connection's SYN on the port pair of one capture holds
		// open (its end unseen: a client that reuses ports, a NAT on the
		// LAN). Its stream starts afresh if the server answers it
		// (below); until then it is not this flow's (a server that holds
		// the old connection ignores it), and must not move its stream.
		f.synISN, f.synNew = t.Seq, true
		return
	} else if f != nil && t.SYN && t.ACK && f.synNew && t.Ack == f.synISN+1 && src == f.srv && sp == f.sport {
		// The server took that new connection: the old one is gone.
		p.end(f, "reused")
		delete(p.flows, k)
		f = nil
	}
	clientIsSrc := !servicePort(sp) || servicePort(dp)
	if sp < dp && !t.SYN {
		clientIsSrc = false
	}
	if t.SYN {
		clientIsSrc = !t.ACK
	}
	var dir int
	f, dir = p.lookupAt(k, f, src, sp, dst, dp, 6, clientIsSrc, t.SYN, t.SYN && !t.ACK && p.sentByGateway(mac), mac)
	if f == nil {
		return
	}
	if !f.decided && (f.sport == 53 || f.cport == 53) {
		p.classify(f) // by address: DNS flows carry no name of their own
	} else if !f.decided && f.inspect && !p.redirected(f.sport) {
		// Forwarded by nftables, not proxied: decided at once by address.
		f.forwarded, f.inspect = true, false
		p.classify(f)
	} else if dir == 0 && t.SYN && !t.ACK && p.rejudgeSYN(f, t.Seq) {
		f.decided = false
		p.classify(f)
	}
	if dir == 0 && t.ACK && !t.SYN && !t.RST {
		f.acked = true
	}
	if dir == 0 && !t.SYN && f.est.IsZero() {
		// The proxy's clocks start when it accepts, after the handshake.
		f.est = p.now
	}
	p.waited(f)
	p.headWaited(f)
	f.pkts[dir]++
	f.bytes[dir] += uint64(len(t.Payload) + p.cut)
	if f.closed {
		return
	}
	seq := t.Seq
	if t.SYN {
		seq++
		f.base[dir], f.haveBase[dir] = seq, true
		if dir == 0 && !t.ACK {
			f.syn = true
		}
	}
	if t.URG && dir == 0 && !t.SYN {
		// A SYN's mark is none: a listening socket only queues the
		// connection request.
		p.urgent(f, seq, t.Urgent)
	}
	if len(f.sent) > 0 {
		p.checkSent(f, dir, seq)
	}
	if dir == 1 && t.ACK && !t.SYN && (f.inspect || f.req != nil) && (!f.srvAcked || int32(t.Ack-f.srvAck) > 0) {
		f.srvAck, f.srvAcked = t.Ack, true // resetTaken
	}
	switch {
	case len(t.Payload) == 0:
	case dir == 0:
		p.clientData(f, seq, t.Payload)
	case f.inspect && (f.app == appDNS || (f.app == appUnknown && f.sport == 53)):
		p.tcpData(f, dir, seq, t.Payload)
	}
	switch {
	case t.RST && dir == 0 && !p.resetTaken(f, seq):
		p.holdReset(f, seq)
	case t.RST && dir == 0:
		p.clientReset(f, seq+uint32(len(t.Payload)))
	case t.RST:
		p.end(f, "rst")
	case t.FIN:
		end := f.readSeq(seq + uint32(len(t.Payload)))
		if dir == 0 {
			p.clientEnd(f, end)
		}
		f.fin[dir] = true
		if dir == 0 {
			p.helloCut(f, end)
		}
		if f.fin[0] && f.fin[1] {
			p.end(f, "fin")
		}
	}
}

// maxRejudge bounds how many retransmissions of a client's SYN judge a
// forwarded connection again (rejudgeSYN): Linux sends 6 by default
// (net.ipv4.tcp_syn_retries), 1, 3, 7, 15, 31 and 63 s after the first.
// A UDP flow's datagrams after its decision judge it again as many times,
// then only at its 2^n-th client datagram (rejudgeDatagram).
const maxRejudge = 6

// rejudgeSYN reports whether the client's SYN at sequence number seq, a
// retransmission of the one that began f (the same initial sequence
// number), is to judge f again, and counts it. The forward chain judges
// every SYN of a connection whose earlier SYNs it dropped as a new packet
// (a dropped packet confirms no conntrack entry): one that comes after
// DNS gave the address out for a rule's name gets out, and the connection
// works (a client that connected from a stale cache, or before its own
// lookup's answer). So a forwarded TCP flow decided dropped is judged
// again, by address with the answers given by now (decideForwarded's
// last), at each retransmitted SYN until one passes, while the handshake
// has not gone further: the server sent nothing (no SYN-ACK got back to
// the client) and the client only SYNs (est); at most maxRejudge times,
// and only before its first report. In audit mode, where nothing drops the
// first SYN, the verdict is that of the first SYN after the answer, as
// enforce mode would have let that one out.
func (p *proc) rejudgeSYN(f *flow, seq uint32) bool {
	if !f.forwarded || !f.haveBase[0] || seq+1 != f.base[0] || !f.est.IsZero() || f.again >= maxRejudge {
		return false
	}
	return p.judgeAgain(f)
}

// rejudgeDatagram reports whether the client's datagram just counted,
// of f, a UDP flow nftables forwards, is to judge f again, and counts it:
// as a retransmitted SYN (rejudgeSYN), a datagram after every earlier one
// was dropped is new to the forward chain, which lets it out once DNS
// gave the address out. A UDP flow is decided 10 s after it began, on its
// datagrams so far (decideForwarded); one decided dropped is judged again
// at a later datagram of its client while the server has sent nothing,
// the first maxRejudge times, then at the client's 2^n-th datagram (a
// burst before the answer does not use up the judgements of a datagram
// after it, and a flow is judged again at most some 70 times).
func (p *proc) rejudgeDatagram(f *flow) bool {
	n := f.pkts[0]
	if f.proto != 17 || f.sport == 53 || f.cport == 53 || f.again >= maxRejudge && n&(n-1) != 0 {
		return false
	}
	return p.judgeAgain(f)
}

// judgeAgain reports whether f, a forwarded flow decided dropped by the
// policy (not denied by capture, nor opened before enforce), not reported
// yet, whose server sent nothing, is to be judged again, and counts it
// (to 255).
func (p *proc) judgeAgain(f *flow) bool {
	if !f.decided || !f.ruled || f.dec.Allowed() || f.reported || f.closed ||
		f.inbound || f.guarded || f.revoked || f.enforceJudged || f.pkts[1] != 0 {
		return false
	}
	if f.again < 255 {
		f.again++
	}
	return true
}

// resetTaken reports whether the server takes a client's reset at
// sequence number seq of f, which capture still reads (its name not yet
// found, or its requests followed): Linux takes one only at the next
// byte it expects (RFC 5961; one elsewhere in the window gets a challenge
// ACK, one outside it is dropped). Capture, which read every byte before
// it, expects the same byte; a reset elsewhere ends no flow, else a
// client could end capture's flow with a reset the server ignores and
// send its hello, or a later request, unread (e2e
// TestCaptureEvasion/rst-out-of-window). Where capture missed a segment,
// the server's acknowledgement says what it expects: a reset there is
// taken too (a reset past a gap the server has not filled either is not,
// and the flow waits for the missing bytes, as without the reset). A flow
// no longer read ends at any reset, as before.
func (p *proc) resetTaken(f *flow, seq uint32) bool {
	if !f.inspect && f.req == nil {
		return true
	}
	nxt, ok := f.rcvNext()
	return !ok || seq == nxt || f.srvAcked && seq == f.srvAck
}

// srvHasMore reports whether the server acknowledged client bytes past
// those capture has in order: capture lost a segment (a kernel drop) the
// server got, and what the server read is not known. A hello or request
// head capture waits on so did not time out on the server: settle decides
// the flow by address, as a flow that ends with a segment missing is, and
// headWaited stops following it (TestLostSegmentServerAnswers).
func (f *flow) srvHasMore() bool {
	nxt, ok := f.rcvNext()
	return ok && f.srvAcked && int32(f.srvAck-nxt) > 0
}

// clientReset ends f at a client's reset taken, the client's stream
// ending before sequence number end.
func (p *proc) clientReset(f *flow, end uint32) {
	end = f.readSeq(end)
	p.clientEnd(f, end)
	p.helloCut(f, end)
	p.end(f, "rst")
}

// holdReset keeps a client's reset at seq that resetTaken did not take
// because it lies past the bytes capture has, no further than a stack
// sends one: at or past the furthest byte capture saw (the client's next
// byte, or its FIN's), within maxStream of the bytes in order. Capture may
// have lost the bytes before it (a kernel drop) that the server got, with
// no time to acknowledge them before the reset (its delayed ACK, or an
// answer under way): the server then took it. Should the missing bytes
// come, capture reads on, as the server did not take it; else, where
// capture would wait for them until a hello or request head times out
// (settle, headWaited), the reset is taken then, and the flow ends as it
// would have at the reset, decided by address, not denied as
// hello-timeout (TestLostSegmentThenReset). A client that sends the rest
// of its hello after that is not read (README "Security"). A reset
// elsewhere stays ignored.
func (p *proc) holdReset(f *flow, seq uint32) {
	nxt, ok := f.rcvNext()
	if !ok || int32(seq-nxt) <= 0 || int32(seq-nxt) > maxStream+1 {
		return
	}
	if !f.cliSeen || int32(seq-f.cliEnd) >= 0 {
		f.rstHeld, f.rstSeq = true, seq
	}
}

// redirected reports whether enforce mode redirects TCP to port to the
// transparent proxy (firewall/render.go, redirectRules): every port by
// default, else the ports of Config.TCPPorts and those of host/path rules
// (policy.Engine.HostPathPorts, of the policy in force now). Other TCP
// goes through nftables' forward chain, which accepts it by destination
// address alone (a CIDR rule, "*" but the guarded ranges, or an address
// egressd's DNS gave out for a rule's name) and drops the rest: no SNI or
// Host is read. Capture judges such a flow so, at its first packet, in
// either mode.
func (p *proc) redirected(port uint16) bool {
	ports := p.c.cfg.TCPPorts
	if ports == nil {
		return true
	}
	for _, pr := range ports {
		if pr.Contains(port, policy.TCP) {
			return true
		}
	}
	if eng := p.c.deps.Policy.Load(); eng != p.pathEng {
		p.pathEng, p.pathPorts = eng, eng.HostPathPorts()
	}
	for _, pr := range p.pathPorts {
		if pr.Contains(port, policy.TCP) {
			return true
		}
	}
	return false
}

// Urgent data. A client's send with MSG_OOB sets the URG flag and an
// urgent pointer on its segments: the byte at sequence number seq+ptr-1
// (RFC 793's reading, which Linux follows; seq itself for a pointer of
// 0) is urgent, and a receiver without SO_OOBINLINE (the transparent
// proxy, most servers) reads the stream without it. Linux keeps one mark:
// a pointer behind what it has received marks nothing, nor does one not
// after the mark it holds; a newer one replaces it, and the older byte is
// back in line unless the reader had read past it already. Capture takes
// the marked byte out of the client's stream (clientData), so that the
// hello or heads it parses are those the proxy parses (e2e
// TestHardeningTCP/urgent-data): judged on the bytes in sequence order, an
// allowed hello would read as hello-malformed, and a client could show
// capture one name and the proxy another. Where a second mark comes after
// the first byte arrived, whether that byte was read past depends on when
// the proxy read: its stream is not known, so the flow is denied
// (urgent-data) rather than parsed or decided by address, and a followed
// flow's next request is (and it is no longer followed). So is a flow
// whose mark comes after bytes at or past the byte it moves were held out
// of order (placed before capture knew of the mark). A SYN's URG flag
// marks nothing (Linux reads none from it).

// urgent takes the URG flag of a client segment at sequence number seq
// with urgent pointer ptr, before its data.
func (p *proc) urgent(f *flow, seq uint32, ptr uint16) {
	if f.req == nil && !f.inspect {
		return // the stream is read no more
	}
	u := seq + uint32(ptr)
	if ptr > 0 {
		u--
	}
	if nxt, ok := f.rcvNext(); ok && int32(u-nxt) < 0 {
		return // received already: Linux does not replay a mark
	}
	if f.urg {
		if int32(u-f.urgSeq) <= 0 {
			return // the same mark (a send cut into segments), or an older one
		}
		if f.urgGot {
			p.urgentUnknown(f)
			return
		}
		// The older byte has not come: no reader can have passed it,
		// it is back in line.
	}
	// Bytes past the byte a mark moves, held out of order, were placed
	// before capture knew of it: at their own sequence numbers where
	// Linux takes the new byte out even if it came already (it skips a
	// mark's byte whether it came before the mark or after), one back
	// where an older byte that had not come is back in line. What
	// capture holds is not the stream the proxy reads.
	moved := u
	if f.urg {
		moved = f.urgSeq
	}
	if f.cliSeen && int32(f.cliEnd-moved) > 0 {
		p.urgentUnknown(f)
		return
	}
	f.urg, f.urgGot, f.urgSeq = true, false, u
}

// urgentUnknown: f's client stream, as the proxy read it, is not known
// (see above).
func (p *proc) urgentUnknown(f *flow) {
	f.urg = false
	if f.req != nil {
		p.request(f, nil, errUrgent)
		p.stopFollow(f)
		return
	}
	p.deny(f, ReasonUrgentData, "", audit.NameNone)
	p.done(f)
}

// errUrgent stands for a client stream with two urgent marks in it.
var errUrgent = errors.New("capture: urgent data: the stream the proxy read is not known")

// rcvNext is the sequence number after the client's bytes received in
// order, as the receiver's rcv_nxt; false when no base is known.
func (f *flow) rcvNext() (uint32, bool) {
	if !f.haveBase[0] {
		return 0, false
	}
	e := f.base[0]
	if s := f.st[0]; s != nil {
		e += uint32(len(s.buf))
	}
	if f.urg && (int32(e-f.urgSeq) > 0 || e == f.urgSeq && f.urgGot) {
		e++ // the urgent byte is in no buffer
	}
	return e, true
}

// readSeq maps the client's sequence number x to the stream without the
// urgent byte: bytes after it move one back.
func (f *flow) readSeq(x uint32) uint32 {
	if f.urg && int32(x-f.urgSeq) > 0 {
		return x - 1
	}
	return x
}

// clientData passes a client segment at sequence number seq to the
// request follower or the name search, without the urgent byte.
func (p *proc) clientData(f *flow, seq uint32, data []byte) {
	if end := seq + uint32(len(data)); !f.cliSeen || int32(end-f.cliEnd) > 0 {
		f.cliEnd, f.cliSeen = end, true
	}
	if d := int32(f.urgSeq - seq); f.urg && d >= 0 && int(d) < len(data) {
		f.urgGot = true
		cut := p.cut
		p.cut = 0 // the capture cut the end of the segment, after the first piece
		if d > 0 {
			p.clientPiece(f, seq, data[:d])
		}
		p.cut = cut
		if rest := data[d+1:]; len(rest) > 0 || cut > 0 {
			p.clientPiece(f, f.urgSeq, rest)
		}
		return
	}
	if d := int32(f.urgSeq - seq); f.urg && d >= 0 && int(d) < len(data)+p.cut {
		// The urgent byte is in the part the capture cut off: of the
		// bytes cut, the stream holds one fewer.
		f.urgGot = true
		p.cut--
		p.clientPiece(f, seq, data)
		p.cut++
		return
	}
	p.clientPiece(f, f.readSeq(seq), data)
}

// clientPiece passes client bytes at sequence number seq (of the stream
// without the urgent byte) on.
func (p *proc) clientPiece(f *flow, seq uint32, data []byte) {
	switch {
	case f.req != nil:
		p.followData(f, seq, data)
	case f.inspect:
		p.tcpData(f, 0, seq, data)
	}
}

// helloCut: the client ended its stream at sequence number end, with a
// FIN or a RST. A TLS flow whose hello began and did not complete, every
// byte before the FIN or RST seen, is one the proxy reads to the end of
// stream or the reset and refuses as hello-malformed (its peek maps both
// to that: TestTransparent/hello-cut-by-reset); capture says so too. With
// bytes missing (capture lost a segment) it cannot tell, and the flow is
// decided as before.
func (p *proc) helloCut(f *flow, end uint32) {
	s := f.st[0]
	if f.decided || !f.inspect || f.app != appTLS || s == nil || s.full || s.pendLen != 0 ||
		!f.haveBase[0] || end-f.base[0] != uint32(len(s.buf)) {
		return
	}
	p.deny(f, ReasonHelloBad, "", audit.NameNone)
	p.giveUp(f)
}

func (p *proc) tcpData(f *flow, dir int, seq uint32, data []byte) {
	end := seq + uint32(len(data))
	defer func() { p.followCut(f, end, p.cut) }() // when the first head started a follow
	if !f.haveBase[dir] {
		f.base[dir], f.haveBase[dir] = seq, true
	}
	off := int32(seq - f.base[dir])
	if off < 0 {
		if int(-off) >= len(data) {
			return
		}
		data = data[-off:]
		off = 0
	}
	if !p.streamRoom(f, len(data)) {
		return
	}
	s := f.st[dir]
	if s == nil {
		s = &stream{}
		f.st[dir] = s
	}
	grew := s.add(uint32(off), data)
	p.charge(f)
	if s.conflict && f.inspect {
		// Which copy the server read is not known (stream.go).
		p.deny(f, ReasonStreamConflict, "", audit.NameNone)
		p.done(f)
		return
	}
	if grew {
		p.examine(f, dir)
	}
	if f.inspect && s.full {
		if f.app == appTLS || f.app == appHTTP {
			p.deny(f, ReasonHelloTooLarge, "", audit.NameNone) // over the proxy's cap too
		}
		p.giveUp(f)
	}
	if f.inspect && p.cut > 0 && f.app != appDNS {
		// The capture cut off bytes the name search still needed (the
		// live snap filter keeps 16 KiB of a packet): what it reads now
		// is not what the proxy would read, and the bytes never come.
		// Given up, as a missing segment is (decided by address), not
		// waited on until classifyWait calls it a hello-timeout.
		p.giveUp(f)
	}
}

// clientEnd handles the client's FIN or RST at stream offset end of f: an
// HTTP request head begun and not complete by then is refused, as the
// proxy's head reader refuses a head the client ends or resets
// (http-malformed). Only when
// capture has every byte before the FIN: with a segment missing, the head
// may be complete on the wire.
func (p *proc) clientEnd(f *flow, end uint32) {
	s := f.st[0]
	if !f.inspect || f.app != appHTTP || s == nil || len(s.buf) == 0 || s.gap() || int(int32(end-f.base[0])) != len(s.buf) {
		return
	}
	p.deny(f, ReasonHTTPBad, "", audit.NameNone)
	p.done(f)
}

var httpMethods = [][]byte{
	[]byte("GET "), []byte("POST "), []byte("HEAD "), []byte("PUT "), []byte("DELETE "),
	[]byte("OPTIONS "), []byte("PATCH "), []byte("TRACE "), []byte("CONNECT "),
}

// httpStart says whether b starts an HTTP request: yes, no, or not yet
// known (b is a prefix of a method, or of a request line). It mirrors the
// proxy's looksHTTP (proxy/httphead.go), which reads a first request with
// any method as HTTP: a flow capture took for another protocol would be
// judged by address, where enforce mode decides it by its Host. Both take
// the request line of any method from httpwire.RequestLineStart.
func httpStart(b []byte) (yes, maybe bool) {
	for _, m := range httpMethods {
		if bytes.HasPrefix(b, m) {
			return true, false
		}
		if len(b) < len(m) && bytes.HasPrefix(m, b) {
			maybe = true
		}
	}
	if y, m := httpwire.RequestLineStart(b); y {
		return true, false
	} else if m {
		maybe = true
	}
	return false, maybe
}

// examine looks at the reassembled bytes of a TCP flow for a name.
func (p *proc) examine(f *flow, dir int) {
	b := f.st[0].bufOrNil()
	if dir == 0 && len(b) > 0 {
		f.started = true
	}
	if f.app == appUnknown {
		switch {
		case f.sport == 53 || f.cport == 53:
			f.app = appDNS
		case len(b) == 0:
			return
		case b[0] == 22:
			f.app = appTLS
		default:
			yes, maybe := httpStart(b)
			switch {
			case yes:
				f.app = appHTTP
			case maybe:
				return
			default:
				f.app = appOther
				p.done(f)
				return
			}
		}
	}
	switch f.app {
	case appTLS:
		// The proxy's parser, with the proxy's limits (internal/tlshello).
		h, err := tlshello.Read(b, &p.scratch)
		switch {
		case err == tlshello.ErrShort:
			return
		case err != nil && h.Size == 0:
			// Starts as TLS and its records do not hold a hello: the
			// proxy refuses it.
			reason := ReasonHelloBad
			if err == tlshello.ErrTooLarge {
				reason = ReasonHelloTooLarge
			}
			p.deny(f, reason, "", audit.NameNone)
			f.gaveUp = true
			p.done(f)
			return
		}
		p.hello(f, h, err, audit.NameSNI)
	case appHTTP:
		// The proxy's parser, on what the proxy would have read: it
		// refuses a head with bare LF line ends at once, complete or
		// not, and waits for the rest of any other head up to its cap
		// (HelloMaxBytes, 64 KiB by default: maxStream). ParseHead's
		// answer changes only once the bytes hold the end of a head or
		// a bare LF ending a line ("\n\n"), so only the bytes since the
		// last look are searched for them: a head that arrives a few
		// bytes a packet costs no rescans of its whole length.
		from := max(0, f.headScan-3)
		f.headScan = len(b)
		if len(b) < maxStream && !bytes.Contains(b[from:], []byte("\r\n\r\n")) && !bytes.Contains(b[from:], []byte("\n\n")) {
			return
		}
		h, err := httpwire.ParseHead(b)
		if errors.Is(err, httpwire.ErrHeadIncomplete) {
			// Over the cap without an end: the proxy refuses it.
			err = httpwire.ErrHeadTooLarge
		}
		// decideHTTP decides with the path without its query (and
		// ParseHead drops the fragment).
		f.path, _, _ = strings.Cut(h.Path, "?")
		if err != nil {
			// The proxy refuses the head before any rule is asked.
			p.deny(f, headReason(err), "", audit.NameNone)
			p.done(f)
			return
		}
		if h.Host != "" {
			p.observe(obsHost, h.Host, 0, f)
			if _, err := netip.ParseAddr(h.Host); err != nil {
				f.name, f.nameSrc = h.Host, audit.NameHost
			}
		}
		if !p.followsRequests() {
			p.done(f)
			return
		}
		// The flow is decided on its first request; the rest of the
		// client's stream goes through the request follower, as the
		// proxy's does after it replays the first head.
		s := f.st[0]
		f.inspect = false
		f.st[1] = nil
		p.classify(f)
		if f.dec.Allowed() {
			p.watchSent(f, &stream{buf: bytes.Clone(s.buf[:h.Len])}, nil)
		}
		f.req = &httpwire.ReqStream{MaxHead: maxStream}
		f.req.Start(&h)
		s.consume(h.Len)
		f.base[0] += uint32(h.Len)
		p.follow(f)
		p.charge(f)
	case appDNS:
		s := f.st[dir]
		if s == nil {
			return
		}
		for {
			o := f.dnsOff[dir]
			if len(s.buf) < o+2 {
				return
			}
			n := int(binary.BigEndian.Uint16(s.buf[o:]))
			if len(s.buf) < o+2+n {
				return
			}
			p.dnsMessage(s.buf[o+2:o+2+n], f, dir == 0)
			f.dnsOff[dir] = o + 2 + n
		}
	}
}

func (s *stream) bufOrNil() []byte {
	if s == nil {
		return nil
	}
	return s.buf
}

// hello records a complete ClientHello, as tlshello read it (err: how it
// refused it).
func (p *proc) hello(f *flow, h tlshello.Hello, err error, src audit.NameSource) {
	p.stats.hellos.Add(1)
	if p.c.observe != nil {
		p.c.observe(observation{Kind: obsHello, Size: h.Size, Flow: makeKey(f.cli, f.cport, f.srv, f.sport, f.proto)})
	}
	if err != nil {
		p.stats.badHellos.Add(1)
	}
	if h.DupSNI {
		// The proxy refuses a hello naming two servers (THREATS.md A5),
		// and says so before it calls a hello malformed.
		p.deny(f, ReasonDuplicateSNI, "", audit.NameNone)
	}
	if err != nil {
		// The proxy refuses a hello that does not parse; the name read
		// before the fault still shows what the client asked for.
		name, ns := "", audit.NameNone
		if h.SNI != "" {
			name, ns = h.SNI, src
		}
		p.deny(f, ReasonHelloBad, name, ns)
	}
	// A server_name read before the hello turned out malformed is still
	// what the client asked for, and what the report should show. An IP
	// literal names no server: the proxy decides the hello as one without
	// SNI, by address and the names given out for it.
	if tlshello.Named(h.SNI) {
		f.name, f.nameSrc = h.SNI, src
		kind := obsSNI
		if src == audit.NameQUIC {
			kind = obsQUICSNI
		}
		p.observe(kind, h.SNI, 0, f)
	} else {
		f.nameSrc = audit.NameNoSNI
	}
	read, q := f.st[0], f.quic
	p.done(f)
	p.watchSent(f, read, q)
}

// After the decision: a decoy the server never read.
//
// A client segment capture reads may never reach the server: one with a
// wrong TCP checksum is forwarded by the gateway (which does not check
// it) and dropped by the server's kernel, and capture cannot tell it from
// a good one (a frame from a local stack over veth or tap carries a
// partial checksum and the packet socket's "checksum not ready" flag,
// which the socket library does not pass on). A client can so show
// capture a ClientHello naming an allowed host and the server another,
// sent after it at the same sequence number (e2e
// TestCaptureEvasion/tcp-checksum). Capture decides on the first complete
// hello (or first request head), so it keeps, for a TCP flow that hello
// let through in audit mode (or offline), the bytes it read until the
// server acknowledges them (sent), and a later copy of any of them that
// differs is the server's: the flow is denied as stream-conflict after
// all. A retransmission of the same bytes, as stacks send, changes
// nothing. The bytes are held for a round trip, counted in
// MaxStreamBytes. ackedWait after the server's acknowledgement they give
// way to their digest, which stays for the flow's life (sentHead.digest;
// the bytes a while: ackedWait says why): a LAN client can
// forge the acknowledgement (a frame from the server's address, which in
// audit mode the gateway routes back out to the client, so capture sees
// it sent by the gateway), and a later copy of the whole run that
// differs, or of part of it, is still the server's: stream-conflict
// (e2e TestCaptureEvasion/forged-ack). The head of each later request of a followed
// plain-HTTP flow that the follower allowed is kept so too (watchHead;
// e2e TestCaptureEvasion/tcp-checksum-later): a copy of it that differs
// is a request denied as stream-conflict, and the flow is no longer
// followed. At most maxSentHeads heads wait for their acknowledgement;
// past that the flow is no longer followed either (Stats.Unfollowed).
// Body bytes and chunk-size lines are not kept: a decoy of a chunk-size
// line is residual (README "Capture in audit mode").
//
// A QUIC client's hello is read from the CRYPTO frames of its Initials,
// over UDP, with no acknowledgement capture can read (the server's ACK
// frames count packets, and a client may start another connection on the
// same addresses and ports to another DCID, whose server connection reads
// its own hello). For a QUIC flow its hello let through, capture keeps
// the hello's bytes and the flow's opener for the flow's life, and opens
// each later client Initial (long header: a 1-RTT packet costs one byte's
// test): CRYPTO data that differs from the hello at its offset denies the
// flow as stream-conflict (quicWatch).

// sentHead is one run of client bytes kept until the server acknowledges
// it: those f was decided on, or (req) a later request's head. Past
// heldWait unacknowledged, its bytes give way to a digest of them (n, sum;
// data nil): see release. Those f was decided on give way to their digest
// ackedWait after the server's acknowledgement too, which stays (see
// above); a later request's head is dropped at it.
type sentHead struct {
	seq  uint32 // the sequence number of its first byte (QUIC: 0)
	data []byte
	req  bool
	at   time.Time // when it was kept
	// acked is when the server acknowledged it (those f was decided
	// on: kept ackedWait more, see release).
	acked time.Time
	n     int    // its length, once released
	sum   uint64 // the digest of its bytes, once released
	out   uint64 // the client's bytes of the flow (flow.bytes[0]) when it was kept
	last  byte   // its last byte, once released
	// keys: QUIC, the Initial keys of the connection it was read from
	// (its version and first DCID): the flow's first, or a later
	// connection's from the same port (quicAttempt); more, the keys of
	// other DCIDs it was read under too (after a Retry: quicOpener.more).
	keys *quicKeys
	more []*quicKeys
}

// digest replaces h's bytes with their length and digest (see differs).
func (h *sentHead) digest() {
	if h.data == nil {
		return
	}
	if len(h.data) > 0 {
		h.last = h.data[len(h.data)-1]
	}
	h.n, h.sum, h.data = len(h.data), maphash.Bytes(sentSeed, h.data), nil
}

// sentSpan is how many bytes a client sends on a flow after a run it
// keeps (or the digest of) before capture stops comparing copies with it: its
// sequence numbers come round again after 4 GiB.
const sentSpan = 1 << 31

// size is the number of bytes h stands for.
func (h *sentHead) size() int {
	if h.data == nil {
		return h.n
	}
	return len(h.data)
}

// differs reports whether data, at sequence number seq, overlaps h and
// differs from it. For a released h (bytes gone, a digest kept) it
// reports whether data overlaps h other than as a copy of h whole that
// sums the same: a copy of part of it can no longer be compared, and is
// taken as differing (the safe side; README "Capture in audit mode"),
// but for one zero byte at its last (a keepalive after the
// acknowledgement).
func (h *sentHead) differs(seq uint32, data []byte) bool {
	off := int(int32(seq - h.seq)) // data's offset in h
	if n := h.size(); off == n-1 && len(data) == 1 && (h.data == nil || !h.acked.IsZero()) {
		// A keepalive after the acknowledgement (Windows') carries
		// one byte at snd_una-1, zero: no copy. A byte that would
		// change a name's last letter is one.
		last := h.last
		if h.data != nil {
			last = h.data[n-1]
		}
		return data[0] != 0 && data[0] != last
	}
	if h.data != nil {
		return differs(h.seq, h.data, seq, data)
	}
	lo, hi := max(off, 0), min(off+len(data), h.n)
	if lo >= hi {
		return false
	}
	return lo != 0 || hi != h.n || maphash.Bytes(sentSeed, data[-off:h.n-off]) != h.sum
}

// heldWait bounds how long a flow keeps the bytes of a sentHead its
// server does not acknowledge: the proxy's hello timeout, the time
// capture waits for a hello. A live server acknowledges them in a round
// trip; one silent for longer holds nothing of capture's but a digest.
const heldWait = classifyWait

// ackedWait is how long a flow keeps the bytes it was decided on after
// the server acknowledged them, before they give way to their digest: an
// acknowledgement capture saw can be lost on the LAN after it (a lossy
// Wi-Fi link), and the client's stack then sends part of those bytes
// again (a hello past one segment: its retransmission timer resends the
// first, a tail loss probe the last, at a round trip or two and then
// twice as late each time), which only the bytes tell from a decoy's
// (TestSentAckedRetransmitted). A copy of part of them past it is taken
// as differing (README "Capture in audit mode").
const ackedWait = 3 * time.Second

// sentSeed keys the digests of released sentHeads: a client cannot make
// two runs of bytes that sum the same without it.
var sentSeed = maphash.MakeSeed()

// release replaces the bytes of each sentHead of f kept past heldWait
// with their digest (see sentHead.differs), and drops a QUIC flow's
// scratch buffer: the sweep calls it, so a flow whose server stays silent
// holds about 40 bytes a run instead of its hello until it ends.
func (p *proc) release(f *flow) {
	freed := false
	for i := range f.sent {
		h := &f.sent[i]
		if h.data != nil && (p.now.Sub(h.at) >= heldWait || !h.acked.IsZero() && p.now.Sub(h.acked) >= ackedWait) {
			h.digest()
			freed = true
		}
	}
	if freed {
		if f.quic != nil {
			f.quic.buf = nil
		}
		p.charge(f)
	}
	if q := f.quic; q != nil && q.next != nil && p.now.Sub(q.nextAt) >= heldWait {
		p.sentDeny(f) // a new attempt's hello that never completed
	}
}

// maxSentHeads bounds the later request heads a flow keeps at once.
const maxSentHeads = 8

// watchSent keeps s, the client bytes f was just decided on (a
// ClientHello, or a first request head, which the request follower then
// consumes: a copy), in f.sent (see above) where that is needed; for a
// QUIC flow, q is its opener, kept as f.quic.
func (p *proc) watchSent(f *flow, s *stream, q *quicOpener) {
	if f.proto != 6 && (f.proto != 17 || q == nil) || s == nil || len(s.buf) == 0 || s.conflict || f.urg || !f.dec.Allowed() || !p.followsRequests() {
		return
	}
	if q != nil {
		q.pending = nil
		f.quic = q
	}
	f.sent = append(f.sent[:0], sentHead{seq: f.base[0], data: s.buf, at: p.now, out: f.bytes[0]})
	if q != nil && q.keys != nil {
		f.sent[0].keys, f.sent[0].more = q.keys, q.more
	}
	p.charge(f)
}

// quicWatch opens a client Initial of f, a QUIC flow that keeps its hello
// (see above), and denies f where its CRYPTO data differs from the hello
// of its connection: the kept hello whose keys open it (RFC 9001 §5.2: a
// client's Initials to the server's chosen DCID keep the keys of its
// first DCID). An Initial that no kept hello's keys open is a new attempt
// (quicAttempt): in another version (after a Version Negotiation packet,
// RFC 9000 §6.2), to a Retry's DCID, or a new connection from the same
// port (quic-go's Transport, an HTTP/3 client's pool, a 0-RTT
// resumption), each with a hello of its own that its server reads.
func (p *proc) quicWatch(f *flow, payload []byte) {
	if len(f.sent) == 0 {
		f.quic = nil
		return
	}
	v := binary.BigEndian.Uint32(payload[1:5])
	dcid, ok := firstDCID(payload)
	if !ok {
		return
	}
	var h *sentHead
	var hk *quicKeys
	for i := range f.sent {
		if k := f.sent[i].keys; k != nil && k.is(v, dcid) {
			h, hk = &f.sent[i], k
		}
	}
	for i := 0; h == nil && i < len(f.sent); i++ {
		for _, k := range append([]*quicKeys{f.sent[i].keys}, f.sent[i].more...) {
			if k == nil || k.version != v {
				continue
			}
			if f.quic.opens(k, payload) {
				h, hk = &f.sent[i], k
				break
			}
		}
	}
	if h == nil {
		p.quicAttempt(f, v, dcid, payload)
		return
	}
	conflict := false
	n, _ := f.quic.openWith(hk, payload, func(off uint64, data []byte) {
		conflict = conflict || off < maxStream && h.differs(uint32(off), data)
	})
	p.stats.quicOpened.Add(uint64(n))
	if conflict {
		p.sentDeny(f)
	}
}

// maxQUICAttempts bounds the connections a QUIC flow keeps a hello of; a
// kept hello older than heldWait gives way to a new one (its server has
// long finished with Initials, and a later Initial to it is a new attempt
// again, held to the same name).
const maxQUICAttempts = 4

// quicAttempt reads the hello of a client Initial of f, in version v to
// dcid, that no kept hello's keys open (quicWatch): a new attempt, whose
// server reads that hello. Capture reads it whole: one that names the
// host f was decided on (so is decided the same), or another the policy
// allows by its name (nameAllowed: a second connection of one socket to
// another allowed host at the same address), is kept and watched as the
// first is, which stays watched too (a server of the first may still
// read a copy of it); any other (a name the policy does not allow by
// itself, one that does not parse, one more than maxQUICAttempts within
// heldWait, a copy that conflicts, Initials of an unfinished attempt to
// more than maxQUICKeys DCIDs more) is a stream-conflict: which hello a
// server read is not known, and a decoy must not make a denied name look
// allowed. Initials to another DCID while an attempt's hello is
// unfinished (a Retry's) add to its hello, as before the decision.
func (p *proc) quicAttempt(f *flow, v uint32, dcid, payload []byte) {
	q := f.quic
	// The unfinished attempt's keys open its Initials, to its first DCID
	// or to the server's chosen one (RFC 9001 §5.2), and after a Retry
	// the Retry's keys (nextMore); any other Initial is another
	// attempt's.
	var k *quicKeys
	if q.next != nil {
		for _, nk := range append([]*quicKeys{q.nextKeys}, q.nextMore...) {
			if nk.version == v && q.opens(nk, payload) {
				k = nk
				break
			}
		}
	}
	if k == nil {
		var err error
		if k, err = initialKeys(v, dcid); err != nil {
			return
		}
		if !q.opens(k, payload) {
			// No client Initial of its DCID (a Handshake or 0-RTT
			// packet, one that does not open): no server reads a
			// hello from it.
			return
		}
		switch {
		case q.next != nil && len(q.nextMore) < maxQUICKeys:
			// Another DCID while the attempt's hello is unfinished:
			// a Retry's (its server sends one after the first of the
			// hello's Initials, and the client sends the hello again
			// to the Retry's DCID, under its keys), or a second
			// attempt. Its CRYPTO data goes to the attempt's stream,
			// as before the decision (quicPacket): a hello that
			// differs is a conflict.
			q.nextMore = append(q.nextMore, k)
		case q.next != nil:
			p.sentDeny(f)
			return
		default:
			if len(f.sent) >= maxQUICAttempts {
				old := slices.IndexFunc(f.sent, func(h sentHead) bool { return p.now.Sub(h.at) >= heldWait })
				if old >= 0 {
					f.sent = slices.Delete(f.sent, old, old+1)
				}
			}
			if len(f.sent) >= maxQUICAttempts {
				p.sentDeny(f)
				return
			}
			q.next, q.nextKeys, q.nextMore, q.nextAt = &stream{}, k, nil, p.now
		}
	}
	if p.streamBytes+len(payload) > p.c.cfg.MaxStreamBytes {
		p.sentDeny(f)
		return
	}
	s := q.next
	n, _ := q.openWith(k, payload, func(off uint64, data []byte) {
		if off < maxStream {
			s.add(uint32(off), data)
		}
	})
	p.stats.quicOpened.Add(uint64(n))
	defer p.charge(f)
	m, err := tlshello.Complete(s.buf)
	switch {
	case s.conflict || s.full || err != nil && err != tlshello.ErrShort:
		p.sentDeny(f)
	case err == nil:
		h, err := tlshello.Parse(s.buf[:m])
		if err != nil || h.DupSNI || f.name == "" && f.nameSrc != audit.NameNoSNI || h.SNI != f.name && !p.nameAllowed(f, h.SNI) ||
			h.SNI != f.name && !p.otherName(f, h.SNI) {
			p.sentDeny(f)
			return
		}
		f.sent = append(f.sent, sentHead{data: s.buf, at: p.now, keys: q.nextKeys, more: q.nextMore})
		q.next, q.nextKeys, q.nextMore = nil, nil, nil
	}
}

// eventOthers returns the names f's hellos carried other than its
// record's (evName: the first hello's, or after a reload the name its
// address was learned for, which it is denied for), normalized, in the
// order they came: its event's OtherNames. A record moved to a learned
// name no hello carried shows all four hellos' names there
// (audit.MaxOtherNames is one more than maxOtherNames; before session 32
// the last was left out: TestRedecideQUICFourNames).
//
// Where the record is the first hello's (nearly always) that is
// f.otherNames itself, capped at its length, which no event allocates
// for: capture only appends to it (past the events' length), or drops it.
func (f *flow) eventOthers() []string {
	if len(f.otherNames) == 0 && (f.name == "" || f.evName == f.name) {
		return nil
	}
	rec, _ := policy.NormalizeName(f.evName)
	first, ok := policy.NormalizeName(f.name)
	withFirst := ok && f.name != "" && f.app == appQUIC && rec != "" && first != rec
	if !withFirst && !slices.Contains(f.otherNames, rec) {
		return f.otherNames[:len(f.otherNames):len(f.otherNames)]
	}
	out := make([]string, 0, len(f.otherNames)+1)
	if withFirst {
		out = append(out, first)
	}
	for _, n := range f.otherNames {
		if n != rec && len(out) < audit.MaxOtherNames {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// named reports whether a hello of f, a QUIC flow, named n, a
// normalized name: its first (f.name) or another (f.otherNames).
func (f *flow) named(n string) bool {
	first, ok := policy.NormalizeName(f.name)
	return ok && f.name != "" && n == first || slices.Contains(f.otherNames, n)
}

// otherName records name, which a new QUIC connection of f named and
// the policy allows by itself (quicAttempt), in f.otherNames where it is
// not f's first name or one recorded already. It reports false where
// f.otherNames holds maxOtherNames already: a host the record
// could not show would be hidden, so the caller denies the flow, as it
// denies one connection more than it keeps hellos of; likewise where the
// name does not fit in Config.MaxStreamBytes (the names are held for the
// flow's life, counted there: charge).
func (p *proc) otherName(f *flow, name string) bool {
	n, _ := policy.NormalizeName(name) // nameAllowed took it
	if f.named(n) {
		return true
	}
	if len(f.otherNames) >= maxOtherNames {
		return false
	}
	p.charge(f) // the hello just read
	cost := len(n)
	if f.otherNames == nil {
		cost += maxOtherNames * stringHeader
	}
	if p.streamBytes+cost > p.c.cfg.MaxStreamBytes {
		p.stats.streamLimited.Add(1)
		return false
	}
	if f.otherNames == nil {
		f.otherNames = make([]string, 0, maxOtherNames)
	}
	f.otherNames = append(f.otherNames, n)
	return true
}

// maxOtherNames bounds the other names a QUIC flow keeps (flow.otherNames):
// its kept hellos' names but the first's. Its events carry up to one more
// (audit.MaxOtherNames): the first hello's, where a reload recorded the
// flow under the name its address was learned for (eventOthers).
const maxOtherNames = maxQUICAttempts - 1

// stringHeader is the size of a string header (64-bit): what a slot of
// flow.otherNames holds besides its bytes.
const stringHeader = 16

// nameAllowed reports whether the policy allows name itself, as the
// proxy decides a hello's name (decideIn: the guard, the address vouched
// for), to f's client, address and port: a new QUIC connection on f's
// addresses and ports (quicAttempt) may name another host than f's first,
// where that is no decoy. A UDP flow is decided by its address, for
// either connection the same; the name is what the record shows, and a
// first hello that names an allowed host must not hide a second that
// names one the policy does not allow. The client's MAC is the frame's
// (flowInput), the one the flow is judged with everywhere else: the
// forward chain matches it, its events carry it (eventMAC), the ledger
// credits its other names and a replay judges them with it. (Before
// session 31 (Q4) it was the neighbour table's, the proxy's, which
// never sees UDP: a client the table has none for, a rule of the second
// name naming the frame's MAC, was a false stream-conflict:
// TestQUICOtherNameFrameMAC.)
func (p *proc) nameAllowed(f *flow, name string) bool {
	n, ok := policy.NormalizeName(name)
	if !ok || !tlshello.Named(name) {
		return false
	}
	eng := p.c.deps.Policy.Load()
	in := p.flowInput(f, "")
	in.Name = n
	d := p.special(eng, f, in, eng.Decide(in), true)
	return d.Allowed() && p.vouched(eng, in, d)
}

// watchHead keeps head, a later request head of f at sequence number seq
// that the follower allowed (a slice of a packet or of st[0]: a copy), in
// f.sent (see above). It reports false where it stopped following f: the
// bound on heads or on all flows' buffers.
func (p *proc) watchHead(f *flow, seq uint32, head []byte) bool {
	if f.urg {
		return true
	}
	n := 0
	for _, h := range f.sent {
		if h.req {
			n++
		}
	}
	if n >= maxSentHeads {
		p.unfollow(f)
		return false
	}
	if !p.streamRoom(f, len(head)) {
		return false
	}
	f.sent = append(f.sent, sentHead{seq: seq, data: bytes.Clone(head), req: true, at: p.now})
	p.charge(f)
	return true
}

// checkSent takes a packet of f, which holds bytes it keeps (f.sent), in
// direction dir at sequence number seq (p.tcp): the server's
// acknowledgement of them ends their watch, a client's copy of them that
// differs denies the flow (the bytes it was decided on) or a request (a
// later head).
func (p *proc) checkSent(f *flow, dir int, seq uint32) {
	t := &p.tcp
	if dir == 1 {
		if !t.ACK {
			return
		}
		n, freed := 0, false
		for _, h := range f.sent {
			if int32(t.Ack-(h.seq+uint32(h.size()))) >= 0 {
				if h.req {
					freed = freed || h.data != nil
					continue
				}
				if h.acked.IsZero() {
					h.acked = p.now // the bytes f was decided on: see release
				}
			}
			f.sent[n] = h
			n++
		}
		clear(f.sent[n:])
		if f.sent = f.sent[:n]; n == 0 {
			f.sent = nil
		}
		if freed {
			p.charge(f)
		}
		return
	}
	for i := range f.sent {
		h := &f.sent[i]
		if f.bytes[0]-h.out >= sentSpan || !h.differs(seq, t.Payload) {
			continue
		}
		if h.req {
			p.sentConflict(f)
		} else {
			p.sentDeny(f)
		}
		return
	}
}

// sentDeny denies f, which the client sent the bytes it was decided on
// again, different, as stream-conflict, and ends the watch.
func (p *proc) sentDeny(f *flow) {
	f.sent, f.quic, f.otherNames = nil, nil, nil
	p.charge(f)
	f.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonStreamConflict, Mode: f.dec.Mode}
	f.evName, f.evSrc = "", audit.NameNone
	f.ruled = false // capture's own denial: no reload judges it again
	if f.reported {
		p.emitNow(f, "capture: the client sent the bytes of its hello again, different: denied", slog.LevelWarn)
	}
}

// sentConflict records a request of f denied as stream-conflict (the
// client sent a later head it allowed again, different), stops following
// f and drops the later heads it keeps.
func (p *proc) sentConflict(f *flow) {
	p.request(f, nil, errConflict)
	if f.req != nil {
		p.stopFollow(f)
	}
	n := 0
	for _, h := range f.sent {
		if !h.req {
			f.sent[n] = h
			n++
		}
	}
	clear(f.sent[n:])
	if f.sent = f.sent[:n]; n == 0 {
		f.sent = nil
	}
	p.charge(f)
}

// differs reports whether data, at sequence number seq, and kept, at
// sequence number kseq, overlap and differ.
func differs(kseq uint32, kept []byte, seq uint32, data []byte) bool {
	off := int(int32(seq - kseq)) // data's offset in kept
	lo, hi := max(off, 0), min(off+len(data), len(kept))
	return lo < hi && !bytes.Equal(kept[lo:hi], data[lo-off:hi-off])
}

// done stops looking for a name, frees the buffers and decides the flow.
func (p *proc) done(f *flow) {
	f.inspect = false
	f.req, f.reqHead = nil, time.Time{}
	f.st = [2]*stream{}
	f.quic = nil
	f.sent = nil
	p.charge(f)
	p.classify(f)
}

// streamRoom reports whether n more bytes for f's name search fit within
// Config.MaxStreamBytes for all flows. When they do not, f gives up its
// search, as a flow past its own limit does, and is counted: the bound
// holds however many flows a client keeps open with partial hellos, and
// the buffers come free as those flows are decided (classifyWait at most).
// A followed plain-HTTP flow stops being followed instead (unfollow).
func (p *proc) streamRoom(f *flow, n int) bool {
	if p.streamBytes+n <= p.c.cfg.MaxStreamBytes {
		return true
	}
	p.stats.streamLimited.Add(1)
	if f.req != nil {
		p.unfollow(f)
		return false
	}
	p.giveUp(f)
	return false
}

// charge counts the bytes f's buffers hold now in p.streamBytes: a QUIC
// flow's Initial keys too (quicKeyCost each) but its first DCID's, which
// every QUIC flow has, and its other names (otherName: held until it
// ends; before session 31 (Q4) they were not counted, up to about 50 MB
// at 65,536 flows).
func (p *proc) charge(f *flow) {
	n := cap(f.otherNames) * stringHeader
	for _, o := range f.otherNames {
		n += len(o)
	}
	for _, s := range f.st {
		if s != nil {
			n += cap(s.buf) + s.pendLen
		}
	}
	for _, h := range f.sent {
		n += cap(h.data)
		if h.keys != nil && (f.quic == nil || h.keys != f.quic.keys) {
			n += quicKeyCost * (1 + len(h.more)) // a later attempt's (quicAttempt)
		}
	}
	if q := f.quic; q != nil {
		for _, d := range q.pending {
			n += len(d.data)
		}
		if q.next != nil {
			n += cap(q.next.buf) + q.next.pendLen + quicKeyCost*(1+len(q.nextMore))
		}
		n += quicKeyCost * len(q.more)
	}
	p.streamBytes += n - f.held
	f.held = n
}

// giveUp stops looking after a missing segment or a limit.
func (p *proc) giveUp(f *flow) {
	f.gaveUp = true
	if f.app == appTLS || f.app == appQUIC {
		f.nameSrc = audit.NameNoSNI
	}
	p.done(f)
}

// headReason is the proxy's reason for a request head its parser refuses
// (httpErrDecision, proxy/httpstream.go).
func headReason(err error) string {
	switch {
	case errors.Is(err, httpwire.ErrHostMismatch):
		return ReasonHostMismatch
	case errors.Is(err, httpwire.ErrHeadFraming):
		return ReasonHTTPFraming
	case errors.Is(err, httpwire.ErrHeadTooLarge):
		return ReasonHelloTooLarge
	case errors.Is(err, errUrgent):
		return ReasonUrgentData
	case errors.Is(err, errConflict):
		return ReasonStreamConflict
	default:
		return ReasonHTTPBad
	}
}

func (p *proc) udpPacket(src, dst netip.Addr, sp, dp layers.UDPPort, payload []byte, mac []byte) {
	s, d := uint16(sp), uint16(dp)
	clientIsSrc := !(servicePort(s) && !servicePort(d))
	if s == 443 && d != 443 {
		clientIsSrc = false
	}
	out := p.sentByGateway(mac)
	if out {
		// Sent toward the LAN: if it starts a flow, its source started
		// it (inbound), whatever the ports.
		clientIsSrc = true
	}
	f, dir := p.lookup(src, s, dst, d, 17, clientIsSrc, false, out, mac)
	if f == nil {
		return
	}
	if f.est.IsZero() {
		f.est = f.first
	}
	p.waited(f)
	f.pkts[dir]++
	f.bytes[dir] += uint64(len(payload) + p.cut)
	if f.inbound {
		return
	}
	if dir == 0 && p.rejudgeDatagram(f) {
		f.decided = false
		p.classify(f)
	}
	if s == 53 || d == 53 {
		f.app = appDNS
		p.classify(f) // by address: DNS flows carry no name of their own
		p.dnsMessage(payload, f, dir == 0)
		return
	}
	if !f.inspect {
		if f.quic != nil && dir == 0 && isQUICInitial(payload) {
			p.quicWatch(f, payload) // a QUIC flow that keeps its hello
		}
		return
	}
	if (f.app == appUnknown || f.app == appQUIC) && isQUICInitial(payload) {
		p.quicPacket(f, dir, payload)
		return
	}
	if f.pkts[0]+f.pkts[1] > 6 {
		if f.app == appQUIC {
			p.giveUp(f) // the hello never completed
		} else {
			f.app = appOther
			p.done(f)
		}
	}
}

// quicPacket opens a QUIC Initial packet of either direction. Until one
// opens, capture does not know which side is the client (no well-known
// port, a capture begun mid-flow, packets out of order): the client is the
// side whose Initial opens with client keys, and Initials that do not open
// yet (another DCID, reordering) wait, a few at most, to be tried again
// with the keys that worked.
func (p *proc) quicPacket(f *flow, dir int, payload []byte) {
	// The payload bounds what it adds: the CRYPTO data it carries, or
	// itself while it waits for keys.
	if !p.streamRoom(f, len(payload)) {
		return
	}
	defer p.charge(f)
	if f.quic == nil {
		f.app, f.quic, f.st[0] = appQUIC, &quicOpener{}, &stream{}
	}
	q, s0 := f.quic, f.st[0]
	if q.established && dir != 0 {
		return // the server's Initials are sealed with server keys
	}
	add := func(off uint64, data []byte) {
		if off < maxStream {
			s0.add(uint32(off), data)
		}
	}
	n, _ := q.open(payload, add)
	if n == 0 {
		if !q.established && len(q.pending) < maxQUICPending {
			q.pending = append(q.pending, pendingDgram{dir, append([]byte(nil), payload...)})
		}
	} else if !q.established {
		q.established = true
		if dir == 1 {
			f.swap()
			for i := range q.pending {
				q.pending[i].dir ^= 1
			}
		}
		for _, pd := range q.pending {
			if pd.dir == 0 {
				m, _ := q.open(pd.data, add)
				n += m
			}
		}
		q.pending = nil
	}
	p.stats.quicOpened.Add(uint64(n))
	if s0.conflict || q.tooMany {
		// CRYPTO data sent twice at one offset, different (to one DCID
		// or to two, or in a datagram no server read): which hello a
		// server read is not known, as for TCP (stream.go). Likewise
		// Initials to more DCIDs than the opener keeps the keys of: a
		// hello sent under the keys of one it dropped, to the server's
		// chosen DCID, could not be read (quicOpener.tooMany).
		p.deny(f, ReasonStreamConflict, "", audit.NameNone)
		p.done(f)
		return
	}
	if s0.full {
		p.giveUp(f)
		return
	}
	m, err := tlshello.Complete(s0.buf)
	switch {
	case err == nil:
		h, err := tlshello.Parse(s0.buf[:m])
		p.hello(f, h, err, audit.NameQUIC)
	case err != tlshello.ErrShort:
		p.giveUp(f)
	case f.pkts[0]+f.pkts[1] > 32:
		p.giveUp(f) // the hello never completed
	}
}

// dnsMessage reads one DNS message: questions of queries are observed,
// A and AAAA answers teach the learned table which name the client asked
// for each address.
func (p *proc) dnsMessage(msg []byte, f *flow, fromClient bool) {
	d := &p.dns
	err := d.DecodeFromBytes(msg, gopacket.NilDecodeFeedback)
	if len(msg) < 12 {
		return
	}
	qr := msg[2]&0x80 != 0
	if !qr {
		p.stats.dnsQueries.Add(1)
		if p.c.observe != nil {
			for _, q := range d.Questions {
				p.observe(obsDNSQuery, string(q.Name), uint16(q.Type), f)
			}
		}
		return
	}
	p.stats.dnsAnswers.Add(1)
	if err != nil || fromClient || len(d.Questions) == 0 || d.ResponseCode != layers.DNSResponseCodeNoErr {
		return
	}
	if !f.echAnswer && hasECH(d.Answers) {
		f.echAnswer = true
	}
	name, ok := policy.NormalizeName(string(d.Questions[0].Name))
	if !ok {
		return
	}
	for i := range d.Answers {
		a := &d.Answers[i]
		if a.Class != layers.DNSClassIN || (a.Type != layers.DNSTypeA && a.Type != layers.DNSTypeAAAA) {
			continue
		}
		addr, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		p.c.learned.add(f.cli, addr, name, p.now, time.Duration(a.TTL)*time.Second)
	}
}

// hasECH reports whether an HTTPS or SVCB record of rrs has an ech
// SvcParam (THREATS.md B1), which egressd's forwarder strips.
func hasECH(rrs []layers.DNSResourceRecord) bool {
	for i := range rrs {
		if rrs[i].Type != layers.DNSTypeHTTPS && rrs[i].Type != layers.DNSTypeSVCB {
			continue
		}
		for _, kv := range rrs[i].SVCB.Params {
			if kv.Key == layers.DNSSvcParamKeyECH {
				return true
			}
		}
	}
	return false
}

func (p *proc) observe(k obsKind, name string, qt uint16, f *flow) {
	if p.c.observe == nil {
		return
	}
	p.c.observe(observation{Kind: k, Name: name, QType: qt, Flow: makeKey(f.cli, f.cport, f.srv, f.sport, f.proto)})
}

// sweep ends idle flows and forgets closed ones.
func (p *proc) sweep() {
	for k, f := range p.flows {
		idle := p.now.Sub(f.last)
		switch {
		case f.closed:
			if idle > closedLinger {
				delete(p.flows, k)
			}
		case idle > p.idleLimit(f):
			p.end(f, "idle")
			delete(p.flows, k)
			p.remember(k, f)
		default:
			p.waited(f)
			p.headWaited(f)
			if len(f.sent) > 0 {
				p.release(f)
			}
			if p.openReport > 0 && !f.reported && p.now.Sub(f.first) >= p.openReport {
				p.emit(f, "")
			}
		}
	}
	for k, m := range p.resumable {
		if p.now.Unix() > m.until {
			delete(p.resumable, k)
		}
	}
	p.defrag.expire(p.now)
	p.stats.fragDropped.Store(p.defrag.dropped)
	p.stats.active.Store(int64(len(p.flows)))
}

// makeRoom frees one slot of a full table: idle and closed flows first,
// else an arbitrary live flow, which is ended early and counted.
func (p *proc) makeRoom() {
	// A full sweep walks the whole table: under a flood of new flows it
	// would run for every packet, so it runs at most once a second here
	// (the periodic sweep does the rest).
	if p.now.Sub(p.roomSweep) >= time.Second {
		p.roomSweep = p.now
		p.sweep()
		if len(p.flows) < p.c.cfg.MaxFlows {
			return
		}
	}
	// Map iteration starts at a random place: the first flow is an
	// arbitrary one, found in constant time.
	for k, f := range p.flows {
		if !f.closed {
			p.end(f, "evicted")
			p.stats.evicted.Add(1)
			delete(p.flows, k)
			p.remember(k, f)
			return
		}
		delete(p.flows, k)
		return
	}
}

// flush ends every flow (end of file, shutdown).
func (p *proc) flush(how string) {
	for k, f := range p.flows {
		p.end(f, how)
		delete(p.flows, k)
	}
	p.stats.active.Store(0)
}

// end ends a flow: it is classified now if it was not before, and its
// event (or, for a flow reported while open, its final update) goes out.
func (p *proc) end(f *flow, how string) {
	if f.closed {
		return
	}
	f.closed = true
	if f.req != nil && f.st[0] != nil && f.st[0].gap() {
		p.stats.unfollowed.Add(1) // a segment never came
	}
	if f.inspect && (f.app == appTLS || f.app == appQUIC) {
		f.gaveUp = true
		f.nameSrc = audit.NameNoSNI
	}
	p.done(f)
	p.emit(f, how)
	if f.otherNames != nil {
		f.otherNames = nil // its last event carried them
		p.charge(f)
	}
}

// When a flow is classified and reported.
//
// A flow is decided once, when it first becomes classifiable, with the
// policy in force at that moment: when its name is found (TLS or QUIC
// ClientHello, HTTP request head), when its first client payload shows it
// names nothing, when it is DNS (decided by address at its first packet),
// when classifyWait passed without any of these, or at its end, whichever
// comes first. That is when the proxy decides a connection too, so a
// reload while a flow is open changes neither verdict: a connection no rule
// allowed when it opened stays a drop even if a rule allowing it arrives
// later (enforce would have refused it then). A forwarded flow decided
// dropped is decided again at a retransmission of its SYN while its
// handshake went no further (rejudgeSYN), or at a UDP flow's later
// datagram while its server sent nothing (rejudgeDatagram): the forward
// chain judges that packet anew.
//
// The decision is kept in the flow and stamped on every event of the flow.
// Events go out as follows. The ledger counts a flow once by its 5-tuple
// and start time (Event.Time, the flow's first packet): the first report
// attributes it to a rule or a drop, later ones only raise its bytes (to
// the largest seen) and its end. So:
//   - A flow that ends within openReport after it started (nearly all of
//     them) gets one event, at its end, with its final bytes and duration:
//     one event per flow, exact, no duplicate for the ledger to merge.
//   - A flow still open openReport after it started (live capture only; a
//     connection open for days would otherwise reach the ledger only when
//     it ends, and meanwhile its rule would look unused and a would-drop
//     would be missing from the report) is reported at once with its bytes
//     so far and no close reason, then once more when it ends, with the
//     same start time and verdict and the final bytes, which the ledger
//     folds into the first report. The only inexact case: the ledger keeps
//     its dedup records for its last MaxFlows flows (65536 by default); if
//     that many other flows were recorded between the two reports, the end
//     update counts as a second flow.
//
// Offline (ReadFile) every flow gets one event: the whole file reaches the
// ledger in one go, so early reports would only add duplicates.
const (
	classifyWait      = 10 * time.Second // the proxy's default hello timeout
	defaultOpenReport = time.Minute
)

// settle decides a flow whose name did not come within classifyWait: the
// proxy would have decided by then, on what it had. A client that sent
// nothing is decided by address (the proxy does so after its first-byte
// wait); a TLS ClientHello or HTTP request head begun and not finished is
// denied as hello-timeout, as the proxy denies it.
func (p *proc) settle(f *flow) {
	if f.rstHeld && !f.closed {
		p.clientReset(f, f.rstSeq)
		return
	}
	if f.inspect && (f.app == appTLS || f.app == appHTTP) && !f.srvHasMore() {
		p.deny(f, ReasonHelloTimeout, "", audit.NameNone)
	}
	if f.inspect && f.app != appDNS {
		p.giveUp(f)
	}
	p.classify(f)
}

// Reasons capture adds to policy's. They are the proxy's reason strings
// (proxy.ReasonSNIMismatch and the others of the same name), so that the
// ledger and the reports see one reason whichever component reported a
// flow.
const (
	// ReasonSNIMismatch: the name (SNI, QUIC SNI or HTTP Host) is allowed,
	// but the destination address was not given out for a name of the
	// rule that allows it (THREATS.md A2).
	ReasonSNIMismatch = "sni-mismatch"
	// ReasonSpecialRange: the destination is in a range the proxy's
	// guard refuses unless a CIDR rule names it (policy.SpecialRange).
	ReasonSpecialRange = "special-range"
	// ReasonHelloTimeout: the ClientHello or HTTP request head did not
	// complete within classifyWait of the handshake.
	ReasonHelloTimeout = "hello-timeout"
	// ReasonDuplicateSNI: more than one server name in the ClientHello.
	ReasonDuplicateSNI = "duplicate-sni"
	// ReasonHelloBad: the stream starts as TLS and its ClientHello does
	// not parse.
	ReasonHelloBad = "hello-malformed"
	// ReasonHelloTooLarge: the ClientHello or HTTP head is over 64 KiB,
	// the proxy's default cap.
	ReasonHelloTooLarge = "hello-too-large"
	// ReasonHTTPBad: an HTTP request head the proxy refuses for its
	// syntax (httpwire.ErrHeadMalformed: the request line, bare CR or LF,
	// obs-fold, two Host headers, a Host or absolute-form authority that
	// is not host[:port], a target of another form).
	ReasonHTTPBad = "http-malformed"
	// ReasonHostMismatch: the absolute-form target of an HTTP request
	// and its Host header name different hosts or ports.
	ReasonHostMismatch = "host-mismatch"
	// ReasonPathForm: an HTTP request path that an origin may read as
	// another one (dot segments, encoded dots, slashes or backslashes,
	// double encoding: not policy.PlainPath) where only a host/path
	// rule allows the request (policy.Engine.PathForm).
	ReasonPathForm = policy.ReasonPathForm
	// ReasonHTTPFraming: an HTTP request head whose body framing is
	// ambiguous or invalid (httpwire.ErrHeadFraming: Content-Length with
	// Transfer-Encoding, two Content-Lengths that differ, a
	// Transfer-Encoding other than chunked), the shapes of request
	// smuggling.
	ReasonHTTPFraming = "http-framing"
	// ReasonInbound: a flow started from outside the LAN toward a LAN
	// host (see inbound), not a LAN client's egress. The enforce
	// firewall drops new connections from the WAN side; no rule allows
	// one.
	ReasonInbound = "inbound"
	// ReasonUrgentData: a client stream with a second urgent mark
	// (MSG_OOB) after the first urgent byte arrived: whether the proxy
	// read that byte in line depends on when it read (see urgent), so
	// what it parsed is not known. Capture's own reason.
	ReasonUrgentData = "urgent-data"
	// ReasonStreamConflict: the client sent bytes of its stream twice,
	// different, at the same place (an overlap, a decoy the server never
	// read): which copy the server read, and so the name it was asked
	// for, is not known (stream.go). Capture's own reason; a flow, or a
	// followed request, denied so.
	ReasonStreamConflict = "stream-conflict"
)

// errConflict stands for a followed request stream with a conflict.
var errConflict = errors.New("capture: bytes sent twice, different: the stream the server read is not known")

// deny decides f as denied by capture (not by a rule), with the policy's
// mode at this moment.
func (p *proc) deny(f *flow, reason, name string, src audit.NameSource) {
	if f.decided {
		return
	}
	f.decided = true
	eng := p.c.deps.Policy.Load()
	if p.beforeEnforce(eng, f) {
		// No proxy reads it to refuse it: the firewall decides.
		p.decideBeforeEnforce(eng, f, name, src)
		return
	}
	f.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: eng.Mode()}
	f.evName, f.evSrc = name, src
}

// classify decides a flow once, with the policy in force now (see above).
// Once decided, the flow keeps its path only as its events carry it.
func (p *proc) classify(f *flow) {
	defer f.boundPath()
	if f.decided {
		return
	}
	f.decided = true
	eng := p.c.deps.Policy.Load()
	if p.beforeEnforce(eng, f) {
		p.decideBeforeEnforce(eng, f, f.name, f.nameSrc)
		return
	}
	// An HTTP flow is decided with its request's path, as the proxy's
	// decideHTTP decides it (host/path rules match it).
	f.dec, f.evName, f.evSrc, f.learned = p.decide(eng, f, f.name, f.nameSrc, f.path)
	f.noPath = f.showsNoPath()
	f.ruled = true
	if f.dec.Allowed() && p.forwardedBeforeEnforce(eng, f) {
		// Opened in audit mode, decided only now (a UDP flow of a few
		// datagrams): Redecide passed it over, undecided then. Its
		// packets since the reload met the forward chain as a new
		// connection's, as a decided flow's do there: a learned address
		// admits it only where the enforce ruleset's sets began with it
		// (the forwarder's answers), not an answer seen on the wire.
		in := p.flowInput(f, "")
		in.NoPath = false
		if !eng.Decide(in).Allowed() && !p.seeded(eng, in) {
			f.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonOpenedBeforeEnforce, Mode: eng.Mode()}
		}
	}
}

// forwardedBeforeEnforce reports whether f is a live forwarded flow (UDP
// but DNS, TCP to a port not redirected) that opened while the policy was
// in audit mode and is decided now that it is in enforce mode: its
// packets carry no mark of the enforce ruleset (see Redecide).
func (p *proc) forwardedBeforeEnforce(eng *policy.Engine, f *flow) bool {
	return f.openedInAudit && (f.proto == 17 || f.forwarded) && p.decideAt.IsZero() &&
		eng.Mode() == policy.ModeEnforce && f.sport != 53 && f.cport != 53
}

// boundPath cuts a decided flow's path to what its events carry
// (audit.MaxPathBytes; the length before in pathLen): a reload in audit
// mode judges a clipped path's connection on the start kept
// (policy.Input.PathCut), or keeps its record where that start cannot
// tell (rejudge), and a flow kept its whole
// first request line, up to the 64 KiB head cap, for as long as it was
// open (TestFlowKeepsBoundedPath).
func (f *flow) boundPath() {
	if f.decided && len(f.path) > audit.MaxPathBytes {
		f.pathLen = len(f.path)
		f.path = audit.Clip(f.path, audit.MaxPathBytes)
	}
}

// ReasonOpenedBeforeEnforce: a TCP connection that opened in audit mode
// and was decided after a reload to enforce, which the enforce firewall
// drops (see beforeEnforce), or a forwarded flow opened in audit mode
// whose address only an answer the enforce ruleset's learned sets did not
// begin with admits (Redecide, forwardedBeforeEnforce). Capture's own
// reason: no rule refused it, and a new connection the same rules allowed
// would pass.
const ReasonOpenedBeforeEnforce = "opened-before-enforce"

// beforeEnforce reports whether f is a TCP connection, live, that opened
// while the policy was in audit mode and is decided now that it is in
// enforce mode (its name came late, or it was silent). Such a connection
// was never redirected to the proxy (NAT applies to a connection's first
// packet), and the enforce firewall's established rule passes only
// connections its forward chain let out (firewall.CTMarkEnforced): its
// packets meet the forward chain's rules as a new connection's would, by
// address alone.
func (p *proc) beforeEnforce(eng *policy.Engine, f *flow) bool {
	return f.openedInAudit && f.proto == 6 && p.decideAt.IsZero() && eng.Mode() == policy.ModeEnforce &&
		!f.forwarded && f.sport != 53 && f.cport != 53
}

// decideBeforeEnforce decides a connection of beforeEnforce as the forward
// chain does: with --tcp-ports (Config.TCPPorts) it holds the TCP ports of
// every rule, and lets the connection through where a CIDR rule or a
// rule's learned set admits its address (decideForwarded, with the
// forwarder's answers only, which the sets were seeded with: seeded; an
// accept rule marks it, so its replies pass); without, every TCP port is redirected
// and the chain accepts no TCP: it is dropped. A drop is reported in
// enforce mode with ReasonOpenedBeforeEnforce, the flow's name kept for
// the record; nothing reads the requests of such a connection, so capture
// does not follow them.
func (p *proc) decideBeforeEnforce(eng *policy.Engine, f *flow, name string, src audit.NameSource) {
	if p.c.cfg.TCPPorts != nil {
		f.forwarded = true
		f.dec, f.evName, f.evSrc, f.learned = p.decide(eng, f, name, src, f.path)
		if f.dec.Allowed() {
			// By a CIDR rule, or by a learned address the enforce
			// ruleset holds: an answer of the forwarder (seeded), not
			// one of another resolver seen on the wire in audit mode.
			in := p.flowInput(f, "")
			in.NoPath = false
			if eng.Decide(in).Allowed() || p.seeded(eng, in) {
				return
			}
		}
	} else {
		if n, ok := policy.NormalizeName(name); ok {
			name = n
		}
		if src == "" {
			src = audit.NameNone
		}
		f.evName, f.evSrc = name, src
	}
	f.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonOpenedBeforeEnforce, Mode: eng.Mode()}
}

// showsNoPath reports whether f is TCP that capture saw from its SYN and
// that is neither TLS nor an HTTP/1 request (see decide): a flow decided
// with policy.Input.NoPath.
func (f *flow) showsNoPath() bool {
	return f.proto != 17 && f.syn && (f.app == appOther || f.app == appUnknown && (f.started || f.bytes[0] == 0))
}

// decide decides f's connection, or one request of it, by name (as the
// client sent it; src how it was found) and path, or by address when
// name is empty. It returns the decision and the name and name source
// to record.
func (p *proc) decide(eng *policy.Engine, f *flow, name string, src audit.NameSource, path string) (policy.Decision, string, audit.NameSource, admitName) {
	return p.decideIn(eng, f, p.flowInput(f, path), name, src, true)
}

// decideIn is decide with in, f's flowInput, made by the caller (a reload
// decides on the facts of the flow's decision: rejudge); vouch says
// whether an allowed name's address must be vouched for (vouched), which
// a reload does not ask again of a connection vouched for when it opened.
// learned is decideForwarded's, for a flow nftables forwards (zero for
// any other).
func (p *proc) decideIn(eng *policy.Engine, f *flow, in policy.Input, name string, src audit.NameSource, vouch bool) (policy.Decision, string, audit.NameSource, admitName) {
	path := in.Path
	// Forwarded by nftables, not proxied (UDP, TCP to a port not
	// redirected): the firewall's form of the special-range guard.
	fwd := in.Proto == policy.UDP || f.forwarded
	var d policy.Decision
	if fwd && in.Port != 53 {
		// nftables reads no name: by address alone, and matches the
		// frame's source MAC (in's).
		d, name, src, learned := p.decideForwarded(eng, in, name, src, f.first, f.last)
		return p.special(eng, f, in, d, fwd), name, src, learned
	}
	// The proxy or the forwarder decides it: with the client's MAC as
	// they see it.
	in.ClientMAC = p.lanMAC(eng, f)
	if name != "" {
		if n, ok := policy.NormalizeName(name); ok {
			name = n
		}
		in.Name = name
		// The guard before the address check, as the proxy's decideName.
		d = p.special(eng, f, in, eng.Decide(in), fwd)
		if d.Allowed() && vouch && !p.vouched(eng, in, d) {
			d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonSNIMismatch, Mode: eng.Mode()}
		}
	} else {
		// By the address first, then by the names DNS gave it out for,
		// in the proxy's order (decideAddr, policy.DecideLearned): a CIDR
		// rule that allows the address decides before any name.
		if src == "" {
			src = audit.NameNone
		}
		d = eng.Decide(in)
		if !d.Allowed() {
			p.cands, p.candNames = p.cands[:0], p.candNames[:0]
			if p.c.deps.DNS != nil {
				for _, n := range p.c.deps.DNS.NamesFor(in.Client, in.Dest) {
					p.cands = append(p.cands, candidate{n, audit.NameDNSLearned})
				}
			}
			// Answers seen on the wire, to this client, then to another
			// address of its device: not to another client's, as the
			// proxy goes by what DNS gave this client's device.
			var wire [4]DNSGrant
			gs := p.c.learned.given(in.Dest, p.now, p.now, false, wire[:0])
			for pass := range 2 {
				for _, g := range gs {
					own := g.Client.Unmap() == in.Client
					if pass == 0 && own || pass == 1 && !own && p.sameDevice(in.Client, g.Client) {
						p.cands = append(p.cands, candidate{g.Name, audit.NameDNSAnswer})
					}
				}
			}
			for _, c := range p.cands {
				p.candNames = append(p.candNames, c.name)
			}
			var i int
			if d, i = eng.DecideLearned(in, d, p.candNames); i >= 0 {
				name, src = p.cands[i].name, p.cands[i].src
				if d.Allowed() {
					in.Name = name
				}
			}
		}
		d = p.special(eng, f, in, d, fwd)
	}
	// A path an origin may read as another one ("/api/../admin") is
	// refused where only a host/path rule allows the request, as the
	// proxy's decideHTTP refuses it (path-form).
	pin := in
	pin.Name = name
	return eng.PathForm(pin, path, d), name, src, admitName{}
}

// sameDevice reports whether LAN addresses a and b are one device's
// (Deps.Devices); without Devices, only when they are one address.
func (p *proc) sameDevice(a, b netip.Addr) bool {
	a, b = a.Unmap(), b.Unmap()
	if a == b {
		return true
	}
	return p.c.deps.Devices != nil && p.c.deps.Devices.SameDevice(a, b)
}

// lanMAC returns f's client's MAC as egressd's proxy and DNS forwarder
// see it, for the flows they decide: Deps.MACs's answer, asked once per
// flow and only while eng names MAC addresses (else it changes no
// decision, and the frame's is returned); without Deps.MACs (offline),
// the frame's source address. A client behind a router has none live:
// its frames carry the router's MAC, which the proxy never sees.
func (p *proc) lanMAC(eng *policy.Engine, f *flow) net.HardwareAddr {
	if p.c.deps.MACs == nil || !eng.HasMACs() {
		if f.hasMAC {
			return net.HardwareAddr(f.mac[:])
		}
		return nil
	}
	if f.lanMACState == 0 {
		f.lanMACState = 1
		if m := p.c.deps.MACs.ClientMAC(p.zoned(f.cli.Unmap(), f.src)); len(m) == 6 {
			copy(f.lanMAC[:], m)
			f.lanMACState = 2
		}
	}
	if f.lanMACState == 2 {
		return net.HardwareAddr(f.lanMAC[:])
	}
	return nil
}

// zoned returns a with the zone of the LAN interface of capture socket
// src (proc.src) when a is link-local, as the DNS forwarder's sockets
// give it: the same link-local address on two LAN interfaces is two
// devices'. Other addresses, and a socket capture has no interface name
// for, as they are.
func (p *proc) zoned(a netip.Addr, src int) netip.Addr {
	if !a.Is6() || !a.IsLinkLocalUnicast() || src < 1 || src > len(p.c.cfg.Interfaces) {
		return a
	}
	return a.WithZone(p.c.cfg.Interfaces[src-1])
}

// eventMAC is the client MAC f's events carry: the one its decision was
// made with where it was asked (lanMAC, for a flow the proxy or the
// forwarder decides), else the frame's source address; "" for none.
func (f *flow) eventMAC() string {
	if f.lanMACState != 0 && !((f.proto == 17 || f.forwarded) && f.sport != 53) {
		if f.lanMACState == 2 {
			return net.HardwareAddr(f.lanMAC[:]).String()
		}
		return ""
	}
	if f.hasMAC {
		return net.HardwareAddr(f.mac[:]).String()
	}
	return ""
}

// askerMAC returns the MAC the forwarder's gate decided g's answer with,
// when eng names MAC addresses: Deps.MACs's answer for g's client;
// offline, the source address of the frames capture saw from that client
// (frameMACs), if any. nil when eng names no MAC.
func (p *proc) askerMAC(eng *policy.Engine, g DNSGrant) net.HardwareAddr {
	if !eng.HasMACs() {
		return nil
	}
	client := g.Client.Unmap()
	if p.c.deps.MACs != nil {
		return p.c.deps.MACs.ClientMAC(client)
	}
	if m, ok := p.frameMACs[client]; ok {
		return net.HardwareAddr(m[:])
	}
	return nil
}

// flowInput is what f's connection, or one request of it (path), is
// decided on but its name.
func (p *proc) flowInput(f *flow, path string) policy.Input {
	proto := policy.TCP
	switch {
	case f.proto == 17:
		proto = policy.UDP
	case f.proto != 6:
		// An echo flow of other.go: no port, no path (denyOther).
		proto = policy.ICMP
	}
	in := policy.Input{Client: f.cli.Unmap(), Dest: f.srv.Unmap(), Port: f.sport, Proto: proto, Path: path, Now: p.now}
	// TCP that is neither TLS nor an HTTP/1 request (HTTP/2 with prior
	// knowledge, another protocol, a client silent at first) shows the
	// proxy no path: host/path rules do not allow it there (path-unseen).
	// Only where capture saw the flow from its SYN and the client's first
	// bytes (or that it sent none): a flow open before capture started, or
	// whose first segment capture lost, may be TLS or HTTP/1 the proxy read.
	in.NoPath = f.showsNoPath()
	if !p.decideAt.IsZero() {
		in.Now = p.decideAt
	}
	if f.hasMAC {
		in.ClientMAC = net.HardwareAddr(f.mac[:])
	}
	return in
}

// decideForwarded decides a flow nftables forwards or drops at its first
// packet (UDP, TCP to a port not redirected: the fwd of decide), as the
// enforce ruleset's forward chain does (firewall/render.go): by
// destination address alone, whatever name the client sent. A rule's
// CIDRs (or "*") allow the address by themselves; else the address must
// be in the rule's learned set. egressd's forwarder feeds the set of every
// rule that lets the asking client resolve the name (dnsfilter's gate,
// policy.Engine.NameRules), for the answer's TTL, and the set admits every
// client the rule covers: not only the client that asked. So the flow is
// allowed when some answer gave the address out, to any client, for a
// name that a rule lets that client resolve and lets this client reach on
// this port; the lowest such rule is credited, as the first accept rule
// of the chain is the lowest. (CIDR rules are asked first, in the proxy's
// order: where a CIDR rule and an earlier rule's learned set both admit
// the address, the chain's counters credit the earlier rule, capture the
// CIDR rule; the verdict is the same.)
//
// The answers are the forwarder's (Deps.DNS: Given) and those capture saw
// on the wire. In enforce mode every LAN query is redirected to the
// forwarder, so the wire answers are its own. In audit mode clients may
// ask another resolver; enforce would have sent the same query to the
// forwarder, which answers a name only where a rule lets the client
// resolve it, with what upstream returns (the same address, short of a
// CDN that answers the two resolvers differently). So a wire answer stands
// for the forwarder's under the same conditions: it counts only for rules
// that let its asker resolve the name, and live only for its TTL (at least
// and at most as the firewall keeps it, policy.LearnedLifetime), not for the longer minLearnedTTL that
// keeps names for the record; a name no rule lets its asker resolve would
// have been refused, and teaches nothing. Offline (ReadFile) there is no
// forwarder and the capture's flows follow their lookups by minutes: the
// wire answers are kept as long as for names.
//
// The wire answers are those live at the flow's first packet (at), when
// nftables judged it, although capture may decide a UDP flow later (it
// looks for a QUIC hello first). An answer given after the flow's last
// packet so far (last) let none of it out: the set did not hold the
// address, and nftables dropped every packet. One given between its first
// and last packets let the later packets out (a dropped packet confirms
// no conntrack entry, so the next one of the same 5-tuple is new to the
// forward chain, which the set now admits): the flow got out, and is
// credited to it.
//
// name and src are the client's own name, if any, kept for the record;
// without one, the name the credited answer gave, or else the first
// answer's. learned is the credited answer's name whatever the client
// named (zero where none admits the address, or a CIDR rule and no
// earlier rule's learned set does): what the flow's mark stands for (the
// chain's first accept rule), which a reload judges again once the
// answer expired (flow.learned, redecide).
func (p *proc) decideForwarded(eng *policy.Engine, in policy.Input, name string, src audit.NameSource, at, last time.Time) (_ policy.Decision, _ string, _ audit.NameSource, learned admitName) {
	if name != "" {
		if n, ok := policy.NormalizeName(name); ok {
			name = n
		}
	}
	in.Name, in.Path, in.NoPath = "", "", false
	d := eng.Decide(in)
	if name == "" && src == "" {
		src = audit.NameNone
	}
	if d.Allowed() && d.RuleIndex <= 0 {
		return d, name, src, admitName{}
	}
	p.grants = p.grants[:0]
	n := 0
	if p.c.deps.DNS != nil {
		for _, g := range p.c.deps.DNS.Given(in.Dest) {
			// An answer given after the flow's last packet did not
			// let it out: nftables had dropped them all by then.
			if g.Since.IsZero() || last.IsZero() || !g.Since.After(last) {
				p.grants = append(p.grants, g)
			}
		}
		n = len(p.grants)
	}
	p.grants = p.c.learned.given(in.Dest, at, last, p.decideAt.IsZero(), p.grants)
	best, bi := -1, -1
	for i, g := range p.grants {
		if r := p.learnedRule(eng, in, g); r >= 0 && (best < 0 || r < best) {
			best, bi = r, i
		}
	}
	if d.Allowed() {
		// A CIDR rule allows it, and is credited; but the chain's first
		// accept marks the flow: an earlier rule's learned set, where
		// one admits the address, is the rule of its mark, which a
		// reload reads (keptByMark).
		if best >= 0 && best < d.RuleIndex {
			learned = p.grantAdmits(eng, best, bi, n)
		}
		return d, name, src, learned
	}
	if best >= 0 {
		d = policy.Decision{Verdict: policy.Allow, Rule: eng.Rules()[best].Name, RuleIndex: best, Reason: policy.ReasonAllowed, Mode: eng.Mode()}
		learned = p.grantAdmits(eng, best, bi, n)
	} else if len(p.grants) > 0 {
		bi = 0
	}
	if name == "" && bi >= 0 {
		name, src = p.grants[bi].Name, audit.NameDNSLearned
		if bi >= n {
			src = audit.NameDNSAnswer
		}
	}
	return d, name, src, learned
}

// grantAdmits is the admitName of p.grants[bi], whose rule rule's
// learned set admits the flow; the first n grants are the forwarder's.
func (p *proc) grantAdmits(eng *policy.Engine, rule, bi, n int) admitName {
	a := admitName{p.grants[bi].Name, audit.NameDNSLearned, eng.Rules()[rule].Name}
	if bi >= n {
		a.src = audit.NameDNSAnswer
	}
	if l, ok := policy.NormalizeName(a.name); ok {
		a.name = l
	}
	return a
}

// admitName is the name of a DNS answer whose rule's learned set
// admitted a flow's address (decideForwarded), normalized, how capture
// knows the answer: dns-learned (the forwarder's) or dns-answer (seen on
// the wire), and that rule's name: the rule of the flow's mark, whose
// tag the firewall's sweep reads at a reload (redecide).
type admitName struct {
	name string
	src  audit.NameSource
	rule string
}

// learnedRule returns the lowest rule whose learned set the answer g fed
// and that lets in's client reach in's port: a rule that lets g's client
// resolve g's name (as the forwarder's gate asks, by address alone) and
// in's client too, with in's port; -1 when there is none.
func (p *proc) learnedRule(eng *policy.Engine, in policy.Input, g DNSGrant) int {
	var ab, cb [8]int
	asker := eng.NameRules(policy.Input{Client: g.Client.Unmap(), ClientMAC: p.askerMAC(eng, g), Name: g.Name, Now: in.Now}, 0, ab[:0])
	if len(asker) == 0 {
		return -1
	}
	rules := eng.Rules()
	for _, r := range eng.NameRules(policy.Input{Client: in.Client, ClientMAC: in.ClientMAC, Name: g.Name, Now: in.Now}, 0, cb[:0]) {
		if !slices.Contains(asker, r) {
			continue
		}
		for _, pr := range rules[r].Ports {
			if pr.Contains(in.Port, in.Proto) {
				return r
			}
		}
	}
	return -1
}

// special applies the proxy's special-range guard (Engine.GuardRefuses,
// THREATS.md F1, F2) to d, the decision of in: a destination in a guarded
// range (link-local and cloud metadata, CGNAT, loopback, the IPv6 forms
// that carry an IPv4 address, …) that d allows is refused with
// special-range unless a CIDR rule names the range; loopback and the
// unspecified address, the gateway itself, are refused so whatever d says
// (the proxy's selfDecision). DNS is left alone: enforce mode redirects it
// to the forwarder, whatever its destination, but for loopback, which no
// rule opens from the LAN on any port or protocol (Engine.LANRefuses: the
// antispoof chain drops it; a live frame guard records first,
// loopback-destination). The gateway's own addresses
// (Config.OwnAddrs) are guarded as the proxy guards them: capture records
// no flow to one, but under the engine's NAT64 prefixes a destination
// that embeds one is the proxy's special-range.
//
// Traffic nftables forwards (fwd: UDP, and TCP to ports not redirected)
// meets the same guard in the firewall (its guarded sets, opened only by a
// CIDR rule inside the range: policy.OpensGuarded), where loopback and
// 0.0.0.0 never come (:: does, as any guarded address: routed; TCP to it
// too on a port not redirected, which policy.LANThisHost takes for the
// proxy's: kernel 6.18 forwarded a SYN to [::]:80), so a
// forwarded flow to one is refused only where a rule allows it; the firewall's sets hold none of the gateway's
// own addresses, so a forwarded flow to one's NAT64 form is the rule's.
// A forwarded flow of f to an IPv4-mapped address in an IPv6 header
// (f.srv ::ffff:a.b.c.d, which in carries unmapped) no rule opens: the
// policy reads a rule's "::ffff:a.b.c.d/128" as a.b.c.d/32, which the
// forward chain matches in IPv4 headers only, and its IPv6 accepts leave
// out the guarded ::ffff:0:0/96 (routed): enforce drops it. DNS (port
// 53) to one is redirected to the forwarder, as to any address.
func (p *proc) special(eng *policy.Engine, f *flow, in policy.Input, d policy.Decision, fwd bool) policy.Decision {
	var own []netip.Addr
	if !fwd {
		own = p.own.Load().list
	}
	if a := in.Dest.Unmap(); !d.Allowed() && (fwd || !a.IsLoopback() && !a.IsUnspecified()) {
		return d
	}
	if fwd && in.Port != 53 && f.srv.Is4In6() { // DNS is the forwarder's (LANRefuses)
		return policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonSpecialRange, Mode: eng.Mode()}
	}
	refuses := eng.LANRefuses
	if fwd && in.Port != 53 && in.Dest.Is6() && in.Dest.IsUnspecified() {
		// TCP to :: on a port not redirected is the forward chain's,
		// not the proxy's (LANThisHost): its guarded sets alone.
		refuses = eng.GuardRefuses
	}
	if _, refused := refuses(in, own, nil); !refused {
		return d
	}
	return policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonSpecialRange, Mode: eng.Mode()}
}

// vouched reports whether a flow's destination address belongs to the
// name the client sent, which rule d allows. It is the proxy's check
// (proxy.vouched, THREATS.md A2) as far as a passive observer can make it:
// a CIDR rule allows the address by itself, or the address was given out
// for the name, or for another name the same rule allows, by egressd's DNS
// forwarder (DNSFacts, to this client's device) or in a DNS answer capture
// saw on the wire (to any client: the wire table stands in for the proxy's
// fresh lookup, which accepts any current answer for the name).
//
// Where neither knows the address the proxy makes a fresh lookup of the
// name and allows the flow if it returns the address. Capture cannot look
// up (it is passive, and offline the answer would be today's, not the
// capture's): it reads the flow as a mismatch. That is the safe reading
// for audit: a client that reaches an allowed name at an address nobody
// resolved for it is what domain fronting looks like, and the report
// shows it as a drop rather than hiding it. The price: a client that
// resolved elsewhere (its own DoH, a hard-coded address, a lookup older
// than the capture) is reported as sni-mismatch even where the proxy's
// lookup would have returned the same address and let it through.
func (p *proc) vouched(eng *policy.Engine, in policy.Input, d policy.Decision) bool {
	addrIn := in
	addrIn.Name, addrIn.Path = "", ""
	if eng.Decide(addrIn).Allowed() {
		return true
	}
	same := func(n string) bool {
		if n == in.Name {
			return true
		}
		ni := addrIn
		ni.Name = n
		dd := eng.Decide(ni)
		return dd.Allowed() && dd.Rule == d.Rule
	}
	if p.c.deps.DNS != nil {
		for _, n := range p.c.deps.DNS.NamesFor(in.Client, in.Dest) {
			if same(n) {
				return true
			}
		}
	}
	var names [4]string
	for _, n := range p.c.learned.namesFor(in.Client, in.Dest, p.now, names[:0]) {
		if same(n) {
			return true
		}
	}
	// Neither DNS knows the address for a name of this rule. The proxy
	// would now look the name up afresh and usually find the address
	// (CDNs, answers older than the capture, lookups capture did not
	// see): capture cannot ask, so it calls a mismatch only on evidence,
	// an answer for this very name seen on the wire that did not give out
	// this address. Without it the flow is judged by its name. The answers
	// are looked up by name: the table by address keeps a few names per
	// address, which a CDN address shared by many names overflows.
	if name, ok := policy.NormalizeName(in.Name); ok {
		if resolved, gave := p.c.learned.answered(name, in.Dest, p.now); gave || !resolved {
			return true
		}
	}
	return false
}

// emit sends an event of f: how is its close reason, "" while it is open.
// unrecorded says whether f is counted only, never an event: the
// gateway's own traffic (Stats.Own), and an inbound flow seen live in
// enforce mode, which passed the enforce firewall (Stats.Inbound).
func (p *proc) unrecorded(f *flow) bool {
	return f.own || f.inbound && f.dec.Mode == policy.ModeEnforce && p.decideAt.IsZero()
}

// The first event of a flow is counted, logged and measured; a later one
// is the end update of a flow reported while open.
func (p *proc) emit(f *flow, how string) {
	if p.unrecorded(f) {
		return
	}
	p.classify(f)
	d := f.dec
	if f.revoked && how != "" {
		how = closeRevoked
	}
	ev := p.event(f, how)
	if f.reported {
		// Minutes or days after the first (a flow reported while
		// open): the ledger may hold the first no more, and must not
		// count this one as a flow of its own.
		ev.Revised = true
		p.stats.updates.Add(1)
		p.c.deps.Sink.Emit(ev)
		return
	}
	f.reported = true
	p.stats.flows.Add(1)
	if d.Verdict == policy.Deny {
		p.stats.denied.Add(1)
	}
	p.c.m.flow(d)
	p.c.deps.Sink.Emit(ev)
	if !p.proxiedLine(f) {
		p.c.logFlow(&ev)
	}
}

// proxiedLine reports whether f's decision line is the transparent
// proxy's: a live TCP connection the proxy said it accepted
// (ProxyAccepted: asked once, at the flow's first report; one it
// accepts after that report has capture's line only), or, unless
// the proxy tells (Config.ProxyTells), one egressd's firewall redirected to it (Config.ProxyLines, asked at its
// first packet: the proxy listened and the firewall redirected to it),
// not the gateway's own, nor started from the WAN side, nor dropped by
// the gateway's hardening before NAT, to a port enforce mode redirected
// to the proxy when it opened (NAT applies to a connection's first
// packet), whose client completed the handshake (the proxy accepts no
// other). The proxy decides it and writes its line; capture's report of
// it is the event only.
func (p *proc) proxiedLine(f *flow) bool {
	if !p.decideAt.IsZero() || f.proto != 6 {
		return false
	}
	// A connection the proxy may have accepted: a handshake the client
	// completed, on the LAN, not to or from DNS's port.
	mayBe := f.acked && !f.forwarded && !f.inbound && !f.own && !f.guarded && f.sport != 53 && f.cport != 53
	// Capture's line is kept for a proxy that may accept the connection
	// later (take) only where enforce mode redirects it: opened in
	// enforce mode, to a port the proxy takes. Else each of audit mode's
	// connections would hold a place until proxiedTTL.
	late := mayBe && p.c.cfg.ProxyTells && !f.openedInAudit && p.redirected(f.sport)
	if p.c.proxied.take(makeKey(f.cli.Unmap(), f.cport, f.srv.Unmap(), f.sport, 6), late) {
		return true
	}
	if p.c.cfg.ProxyTells {
		// The proxy did not accept it, or not yet: capture writes the
		// line, and a proxy that accepts it later writes none
		// (ProxyAccepted).
		return false
	}
	return f.redirectedAtOpen && mayBe && p.redirected(f.sport)
}

// event is the event of f, decided, with close reason how.
func (p *proc) event(f *flow, how string) audit.Event {
	ps := protoName(f.proto)
	cli := f.cli.Unmap()
	if f.guarded {
		cli = f.cli // the header's address: an IPv4-mapped source is no IPv4 client's (guard.go)
	}
	ev := audit.Event{
		Kind: audit.KindFlow, Source: audit.SourceCapture, Time: f.first,
		Client: cli, ClientPort: f.cport, Dest: f.srv.Unmap(), DestPort: f.sport, Proto: ps,
		Name: f.evName, NameSource: f.evSrc, OtherNames: f.eventOthers(), LearnedName: f.learned.name, Path: f.path, PathLen: f.pathLen, NoPath: f.noPath,
		BytesOut: f.bytes[0], BytesIn: f.bytes[1], Duration: f.last.Sub(f.first).Seconds(), Close: how,
	}
	ev.ClientMAC = f.eventMAC()
	if f.echAnswer {
		ev.Filtered = "ech"
	}
	ev.Stamp(f.dec)
	ev.Enforced = ev.Enforced && p.c.firewallDrops()
	return ev
}

// logFlow writes the canonical line of a flow or request event: deny at
// Warn, allow at Info.
func (c *Capture) logFlow(ev *audit.Event) {
	level := slog.LevelInfo
	if ev.Verdict == policy.Deny {
		level = slog.LevelWarn
	}
	ctx := context.Background()
	if !c.log.Enabled(ctx, level) || audit.QuietLine(c.deps.Sink, ev) {
		return
	}
	var buf [audit.FlowAttrsMax]slog.Attr
	logjson.Log(ctx, c.log, level, audit.CanonicalMessage, ev.AppendFlowAttrs(buf[:0])...)
}
