package firewall

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/policy"
)

// TableName is the name of egressd's table, of the inet family. The firewall
// creates, replaces and deletes this table and no other.
const TableName = "egressd"

// Defaults of Config fields whose zero value means "the default".
const (
	DefaultDNSPort    = 53
	DefaultMinTTL     = policy.LearnedMinTTL
	DefaultMaxLearned = 65536
	// MaxTTL caps a learned address's lifetime (old kernels refuse set
	// timeouts beyond about 23 days; a day is plenty for DNS). Both
	// bounds are policy's, which capture and dnsfilter judge audit-mode
	// flows by (policy.LearnedLifetime).
	MaxTTL = policy.LearnedMaxTTL
)

// Config says where the ruleset applies and where it sends traffic. The
// mode is not here: it is the engine's ([policy.Engine.Mode]; the command
// line's --mode goes through [policy.Engine.WithMode]), so that a reload can
// switch it. A Config is read by New and must not be changed afterwards.
type Config struct {
	// LANs are the interfaces LAN clients arrive on (VLAN devices, say),
	// each treated alike: DNS and TCP from any of them are redirected,
	// the policy's rules apply to each, and what none of them allows is
	// dropped, traffic from one LAN interface to another included. At
	// least one is required in enforce mode; unused in audit mode.
	LANs []string
	// WAN is the interface toward the internet. Empty means no inbound
	// guard and no masquerade. In enforce mode new connections arriving on
	// it are dropped (forwarded and to the gateway itself).
	WAN string

	// ProxyPort is the transparent proxy's listen port: TCP from the LAN is
	// redirected to it (nftables redirect: the gateway's address on the LAN
	// interface, IPv4 and IPv6), so the listener must accept on that
	// address: a wildcard such as [::]:PORT, not loopback. Required in
	// enforce mode.
	ProxyPort uint16
	// ProxyPort6 is the port IPv6 TCP is redirected to. Zero means
	// ProxyPort (one dual-stack listener).
	ProxyPort6 uint16
	// DNSPort is the DNS forwarder's port: UDP and TCP 53 from the LAN, to
	// any address, are redirected to it (the same way: listen on a wildcard
	// or the LAN address). Zero means 53.
	DNSPort uint16
	// TCPPorts limits the redirect to the proxy to these destination port
	// ranges (Proto must be TCP). Empty means every TCP port. The TCP ports
	// of rules with a host/path target are redirected as well: only the
	// proxy checks a request's path. TCP to other ports is forwarded only
	// where a rule's addresses allow it, like UDP.
	TCPPorts []policy.PortRange

	// Masquerade NATs traffic leaving the WAN interface (IPv4 and IPv6) to
	// the WAN address, in both modes. Requires WAN. It is removed with the
	// table on a clean stop (see the package documentation).
	Masquerade bool
	// WANOpen are ports of the gateway itself that stay reachable from the
	// WAN side while the inbound guard is on (22/tcp, say, when the box is
	// managed over its WAN link). Empty means none: only replies, IPv6
	// neighbour discovery and DHCPv6 replies get in.
	WANOpen []policy.PortRange
	// GuardWAN installs the WAN inbound guard in audit mode too (see the
	// package documentation for why it is off by default there). In enforce
	// mode the guard is always installed when WAN is set.
	GuardWAN bool

	// MinTTL is the shortest time a learned address stays in its set,
	// whatever the DNS TTL, so that a client has time to use an answer with
	// a tiny TTL. Zero means 60s.
	MinTTL time.Duration
	// MaxLearned bounds the addresses kept per learned set (per rule and
	// address family); beyond it Learn returns ErrSetFull. Zero means 65536.
	MaxLearned int

	// CTMarkBits are the conntrack mark bits egressd owns: one run of
	// contiguous bits, at least two, whose highest is the enforced bit
	// and the others the rule tag (see the package documentation). Zero
	// means DefaultCTMarkBits (0x007ff000). The operator's own rules
	// must not write these bits, nor egressd any other.
	CTMarkBits uint32

	// FastPath (enforce mode only; audit mode installs nothing new) has
	// the proxy decide each new TCP connection it would get from its
	// queued packets instead of terminating it (FASTPATH: chain fastpath
	// and the first rules of forward, fast.go): the LAN's initial SYNs
	// to the redirected ports, and the packets with payload of a
	// connection userspace marked pending, go to NFQUEUE queue
	// FastPathQueue; a connection it allows is then forwarded by the
	// kernel. With no reader on the queue the kernel drops them (fail
	// closed). It needs at least 3 tag bits in CTMarkBits (FastMarks).
	FastPath bool
	// FastPathQueue is the NFQUEUE queue number of the fast path. Zero
	// means DefaultFastPathQueue (3300).
	FastPathQueue uint16
	// FastPathPorts are the TCP ports whose new connections go to the
	// queue (each a redirected port: one the proxy would get otherwise);
	// none means port 443 only. The proxy takes the fast path for TLS
	// only (a plain HTTP connection's later requests must each be read),
	// so another port's SYNs would cost a trip to userspace for nothing.
	FastPathPorts []policy.PortRange

	// NetNS is the path of the network namespace to install into, such as
	// /var/run/netns/NAME. Empty means the process's own namespace.
	NetNS string
}

// Deps are the firewall's collaborators. Every field may be nil.
type Deps struct {
	// Logger receives one line per install, replace and remove, and errors
	// of the learned-address feed. Nil means slog.Default().
	Logger *slog.Logger
	// Registerer gets the firewall's metrics. Nil means they are not
	// registered anywhere.
	Registerer prometheus.Registerer
	// Sink receives one event for each forwarded flow a reload, or a
	// rule's expiry, cuts (sweep.go): a drop, enforced, close
	// policy-revoked, timed at the cut. Nil means audit.Discard.
	Sink audit.Sink
	// Now is the clock, for tests. Nil means time.Now.
	Now func() time.Time
	// Given returns the answers the DNS forwarder has given out that the
	// enforce firewall would still hold, had it learned them when they
	// were given (egressd run: dnsfilter's table, Table.HeldAll). When a
	// ruleset goes into the kernel (Install, a Replace from audit mode,
	// a Replace that gives a rule names or clients it did not have), the
	// learned sets of those rules are filled from them in the same
	// transaction (seed.go). Nil means none.
	Given func() []Given
	// MACs tells a LAN client's MAC address, for a policy whose rules
	// name clients by MAC (policy.Engine.HasMACs): the seeding of learned
	// sets asks it who asked the forwarder, as the forwarder's gate did
	// (seed.go), and a look at the connections already out asks it their
	// clients' (sweep.go). Nil means no client has one there. The forward
	// chain itself matches the frame's source address (ether saddr).
	MACs ClientMACs
	// Previous is the policy an earlier egressd ran with before this
	// start (egressd run: the state directory's copy), whose ruleset may
	// still be in the kernel with the marks of the connections it let
	// out, with the NAT64 prefixes it ran with (policy.Engine.WithNAT64;
	// egressd run: recorded beside the copy). Rendered with this Config,
	// it is what their tags are read as at the first look at the
	// connections (sweep.go): a rule it had that the new policy lacks or
	// changed, or whose accept rules open other destinations under the
	// new prefixes, has its flows decided again, even where a new rule
	// drew its tag. Nil (no copy, the first start) means a tag the new
	// ruleset uses is taken for its rule's.
	Previous *policy.Engine
	// PreviousTCPPorts is the Config.TCPPorts the earlier egressd ran
	// Previous with (egressd run: recorded beside the copy), which
	// Previous is rendered with: the ports forward handles are part of
	// a rule's fingerprint, so of its tag (fingerprint), and a
	// --tcp-ports changed across the restart would otherwise read the
	// marks as other rules'. Nil: not known (an egressd before it
	// recorded them), this Config's.
	PreviousTCPPorts *[]policy.PortRange
	// PreviousCTMarkBits is the Config.CTMarkBits the earlier egressd ran
	// Previous with (egressd run: recorded beside the copy): its marks
	// are at those bits, and are read there. Where they differ from this
	// Config's, the first look at the connections also takes those
	// marked at the old bits, decides them as any (a rule unchanged
	// keeps its flows), and marks those it keeps at the new bits (the
	// old ones are left as they are: they may be the operator's now).
	// Nil: not known, this Config's.
	PreviousCTMarkBits *uint32
	// PreviousFastPath is the Config.FastPath the earlier egressd ran
	// Previous with (egressd run: recorded beside the copy): with the
	// fast path the last tag is reserved (fast-allowed) and rules draw
	// from one fewer, so every tag may move across a restart that turns
	// it on or off. Nil: not known (an egressd before it recorded it);
	// Previous is then read both ways, and a tag the two readings give
	// different meanings is decided again.
	PreviousFastPath *bool
	// Pending are the policies an earlier egressd was putting in after
	// Previous, oldest first, without knowing whether they went in (egressd
	// run: written before an enforce install or reload, removed once the
	// copy is Previous's successor; a kill between the two leaves them).
	// Their tags are read beside Previous's (each rendered as Previous is,
	// with its own ports and bits): a tag the rulesets give different
	// rules is decided again, not taken for one of them.
	Pending []Prior
}

// Prior is a policy an earlier egressd may have installed, with what it
// ran it with (Deps.Pending): nil ports or bits are this Config's; a nil
// FastPath is read both ways (Deps.PreviousFastPath).
type Prior struct {
	Policy     *policy.Engine
	TCPPorts   *[]policy.PortRange
	CTMarkBits *uint32
	FastPath   *bool
}

// ClientMACs tells a LAN client's MAC address (egressd run: the LAN
// interfaces' neighbour tables, netutil.Devices.MAC); nil when it has
// none (a client behind a router). It may wait briefly for the kernel:
// the firewall asks only while the policy names MAC addresses, and never
// while it holds its lock.
type ClientMACs interface {
	ClientMAC(client netip.Addr) net.HardwareAddr
}

// Errors.
var (
	// ErrSetFull is returned by Learn when a learned set already holds
	// Config.MaxLearned live addresses, as a *SetFullError per address.
	ErrSetFull = errors.New("firewall: learned set full")
	// ErrClosed is returned by Install and Replace after Close.
	ErrClosed = errors.New("firewall: closed")
)

// SetFullError is LearnAll's error for one address its rule's learned set
// refused because it held Config.MaxLearned live addresses (errors.Is
// ErrSetFull). The set keeps its live addresses: taking one's place would
// cut a client that was answered with it.
type SetFullError struct {
	Rule, Set string
	Addr      netip.Addr
	Len       int // addresses in the set
	// Enforced: the set is in the kernel (enforce mode), which drops the
	// rule's forwarded traffic to Addr. In audit mode nothing is dropped.
	Enforced bool
	// Opened: the installed rule opens Addr by a CIDR or "*" of its own
	// (policy.Engine.DestOpens of the installed policy, when the refusal
	// was made): its accept lets the client out whatever the set took.
	Opened bool
	// OtherPolicy: the address's answer was decided under a policy other
	// than the installed one (Address.Engine: a reload going in, its
	// store swapped before its ruleset). Opened is the installed rule's,
	// which the reload's ruleset may change at once: the forwarder asks
	// again at the next hit, not remembering the refusal for a second.
	OtherPolicy bool
}

func (e *SetFullError) Error() string {
	return fmt.Sprintf("%v: %s (%d addresses), rule %s, %s", ErrSetFull, e.Set, e.Len, e.Rule, e.Addr)
}

// Is reports target == ErrSetFull.
func (e *SetFullError) Is(target error) bool { return target == ErrSetFull }

// Unreachable tells the DNS forwarder (dnsfilter.Unreachable) that the
// rule's forwarded ports stay closed to the address: ok is false in audit
// mode, and when the installed rule opens the address otherwise (Opened).
// The firewall judges it, with the ruleset it has: after a reload the
// policy an answer was decided under may not be the installed one.
func (e *SetFullError) Unreachable() (rule, set string, addr netip.Addr, ok bool) {
	return e.Rule, e.Set, e.Addr, e.Enforced && !e.Opened
}

// Provisional tells the DNS forwarder that the refusal was judged with an
// installed policy other than the answer's (a reload going in): its ok may
// change with the reload's ruleset, so it is not remembered.
func (e *SetFullError) Provisional() bool { return e.OtherPolicy }

func (c Config) dnsPort() uint16 {
	if c.DNSPort == 0 {
		return DefaultDNSPort
	}
	return c.DNSPort
}

func (c Config) proxyPort6() uint16 {
	if c.ProxyPort6 == 0 {
		return c.ProxyPort
	}
	return c.ProxyPort6
}

func (c Config) minTTL() time.Duration {
	return policy.LearnedLifetime(0, c.MinTTL)
}

func (c Config) maxLearned() int {
	if c.MaxLearned <= 0 {
		return DefaultMaxLearned
	}
	return c.MaxLearned
}

// Validate returns every problem of the configuration for the given mode, or
// nil.
func (c Config) Validate(mode policy.Mode) error {
	var errs []error
	seen := map[string]bool{}
	for _, lan := range c.LANs {
		switch {
		case lan == "":
			errs = append(errs, errors.New("firewall: LAN interface: an empty name"))
		case seen[lan]:
			errs = append(errs, fmt.Errorf("firewall: LAN interface %q is named twice", lan))
		default:
			if err := checkIfName(lan); err != nil {
				errs = append(errs, fmt.Errorf("firewall: LAN interface: %w", err))
			}
			if lan == c.WAN {
				errs = append(errs, fmt.Errorf("firewall: the LAN and WAN interfaces are both %q", lan))
			}
		}
		seen[lan] = true
	}
	if c.WAN != "" {
		if err := checkIfName(c.WAN); err != nil {
			errs = append(errs, fmt.Errorf("firewall: WAN interface: %w", err))
		}
	}
	if c.Masquerade && c.WAN == "" {
		errs = append(errs, errors.New("firewall: masquerade needs the WAN interface"))
	}
	for _, pr := range c.TCPPorts {
		if pr.Proto != policy.TCP || pr.Lo == 0 || pr.Hi < pr.Lo {
			errs = append(errs, fmt.Errorf("firewall: redirected port range %s: expected TCP ports N or N-M, 1-65535", pr))
		}
	}
	for _, pr := range c.WANOpen {
		if (pr.Proto != policy.TCP && pr.Proto != policy.UDP) || pr.Lo == 0 || pr.Hi < pr.Lo {
			errs = append(errs, fmt.Errorf("firewall: WAN-open port range %s: expected N/tcp, N-M/udp, 1-65535", pr))
		}
	}
	if err := CheckCTMarkBits(c.CTMarkBits); err != nil {
		errs = append(errs, err)
	} else if c.FastPath && layoutOf(c.CTMarkBits).count < fastMinTags {
		errs = append(errs, fmt.Errorf("firewall: the fast path needs at least 3 tag bits below the enforced bit; conntrack mark bits 0x%08x have fewer", c.CTMarkBits))
	}
	if c.MaxLearned < 0 {
		errs = append(errs, errors.New("firewall: MaxLearned is negative"))
	}
	switch mode {
	case policy.ModeEnforce:
		if len(c.LANs) == 0 {
			errs = append(errs, errors.New("firewall: enforce mode needs the LAN interface"))
		}
		if c.ProxyPort == 0 {
			errs = append(errs, errors.New("firewall: enforce mode needs the transparent proxy's port"))
		}
	case policy.ModeAudit:
	default:
		errs = append(errs, fmt.Errorf("firewall: unknown mode %q", mode))
	}
	return errors.Join(errs...)
}

// checkIfName checks an interface name as the kernel would (IFNAMSIZ).
func checkIfName(s string) error {
	if len(s) > 15 {
		return fmt.Errorf("%q is longer than 15 bytes", s)
	}
	if s == "." || s == ".." || strings.ContainsAny(s, "/: \t\n\x00\"\\") {
		return fmt.Errorf("%q is not a valid interface name", s)
	}
	return nil
}
