package policy

import (
	"net"
	"net/netip"
	"time"
)

// Mode says whether denied traffic is blocked (enforce) or only recorded
// (audit).
type Mode string

// The modes. The zero value of a policy's mode is ModeAudit.
const (
	ModeAudit   Mode = "audit"
	ModeEnforce Mode = "enforce"
)

// ParseMode parses "audit" or "enforce".
func ParseMode(s string) (Mode, bool) {
	switch Mode(s) {
	case ModeAudit, ModeEnforce:
		return Mode(s), true
	}
	return "", false
}

// Verdict is what the policy says of a flow or a query.
type Verdict string

// The verdicts.
const (
	Allow Verdict = "allow"
	Deny  Verdict = "deny"
)

// Proto is a transport protocol.
type Proto uint8

// The protocols a rule can name. ICMP stands for ICMP echo request in
// IPv4 and ICMPv6 echo request in IPv6 alike (the "icmp" of a rule's
// ports), always with port 0: replies and the errors they draw are the
// flow's own traffic. "any" in ports is TCP and UDP, not ICMP.
const (
	ProtoAny Proto = 0 // only as an Input for DecideName; rules never hold it
	ICMP     Proto = 1
	TCP      Proto = 6
	UDP      Proto = 17
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	}
	return "any"
}

// ParseProto parses "tcp" or "udp" (any case); "icmp", which has no
// ports, is a ports entry of its own (see PortRange).
func ParseProto(s string) (Proto, bool) {
	switch s {
	case "tcp", "TCP":
		return TCP, true
	case "udp", "UDP":
		return UDP, true
	}
	return 0, false
}

// Input describes one flow, or one DNS question for DecideName. Fields may be
// added; callers set the ones they know.
type Input struct {
	Client    netip.Addr       // the LAN client; invalid = unknown
	ClientMAC net.HardwareAddr // nil = unknown
	Dest      netip.Addr       // original destination address; invalid = unknown
	Port      uint16           // destination port
	Proto     Proto            // TCP, UDP, or ICMP (echo, port 0)
	// Name is the destination name (SNI, Host, or a DNS-learned name), as seen
	// on the wire: case and a trailing dot do not matter, anything but ASCII
	// letters, digits, '-', '_' and '.' makes it match no name rule.
	Name string
	// Path is the HTTP request path when the request was inspected; empty
	// means unknown, and host/path rules then apply at host level.
	Path string
	// NoPath says the flow is cleartext the proxy cannot read a path from
	// (not TLS, not an HTTP/1 request: HTTP/2 with prior knowledge, another
	// protocol, a client silent at first): a path that could be there is
	// not seen, so host/path rules do not match it (ReasonPathUnseen),
	// where for TLS without inspection they apply at host level.
	NoPath bool
	// PathCut says Path is only the start of the request's path, which
	// was longer (cut at a size cap: capture keeps what its events carry).
	// A host/path rule whose glob the start decides (its literal lead
	// differs, or it is a literal lead and a final '*') matches as on the
	// whole path; where one the start cannot decide would rank before the
	// rule credited, the decision is a deny with ReasonPathCut, which says
	// only that: what the rules make of the whole path is not known.
	PathCut bool
	// Now is the time of the flow, for expiring rules; zero means time.Now.
	Now time.Time
}

// Decision is the policy's answer. Deny is a result, not an error.
type Decision struct {
	Verdict Verdict
	// Rule is the credited rule's name: the first allowing rule in file
	// order, or for a deny the expired rule that would have allowed it.
	Rule string
	// RuleIndex is the rule's position in the file, -1 when Rule is empty.
	RuleIndex int
	// Reason is a short constant such as ReasonAllowed or ReasonNoRule.
	Reason string
	// Mode is the engine's mode: in audit mode a deny is a would-deny.
	Mode Mode
}

// Allowed reports whether the verdict is Allow.
func (d Decision) Allowed() bool { return d.Verdict == Allow }

// Reasons carried by decisions. They are constants, so they can be metric
// labels and never allocate.
const (
	ReasonAllowed       = "allowed"            // a rule allows it
	ReasonNoRule        = "no-rule"            // nothing matches the destination
	ReasonPort          = "port-not-allowed"   // a rule names the destination, not this port
	ReasonPath          = "path-not-allowed"   // a host/path rule names the host, not this path
	ReasonPathUnseen    = "path-unseen"        // only a host/path rule names the host, and the cleartext stream shows no HTTP/1 path (Input.NoPath)
	ReasonPathCut       = "path-cut"           // a host/path rule the start of a cut path cannot decide could allow it (Input.PathCut); never recorded
	ReasonClient        = "client-not-allowed" // a rule names the destination, not for this client
	ReasonExpired       = "expired"            // only an expired rule would allow it
	ReasonInvalidName   = "invalid-name"       // the name is not an ASCII hostname
	ReasonNoDestination = "no-destination"     // neither a name nor an address was given
	// ReasonPrivateRelay: the name is iCloud Private Relay's ingress
	// (IsPrivateRelay) and no rule that names it exactly allows it; a
	// wildcard, "*" or a CIDR rule does not (see relay.go).
	ReasonPrivateRelay = "private-relay"
)
