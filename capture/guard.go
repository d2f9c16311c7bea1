package capture

import (
	"encoding/binary"
	"net/netip"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// LAN packets the enforce firewall's gateway hardening drops.
//
// In enforce mode the ruleset drops, before anything else sees them, what
// arrives on a LAN interface from a source the gateway would not route
// back out of that interface (the antispoof chain, BCP 38: `fib saddr .
// iif oif missing`) and what is sent to 127.0.0.0/8; its input chain
// drops IPv6 Router Advertisements and redirects and ICMP redirects that
// come in on a LAN interface (firewall/render.go: antispoofRules,
// lanRoutingGuard). Audit mode installs none of this, and the operator
// must see in the report what enforce mode will drop: a routed subnet
// behind a LAN router the gateway has no route for, a device that sends
// RAs. Capture sees LAN frames before netfilter, so in both modes it
// records each such packet's flow (by client, destination, protocol and
// ports, as other flows) as denied with a reason of its own, in the
// order the firewall checks them: ReasonForgedSource,
// ReasonLoopbackDestination, ReasonRouterAdvertisement, ReasonRedirect.
// Capture reads nothing else of such a flow (no name, no DNS answer).
//
// Only live frames a LAN host sent are checked: a frame the gateway sent
// out of the interface carries one of its MAC addresses (sentByGateway),
// and on an interface without a MAC address capture cannot tell them
// apart, so it checks nothing there; offline (a capture file) no
// interface and no routing table is known.
//
// The source check asks the kernel, as nft_fib does, whether the LAN
// interface has a route back to the source (netutil.RouteAsker, one
// netlink request, in the namespace of the sockets), once per interface
// and source in rpfTTL: a route an operator adds counts within that. At
// most rpfMax answers are kept (expired ones make room first) and at most
// rpfBudget requests made a second: a flood of
// random forged sources costs a bounded number of requests, and a source
// checked neither way (over the budget, or the kernel did not answer) is
// recorded as before, its flow decided by the policy (Stats.RPFUnchecked
// counts such packets). The firewall's exceptions are kept: DHCP from
// 0.0.0.0 to the broadcast address or a local multicast group
// (224.0.0.0/24), ICMPv6 from :: to a link-local destination (duplicate
// address detection, MLD), which nft_fib lets pass; IPv6 link-local
// sources pass by their fe80::/64 route, IPv4's 169.254/16 only where the
// gateway routes it via the LAN interface, as there.
//
// What Linux itself drops in both modes is not recorded (no flow, but
// Stats.Martian): a packet from 0.0.0.0 to anything but those DHCP
// destinations and 0.0.0.0 passes nft_fib where the default route
// leaves by the LAN interface, but the kernel drops it after prerouting
// as a martian source (it reaches neither the input nor the forward
// chain; kernel 6.18: an echo, UDP and a TCP SYN to a server, to the
// gateway's own addresses and to a subnet routed via a LAN host, which
// for IPv6's :: it forwards), so neither mode lets it through. One from
// 0.0.0.0 to 0.0.0.0 the kernel takes as a broadcast (it reached the
// input chain) and nft_fib looks 0.0.0.0 up: checked as any source. A
// packet from a LAN host to 0.0.0.0 the kernel drops as a martian
// destination (kernel 6.18: an echo, UDP and a TCP SYN to a port not
// redirected reached neither chain; the rest of 0.0.0.0/8 it forwards)
// unless enforce mode redirects it to the proxy or the forwarder (TCP to
// a port the proxy takes, DNS: localDest in guard), whose flow the
// policy's guard decides (policy.LANThisHost). Conntrack reassembles a
// fragmented datagram before the nat chain: its first fragment is
// judged by the ports it carries, and a later one, which carries none,
// goes to reassembly, which completes only with a first fragment that
// passed. Nor does
// Linux forward a packet from IPv6's :: out of another interface
// (kernel 6.18: an echo request, a UDP datagram and a TCP SYN from :: to
// a server's address passed prerouting, where nft_fib found no route
// back, but reached neither the forward nor the input chain:
// Ip6InAddrErrors), so one to an address
// it would forward by a route that leaves by another interface (routed,
// not the gateway's; :: too, the default route's) is not recorded
// either (one route lookup of the destination, as for a source, above).
// Where the route leaves by the LAN interface it came in on, the kernel
// forwards it (ip6_forward's redirect case; the same three to a subnet
// routed via a LAN host crossed the forward chain), and to the
// gateway's own address it takes it: enforce mode's antispoof chain
// drops both (forged-source). An IPv4-mapped address in an IPv6 header
// (::ffff:198.18.1.77) is an IPv6 address: Linux passes such a packet to
// netfilter (kernel 6.18: to the input and forward chains; no drop in
// ip6_rcv_core), nft_fib looks its source up in the IPv6 table, where
// usually only the default route covers it, and the firewall's loopback
// rule is IPv4's, so ::ffff:127.0.0.1 is no loopback destination (the
// kernel forwards it by its IPv6 routes; the policy decides it). Capture
// checks them so, and records such a flow under the address the header
// carries, not as the IPv4 client's (event).
const (
	// ReasonForgedSource: a source the LAN interface does not route back
	// to (not of the LAN's subnets, nor of a subnet the gateway routes
	// via the LAN); the antispoof chain drops it.
	ReasonForgedSource = "forged-source"
	// ReasonLoopbackDestination: a packet from the LAN to 127.0.0.0/8;
	// the antispoof chain drops it.
	ReasonLoopbackDestination = "loopback-destination"
	// ReasonRouterAdvertisement: an IPv6 Router Advertisement from the
	// LAN side; the input chain drops it.
	ReasonRouterAdvertisement = "router-advertisement"
	// ReasonRedirect: an ICMP or ICMPv6 redirect from the LAN side to
	// the gateway; the input chain drops it.
	ReasonRedirect = "redirect"

	// reasonMartian: a packet from 0.0.0.0, to 0.0.0.0 and not
	// redirected, or from :: to an address the gateway routes out of
	// another interface, the kernel drops in both modes; guard records
	// no flow for it.
	reasonMartian = "martian"
)

const (
	rpfTTL    = 30 * time.Second
	rpfMax    = 8192
	rpfBudget = 256
)

type rpfKey struct {
	ifindex int
	addr    netip.Addr
}

// rpfCache keeps RoutesBack's answers (see above).
type rpfCache struct {
	m      map[rpfKey]rpfAnswer
	window time.Time // the second asked counts the requests of
	asked  int
}

type rpfAnswer struct {
	back  bool
	until time.Time
}

// routesBack reports whether the interface with index ifindex routes a
// reply to src back out of it, and whether that is known (see above).
func (p *proc) routesBack(ifindex int, src netip.Addr) (back, known bool) {
	c := &p.rpf
	k := rpfKey{ifindex, src}
	if a, ok := c.m[k]; ok && p.now.Before(a.until) {
		return a.back, true
	}
	if p.now.Sub(c.window) >= time.Second || p.now.Before(c.window) {
		c.window, c.asked = p.now, 0
	}
	if c.asked >= rpfBudget {
		return false, false
	}
	ask := p.c.routesBackHook
	if ask == nil && p.c.routes != nil {
		ask = p.c.routes.RoutesBack
	}
	if ask == nil {
		return false, false
	}
	c.asked++
	back, err := ask(ifindex, src)
	if err != nil {
		return false, false
	}
	if c.m == nil {
		c.m = make(map[rpfKey]rpfAnswer)
	}
	if _, ok := c.m[k]; !ok && len(c.m) >= rpfMax {
		// Expired answers go first: rpfBudget*rpfTTL is less than
		// rpfMax, so that makes room but after a clock step.
		for k2, a := range c.m {
			if !p.now.Before(a.until) {
				delete(c.m, k2)
			}
		}
		for k2 := range c.m {
			if len(c.m) < rpfMax {
				break
			}
			delete(c.m, k2)
		}
	}
	c.m[k] = rpfAnswer{back: back, until: p.now.Add(rpfTTL)}
	return back, true
}

var localMulticast4 = netip.MustParsePrefix("224.0.0.0/24")

// guardReason says why enforce mode's gateway hardening drops a packet
// from src to dst of IP protocol proto that a LAN host sent in on the
// current live socket (payload: what follows its IP headers; later: a
// fragment after the first; local: TCP or UDP enforce mode redirects to
// the proxy or the forwarder, see localDest), or "" when it passes (see
// above).
func (p *proc) guardReason(src, dst netip.Addr, proto uint8, payload []byte, later, local bool) string {
	ifindex := 0
	if p.src > 0 && p.src <= len(p.ifindexes) {
		ifindex = p.ifindexes[p.src-1]
	}
	if ifindex == 0 {
		return ""
	}
	// No Unmap: an IPv6 header's ::ffff:a.b.c.d is an IPv6 address to
	// the kernel and to nft_fib (see above).
	switch {
	case src.Is4() && src.IsUnspecified() && (dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || localMulticast4.Contains(dst)):
	case src.Is4() && src.IsUnspecified() && !dst.IsUnspecified():
		return reasonMartian
	case dst.Is4() && dst.IsUnspecified() && !src.IsUnspecified() && !local && !(later && (proto == 6 || proto == 17)):
		return reasonMartian
	case src.Is6() && src.IsUnspecified() && proto == uint8(layers.IPProtocolICMPv6) && (dst.IsLinkLocalUnicast() || dst.IsLinkLocalMulticast()):
	case src.Is6() && src.IsUnspecified() && routed(dst) && !p.ownAddr(dst) && p.leavesElsewhere(ifindex, dst):
		return reasonMartian
	default:
		back, known := p.routesBack(ifindex, src)
		if !known {
			p.stats.rpfUnchecked.Add(1)
		} else if !back {
			return ReasonForgedSource
		}
	}
	if dst.Is4() && dst.IsLoopback() {
		return ReasonLoopbackDestination
	}
	if later || len(payload) == 0 {
		return ""
	}
	reason := ""
	switch {
	case proto == uint8(layers.IPProtocolICMPv6) && payload[0] == 134:
		reason = ReasonRouterAdvertisement
	case proto == uint8(layers.IPProtocolICMPv6) && payload[0] == 137,
		proto == uint8(layers.IPProtocolICMPv4) && payload[0] == 5:
		reason = ReasonRedirect
	}
	if reason == "" || !p.toGateway(dst) {
		return ""
	}
	return reason
}

// leavesElsewhere reports whether the gateway's best route to dst is
// known to leave by another interface than the one with index ifindex.
// Linux forwards a packet from IPv6's :: only back out of the interface
// it came in on (ip6_forward checks the source after the redirect case:
// kernel 6.18 forwarded an echo, UDP and a TCP SYN from :: to a subnet
// routed via a LAN host, and dropped one to the server's address); an
// unknown route (over the budget) is not.
func (p *proc) leavesElsewhere(ifindex int, dst netip.Addr) bool {
	back, known := p.routesBack(ifindex, dst)
	return known && !back
}

// toGateway reports whether a packet to dst that came in on a LAN
// interface is the gateway's to take (its input chain's): to one of its
// addresses, or to a multicast, broadcast or link-local one.
func (p *proc) toGateway(dst netip.Addr) bool {
	return onLink(dst) || p.ownAddr(dst)
}

// ownAddr reports whether a is one of the gateway's own addresses.
func (p *proc) ownAddr(a netip.Addr) bool {
	_, ok := p.own.Load().set[a]
	return ok
}

// guardPacket records a packet guardReason dropped, of IP protocol proto
// from src and port sp to dst and port dp (0 but for TCP and UDP), n
// bytes after its IP headers, in its flow, decided at its first packet
// as denied with reason in the policy's mode now.
func (p *proc) guardPacket(src netip.Addr, sp uint16, dst netip.Addr, dp uint16, proto uint8, reason string, n int, mac []byte) {
	p.stats.guarded.Add(1)
	p.guarding = true
	f, dir := p.lookup(src, sp, dst, dp, proto, true, true, false, mac)
	p.guarding = false
	if f == nil {
		return
	}
	if !f.decided {
		f.inspect, f.decided, f.guarded = false, true, true
		f.dec = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reason, Mode: p.c.deps.Policy.Load().Mode()}
		f.evName, f.evSrc = "", audit.NameNone
	}
	f.pkts[dir]++
	f.bytes[dir] += uint64(n + p.cut)
}

// guard checks a frame a LAN host sent in on the current live socket,
// decoded into p's layers (see packetLen), and records it and reports
// true when the gateway hardening drops it: the pipeline reads no more
// of it.
func (p *proc) guard(src, dst netip.Addr, proto uint8, payload []byte, later, hasTCP, hasUDP bool) bool {
	var sp, dp uint16
	switch {
	case later:
	case hasTCP:
		sp, dp = uint16(p.tcp.SrcPort), uint16(p.tcp.DstPort)
	case hasUDP:
		sp, dp = uint16(p.udp.SrcPort), uint16(p.udp.DstPort)
	}
	// localDest: to 0.0.0.0, enforce mode redirects it to the gateway
	// (DNS to the forwarder, TCP to a port the proxy takes), whose NAT
	// comes before the kernel's martian destination check. The first
	// fragment of a datagram (no TCP or UDP layer decoded) has its
	// ports too: conntrack reassembles the datagram before the nat
	// chain redirects it by them.
	localDest := false
	if dst.Is4() && dst.IsUnspecified() {
		tcp, udp, port := hasTCP, hasUDP, dp
		if !later && !hasTCP && !hasUDP && (proto == 6 || proto == 17) && len(payload) >= 4 {
			tcp, udp, port = proto == 6, proto == 17, binary.BigEndian.Uint16(payload[2:4])
		}
		localDest = (tcp || udp) && port == 53 || tcp && p.redirected(port)
	}
	reason := p.guardReason(src, dst, proto, payload, later, localDest)
	if reason == "" {
		return false
	}
	if reason == reasonMartian {
		p.stats.martian.Add(1)
		return true
	}
	p.guardPacket(src, sp, dst, dp, proto, reason, len(payload), p.eth.SrcMAC)
	return true
}
