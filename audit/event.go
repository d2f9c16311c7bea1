// Package audit is where every observation of egressd ends up. The proxy,
// the DNS forwarder and capture each emit an [Event] per connection, query or
// flow into a [Sink] (the proxy also one per later HTTP request on a
// plain-HTTP connection and one per request in an inspected connection,
// [KindRequest]). In the daemon that sink is a [Journal]: a bounded queue
// (Emit never blocks; what it must shed it counts) in front of one writer
// that adds each event to the [Ledger] and appends it to the NDJSON event
// log in the state directory (a noisy device's repeated denials past its
// detail budget as summary records, which reading the log expands:
// detail.go; rotated files gzipped in the background: compress.go). The ledger turns events into per-rule usage
// and the list of what was or would be dropped, counting each flow once
// whichever components reported it; on start it is rebuilt from the log
// and from the summary of the log files rotation deleted ([ArchiveFile]),
// so counts continue across restarts. A [Report] (terminal, JSON, HTML,
// policy suggestions) is a snapshot of the ledger; a [Replayer] runs
// recorded events against a candidate policy.
//
// It sits between policy/ (whose Decision it records) and the components,
// which import it and never each other; admin/ serves its reports.
package audit

import (
	"net/netip"
	"time"
	"unicode/utf8"

	"egressd/policy"
)

// Kind says what an event describes.
type Kind string

// The kinds of events.
const (
	KindFlow Kind = "flow" // one TCP connection, or one UDP exchange
	KindDNS  Kind = "dns"  // one DNS query
	// KindRequest is one HTTP request after the first on a plain-HTTP
	// connection (the connection's flow event stands for the first), or
	// one request in an inspected connection, decided on its own Host and
	// path. It is not a flow: it credits its rule or records the
	// (would-be) drop, and never adds to flow counts.
	KindRequest Kind = "request"
	// KindAlarm is an alarm a component raises about a client's
	// behaviour over many events, not one flow or query: the DNS
	// forwarder's, reason dns-tunnel or dns-tunnel-slow (THREATS.md E2),
	// names the client, the wildcard zone in Name and the distinct names
	// of the zone the client sent upstream in the window in Count; reason
	// dns-tunnel-zone counts the names of all clients and has no Client
	// (the zero address, "" in JSON), nor does dns-tunnel-zone-slow (all
	// clients in the long window); both name in TopClients the clients
	// that added the most names. It never adds to flow or query counts;
	// the report lists alarms apart.
	KindAlarm Kind = "alarm"
	// KindShed is a record the event log writes for events it had to shed
	// (Count of them, up to Time); components never emit it.
	KindShed Kind = "shed"
)

// Source names the component that emitted an event.
type Source string

// The sources.
const (
	SourceProxy   Source = "proxy"
	SourceDNS     Source = "dnsfilter"
	SourceCapture Source = "capture"
	// SourceFirewall is the firewall's report of a forwarded flow a
	// policy reload (or a rule's expiry) cut, when capture, which would
	// record it with the flow's start and bytes, did not know the flow.
	SourceFirewall Source = "firewall"
)

// NameSource says how the destination name of a flow was found.
type NameSource string

// The ways a name is found.
const (
	NameSNI        NameSource = "sni"         // TLS ClientHello server_name
	NameHost       NameSource = "host"        // HTTP Host header or absolute URL
	NameConnect    NameSource = "connect"     // explicit proxy CONNECT authority
	NameQUIC       NameSource = "quic-sni"    // SNI from a decrypted QUIC Initial
	NameDNSAnswer  NameSource = "dns-answer"  // the question of a DNS answer
	NameDNSLearned NameSource = "dns-learned" // an address our DNS gave out for the name
	NameNoSNI      NameSource = "no-sni"      // TLS without a usable SNI
	NameNone       NameSource = "none"        // nothing names the destination
)

// Event is one observation. The zero value of every optional field means
// "unknown" and is omitted from JSON.
type Event struct {
	Kind   Kind      `json:"kind"`
	Source Source    `json:"source"`
	Time   time.Time `json:"time"` // start of the flow, or the query's arrival

	Client     netip.Addr `json:"client"`
	ClientPort uint16     `json:"client_port,omitempty"`
	ClientMAC  string     `json:"client_mac,omitempty"`
	Dest       netip.Addr `json:"dest_ip,omitzero"`
	DestPort   uint16     `json:"dest_port,omitempty"`
	// Proto is "tcp" or "udp"; a capture flow of another IP protocol
	// (no ports, denied as protocol-not-allowed) has its name: "icmp",
	// "ipv6-icmp", "gre", "esp", "ah", "ipv6" (6in4), "sctp", "igmp", or
	// the protocol's number.
	Proto string `json:"proto"`

	// Name, Path and Front are text a LAN client chooses; each is kept
	// to a bound (MaxNameBytes, MaxPathBytes) by Bound, which every sink
	// of this package applies, and NameLen, PathLen and FrontLen hold the
	// length of one that was cut (0: kept whole). PathLen is set too where
	// Bound wrote bytes that are not UTF-8 as U+FFFD (a raw byte 0x80 or
	// above in a target): the path is not the one sent, and a replay
	// decides it on the start before the first U+FFFD, as a cut one.
	Name       string     `json:"name,omitempty"`
	NameLen    int        `json:"name_len,omitempty"`
	NameSource NameSource `json:"name_source,omitempty"`
	Path       string     `json:"path,omitempty"`
	PathLen    int        `json:"path_len,omitempty"`
	// NoPath says the flow was cleartext that showed no HTTP/1 path (not
	// TLS, not an HTTP/1 request: HTTP/2 with prior knowledge, another
	// protocol, a client silent at first) and was decided so
	// (policy.Input.NoPath): host/path rules did not match it. A replay
	// decides it again so. False also where the component could not tell
	// (TLS, whose path is unknown rather than absent).
	NoPath bool `json:"no_path,omitempty"`
	// Front is set on a request of an inspected TLS connection whose Host
	// named another host than the connection was opened for (its SNI, or
	// the CONNECT authority): domain fronting (THREATS.md A1). It holds
	// that other name; the request was decided on its own Host (Name) and
	// the connection's address, as a connection to Name would be.
	Front    string `json:"front,omitempty"`
	FrontLen int    `json:"front_len,omitempty"`

	Verdict policy.Verdict `json:"verdict"`
	Rule    string         `json:"rule,omitempty"`
	Mode    policy.Mode    `json:"mode"`
	Reason  string         `json:"reason,omitempty"`
	// Enforced is true when the flow or query was actually blocked, or
	// when enforcement changed what an allowed query got: the DNS
	// forwarder withheld the addresses full learned sets refused
	// (trimmed, or SERVFAIL; Verdict stays allow, and the ledger counts
	// the query under its rule).
	Enforced bool `json:"enforced,omitempty"`

	BytesOut uint64  `json:"bytes_out,omitempty"` // client to destination
	BytesIn  uint64  `json:"bytes_in,omitempty"`  // destination to client
	Duration float64 `json:"duration_seconds,omitempty"`
	Close    string  `json:"close,omitempty"` // how a connection ended
	// Revised marks a later report of a flow its component reported
	// already, at the same start: the proxy's fast path's second event of
	// a connection, with a new decision (proxy fastQueue.redecided), and
	// capture's update of a flow it reported while open or at a reload,
	// minutes or days after (capture's emit, emitNow). The ledger moves
	// the flow it finds (redecided, recredited) or merges it; where it
	// no longer holds the flow (past LedgerOptions.MaxFlows, the first
	// report in the summary of rotated-out files) the first report's
	// count stands and this one counts as a duplicate, as a held flow's
	// later report merges into its summary: the connection counts once.
	// Where the journal lost the first report (shed it, or could not
	// write it) it writes this one unmarked, the only report of the
	// connection there is, which counts as the flow (lostFirsts).
	Revised bool `json:"revised,omitempty"`

	// DNS queries. QueryID is the query's DNS message ID: with the
	// client's address and port, name and type it tells one query from
	// another (a stub's retransmission keeps the ID; its next query on
	// the same socket takes a new one). 0 in a log written before it was
	// recorded, as for a query of ID 0, and in a summary record.
	QType    string  `json:"qtype,omitempty"`
	QueryID  uint16  `json:"query_id,omitempty"`
	RCode    string  `json:"rcode,omitempty"`
	CacheHit bool    `json:"cache_hit,omitempty"`
	Upstream string  `json:"upstream,omitempty"`
	Latency  float64 `json:"latency_seconds,omitempty"`
	// Filtered says what egressd's DNS answer filter removed from the
	// answer ("rebinding", "ech", or both joined by "+"), in every mode:
	// on a dns event (dnsfilter), what it removed; on a capture flow of
	// DNS to another resolver (audit mode: no redirect), what it would
	// have removed had the query gone to egressd's forwarder, as every
	// LAN query does in enforce mode (capture sees only "ech").
	Filtered string `json:"filtered,omitempty"`

	// Count is the number of events a KindShed record stands for. On a
	// flow, dns or request event it makes the event a summary record of
	// the detail budget (detail.go): Count events of this shape a noisy
	// device made, held back from the log one by one, the first at Time
	// and the last at Until, BytesOut and BytesIn their sums; Duplicates
	// more that the ledger had merged into flows it counted already.
	Count      uint64    `json:"count,omitempty"`
	Until      time.Time `json:"until,omitzero"`
	Duplicates uint64    `json:"duplicates,omitempty"`

	// TopClients, on a zone-wide alarm, are the clients that added the
	// most names to its window, most first: a device's MAC, an address,
	// or "unresolved" (the forged sources of a LAN link). Bound keeps at
	// most MaxAlarmClients, each cut to MaxNameBytes (a log read back may
	// hold anything).
	TopClients []string `json:"top_clients,omitempty"`

	// OtherNames, on a capture flow event of a QUIC flow, are the hosts
	// its connections' hellos named other than Name (quic-go's shared
	// Transport: one client port, one server address, a connection per
	// host), each of which the policy allowed by its name when capture
	// read it. Name is the first hello's; after a reload that makes the
	// flow a would-be deny, the name its address was learned for (which
	// a rule no longer allows), and the first hello's name is among
	// these. Each appears once, normalized as the policy reads a
	// name, in the order the hellos came. A replay judges the flow on
	// each (Replayer); capture's reload by the name its address was
	// learned for, as the forward chain reads no hello. Bound keeps at
	// most MaxOtherNames, each cut to MaxNameBytes (a log read back may
	// hold anything).
	OtherNames []string `json:"other_names,omitempty"`

	// LearnedName, on a capture flow event of a flow nftables forwards
	// by address (UDP, TCP to a port not redirected, an echo), is the
	// name of the DNS answer whose rule's learned set let its address
	// out (normalized): the name the flow's mark stands for, whatever
	// name its hello carried (Name, OtherNames). Capture's reload judges
	// the flow by it, as the firewall's sweep does, and so does a replay
	// (Replayer). Absent where a CIDR rule alone let it out, where no
	// answer did (a drop), and in logs written before session 32 (a
	// replay then judges Name and OtherNames, as before). Bound cuts it
	// to MaxNameBytes (a log read back may hold anything).
	LearnedName string `json:"learned_name,omitempty"`

	// expanded marks an event read from a summary record (Event.expand).
	expanded uint8
}

// The bounds of the text a LAN client chooses that an event keeps. An HTTP
// Host line, a request target, a CONNECT authority or a TLS server name
// can be as long as the head or hello the proxy reads (64 KiB); kept
// whole, one such event would take the room of some 200 ordinary ones in
// the event log, which rotates by size, and bloat every log line. A
// longer value is cut to the bound: its first bytes (whole UTF-8
// characters) followed by TruncMark, and its length is kept in the
// event's NameLen, PathLen or FrontLen (PathLen too for a path that is
// not UTF-8, changed so: see Event.PathLen). A valid name (at most 253 bytes,
// 254 with the root's dot) is never cut, and a cut one is never valid
// (TruncMark is not ASCII), so a replay judges it as it would the whole
// one: no name. TruncMark does not end in a dot, which the ledger would
// trim from a name.
const (
	MaxNameBytes = 255  // Name and Front
	MaxPathBytes = 2048 // Path: enough for the prefixes path rules name
	// MaxErrorBytes bounds the error text of a decision line, which may
	// quote what the client sent.
	MaxErrorBytes = 1024
	TruncMark     = "…" // U+2026, 3 bytes
	// MaxAlarmClients bounds the clients an alarm names (TopClients).
	MaxAlarmClients = 5
	// MaxOtherNames bounds the other names a flow event carries
	// (OtherNames): capture keeps the hellos of at most four connections
	// of a QUIC flow at once, and denies one naming a fifth host; a flow
	// a reload records under the name its address was learned for shows
	// all four hellos' names here (before session 32, three: one was
	// lost).
	MaxOtherNames = 4
)

// Clip returns s if it has at most max bytes, else its first bytes cut at
// a character boundary and TruncMark: at most max bytes in all. max must
// be larger than len(TruncMark).
func Clip(s string, max int) string {
	if len(s) <= max {
		return s
	}
	n := max - len(TruncMark)
	for i := 0; i < utf8.UTFMax-1 && n > 0 && !utf8.RuneStart(s[n]); i++ {
		n--
	}
	return s[:n] + TruncMark
}

// Bound cuts the client-chosen text of e to its bounds (MaxNameBytes,
// MaxPathBytes; Rule and ClientMAC to MaxNameBytes too), noting the
// length of what it cut in NameLen, PathLen and FrontLen. Text that is not UTF-8 (a server name is bytes) has each
// invalid byte replaced by U+FFFD first, as the event log's JSON would
// write it, so that the bound holds in the log too and the text reads
// the same live and from the log. It changes nothing that is valid and
// within the bounds, so it may run again: the journal, the ledger, a
// report and a replay all see the value it left.
func (e *Event) Bound() {
	e.Name, e.NameLen = bound(e.Name, e.NameLen, MaxNameBytes)
	if !utf8.ValidString(e.Path) {
		// Changed, not only cut: the event says so (PathLen).
		e.PathLen = max(e.PathLen, len(e.Path))
	}
	e.Path, e.PathLen = bound(e.Path, e.PathLen, MaxPathBytes)
	e.Front, e.FrontLen = bound(e.Front, e.FrontLen, MaxNameBytes)
	// The rule and the MAC are egressd's own text live (a policy's rule
	// name, a neighbour's address), far within the bound, but a log read
	// back may hold anything: each is cut as the summary's import cuts
	// them (importAlarmsLocked), so an entry is the same whichever it
	// came from, and a line of the log's length is no key of that length.
	e.Rule, _ = bound(e.Rule, 0, MaxNameBytes)
	e.ClientMAC, _ = bound(e.ClientMAC, 0, MaxNameBytes)
	e.LearnedName, _ = bound(e.LearnedName, 0, MaxNameBytes)
	if listNeedsBound(e.TopClients, MaxAlarmClients) {
		e.TopClients = boundList(e.TopClients, MaxAlarmClients)
	}
	if listNeedsBound(e.OtherNames, MaxOtherNames) {
		e.OtherNames = boundList(e.OtherNames, MaxOtherNames)
	}
}

// listNeedsBound reports whether boundList would change list.
func listNeedsBound(list []string, n int) bool {
	if len(list) > n {
		return true
	}
	for _, c := range list {
		if len(c) > MaxNameBytes || !utf8.ValidString(c) {
			return true
		}
	}
	return false
}

// boundList returns a copy of list (the caller's slice is not changed)
// of at most n, each bounded as Bound bounds a name.
func boundList(list []string, n int) []string {
	out := make([]string, min(len(list), n))
	for i := range out {
		out[i], _ = bound(list[i], 0, MaxNameBytes)
	}
	return out
}

// needsBound reports whether Bound would change e.
func (e *Event) needsBound() bool {
	return len(e.Name) > MaxNameBytes || len(e.Path) > MaxPathBytes || len(e.Front) > MaxNameBytes ||
		len(e.Rule) > MaxNameBytes || len(e.ClientMAC) > MaxNameBytes || len(e.LearnedName) > MaxNameBytes ||
		!utf8.ValidString(e.LearnedName) || !utf8.ValidString(e.Name) || !utf8.ValidString(e.Path) || !utf8.ValidString(e.Front) ||
		!utf8.ValidString(e.Rule) || !utf8.ValidString(e.ClientMAC) || listNeedsBound(e.TopClients, MaxAlarmClients) ||
		listNeedsBound(e.OtherNames, MaxOtherNames)
}

// bound is Bound for one text s of a bound of limit bytes and its noted
// length n.
func bound(s string, n, limit int) (string, int) {
	if utf8.ValidString(s) {
		if len(s) <= limit {
			return s, n
		}
		return Clip(s, limit), max(n, len(s))
	}
	b := make([]byte, 0, min(len(s), limit)+utf8.UTFMax)
	for i := 0; i < len(s) && len(b) <= limit; {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, "\uFFFD"...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	if len(b) <= limit {
		return string(b), n
	}
	return Clip(string(b), limit), max(n, len(s))
}

// FlowKey identifies a flow across observers: the 5-tuple. Together with
// the start time it lets the ledger count a flow once, however many
// components saw it.
type FlowKey struct {
	Client     netip.Addr
	ClientPort uint16
	Dest       netip.Addr
	DestPort   uint16
	Proto      string
}

// ClientAddr is a client's address as events carry it: unmapped, and a
// link-local address without the zone its socket gave it (fe80::1, not
// fe80::1%lan0), as capture has it from the packet. The report keys a
// client, and a flow, by its address: one device's connection seen by
// capture and the proxy must name one. The zone is the net package's
// name of the interface, or its index where the name was not at hand;
// the event's ClientMAC tells one link's device from another's.
func ClientAddr(a netip.Addr) netip.Addr { return a.Unmap().WithZone("") }

// Key returns the event's flow key.
func (e *Event) Key() FlowKey {
	return FlowKey{Client: e.Client.Unmap(), ClientPort: e.ClientPort, Dest: e.Dest.Unmap(), DestPort: e.DestPort, Proto: e.Proto}
}

// Stamp copies a policy decision into the event and sets Enforced: a deny is
// enforced only in enforce mode.
func (e *Event) Stamp(d policy.Decision) {
	e.Verdict, e.Rule, e.Mode, e.Reason = d.Verdict, d.Rule, d.Mode, d.Reason
	e.Enforced = d.Verdict == policy.Deny && d.Mode == policy.ModeEnforce
}
