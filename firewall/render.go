package firewall

import (
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"slices"
	"time"

	"egressd/policy"
)

// Ruleset is the rendered form of a policy and a Config: egressd's whole
// table. It is a description, built without touching the kernel; String
// prints it as `nft list table` would, and Install turns it into netlink
// messages. A Ruleset is immutable once rendered.
type Ruleset struct {
	Mode   policy.Mode
	Sets   []Set
	Chains []Chain
	// NextExpiry is the earliest time a rendered rule expires (zero: none);
	// the Firewall re-renders then.
	NextExpiry time.Time

	// learn maps a rule name to its learned sets, IPv4 then IPv6 ("" for
	// a family its "*" or a /0 opens: no set). Rules whose names feed
	// address sets appear here in both modes, so that addresses learned
	// in audit mode are ready when a reload switches to enforce; inKernel
	// says whether the sets exist in the table.
	learn    map[string][2]string
	inKernel bool

	// mark is where the conntrack mark bits the ruleset writes sit
	// (Config.CTMarkBits).
	mark markLayout

	// flows describes, per policy rule with accept rules in forward, what
	// they let out, for a reload's look at the connections already out
	// (sweep.go); byTag and byFP index it by conntrack mark tag and by
	// fingerprint. Rendered in both modes, like learn.
	flows []*flowRule
	byTag map[uint32][]*flowRule
	byFP  map[uint64]*flowRule
	// expiredTags are the tags the expired rules would have (addFlowRule
	// draws none of them for another rule): a rule's tag does not depend
	// on whether a rule before it has expired, so that a start after a
	// rule expired reads the marks its ruleset wrote before as the same
	// rules' (Deps.Previous is rendered as of the start).
	expiredTags map[uint32]bool
	// fast says the ruleset has the fast path (Config.FastPath, enforce
	// mode): the fast tag is reserved (drawTag), and the connections
	// marked fast-allowed are kept by a reload only while fastFP, what
	// the fast path's decisions depend on, is unchanged (keeps).
	fast   bool
	fastFP uint64
	// guards are the guarded destinations the sets hold (guardList):
	// policy.GuardedRanges, adjusted for the engine's NAT64 prefixes.
	guards []netip.Prefix
}

// Family is an address family a rule or set applies to.
type Family uint8

// The families. FamilyAny means the rule does not look at the network
// header.
const (
	FamilyAny Family = iota
	IPv4
	IPv6
)

func (f Family) String() string {
	switch f {
	case IPv4:
		return "ipv4"
	case IPv6:
		return "ipv6"
	}
	return "any"
}

// SetKind is what a set holds.
type SetKind uint8

// The set kinds.
const (
	// SetPrefixes holds address prefixes, fixed at render time (flags
	// interval).
	SetPrefixes SetKind = iota + 1
	// SetLearned holds addresses fed by Learn, each with its own timeout
	// (flags timeout).
	SetLearned
	// SetMACs holds client MAC addresses, fixed at render time.
	SetMACs
	// SetIfnames holds interface names, fixed at render time: the LAN
	// interfaces when there are several (Config.LANs).
	SetIfnames
)

// Set is a named nftables set.
type Set struct {
	Name     string
	Kind     SetKind
	Family   Family // the address family (FamilyAny for SetMACs and SetIfnames)
	Rule     string // the policy rule it serves; "" for the guarded ranges and the LANs
	Prefixes []netip.Prefix
	MACs     []net.HardwareAddr
	Names    []string // SetIfnames
}

// Chain is a base chain of the table. Every chain's policy is accept: the
// ruleset drops only what its rules say, so a chain with no rules yet (in
// the middle of a transaction) never drops anything.
type Chain struct {
	Name     string
	Type     string // "filter" or "nat"
	Hook     string // "prerouting", "input", "forward", "postrouting"
	Priority int    // -100 dstnat, 0 filter, 100 srcnat
	Rules    []Rule
}

// Rule is one rule: every non-zero match must hold, then the verdict
// applies.
type Rule struct {
	IIf string // meta iifname
	// IIfSet names a set of interface names (SetIfnames) the packet's
	// incoming interface must be in: iifname @lans.
	IIfSet  string
	OIf     string  // meta oifname
	CTState CTState // ct state (any of the bits); 0: no match
	// CTMark matches connections whose conntrack mark has these bits
	// (ct mark & CTMark == CTMark); 0: no match.
	CTMark uint32
	// CTMarkAnd and CTMarkEq match connections whose conntrack mark's
	// bits under CTMarkAnd are CTMarkEq (ct mark & CTMarkAnd ==
	// CTMarkEq); a zero CTMarkAnd: no match. MarkAnd and MarkEq match the
	// packet mark the same way (meta mark).
	CTMarkAnd, CTMarkEq uint32
	MarkAnd, MarkEq     uint32
	// CTReply matches packets of a connection's reply direction (ct
	// direction reply), CTOriginal those of its original direction.
	CTReply, CTOriginal bool
	Family              Family // meta nfproto; implied by SrcSet/DstSet
	// SrcSet, DstSet name address sets of Family; SrcMACSet a MAC set.
	SrcSet, DstSet, SrcMACSet string
	// DstNotSet names an address set of Family the destination must not
	// be in.
	DstNotSet string
	FibLocal  bool // fib daddr type local
	// FibSrcMissing: the kernel's FIB has no route back to the source
	// out of the interface the packet came in on (fib saddr . iif oif
	// missing): a strict reverse-path check.
	FibSrcMissing bool
	Proto         policy.Proto // meta l4proto (TCP, UDP); 0: any
	ICMPv6        bool         // meta l4proto ipv6-icmp, with ICMPTypes
	ICMP          bool         // meta l4proto icmp (IPv4), with ICMPTypes
	ICMPTypes     [2]uint8     // icmp or icmpv6 type range (inclusive)
	// Echo matches an ICMP echo request of Family (IPv4 or IPv6): icmp
	// type echo-request, icmpv6 type echo-request (policy.ICMP).
	Echo bool
	// Ports is the destination port range of Proto; zero Lo: any port.
	Ports policy.PortRange
	// SYN matches a TCP segment with SYN set and ACK clear (tcp flags &
	// (syn | ack) == syn), with Proto TCP.
	SYN bool
	// EmptyTCP, when not zero, matches a TCP segment of that data offset
	// (in 32-bit words, 5-15) that provably carries no payload: IPv4
	// without options (ihl 5) and total length 20+4*EmptyTCP, or IPv6
	// whose next header is TCP and payload length 4*EmptyTCP. Family
	// must be IPv4 or IPv6.
	EmptyTCP uint8
	Counter  bool
	// SetCTMarkMask and SetCTMark set the bits of the connection's
	// conntrack mark under the mask to SetCTMark (the others kept) before
	// the verdict; a zero mask: none.
	SetCTMarkMask, SetCTMark uint32
	Verdict                  Verdict
	Comment                  string
}

// CTMarkEnforced is the conntrack mark bit the enforce ruleset sets on
// every connection its forward chain lets out, and requires of
// established and related traffic, in the default layout
// ([DefaultCTMarkBits]; Config.CTMarkBits places it elsewhere). A
// connection that went out before enforcement began (in audit mode, or
// before egressd) lacks it, so "established" does not carry it past the
// policy: its packets from the LAN are judged by the rules like new ones,
// and its replies are dropped.
const CTMarkEnforced uint32 = 0x00400000

// CTMarkTag are the conntrack mark bits, next to [CTMarkEnforced], in
// which the enforce ruleset records which policy rule let a connection
// out, in the default layout: a tag of 10 bits derived from the rule's
// name and content (addFlowRule). Tag 0 is a connection between other
// interfaces (not egress), and one marked by an egressd from before tags.
// A reload looks at them to cut the connections a narrowed policy no
// longer allows (sweep.go).
const CTMarkTag uint32 = 0x003ff000

// DefaultCTMarkBits are the conntrack mark bits egressd owns when
// Config.CTMarkBits is zero: [CTMarkEnforced] and [CTMarkTag].
const DefaultCTMarkBits = CTMarkEnforced | CTMarkTag

// ctTagShift is the position of CTMarkTag's lowest bit.
const ctTagShift = 12

// ctMarkOwned are the mark bits the ruleset writes in the default
// layout; every other bit of the mark is left as it is.
const ctMarkOwned = CTMarkEnforced | CTMarkTag

// markLayout is where egressd's bits sit in the conntrack mark: one run
// of contiguous bits (Config.CTMarkBits), its highest the enforced bit,
// the others the tag.
type markLayout struct {
	enforced uint32 // the enforced bit
	tag      uint32 // the tag's bits
	shift    uint   // the position of the tag's lowest bit
	count    uint32 // how many tags the tag holds, 0 excluded
}

// layoutOf is the layout of a run of bits that CheckCTMarkBits accepts.
func layoutOf(run uint32) markLayout {
	if run == 0 {
		run = DefaultCTMarkBits
	}
	enforced := uint32(1) << (31 - bits.LeadingZeros32(run))
	tag := run &^ enforced
	shift := uint(bits.TrailingZeros32(tag))
	return markLayout{enforced: enforced, tag: tag, shift: shift, count: tag >> shift}
}

// owned are the mark bits the ruleset writes; every other bit of the mark
// is left as it is.
func (l markLayout) owned() uint32 { return l.enforced | l.tag }

// tagOf reads the tag of a mark.
func (l markLayout) tagOf(mark uint32) uint32 { return mark & l.tag >> l.shift }

// marked is the value of the owned bits for a connection let out under
// tag.
func (l markLayout) marked(tag uint32) uint32 { return l.enforced | tag<<l.shift }

// CheckCTMarkBits checks a value of Config.CTMarkBits (zero: the
// default): one run of contiguous bits, at least two (the enforced bit,
// the highest, and a tag).
func CheckCTMarkBits(run uint32) error {
	if run == 0 {
		return nil
	}
	low := run & -run
	if (run+low)&run != 0 {
		return fmt.Errorf("firewall: conntrack mark bits 0x%08x: not one run of contiguous bits (such as 0x%08x)", run, DefaultCTMarkBits)
	}
	if run == low {
		return fmt.Errorf("firewall: conntrack mark bits 0x%08x: one bit; egressd needs at least two (the enforced bit and a rule tag), 11 for its default 1023 tags", run)
	}
	return nil
}

// CTState is a set of conntrack state bits.
type CTState uint32

// The conntrack states the ruleset uses (kernel bit values).
const (
	CTEstablished CTState = 2
	CTRelated     CTState = 4
	CTNew         CTState = 8
)

// VerdictKind is what a matching rule does.
type VerdictKind uint8

// The verdicts.
const (
	Accept VerdictKind = iota + 1
	Drop
	Return
	Reject         // ICMP(v6) port unreachable
	RejectTCPReset // TCP reset
	Redirect       // to the gateway's own address, port Verdict.Port
	Masquerade
	Queue // to userspace, NFQUEUE queue Verdict.Queue (fast.go)
)

// Verdict is a rule's action.
type Verdict struct {
	Kind  VerdictKind
	Port  uint16 // Redirect
	Queue uint16 // Queue
}

// Chain names.
const (
	chainAntispoof   = "antispoof"
	chainPrerouting  = "prerouting"
	chainInput       = "input"
	chainForward     = "forward"
	chainPostrouting = "postrouting"
)

// Ports that carry protocols the proxy cannot see into: QUIC (UDP 443) and
// DNS over TLS/QUIC (853). They are rejected, not dropped, so that clients
// give up at once and fall back to TCP and to the forwarder.
const (
	portQUIC = 443
	portDoT  = 853
)

// Render renders the policy's current rules (expired ones left out) and cfg
// into the ruleset the firewall would install, in the engine's mode.
func Render(cfg Config, eng *policy.Engine) (*Ruleset, error) {
	return render(cfg, eng, time.Now())
}

func render(cfg Config, eng *policy.Engine, now time.Time) (*Ruleset, error) {
	if eng == nil {
		return nil, fmt.Errorf("firewall: no policy")
	}
	mode := eng.Mode()
	if err := cfg.Validate(mode); err != nil {
		return nil, err
	}
	rs := &Ruleset{Mode: mode, learn: map[string][2]string{}, inKernel: mode == policy.ModeEnforce, mark: layoutOf(cfg.CTMarkBits)}
	if cfg.FastPath && mode == policy.ModeEnforce {
		rs.fast, rs.fastFP = true, fastFingerprint(eng, now)
	}
	ar := renderAllows(cfg, eng, now, rs)

	guard := cfg.WAN != "" && (mode == policy.ModeEnforce || cfg.GuardWAN)
	if mode == policy.ModeEnforce {
		if len(cfg.LANs) > 1 {
			rs.Sets = append(rs.Sets, Set{Name: setLANs, Kind: SetIfnames, Names: slices.Clone(cfg.LANs)})
		}
		rs.Sets = append(rs.Sets, ar.sets...)
		rs.Sets = append(rs.Sets, Set{Name: setLoopback4, Kind: SetPrefixes, Family: IPv4, Prefixes: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
		rs.Chains = append(rs.Chains, Chain{Name: chainAntispoof, Type: "filter", Hook: "prerouting", Priority: -300, Rules: antispoofRules(cfg)})
		if rs.fast {
			rs.Chains = append(rs.Chains, Chain{Name: chainFastPath, Type: "filter", Hook: "prerouting", Priority: -150, Rules: fastPathRules(cfg, eng.HostPathPorts())})
		}
		redirects := redirectRules(cfg, eng.HostPathPorts())
		if rs.fast {
			// Before the TCP redirects (DNS and the gateway's own
			// services come first, and are never queued as pending).
			i := slices.IndexFunc(redirects, func(r Rule) bool { return r.Verdict.Port != 0 && r.Proto == policy.TCP && r.Ports.Lo != 53 })
			redirects = slices.Insert(redirects, i, fastNATRule(cfg, rs.mark))
		}
		rs.Chains = append(rs.Chains, Chain{Name: chainPrerouting, Type: "nat", Hook: "prerouting", Priority: -100, Rules: redirects})
	}
	if mode == policy.ModeEnforce || guard {
		var rules []Rule
		if mode == policy.ModeEnforce {
			rules = lanRoutingGuard(cfg)
		}
		if guard {
			rules = append(rules, inputGuard(cfg.WAN, cfg.WANOpen)...)
		}
		rs.Chains = append(rs.Chains, Chain{Name: chainInput, Type: "filter", Hook: "input", Priority: 0, Rules: rules})
	}
	if mode == policy.ModeEnforce || guard {
		var rules []Rule
		est := Rule{CTState: CTEstablished | CTRelated, Verdict: Verdict{Kind: Accept}, Comment: "replies and related traffic"}
		if mode == policy.ModeEnforce {
			// Only connections this ruleset let out: not one that began
			// before enforcement.
			est.CTMark = rs.mark.enforced
			est.Comment = "replies and related traffic of connections let out in enforce mode"
		}
		if rs.fast {
			// First: nothing below may accept or drop a pending
			// connection's packets before these rules see them; est
			// among them, before the pending connection's rules.
			rules = fastForwardRules(cfg, rs.mark, est)
		} else {
			rules = append(rules, est)
		}
		if guard {
			rules = append(rules, Rule{IIf: cfg.WAN, Counter: true, Verdict: Verdict{Kind: Drop},
				Comment: "new connections from the WAN side"})
		}
		if mode == policy.ModeEnforce {
			rules = append(rules, ar.rules...)
			lan := cfg.lanMatch()
			rules = append(rules,
				Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.UDP, Ports: portRange(portQUIC, policy.UDP), Counter: true, Verdict: Verdict{Kind: Reject},
					Comment: "QUIC: fall back to TCP through the proxy"},
				Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.UDP, Ports: portRange(portDoT, policy.UDP), Counter: true, Verdict: Verdict{Kind: Reject},
					Comment: "DNS over QUIC: use the forwarder"},
				Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.TCP, Ports: portRange(portDoT, policy.TCP), Counter: true, Verdict: Verdict{Kind: RejectTCPReset},
					Comment: "DNS over TLS: use the forwarder"},
				Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Counter: true, Verdict: Verdict{Kind: Drop},
					Comment: "enforce: nothing else from the LAN"})
			if cfg.WAN != "" {
				// Another interface (a LAN segment or VLAN that is not
				// one of cfg.LANs, a VPN) gets no way around the LAN's
				// rules to the WAN side.
				rules = append(rules, Rule{OIf: cfg.WAN, Counter: true, Verdict: Verdict{Kind: Drop},
					Comment: "enforce: nothing else out to the WAN side"})
			}
			// What is left came in on neither a LAN interface nor the
			// WAN, and goes elsewhere than the WAN (from another segment
			// to a LAN, say): not egress. Marked, so that its replies
			// pass the established rule above. Traffic from one LAN
			// interface to another never gets here: it is LAN traffic,
			// judged by the rules above like any.
			rules = append(rules, Rule{SetCTMarkMask: rs.mark.owned(), SetCTMark: rs.mark.enforced, Verdict: Verdict{Kind: Accept},
				Comment: "not egress: between other interfaces"})
		}
		rs.Chains = append(rs.Chains, Chain{Name: chainForward, Type: "filter", Hook: "forward", Priority: 0, Rules: rules})
	}
	if cfg.Masquerade {
		rs.Chains = append(rs.Chains, Chain{Name: chainPostrouting, Type: "nat", Hook: "postrouting", Priority: 100,
			Rules: []Rule{{OIf: cfg.WAN, Verdict: Verdict{Kind: Masquerade}, Comment: "NAT to the WAN address"}}})
	}
	rs.NextExpiry = ar.nextExpiry
	return rs, nil
}

// setLANs is the name of the set of LAN interfaces, when there are
// several.
const setLANs = "lans"

// lanMatch is the match of a rule for traffic from the LAN: its interface
// (iifname "eth1"), or with several the set of them (iifname @lans; an
// anonymous set, iifname { ... }, would do as well in the kernel, but nft
// lists the names of one google/nftables makes as "": it marks every
// anonymous set's key big-endian).
func (c Config) lanMatch() Rule {
	if len(c.LANs) == 1 {
		return Rule{IIf: c.LANs[0]}
	}
	return Rule{IIfSet: setLANs}
}

// antispoofRules drop what arrives on a LAN interface from a source the
// gateway would not route back out of that interface (BCP 38 ingress
// filtering, a strict reverse-path check): a forged source off the LAN
// (an internet address, another site's) is neither a client of the
// forwarder or the proxy, nor reflected at that address by their replies
// out of the WAN, nor forwarded. It runs before conntrack (priority raw),
// so such packets make no conntrack entries, and before the redirects,
// so it covers traffic to the gateway and forwarded traffic alike.
//
// "oif missing" and not "oif != iif": with ". iif" nft_fib takes the
// gateway's best route for the source (not one restricted to the
// incoming interface; only an IPv6 link-local source's lookup is) and
// yields the incoming interface if it is among that route's next hops,
// else nothing, so the two say the same, and "missing" needs no
// interface index at load time (a LAN interface that is recreated, the
// set of LANs). A source whose best route leaves by another interface is
// missing even where a broader route via the LAN covers it. Without
// ". iif" (loose mode) any source with a route passes, and the default
// route via the WAN gives every address one.
//
// What passes: sources of the LAN's subnets and of subnets the gateway
// routes via the LAN interface (behind a LAN-side router); IPv6
// link-local sources (fe80::/64 is routed on every link; IPv4's
// 169.254/16 only with such a route); the kernel's own exceptions:
// 0.0.0.0 to broadcast or local multicast (DHCP), and ICMPv6 from :: to
// link-local addresses (duplicate address detection, MLD), which nft_fib
// lets pass in prerouting.
//
// It also drops packets from the LAN to loopback (127.0.0.0/8): Linux
// drops them as martians, but not on a gateway with route_localnet=1
// (kube-proxy sets it on all interfaces), where a LAN host that routes
// 127.0.0.1 to the gateway reaches its loopback-only services, the admin
// page among them (e2e/TestHardeningGateway). IPv6's ::1 is dropped by
// the kernel whatever the settings.
func antispoofRules(cfg Config) []Rule {
	lan := cfg.lanMatch()
	return []Rule{
		{IIf: lan.IIf, IIfSet: lan.IIfSet, FibSrcMissing: true, Counter: true, Verdict: Verdict{Kind: Drop},
			Comment: "enforce: a source the LAN interface does not route back to (BCP 38)"},
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Family: IPv4, DstSet: setLoopback4, Counter: true, Verdict: Verdict{Kind: Drop},
			Comment: "enforce: loopback destinations from the LAN side (route_localnet)"},
	}
}

func portRange(p uint16, proto policy.Proto) policy.PortRange {
	return policy.PortRange{Lo: p, Hi: p, Proto: proto}
}

// redirectRules sends DNS from the LAN to the forwarder and TCP to the
// proxy. Order matters: DNS first (to any address, the gateway's own
// included), then traffic to the gateway's own addresses is left alone (its
// admin and SSH ports are not the proxy's business), then TCP.
//
// With cfg.TCPPorts set, the TCP ports of rules with a host/path target
// (extra) are redirected too: only the proxy reads a request's path, and
// forwarded by the rule's learned addresses any path of the host would go
// out.
func redirectRules(cfg Config, extra []policy.PortRange) []Rule {
	dns := cfg.dnsPort()
	lan := cfg.lanMatch()
	rules := []Rule{
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.UDP, Ports: portRange(53, policy.UDP), Verdict: Verdict{Kind: Redirect, Port: dns}, Comment: "DNS to the forwarder"},
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.TCP, Ports: portRange(53, policy.TCP), Verdict: Verdict{Kind: Redirect, Port: dns}, Comment: "DNS over TCP to the forwarder"},
		{IIf: lan.IIf, IIfSet: lan.IIfSet, FibLocal: true, Verdict: Verdict{Kind: Return}, Comment: "the gateway's own services"},
	}
	p4, p6 := cfg.ProxyPort, cfg.proxyPort6()
	for _, pr := range redirectedPorts(cfg, extra) {
		if p4 == p6 {
			rules = append(rules, Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Proto: policy.TCP, Ports: pr, Verdict: Verdict{Kind: Redirect, Port: p4}, Comment: "TCP to the transparent proxy"})
			continue
		}
		rules = append(rules,
			Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Family: IPv4, Proto: policy.TCP, Ports: pr, Verdict: Verdict{Kind: Redirect, Port: p4}, Comment: "TCP to the transparent proxy"},
			Rule{IIf: lan.IIf, IIfSet: lan.IIfSet, Family: IPv6, Proto: policy.TCP, Ports: pr, Verdict: Verdict{Kind: Redirect, Port: p6}, Comment: "TCP to the transparent proxy"})
	}
	return rules
}

// lanRoutingGuard keeps LAN hosts from changing the gateway's own routes:
// it drops IPv6 Router Advertisements and redirects and IPv4 redirects
// that arrive on a LAN interface. A kernel that takes RAs while it
// forwards (accept_ra=2, set for SLAAC on the WAN side, or on all
// interfaces) would add a default route through the LAN host that sent
// one, and the proxy's and the forwarder's own connections upstream would
// go to it; a forwarding kernel takes IPv4 redirects when all/ and the
// interface's accept_redirects are 1 (the defaults), so a LAN host that
// forges one from a LAN router moves the gateway's route to the subnet
// behind it (e2e/TestHardeningGateway). The gateway is the LAN's router:
// it has nothing to learn from these.
func lanRoutingGuard(cfg Config) []Rule {
	lan := cfg.lanMatch()
	return []Rule{
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Family: IPv6, ICMPv6: true, ICMPTypes: [2]uint8{134, 134}, Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "router advertisements from the LAN side"},
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Family: IPv6, ICMPv6: true, ICMPTypes: [2]uint8{137, 137}, Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "IPv6 redirects from the LAN side"},
		{IIf: lan.IIf, IIfSet: lan.IIfSet, Family: IPv4, ICMP: true, ICMPTypes: [2]uint8{5, 5}, Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "ICMP redirects from the LAN side"},
	}
}

// inputGuard protects the gateway itself from the WAN side: replies pass,
// and IPv6 neighbour discovery and DHCPv6 replies, without which the WAN
// link itself stops working; every other new packet is dropped.
func inputGuard(wan string, open []policy.PortRange) []Rule {
	rules := []Rule{
		{IIf: wan, CTState: CTEstablished | CTRelated, Verdict: Verdict{Kind: Accept}, Comment: "replies to the gateway"},
		{IIf: wan, Family: IPv6, ICMPv6: true, ICMPTypes: [2]uint8{133, 137}, Verdict: Verdict{Kind: Accept}, Comment: "IPv6 neighbour and router discovery"},
		{IIf: wan, Family: IPv6, Proto: policy.UDP, Ports: portRange(546, policy.UDP), Verdict: Verdict{Kind: Accept}, Comment: "DHCPv6 replies"},
	}
	for _, pr := range open {
		rules = append(rules, Rule{IIf: wan, Proto: pr.Proto, Ports: pr, Verdict: Verdict{Kind: Accept}, Comment: "open on the gateway from the WAN side"})
	}
	return append(rules, Rule{IIf: wan, Counter: true, Verdict: Verdict{Kind: Drop}, Comment: "new connections to the gateway from the WAN side"})
}

type allows struct {
	sets       []Set
	rules      []Rule
	nextExpiry time.Time
	guarded    bool           // the guard sets are in sets
	guards     []netip.Prefix // the guarded destinations (guardList)
}

// guardedPrefixes are the destinations the proxy's special-range guard
// keeps out unless a CIDR rule names them from inside (policy.GuardedRanges,
// proxy/guard.go; THREATS.md F1, F2): "this network", loopback, link-local
// (cloud metadata), CGNAT (Alibaba metadata), Azure WireServer, multicast,
// reserved, and the IPv6 forms that carry an IPv4 address (mapped, NAT64,
// 6to4, Teredo) or reach metadata (AWS IMDSv6). A rule that opens every
// address ("*", 0.0.0.0/0, ::/0), or a prefix broader than one of these
// (0.0.0.0/1, ::/1), opens forwarded traffic to its addresses but these,
// as it does through the proxy (policy.OpensGuarded); a rule's learned
// sets open their addresses but these.
var guardedPrefixes = policy.GuardedRanges

// guardList returns the guarded destinations under the NAT64 prefixes nat
// (policy.GuardList): policy.Engine.DestOpens reads the same list.
func guardList(nat []netip.Prefix) []netip.Prefix { return policy.GuardList(nat) }

// Names of the sets of guarded destinations.
const (
	setGuard4 = "guarded4"
	setGuard6 = "guarded6"
	// setLoopback4 is 127.0.0.0/8, which the antispoof chain drops as a
	// destination from the LAN side.
	setLoopback4 = "loopback4"
)

// comment is the set's nftables comment.
func (s Set) comment() string {
	if s.Kind == SetIfnames {
		return "the LAN interfaces"
	}
	if s.Name == setLoopback4 {
		return "loopback: never a destination from the LAN side"
	}
	if s.Rule == "" {
		return "special ranges: open only by a CIDR rule that names them"
	}
	return "rule " + s.Rule
}

// guardSets adds the sets of guarded destinations, once.
func (a *allows) guardSets() {
	if a.guarded {
		return
	}
	a.guarded = true
	var v4, v6 []netip.Prefix
	for _, p := range a.guards {
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	a.sets = append(a.sets,
		Set{Name: setGuard4, Kind: SetPrefixes, Family: IPv4, Prefixes: v4},
		Set{Name: setGuard6, Kind: SetPrefixes, Family: IPv6, Prefixes: v6})
}

// renderAllows turns each rule that allows forwarded traffic (UDP, ICMP
// echo, and TCP on ports that are not redirected) into sets and accept
// rules:
//
//	[ip saddr @from4_R | ether saddr @frommac_R] ip daddr @net4_R|@dns4_R udp dport P accept
//	[ip saddr @from4_R | ether saddr @frommac_R] ip daddr @net4_R|@dns4_R icmp type echo-request accept
//
// (the IPv6 rules alike, with icmpv6 type echo-request for icmp).
// A rule with "*" (or a /0) allows any address of that family but the
// guarded ones (ip daddr != @guarded4); so do its prefixes broader than a
// guarded range, kept apart in wide4_R and wide6_R (ip daddr @wide4_R ip
// daddr != @guarded4), while its prefixes inside one open it, as through
// the proxy. Its names feed the learned sets dns4_R and dns6_R, whose
// accept excludes the guarded sets too (ip daddr @dns4_R ip daddr !=
// @guarded4): a guarded address opens only by a CIDR rule's accept,
// whatever reached a learned set.
//
// With NAT64 prefixes (policy.Engine.WithNAT64) its IPv4 prefixes open
// their NAT64 forms as well, as IPv6 prefixes (0.0.0.0/0 the NAT64 prefix
// itself), and the guarded sets hold the NAT64 forms of the guarded IPv4
// ranges (guardList).
func renderAllows(cfg Config, eng *policy.Engine, now time.Time, rs *Ruleset) allows {
	a := allows{guards: guardList(eng.NAT64())}
	rs.guards = a.guards
	for _, r := range eng.Rules() {
		if !r.Expires.IsZero() {
			if !now.Before(r.Expires) {
				if ports := forwardedPorts(cfg, r); len(ports) > 0 {
					rs.expiredTag(fingerprint(r, ports))
				}
				continue
			}
			if a.nextExpiry.IsZero() || r.Expires.Before(a.nextExpiry) {
				a.nextExpiry = r.Expires
			}
		}
		ports := forwardedPorts(cfg, r)
		if len(ports) == 0 {
			continue
		}
		var any4, any6, names bool
		var nets4, nets6, wide4, wide6 []netip.Prefix
		for _, t := range r.To {
			switch t.Kind {
			case policy.TargetAny:
				any4, any6 = true, true
			case policy.TargetName, policy.TargetHostPath:
				names = true
			case policy.TargetPrefix:
				ps := []netip.Prefix{t.Prefix}
				if t.Prefix.Addr().Is4() {
					for _, n := range eng.NAT64() {
						ps = append(ps, policy.NAT64Form(n, t.Prefix))
					}
				}
				for _, p := range ps {
					switch {
					case p.Addr().Is4() && p.Bits() == 0:
						any4 = true
					case p.Addr().Is4() && !policy.OpensHeld(a.guards, p):
						wide4 = append(wide4, p)
					case p.Addr().Is4():
						nets4 = append(nets4, p)
					case p.Bits() == 0:
						any6 = true
					case !policy.OpensHeld(a.guards, p):
						wide6 = append(wide6, p)
					default:
						nets6 = append(nets6, p)
					}
				}
			}
		}
		if names && !(any4 && any6) {
			// A family "*" or a /0 opens has no learned set: its accept
			// lets out every address a set would open.
			var sets [2]string
			if !any4 {
				sets[0] = "dns4_" + r.Name
			}
			if !any6 {
				sets[1] = "dns6_" + r.Name
			}
			rs.learn[r.Name] = sets
		}
		fr := rs.addFlowRule(r, ports, any4, any6, names, slices.Concat(nets4, nets6), slices.Concat(wide4, wide6))

		var from4, from6 []netip.Prefix
		for _, p := range r.From.Prefixes {
			if p.Addr().Is4() {
				from4 = append(from4, p)
			} else {
				from6 = append(from6, p)
			}
		}
		macSet := ""
		if len(r.From.MACs) > 0 {
			macSet = "frommac_" + r.Name
			a.sets = append(a.sets, Set{Name: macSet, Kind: SetMACs, Rule: r.Name, MACs: slices.Clone(r.From.MACs)})
		}
		for _, fam := range []struct {
			f                 Family
			any, names        bool
			nets, wide, froms []netip.Prefix
			suffix            string
		}{{IPv4, any4, names, nets4, wide4, from4, "4_"}, {IPv6, any6, names, nets6, wide6, from6, "6_"}} {
			// Sources: any client, or the rule's client prefixes of this
			// family, or its MAC addresses.
			var srcs []Rule
			if r.From.Any() {
				srcs = append(srcs, Rule{})
			} else {
				if len(fam.froms) > 0 {
					name := "from" + fam.suffix + r.Name
					a.sets = append(a.sets, Set{Name: name, Kind: SetPrefixes, Family: fam.f, Rule: r.Name, Prefixes: fam.froms})
					srcs = append(srcs, Rule{SrcSet: name})
				}
				if macSet != "" {
					srcs = append(srcs, Rule{SrcMACSet: macSet})
				}
			}
			var dsts []Rule
			switch {
			case fam.any:
				// Any address but the guarded ones.
				a.guardSets()
				dsts = append(dsts, Rule{DstNotSet: "guarded" + fam.suffix[:1]})
			default:
				if len(fam.nets) > 0 {
					name := "net" + fam.suffix + r.Name
					a.sets = append(a.sets, Set{Name: name, Kind: SetPrefixes, Family: fam.f, Rule: r.Name, Prefixes: fam.nets})
					dsts = append(dsts, Rule{DstSet: name})
				}
				if len(fam.wide) > 0 {
					// Its addresses but the guarded ones.
					a.guardSets()
					name := "wide" + fam.suffix + r.Name
					a.sets = append(a.sets, Set{Name: name, Kind: SetPrefixes, Family: fam.f, Rule: r.Name, Prefixes: fam.wide})
					dsts = append(dsts, Rule{DstSet: name, DstNotSet: "guarded" + fam.suffix[:1]})
				}
				if fam.names {
					// Its learned addresses but the guarded ones: the
					// rebinding filter keeps them out of answers to
					// public names, and this keeps them closed should
					// one get in all the same (an internal name, a
					// filter bypassed), as the proxy does for TCP. One
					// a CIDR rule names for the client and port passes
					// by that rule's own accept, as through the proxy
					// (policy.Engine.CIDRNames).
					a.guardSets()
					name := "dns" + fam.suffix + r.Name
					a.sets = append(a.sets, Set{Name: name, Kind: SetLearned, Family: fam.f, Rule: r.Name})
					dsts = append(dsts, Rule{DstSet: name, DstNotSet: "guarded" + fam.suffix[:1]})
				}
			}
			for _, s := range srcs {
				for _, d := range dsts {
					for _, pr := range ports {
						a.rules = append(a.rules, allowRule(cfg, rs.mark, r.Name, fr.tag, Rule{Family: fam.f, SrcSet: s.SrcSet, SrcMACSet: s.SrcMACSet, DstSet: d.DstSet, DstNotSet: d.DstNotSet}, pr))
					}
				}
			}
		}
	}
	return a
}

// forwardedPorts are the ports of rule r that forward handles (UDP, ICMP
// echo, and TCP where Config.TCPPorts leaves some to it), port 53 left
// out. A rule with none has no accept rules in forward, and no tag.
func forwardedPorts(cfg Config, r policy.Rule) []policy.PortRange {
	var ports []policy.PortRange
	for _, pr := range r.Ports {
		if pr.Proto == policy.ICMP {
			ports = append(ports, pr)
			continue
		}
		if pr.Proto == policy.UDP || (pr.Proto == policy.TCP && len(cfg.TCPPorts) > 0) {
			ports = append(ports, withoutDNS(pr)...)
		}
	}
	return ports
}

// CheckTags reports whether the tag of Config.CTMarkBits holds a tag of
// its own for every rule of the policy with accept rules in forward
// (expired ones left out). With fewer tags than such rules, rules share
// tags: a reload still cuts what the new policy does not allow, but it
// decides again the flows of every rule that shares a tag with a changed
// one, and cuts those of them an unchanged rule would have kept (to a
// learned address that has since expired from its set, from a client
// matched by MAC).
func (c Config) CheckTags(eng *policy.Engine) error {
	if err := CheckCTMarkBits(c.CTMarkBits); err != nil {
		return err
	}
	now := time.Now()
	n := 0
	for _, r := range eng.Rules() {
		if (r.Expires.IsZero() || now.Before(r.Expires)) && len(forwardedPorts(c, r)) > 0 {
			n++
		}
	}
	l := layoutOf(c.CTMarkBits)
	tags := l.count
	if c.FastPath {
		tags-- // the fast tag (fast.go)
	}
	if uint64(n) > uint64(tags) {
		return fmt.Errorf("firewall: conntrack mark bits 0x%08x hold %d rule tags, and the policy has %d rules that forward traffic: widen the run of bits (each bit doubles the tags)", l.owned(), tags, n)
	}
	return nil
}

// withoutDNS returns pr without port 53. Every LAN packet to port 53 that
// starts a connection is redirected to the forwarder, so an accept for it
// in forward could only let through a connection that began before
// enforcement: a DNS tunnel straight to a server of the client's choosing.
func withoutDNS(pr policy.PortRange) []policy.PortRange {
	const dns = 53
	if pr.Lo > dns || pr.Hi < dns {
		return []policy.PortRange{pr}
	}
	var out []policy.PortRange
	if pr.Lo < dns {
		out = append(out, policy.PortRange{Lo: pr.Lo, Hi: dns - 1, Proto: pr.Proto})
	}
	if pr.Hi > dns {
		out = append(out, policy.PortRange{Lo: dns + 1, Hi: pr.Hi, Proto: pr.Proto})
	}
	return out
}

// allowRule completes an accept rule of a policy rule: from the LAN
// interfaces, to the port range (policy.ICMP: an echo request of ru's
// family).
func allowRule(cfg Config, mark markLayout, rule string, tag uint32, ru Rule, pr policy.PortRange) Rule {
	lan := cfg.lanMatch()
	ru.IIf, ru.IIfSet, ru.Proto, ru.Ports = lan.IIf, lan.IIfSet, pr.Proto, pr
	if pr.Lo == 1 && pr.Hi == 65535 {
		ru.Ports = policy.PortRange{}
	}
	if pr.Proto == policy.ICMP {
		ru.Proto, ru.Ports, ru.Echo = 0, policy.PortRange{}, true
	}
	ru.SetCTMarkMask, ru.SetCTMark = mark.owned(), mark.marked(tag)
	ru.Verdict = Verdict{Kind: Accept}
	ru.Comment = "rule " + rule
	return ru
}

// LearnedSets returns the names of the sets that Learn feeds for the rule,
// IPv4 then IPv6 ("" for a family its "*" or a /0 opens), and whether the
// rule has any.
func (rs *Ruleset) LearnedSets(rule string) (v4, v6 string, ok bool) {
	s, ok := rs.learn[rule]
	return s[0], s[1], ok
}

// Set returns the set of that name, or nil.
func (rs *Ruleset) Set(name string) *Set {
	for i := range rs.Sets {
		if rs.Sets[i].Name == name {
			return &rs.Sets[i]
		}
	}
	return nil
}

// addrRange is an inclusive range of addresses of one family.
type addrRange struct{ lo, hi netip.Addr }

// mergePrefixes turns prefixes into sorted, disjoint, non-adjacent ranges,
// as an interval set needs them (overlapping elements are an error).
func mergePrefixes(ps []netip.Prefix) []addrRange {
	rs := make([]addrRange, 0, len(ps))
	for _, p := range ps {
		p = p.Masked()
		rs = append(rs, addrRange{p.Addr(), lastAddr(p)})
	}
	slices.SortFunc(rs, func(a, b addrRange) int { return a.lo.Compare(b.lo) })
	var out []addrRange
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			next := last.hi.Next()
			if !next.IsValid() || r.lo.Compare(next) <= 0 {
				if r.hi.Compare(last.hi) > 0 {
					last.hi = r.hi
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// lastAddr is the last address of a masked prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
