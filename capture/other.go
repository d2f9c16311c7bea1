package capture

import (
	"net/netip"
	"strconv"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// Packets of other IP protocols than TCP and UDP.
//
// No rule can allow them but an ICMP or ICMPv6 echo request: a rule's
// ports are TCP or UDP ports ("any" is both) or "icmp" (echo requests),
// and the enforce firewall's forward chain drops every other protocol
// from the LAN ("nothing else from the LAN"; ICMP errors about a
// connection it let out pass as related), and echo requests but to the
// addresses of the rules that list icmp. Audit mode forwards them, so a
// device's ping monitoring, ping tunnel, GRE or IPsec VPN, 6in4 tunnel
// goes out: the report must show them, or enforce cuts them unseen.
// Capture makes them flows, one per client, destination and protocol
// (no ports: ICMP echo identifiers and sequence numbers are not kept, a
// ping program's every run is the same flow while it is not idle for
// Config.UDPIdle), decided at their first packet as denied with
// ReasonProtocol, or inbound (see inbound); a flow whose first packet is
// an echo request is decided by the policy with the protocol icmp, as the
// forward chain decides it: by address, a CIDR rule's or one DNS gave out
// for a rule's name (decideForwarded). A policy reload judges them again
// as it does forwarded flows (Redecide, reload.go).
//
// What starts such a flow: a packet of any protocol but ICMP and ICMPv6
// to a unicast address (IGMP, VRRP, OSPF, PIM to their multicast groups
// stay on the link: not egress); of ICMP, a request (an echo request, or
// any type not an error, a reply or router discovery); of ICMPv6 an
// informational message that is not a reply, neighbour or router
// discovery or MLD. ICMP errors (destination unreachable, time exceeded,
// packet too big, parameter problem, redirect) are about another flow,
// and replies count in their request's flow if capture has it, never
// start one. Those, packets from a link-local, multicast, broadcast or
// unspecified address (onLink) and packets to one Linux does not forward
// (routed) are counted as NotIP.

// ReasonProtocol: a packet of an IP protocol other than TCP and UDP, and
// not an ICMP or ICMPv6 echo request (see above). No rule allows one; the
// enforce firewall drops it.
const ReasonProtocol = "protocol-not-allowed"

// other reports whether proto is an IP protocol capture makes flows of
// here, not tcpPacket or udpPacket.
func other(proto layers.IPProtocol) bool {
	return proto != layers.IPProtocolTCP && proto != layers.IPProtocolUDP
}

// ip4Layer is the IPv4 decoder: an IPv4 or IPv6 packet inside an IPv4
// packet (IP protocol 4, 41: IP-in-IP and 6in4 tunnels, which the
// enforce firewall drops as any other protocol) is not decoded. The
// tunnel is the flow, not what it carries (otherPacket). GTP-U, a UDP
// tunnel, still gives its inner packet.
type ip4Layer struct{ layers.IPv4 }

func (l *ip4Layer) NextLayerType() gopacket.LayerType {
	if ipInIP(l.Protocol) && l.Flags&layers.IPv4MoreFragments == 0 && l.FragOffset == 0 {
		return gopacket.LayerTypeZero
	}
	return l.IPv4.NextLayerType()
}

// ip6Layer is the IPv6 decoder, as ip4Layer for IPv6.
type ip6Layer struct{ layers.IPv6 }

// next is the protocol of what follows the IPv6 header and its
// Hop-by-Hop Options, which gopacket decodes with it.
func (l *ip6Layer) next() layers.IPProtocol {
	if l.HopByHop != nil {
		return l.HopByHop.NextHeader
	}
	return l.NextHeader
}

func (l *ip6Layer) NextLayerType() gopacket.LayerType {
	if ipInIP(l.next()) {
		return gopacket.LayerTypeZero
	}
	return l.IPv6.NextLayerType()
}

// ip6ExtLayer is the IPv6 extension header skipper, as ip6Layer.
type ip6ExtLayer struct{ layers.IPv6ExtensionSkipper }

func (l *ip6ExtLayer) NextLayerType() gopacket.LayerType {
	if ipInIP(l.NextHeader) {
		return gopacket.LayerTypeZero
	}
	return l.IPv6ExtensionSkipper.NextLayerType()
}

// icmpProto reports whether IP protocol n is ICMP or ICMPv6.
func icmpProto(n uint8) bool {
	return n == uint8(layers.IPProtocolICMPv4) || n == uint8(layers.IPProtocolICMPv6)
}

func ipInIP(p layers.IPProtocol) bool {
	return p == layers.IPProtocolIPv4 || p == layers.IPProtocolIPv6
}

// What an ICMP or ICMPv6 message is to flows.
const (
	icmpNone  = iota // not a flow's: an error, discovery
	icmpStart        // a request: starts a flow
	icmpReply        // counts in its request's flow
)

// icmpKind says what an ICMP message of type typ is.
func icmpKind(typ uint8) int {
	switch typ {
	case 0, 14, 16, 18, 43: // echo, timestamp, information, address mask, extended echo replies
		return icmpReply
	case 3, 4, 5, 9, 10, 11, 12: // errors, redirect, router discovery
		return icmpNone
	}
	return icmpStart
}

// icmp6Kind says what an ICMPv6 message of type typ is.
func icmp6Kind(typ uint8) int {
	switch {
	case typ < 128: // errors: unreachable, packet too big, time exceeded, parameter problem
		return icmpNone
	case typ == 129, typ == 140, typ == 145, typ == 147, typ == 161: // echo, node information, home agent, mobile prefix, extended echo replies
		return icmpReply
	case typ >= 130 && typ <= 137, typ == 141, typ == 142, typ == 143, typ == 148, typ == 149, typ >= 151 && typ <= 153:
		// MLD, router and neighbour discovery, inverse ND, SEND,
		// multicast router discovery: the link's own.
		return icmpNone
	}
	return icmpStart
}

// onLink reports whether a is an address no router forwards to or from:
// multicast, broadcast, link-local, loopback, unspecified. As a
// destination Linux is less strict (routed).
func onLink(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsLoopback() || a.IsUnspecified() ||
		a == netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// routed reports whether Linux forwards, by its routes, a packet a LAN
// host sends the gateway to dst (an IPv4 header's when dst.Is4, else an
// IPv6 header's): not to IPv4's 0.0.0.0 (a martian), 255.255.255.255,
// loopback or a multicast group, nor to IPv6's loopback, link-local or
// multicast addresses. It forwards IPv4's link-local 169.254/16 (the
// metadata address 169.254.169.254), IPv6's unspecified ::, and an
// IPv4-mapped ::ffff:a.b.c.d, an IPv6 address to the kernel whatever it
// carries (guard.go), as any unicast address: kernel 6.18, an echo
// request to each crossed the gateway's forward chain, where enforce
// mode's firewall judges it (its guarded sets hold them all).
func routed(dst netip.Addr) bool {
	switch {
	case dst.Is4():
		return !dst.IsUnspecified() && !dst.IsLoopback() && !dst.IsMulticast() && dst != netip.AddrFrom4([4]byte{255, 255, 255, 255})
	case dst.Is4In6():
		return true
	}
	return !dst.IsLoopback() && !dst.IsLinkLocalUnicast() && !dst.IsMulticast()
}

// otherPacket handles a packet of IP protocol proto (other) from src to
// dst; payload is what follows its IP headers, later says it is a
// fragment after the first (no ICMP header in it).
func (p *proc) otherPacket(src, dst netip.Addr, proto uint8, payload []byte, later bool, mac []byte) {
	kind, echo := icmpStart, false
	switch {
	case later:
		kind = icmpReply
	case proto == uint8(layers.IPProtocolICMPv4) || proto == uint8(layers.IPProtocolICMPv6):
		if len(payload) == 0 {
			kind = icmpNone
		} else if proto == uint8(layers.IPProtocolICMPv4) {
			kind, echo = icmpKind(payload[0]), payload[0] == 8
		} else {
			kind, echo = icmp6Kind(payload[0]), payload[0] == 128
		}
	}
	if kind == icmpNone || onLink(src) || !routed(dst) {
		p.stats.notIP.Add(1)
		return
	}
	var f *flow
	dir := 0
	if kind == icmpReply {
		// Only in a flow capture has: a reply or a later fragment
		// starts none.
		k := makeKey(src, 0, dst, 0, proto)
		if f = p.flows[k]; f == nil || f.closed || f.src != p.src || p.endIdle(k, f) {
			p.stats.notIP.Add(1)
			return
		}
		if src != f.cli {
			dir = 1
		}
		f.last = p.now
	} else {
		// The sender of the first packet is the client; a packet the
		// gateway sent toward the LAN starts an inbound flow. Only an
		// ICMP request says so for sure: a GRE or ESP packet may resume
		// a tunnel capture ended idle while conntrack holds it (recall).
		f, dir = p.lookup(src, 0, dst, 0, proto, true, icmpProto(proto), p.sentByGateway(mac), mac)
		if f == nil {
			return
		}
		if !f.decided && !f.own {
			p.denyOther(f, echo)
		}
	}
	f.pkts[dir]++
	f.bytes[dir] += uint64(len(payload) + p.cut)
}

// denyOther decides f, a new flow of another protocol, as denied with
// ReasonProtocol in the policy's mode now; its name, for the record, is
// one DNS gave out for the address, if any. A flow an ICMP or ICMPv6
// echo request started (echo) is decided as the forward chain decides
// it, by address (decideForwarded: a CIDR rule, or an answer that fed a
// rule's learned set, whose name it records) with the protocol icmp.
func (p *proc) denyOther(f *flow, echo bool) {
	f.inspect, f.decided = false, true
	eng := p.c.deps.Policy.Load()
	f.dec = protocolDenied(eng)
	f.evName, f.evSrc = "", audit.NameNone
	f.echo = echo
	if echo {
		in := p.flowInput(f, "")
		d, name, src, learned := p.decideForwarded(eng, in, "", "", f.first, f.last)
		f.dec, f.learned = p.special(eng, f, in, d, true), learned
		if name != "" {
			f.evName, f.evSrc = name, src
			return
		}
	}
	cli, dst := f.cli.Unmap(), f.srv.Unmap()
	if p.c.deps.DNS != nil {
		if ns := p.c.deps.DNS.NamesFor(cli, dst); len(ns) > 0 {
			f.evName, f.evSrc = ns[0], audit.NameDNSLearned
			return
		}
	}
	var names [4]string
	if ns := p.c.learned.namesFor(cli, dst, p.now, names[:0]); len(ns) > 0 {
		f.evName, f.evSrc = ns[0], audit.NameDNSAnswer
	}
}

// protocolDenied is the decision of a flow of another protocol that is
// not an echo: denied with ReasonProtocol in eng's mode.
func protocolDenied(eng *policy.Engine) policy.Decision {
	return policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: ReasonProtocol, Mode: eng.Mode()}
}

// protoName is the name events give IP protocol n: tcp, udp, the
// names of /etc/protocols and nftables for the common others, else the
// number.
func protoName(n uint8) string {
	switch n {
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 1:
		return "icmp"
	case 2:
		return "igmp"
	case 41:
		return "ipv6"
	case 47:
		return "gre"
	case 50:
		return "esp"
	case 51:
		return "ah"
	case 58:
		return "ipv6-icmp"
	case 132:
		return "sctp"
	}
	return strconv.Itoa(int(n))
}

// protoNum is protoName's inverse (tcp for what it does not know).
func protoNum(s string) uint8 {
	for _, n := range []uint8{6, 17, 1, 2, 41, 47, 50, 51, 58, 132} {
		if protoName(n) == s {
			return n
		}
	}
	if n, err := strconv.ParseUint(s, 10, 8); err == nil {
		return uint8(n)
	}
	return 6
}
