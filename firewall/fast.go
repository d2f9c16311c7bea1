package firewall

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"slices"
	"time"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"egressd/policy"
)

// DefaultFastPathQueue is the NFQUEUE queue number of the fast path when
// Config.FastPathQueue is zero (queue 0, the default of other NFQUEUE
// users such as Suricata, is left to them).
const DefaultFastPathQueue uint16 = 3300

// Marks are the packet-mark values of the fast path (Config.FastPath),
// inside egressd's owned bits (Config.CTMarkBits). Userspace gives a
// queued packet a verdict with the packet mark (orig &^ Mask) | one of
// them, the operator's bits kept:
//
//   - Pending, on an initial SYN: the connection is not redirected to the
//     proxy; its later packets from the LAN that carry payload are queued
//     until it is decided;
//   - Allowed, on the last released packet of a pending connection (with
//     NF_REPEAT): the connection is let out as one an allow rule let out,
//     and from then on forwarded by the kernel;
//   - Denied, likewise: the connection is dropped in nftables from then on.
type Marks struct {
	Mask, Pending, Allowed, Denied uint32
}

// fastLayout is where the fast path's values sit in the owned bits. The
// packet-mark values and the conntrack-mark values are all tags of the
// layout's run of bits, the highest ones ("count" is the all-ones tag):
//
//	conntrack mark "fast-allowed"  enforced | tag count  (drawTag never gives count to a rule)
//	conntrack mark "pending"       tag count,   enforced bit clear
//	conntrack mark "denied"        tag count-1, enforced bit clear
//	packet mark Pending            tag count-2, enforced bit clear
//	packet mark Allowed            tag count-3, enforced bit clear
//	packet mark Denied             tag count-4, enforced bit clear
//
// A rule's mark always has the enforced bit, so no conntrack value of the
// fast path but fast-allowed can be a rule's, and fast-allowed's tag is
// reserved; no packet-mark value is any conntrack-mark value, so a
// gateway that copies the conntrack mark into the packet mark (connmark
// restore) cannot forge a verdict.
func (l markLayout) fastTag() uint32       { return l.count }
func (l markLayout) fastAllowed() uint32   { return l.enforced | l.count<<l.shift }
func (l markLayout) fastPendingCT() uint32 { return l.count << l.shift }
func (l markLayout) fastDeniedCT() uint32  { return (l.count - 1) << l.shift }

func (l markLayout) fastMarks() Marks {
	return Marks{Mask: l.owned(), Pending: (l.count - 2) << l.shift, Allowed: (l.count - 3) << l.shift, Denied: (l.count - 4) << l.shift}
}

// fastMinTags is the fewest tags a layout needs for the fast path: the
// five values above and at least two rules'.
const fastMinTags = 7

// FastMarks returns the packet-mark values of the fast path for cfg (its
// Config.CTMarkBits).
func FastMarks(cfg Config) Marks { return layoutOf(cfg.CTMarkBits).fastMarks() }

// fastQueue is the queue number of the fast path.
func (c Config) fastQueue() uint16 {
	if c.FastPathQueue == 0 {
		return DefaultFastPathQueue
	}
	return c.FastPathQueue
}

// Chain names of the fast path.
const chainFastPath = "fastpath"

// redirectedPorts are the TCP port ranges redirected to the proxy
// (redirectRules): Config.TCPPorts and the ports of host/path rules, or
// every port ({} as the only range).
func redirectedPorts(cfg Config, extra []policy.PortRange) []policy.PortRange {
	if len(cfg.TCPPorts) == 0 {
		return []policy.PortRange{{}}
	}
	ranges := slices.Clone(cfg.TCPPorts)
	for _, pr := range extra {
		if !slices.Contains(ranges, pr) {
			ranges = append(ranges, pr)
		}
	}
	return ranges
}

// fastPathRules are the rules of chain fastpath (filter, prerouting,
// priority -150: after conntrack, before the redirects): the LAN's
// initial SYNs to the ports the proxy would get are queued to userspace,
// which lets each through unmarked (redirected as ever) or with
// Marks.Pending (not redirected; decided from its first bytes). DNS and
// the gateway's own services are left alone, as the redirects do.
func fastPathRules(cfg Config, extra []policy.PortRange) []Rule {
	lan := cfg.lanMatch()
	rules := []Rule{
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.TCP, Ports: portRange(53, policy.TCP), Verdict: Verdict{Kind: Return}, Comment: "DNS over TCP: the forwarder's"},
		{IIf: lan.IIf, IIfSet: lan.IIfSet, FibLocal: true, Verdict: Verdict{Kind: Return}, Comment: "the gateway's own services"},
	}
	for _, pr := range cfg.fastPorts(redirectedPorts(cfg, extra)) {
		rules = append(rules, Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, CTState: CTNew, Proto: policy.TCP, Ports: pr, SYN: true,
			Verdict: Verdict{Kind: Queue, Queue: cfg.fastQueue()}, Comment: "fast path: the proxy decides each new connection"})
	}
	return rules
}

// fastNATRule is nat prerouting's rule, before the redirects to the
// proxy: a SYN userspace let through with Marks.Pending is not
// redirected, and its connection is marked pending.
func fastNATRule(cfg Config, l markLayout) Rule {
	lan := cfg.lanMatch()
	m := l.fastMarks()
	return Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, MarkAnd: m.Mask, MarkEq: m.Pending, Proto: policy.TCP,
		SetCTMarkMask: l.owned(), SetCTMark: l.fastPendingCT(), Verdict: Verdict{Kind: Accept}, Comment: "fast path: pending, not redirected"}
}

// fastForwardRules come first in forward, before anything that could
// accept or drop a pending connection's packets (the allow rules of TCP
// ports under Config.TCPPorts, the WAN guard):
//
//   - a packet userspace released with Marks.Allowed: its connection is
//     marked as let out (the enforced bit, the reserved fast tag), and
//     from then on passes as established;
//   - Marks.Denied: marked denied, and dropped, as every later packet of
//     a denied connection;
//   - a SYN from the client of a fast-allowed connection: dropped (a new
//     connection on its 5-tuple that conntrack did not start afresh);
//   - est, the forward chain's rule for the established and related
//     traffic of connections let out (their conntrack mark has the
//     enforced bit): every packet of a decided connection is accepted
//     here, by the chain's 5th rule instead of its 29th;
//   - a pending connection: replies pass, packets from the LAN that
//     provably carry no payload (the handshake's ACK, FIN, RST) pass,
//     every other packet is queued until userspace decides.
//
// est comes before the pending connection's rules, not after them, with
// the same verdicts: each of those rules needs the owned bits to be the
// pending value, whose enforced bit is clear, so no packet est accepts
// is one of theirs. It comes after the packet-mark rules (a packet
// queued while its connection was pending gets its verdict mark when the
// connection may be let out already) and the drop of a new SYN on a
// fast-allowed connection's 5-tuple (TestFastForwardEstablishedEarly).
func fastForwardRules(cfg Config, l markLayout, est Rule) []Rule {
	lan := cfg.lanMatch()
	m := l.fastMarks()
	owned := l.owned()
	q := cfg.fastQueue()
	rules := []Rule{
		{MarkAnd: m.Mask, MarkEq: m.Allowed, SetCTMarkMask: owned, SetCTMark: l.fastAllowed(), Verdict: Verdict{Kind: Accept}, Comment: "fast path: allowed"},
		{MarkAnd: m.Mask, MarkEq: m.Denied, SetCTMarkMask: owned, SetCTMark: l.fastDeniedCT(), Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "fast path: denied"},
		{CTMarkAnd: owned, CTMarkEq: l.fastDeniedCT(), Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "fast path: a denied connection"},
		// A SYN on a fast-allowed connection is another connection on
		// its 5-tuple: conntrack lets a new SYN through an entry the
		// server reset (state CLOSE) as "ignored", the ct mark kept, and
		// gets back in sync from the server's SYN-ACK, so it would go
		// out undecided. Dropped: the client's retransmission after the
		// entry expires (10 s) is a new connection, decided anew.
		{CTMarkAnd: owned, CTMarkEq: l.fastAllowed(), CTOriginal: true, Proto: policy.TCP, SYN: true, Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "fast path: a new SYN on a decided connection's 5-tuple"},
		est,
		{CTMarkAnd: owned, CTMarkEq: l.fastPendingCT(), CTReply: true, Verdict: Verdict{Kind: Accept}, Comment: "fast path: replies of a pending connection"},
	}
	for _, fam := range []Family{IPv4, IPv6} {
		for doff := uint8(5); doff <= 15; doff++ {
			rules = append(rules, Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, CTMarkAnd: owned, CTMarkEq: l.fastPendingCT(), CTOriginal: true, Family: fam, Proto: policy.TCP, EmptyTCP: doff,
				Verdict: Verdict{Kind: Accept}, Comment: "fast path: no payload"})
		}
	}
	return append(rules, Rule{CTMarkAnd: owned, CTMarkEq: l.fastPendingCT(), Verdict: Verdict{Kind: Queue, Queue: q}, Comment: "fast path: payload of a pending connection, to be decided"})
}

// TCP flags (tcp flags).
const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

// emptyTCPExprs are the expressions of Rule.EmptyTCP: an IPv4 header of
// 20 bytes (version 4, ihl 5) and total length 20 + 4*doff, or an IPv6
// header whose next header is TCP and payload length 4*doff; and the TCP
// data offset doff. With options (IPv4) or extension headers (IPv6) the
// rule does not match: such a packet is queued, never let through
// unproven.
func emptyTCPExprs(r Rule) ([]expr.Any, error) {
	d := r.EmptyTCP
	if d < 5 || d > 15 || r.Proto != policy.TCP {
		return nil, fmt.Errorf("an empty TCP segment match needs TCP and a data offset 5-15")
	}
	var e []expr.Any
	switch r.Family {
	case IPv4:
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 0, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x45}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(20 + 4*uint16(d))})
	case IPv6:
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 6, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 4, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(4 * uint16(d))})
	default:
		return nil, fmt.Errorf("an empty TCP segment match without a family")
	}
	return append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 12, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0xf0}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{d << 4}}), nil
}

// fastPorts are the port ranges of Config.FastPathPorts (443 when none)
// that the proxy would get (redirected): a range counts when one
// redirected range holds all of it.
func (c Config) fastPorts(redirected []policy.PortRange) []policy.PortRange {
	want := c.FastPathPorts
	if len(want) == 0 {
		want = []policy.PortRange{portRange(443, policy.TCP)}
	}
	var out []policy.PortRange
	for _, w := range want {
		for _, r := range redirected {
			if r == (policy.PortRange{}) || r.Lo <= w.Lo && w.Hi <= r.Hi {
				out = append(out, w)
				break
			}
		}
	}
	return out
}

// fastFingerprint hashes what the fast path's decisions depend on, for a
// reload's look at the fast-allowed connections (sweep.go): every rule
// that covers TCP (name, clients, targets with their paths, ports), the
// NAT64 prefixes. Fast-allowed connections all carry one tag (Marks has
// one Allowed value), so a reload that changes any of it cuts them all:
// a connection a removed or narrowed rule let out is never kept.
func fastFingerprint(eng *policy.Engine, now time.Time) uint64 {
	h := fnv.New64a()
	var b [8]byte
	for _, r := range eng.Rules() {
		if !r.Expires.IsZero() && !now.Before(r.Expires) {
			continue
		}
		if !slices.ContainsFunc(r.Ports, func(pr policy.PortRange) bool { return pr.Proto == policy.TCP }) {
			continue
		}
		binary.BigEndian.PutUint64(b[:], fingerprint(r, r.Ports))
		h.Write(b[:])
		for _, t := range r.To {
			h.Write([]byte(t.Path + "\x00"))
		}
	}
	for _, p := range eng.NAT64() {
		h.Write([]byte(p.String() + "\x00"))
	}
	return h.Sum64()
}
