package audit

import (
	"cmp"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/net/publicsuffix"

	"egressd/policy"
)

// Suggestion is one rule that would allow part of what was dropped.
type Suggestion struct {
	Name    string
	To      []string // names, "*.name" wildcards, or addresses
	Ports   []string // "443/tcp", or "icmp" (ICMP echo)
	From    []string // the clients seen; empty when too many to list
	Flows   uint64
	Queries uint64
	Clients int
	// ClientsTruncated says more clients were seen than listed (From is
	// then empty: the rule applies to any client).
	ClientsTruncated bool
	First, Last      time.Time
	Reasons          []string
	Notes            []string
}

type suggestKey struct {
	domain string // registrable domain, or the address
	port   string // "443/tcp", "icmp"
}

// maxFromClients is the most clients a suggestion lists in "from";
// beyond it the rule is left open to every client, with a comment.
const maxFromClients = 8

// Suggest turns the dropped list into rules that would allow it, grouped
// and generalised safely:
//   - names are grouped by registrable domain (eTLD+1 from the Public
//     Suffix List, private entries such as s3.amazonaws.com included) and
//     by port; two or more names under a common parent
//     become "*.parent", where the parent is the longest common suffix of
//     the names and never shorter than their registrable domain, so no
//     suggestion is ever wider than a registrable domain, and none is at
//     or above a public suffix;
//   - addresses are suggested one by one, never as wider prefixes;
//   - "from" lists the clients seen (when few enough), so a suggestion
//     opens nothing to clients that did not ask: the clients of the
//     denied flows, not those that only asked DNS for the name (a name
//     with no flow lists the clients that asked), but where a flow
//     client never asked (it resolved through a LAN resolver that asks
//     egressd, or its IPv6 address): then the askers too, whom enforce
//     must let resolve the name for the flows;
//   - only denials a rule can turn into an allow are suggested (see
//     suggestible); for the others a comment per reason says how many
//     were left out and why. Denials only an expired rule explains are
//     not turned into rules (the comment says to extend the rule), nor is
//     the overflow entry.
//
// Each suggestion has one port, and no two name the same destination on
// the same port, so none shadows another once pasted. A denied DNS query
// counts with the rules of its name's flows (one per port), its clients
// not (the flows' clients are the rule's); a name with no flow (enforce mode: the name never resolved) is
// suggested with 443/tcp and a comment saying the port is assumed.
func (r *Report) Suggest() (sugs []Suggestion, comments []string) {
	type group struct {
		names   map[string]bool
		addrs   map[string]bool
		port    string
		flows   uint64
		queries uint64
		clients map[string]bool
		// macs are the MACs seen with each client; noMAC the clients
		// seen without one, or with more than were kept.
		macs    map[string]map[string]bool
		noMAC   map[string]bool
		trunc   bool
		first   time.Time
		last    time.Time
		reasons map[string]bool
		assumed bool
		// asked are the denied queries of the group's names that
		// also had flows: their clients join from: only where a flow
		// client never asked (below).
		asked []DroppedReport
	}
	addClients := func(g *group, d DroppedReport) {
		macsOf := d.ClientDevices.macsByClient()
		for _, c := range d.Clients {
			g.clients[c] = true
			ms, ok := macsOf[c]
			if !ok {
				g.noMAC[c] = true
				continue
			}
			if g.macs[c] == nil {
				g.macs[c] = map[string]bool{}
			}
			for _, m := range ms {
				g.macs[c][m] = true
			}
		}
		g.trunc = g.trunc || d.ClientsTruncated
	}
	// dest is the normalised destination of d: an address, or a valid
	// host name.
	dest := func(d DroppedReport) (string, bool, bool) {
		if a, err := netip.ParseAddr(d.Dest); err == nil {
			return a.Unmap().WithZone("").String(), true, true
		}
		n, ok := policy.NormalizeName(d.Dest)
		return n, false, ok
	}
	// The ports of each destination's suggested flows, so that a denied
	// query for a name counts with its flows.
	portsOf := map[string]map[string]bool{}
	for _, d := range r.Dropped {
		if ruleablePort(d) && suggestible(d.Reason) && d.Dest != overflowKey.dest {
			if n, _, ok := dest(d); ok {
				if portsOf[n] == nil {
					portsOf[n] = map[string]bool{}
				}
				portsOf[n][portOf(d)] = true
			}
		}
	}
	devMACs := r.deviceMACs()
	type tally struct{ flows, queries, requests uint64 }
	left := map[string]*tally{}
	groups := map[suggestKey]*group{}
	var allowedNow []DroppedReport
	for _, d := range r.Dropped {
		if d.AllowedNow != "" {
			// A reload since the drops added or widened a rule that
			// allows it: a rule for it would be shadowed.
			allowedNow = append(allowedNow, d)
			continue
		}
		if d.Dest == overflowKey.dest {
			comments = append(comments, fmt.Sprintf("%d flows to further destinations were not kept one by one (the dropped list is full); they are not suggested", d.Flows))
			continue
		}
		if d.Reason == policy.ReasonExpired {
			comments = append(comments, fmt.Sprintf("%s %s: %d flows only the expired rule %q would allow; extend its expires: instead of adding a rule", d.Dest, portOf(d), d.Flows, d.Rule))
			continue
		}
		if !suggestible(d.Reason) {
			t := left[d.Reason]
			if t == nil {
				t = &tally{}
				left[d.Reason] = t
			}
			t.flows += d.Flows
			t.queries += d.Queries
			t.requests += d.Requests
			continue
		}
		if d.Proto != "dns" && !ruleablePort(d) {
			comments = append(comments, fmt.Sprintf("%q %d/%s: no port a rule can name; not suggested", d.Dest, d.Port, d.Proto))
			continue
		}
		name, isAddr, ok := dest(d)
		if !ok || policy.CheckTarget(name) != nil {
			// A name no rule can hold ("0", "1.2.3": a numeric
			// top-level label reads as an address).
			comments = append(comments, fmt.Sprintf("%q is not a valid host name; not suggested", d.Dest))
			continue
		}
		if !isAddr {
			// A name a rule reads as more than itself: a client
			// asking for "private" must not get a rule for RFC 1918.
			if err := policy.CheckName(name); err != nil {
				comments = append(comments, fmt.Sprintf("%v; not suggested", err))
				continue
			}
		}
		// A name that is itself a public suffix (or has no label above
		// one) is its own domain: only the exact name is ever suggested.
		domain := name
		if !isAddr {
			if dom, err := publicsuffix.EffectiveTLDPlusOne(name); err == nil {
				domain = dom
			}
		}
		var ports []string
		assumed := false
		if d.Proto == "dns" {
			// A name that also had flows counts with them; else the
			// port is a guess.
			ports = sortedKeys(portsOf[name])
			slices.SortFunc(ports, comparePorts)
			if len(ports) == 0 {
				ports, assumed = []string{"443/tcp"}, true
			}
		} else {
			ports = []string{portOf(d)}
		}
		for i, p := range ports {
			k := suggestKey{domain: domain, port: p}
			g := groups[k]
			if g == nil {
				g = &group{names: map[string]bool{}, addrs: map[string]bool{}, port: p, clients: map[string]bool{}, reasons: map[string]bool{},
					macs: map[string]map[string]bool{}, noMAC: map[string]bool{}}
				groups[k] = g
			}
			if isAddr {
				g.addrs[name] = true
			} else {
				g.names[name] = true
			}
			if i == 0 { // counted once, whatever the ports
				g.flows += d.Flows
				g.queries += d.Queries
			}
			g.first, g.last = spanWith(g.first, g.last, d)
			if d.Reason != "" {
				g.reasons[d.Reason] = true
			}
			g.assumed = g.assumed || assumed
			if d.Proto == "dns" && !assumed {
				// The name's flows bring their clients: one that
				// only asked DNS opened nothing the rule would
				// cover, and gets no from: (nor counts), unless a
				// flow client never asked (below).
				g.asked = append(g.asked, d)
				continue
			}
			addClients(g, d)
		}
	}
	for _, g := range groups {
		// A flow client that never asked the forwarder resolved the
		// name through another address: a LAN resolver that asks
		// egressd, the device's IPv6 address while it connects over
		// IPv4 (or its own resolver, in audit mode). Enforce decides a
		// query by its asker: without them in from:, the rule refuses
		// the resolution its flows need. So the askers stay.
		askers := map[string]bool{}
		for _, d := range g.asked {
			for _, c := range d.Clients {
				askers[c] = true
			}
		}
		for c := range g.clients {
			if !askers[c] {
				for _, d := range g.asked {
					addClients(g, d)
				}
				break
			}
		}
	}
	if len(allowedNow) > 0 {
		rules := map[string]bool{}
		for _, d := range allowedNow {
			rules[d.AllowedNow] = true
		}
		comments = append(comments, fmt.Sprintf("%d dropped entries the running policy allows now (rule %s, added or widened since they were dropped): none suggested",
			len(allowedNow), strings.Join(sortedKeys(rules), ", ")))
	}
	leftReasons := make([]string, 0, len(left))
	for reason := range left {
		leftReasons = append(leftReasons, reason)
	}
	slices.Sort(leftReasons)
	for _, reason := range leftReasons {
		t := left[reason]
		var what []string
		if t.flows > 0 {
			what = append(what, fmt.Sprintf("%d flow(s)", t.flows))
		}
		if t.queries > 0 {
			what = append(what, fmt.Sprintf("%d DNS %s", t.queries, queries(t.queries)))
		}
		if t.requests > 0 || len(what) == 0 {
			what = append(what, fmt.Sprintf("%d request(s)", t.requests))
		}
		comments = append(comments, fmt.Sprintf("%s denied as %s: none suggested; %s", strings.Join(what, ", "), reason, unsuggestedWhy(reason)))
	}

	var allNames []string
	for _, g := range groups {
		for n := range g.names {
			allNames = append(allNames, n)
		}
	}
	taken := map[string]bool{}
	for _, u := range r.Rules {
		taken[u.Name] = true
	}
	for _, n := range r.UnusedRules {
		taken[n] = true
	}
	for _, e := range r.ExpiredRules {
		taken[e.Name] = true
	}
	keys := make([]suggestKey, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b suggestKey) int {
		ga, gb := groups[a], groups[b]
		if c := cmp.Compare(gb.flows+gb.queries, ga.flows+ga.queries); c != 0 {
			return c
		}
		if c := cmp.Compare(a.domain, b.domain); c != 0 {
			return c
		}
		return cmp.Compare(a.port, b.port)
	})
	for _, k := range keys {
		g := groups[k]
		s := Suggestion{Ports: []string{g.port}, Flows: g.flows, Queries: g.queries, Clients: len(g.clients),
			ClientsTruncated: g.trunc, First: g.first, Last: g.last}
		if len(g.addrs) > 0 {
			s.To = sortedKeys(g.addrs)
		} else {
			s.To = generalise(k.domain, sortedKeys(g.names), allNames)
		}
		if from, byMAC := fromOf(g.clients, g.macs, g.noMAC, devMACs); !g.trunc && len(from) <= maxFromClients {
			s.From = sortedKeys(from)
			if byMAC {
				s.Notes = append(s.Notes, "from: names a device by MAC where each of its addresses was seen with that one MAC, so the rule holds across DHCP leases")
			}
		}
		s.Reasons = sortedKeys(g.reasons)
		if g.reasons[policy.ReasonClient] {
			s.Notes = append(s.Notes, "a rule already allows this destination for other clients: adding these clients to its from: may be better")
		}
		if g.reasons[policy.ReasonPort] {
			s.Notes = append(s.Notes, "a rule already allows this destination on other ports: adding the port to it may be better")
		}
		if g.assumed {
			s.Notes = append(s.Notes, "only denied DNS queries were seen, so the port is not known: 443/tcp is assumed")
		}
		tail := ""
		if hasOtherPorts(keys, k) {
			tail = "-" + strings.ReplaceAll(g.port, "/", "")
		}
		s.Name = ruleName("allow-"+strings.NewReplacer(".", "-", ":", "-").Replace(k.domain), tail, taken)
		taken[s.Name] = true
		sugs = append(sugs, s)
	}
	return sugs, comments
}

// spanWith widens first..last to d's first and last sighting.
func spanWith(first, last time.Time, d DroppedReport) (time.Time, time.Time) {
	if first.IsZero() || d.FirstSeen.Before(first) {
		first = d.FirstSeen
	}
	if d.LastSeen.After(last) {
		last = d.LastSeen
	}
	return first, last
}

// fromOf is what a suggestion's from: lists for clients: a client seen
// with one MAC, and in none of the group's entries without one (within
// an entry, a sighting without a MAC is not kept once one had a MAC:
// clientSet.add), as that MAC when it is one
// device's (devMACs: a device keeps it across DHCP leases, and its IPv4
// and IPv6 addresses are one entry); any other as its address. byMAC
// says some MAC is listed.
func fromOf(clients map[string]bool, macs map[string]map[string]bool, noMAC map[string]bool, devMACs map[string]bool) (from map[string]bool, byMAC bool) {
	from = map[string]bool{}
	for c := range clients {
		if ms := macs[c]; !noMAC[c] && len(ms) == 1 {
			m := onlyKey(ms)
			if devMACs[m] {
				from[m], byMAC = true, true
				continue
			}
		}
		from[c] = true
	}
	return from, byMAC
}

func onlyKey(m map[string]bool) string {
	for k := range m {
		return k
	}
	return ""
}

// maxDeviceAddrs bounds the addresses of a MAC --suggest names as one
// device, as netutil.Devices bounds a device's (README: "A client is a
// device"): at most one IPv4 address and at most 16 in all.
const maxDeviceAddrs = 16

// deviceMACs returns the MACs of r that stand for one device: seen, over
// all of r's rules and dropped entries, with at most one IPv4 address and
// at most maxDeviceAddrs addresses in all. A MAC with more is not one
// device's but a box's that puts its MAC on others' frames: a LAN router
// (capture records the frame's MAC, the router's, for the flows of every
// client behind it), proxy ARP, a wireless repeater. from: naming it
// would let every client behind it out through the forward chain in
// enforce mode, while the proxies deny those clients all the same (they
// have no neighbour entry: README "A client behind a router has no MAC").
// Only the addresses the report kept are counted (64 an entry).
func (r *Report) deviceMACs() map[string]bool {
	addrs := map[string]map[string]bool{}
	see := func(d ClientDevices) {
		for _, dev := range d.Devices {
			if addrs[dev.MAC] == nil {
				addrs[dev.MAC] = map[string]bool{}
			}
			for _, c := range dev.Clients {
				addrs[dev.MAC][c] = true
			}
		}
	}
	for _, u := range r.Rules {
		see(u.ClientDevices)
	}
	for _, d := range r.Dropped {
		see(d.ClientDevices)
	}
	out := map[string]bool{}
	for m, as := range addrs {
		v4 := 0
		for a := range as {
			if ip, err := netip.ParseAddr(a); err == nil && ip.Unmap().Is4() {
				v4++
			}
		}
		if v4 <= 1 && len(as) <= maxDeviceAddrs {
			out[m] = true
		}
	}
	return out
}

// macsByClient returns the MACs seen with each client that had one, from
// Devices; a client whose MACs were not all kept (MACsTruncated) is left
// out, as one seen without a MAC.
func (d ClientDevices) macsByClient() map[string][]string {
	out := map[string][]string{}
	for _, dev := range d.Devices {
		for _, c := range dev.Clients {
			out[c] = append(out[c], dev.MAC)
		}
	}
	for _, m := range d.ClientMACs {
		if m.MACsTruncated {
			delete(out, m.Client)
		}
	}
	return out
}

// ruleablePort reports whether d's port and protocol can stand in a
// rule's ports: a TCP or UDP port, or an ICMP or ICMPv6 flow (port 0)
// that is suggestible, which capture records so only for an echo (the
// icmp of a rule's ports); other ICMP requests are protocol-not-allowed.
func ruleablePort(d DroppedReport) bool {
	return (d.Proto == "tcp" || d.Proto == "udp") && d.Port != 0 || isEcho(d)
}

// allowedNow is the rule of eng that allows ds to each of its clients
// (addrs: ds.clients.addrs()) now (with each MAC the client was seen with, when a rule names MACs; a
// client whose MACs were not all kept as one seen with none), "" when eng is nil, a client is
// denied, the clients were not all kept, or ds is no drop a rule can
// turn into an allow. It reads the ledger's own entry (the caller holds
// its lock), parsing nothing: a report of a full dropped list decides
// up to MaxDropped × MaxClients × maxClientMACs inputs
// (BenchmarkReportDroppedFull).
func allowedNow(eng *policy.Engine, ds *dropStats, addrs []netip.Addr, now time.Time) string {
	c := &ds.clients
	if eng == nil || len(c.m) == 0 || c.truncated || !suggestible(ds.reason) || ds.key == overflowKey {
		return ""
	}
	d := DroppedReport{Dest: ds.key.dest, Port: ds.key.port, Proto: ds.key.proto, Reason: ds.reason}
	in := policy.Input{Now: now}
	if a, err := netip.ParseAddr(d.Dest); err == nil {
		in.Dest = a.Unmap().WithZone("")
	} else {
		in.Name = d.Dest
		if ds.ip.IsValid() {
			in.Dest = ds.ip.Unmap().WithZone("")
		}
	}
	dns := d.Proto == "dns"
	switch {
	case dns:
	case isEcho(d):
		in.Proto = policy.ICMP
	case ruleablePort(d):
		p, ok := policy.ParseProto(d.Proto)
		if !ok {
			return ""
		}
		in.Proto, in.Port = p, d.Port
	default:
		return ""
	}
	var mac mac6
	rule := ""
	decide := func() bool {
		var dec policy.Decision
		if dns {
			dec = eng.DecideName(in)
		} else {
			dec = eng.Decide(in)
		}
		if rule == "" {
			rule = dec.Rule
		}
		return dec.Allowed()
	}
	for _, a := range addrs {
		in.Client, in.ClientMAC = a, nil
		s := c.m[a]
		if s.n == 0 || s.more || !eng.HasMACs() { // no MAC, or none can change it
			if !decide() {
				return ""
			}
			continue
		}
		for _, m := range s.list() {
			mac = m
			in.ClientMAC = mac[:]
			if !decide() {
				return ""
			}
		}
	}
	return rule
}

// isEcho reports whether d is an ICMP or ICMPv6 echo flow a rule can
// name: capture records an echo request decided by the policy (port 0, a
// suggestible reason); any other ICMP flow as protocol-not-allowed.
func isEcho(d DroppedReport) bool {
	return (d.Proto == "icmp" || d.Proto == "ipv6-icmp") && d.Port == 0 && suggestible(d.Reason)
}

// portOf is d's entry in a rule's ports: "443/tcp", or "icmp" for an
// echo flow.
func portOf(d DroppedReport) string {
	if isEcho(d) {
		return "icmp"
	}
	return fmt.Sprintf("%d/%s", d.Port, d.Proto)
}

// maxRuleName is the longest rule name a policy takes.
const maxRuleName = 63

// ruleName is head+tail, or head+tail+"-N" for the lowest N from 2 that
// is not taken, with head cut so that the name is never longer than a
// policy takes.
func ruleName(head, tail string, taken map[string]bool) string {
	for i := 1; ; i++ {
		suffix := tail
		if i > 1 {
			suffix += fmt.Sprintf("-%d", i)
		}
		h := head
		if len(h)+len(suffix) > maxRuleName {
			h = h[:maxRuleName-len(suffix)]
		}
		if n := h + suffix; !taken[n] {
			return n
		}
	}
}

// suggestible reports whether a rule could allow what was denied for
// reason: nothing matched it, or a rule matched it but not on this port
// or for this client. "" is a denial recorded without a reason.
//
// Expired denials are left to a comment of their own (extend the rule).
// No rule allows the other reasons: the connection's bytes (a ClientHello
// or an HTTP head refused for its form), the proxy's and the DNS
// forwarder's own refusals, an address the name was not given out for,
// and the guarded ranges; nor do path denials, which a host rule would
// only hide by opening every path of the host (the report does not keep
// paths to suggest one).
func suggestible(reason string) bool {
	switch reason {
	case "", policy.ReasonNoRule, policy.ReasonPort, policy.ReasonClient:
		return true
	}
	return false
}

// unsuggested says, per deny reason that suggestible refuses, why no rule
// is suggested for it: what an operator can do instead.
var unsuggested = map[string]string{
	policy.ReasonPath:          "a host/path rule names the host, not this path: add the path to that rule (the report keeps no paths)",
	policy.ReasonPathUnseen:    "only a host/path rule names the host and the stream showed no HTTP/1 path: a host rule would open every path",
	policy.ReasonInvalidName:   "the name is not an ASCII host name: no rule matches it",
	policy.ReasonNoDestination: "neither a name nor an address was seen: no rule matches it",
	policy.ReasonPrivateRelay:  "iCloud Private Relay's ingress (mask.icloud.com, mask-h2.icloud.com), refused on purpose so that Apple devices connect directly: only a rule naming it exactly opens the relay, which egressd does not suggest",
	"sni-mismatch":             "the name is allowed, but the address was not given out for it (a client using another resolver, or a hard-coded address): no rule fixes this",
	"special-range":            "the address is in a guarded range (loopback, link-local, CGNAT, cloud metadata, the gateway): only a CIDR rule naming it opens it, which egressd does not suggest",
	"duplicate-sni":            "a ClientHello with more than one server name: no rule allows it",
	"hello-malformed":          "a ClientHello that does not parse: no rule allows it",
	"hello-timeout":            "the ClientHello or HTTP head did not come in time: no rule allows it",
	"hello-too-large":          "a ClientHello or HTTP head over the size cap: no rule allows it",
	"http-malformed":           "an HTTP head the proxy refuses for its syntax: no rule allows it",
	"host-mismatch":            "an HTTP request whose Host and target disagree: no rule allows it",
	"http-framing":             "an HTTP request with ambiguous body framing (request smuggling): no rule allows it",
	"path-form":                "a request path an origin may read as another, where a host/path rule decides: no rule is suggested",
	"ip-literal-form":          "a CONNECT host in a numeric form that is not an address: no rule allows it",
	"connection-limit":         "the proxy's connection limit: no rule allows it",
	"shutdown":                 "connections the proxy took as it shut down and reset unserved: no rule allows them; they pass once it runs again",
	"fast-path-failed":         "connections the fast path was deciding when its queue reader failed, refused: no rule allows them; new ones go through the proxy",
	"stream-mismatch":          "a fast-path connection whose queued segments did not make one stream (a segment before its start, other bytes where bytes were held, one past the window, a second SYN of another sequence number): no rule allows it",
	"fast-path-http":           "plain HTTP to a --fast-path-ports port, refused since the kernel would forward its later requests unread: no rule allows it; leave the port out of --fast-path-ports (plain HTTP then goes through the proxy)",
	"no-original-dst":          "the proxy could not read the original destination: no rule allows it",
	"resolve-failed":           "the proxy could not resolve the name: no rule allows it",
	"proxy-auth":               "the explicit proxy refused clients without valid credentials: they need credentials (--proxy-users), not a rule",
	"reload-undecidable":       "a reload found a connection it could not decide again (a bug, see the logs): no rule allows it",
	"opened-before-enforce":    "connections opened in audit mode and cut by the switch to enforce: new ones the rules allow pass",
	"urgent-data":              "a client stream with urgent data (MSG_OOB) in two places, whose bytes as the proxy read them cannot be known: no rule allows it",
	"stream-conflict":          "a client stream with bytes sent twice, different, at the same place (an overlap, or a decoy the server never read: an IDS-evasion trick), whose name as the server read it cannot be known: no rule allows it",
	"inbound":                  "connections started from the WAN side toward a LAN host, not a LAN client's egress: rules name what LAN clients may reach, and enforce mode drops new connections from the WAN side",
	"protocol-not-allowed":     "packets of an IP protocol other than TCP and UDP (GRE, ESP, a tunnel, an ICMP request other than echo): a rule names TCP and UDP ports and ICMP echo (icmp) only, so none can allow them, and enforce mode drops them; a device that needs one needs another way out",
	"forged-source":            "packets from a source the gateway does not route back out of the LAN interface they came in on (not of the LAN's subnets, nor of a subnet routed via the LAN): enforce mode drops them before any rule (BCP 38); for a subnet behind a LAN router, add its route via the LAN (ip route add SUBNET via ROUTER dev LAN)",
	"loopback-destination":     "packets from the LAN to 127.0.0.0/8: enforce mode drops them before any rule; no rule allows them",
	"router-advertisement":     "IPv6 Router Advertisements from the LAN side: enforce mode drops them (the gateway is the LAN's router); no rule allows them",
	"redirect":                 "ICMP or ICMPv6 redirects from the LAN side to the gateway: enforce mode drops them; no rule allows them",
	"doh-canary":               "Firefox's DoH canary, answered NXDOMAIN on purpose: no rule allows it",
	"rate-limited":             "the client went over the DNS rate limit: no rule allows it",
	"qtype-refused":            "DNS queries of a type egressd refuses (ANY, AXFR, IXFR, and those that are no data type: 0, OPT, TSIG, TKEY, 128-255): no rule allows them",
	"class-refused":            "DNS queries not of class IN: no rule allows them",
	"opcode":                   "DNS messages that are not standard queries: no rule allows them",
	"format-error":             "malformed DNS queries: no rule allows them",
	"upstream-failed":          "the upstream resolver failed: no rule allows it",
}

// unsuggestedWhy says why --suggest turns no denial for reason into a
// rule, or "" when it does.
func unsuggestedWhy(reason string) string {
	if suggestible(reason) || reason == policy.ReasonExpired {
		return ""
	}
	if why, ok := unsuggested[reason]; ok {
		return why
	}
	return "a rule is not known to allow it"
}

// hasOtherPorts says whether another group has the same domain.
func hasOtherPorts(keys []suggestKey, k suggestKey) bool {
	for _, o := range keys {
		if o.domain == k.domain && o.port != k.port {
			return true
		}
	}
	return false
}

// generalise returns the rule targets for names under one registrable
// domain: the names themselves when fewer than two share a parent, else
// "*.parent" for the names strictly
// under their longest common parent (plus the parent itself, exactly, if
// it was seen). The parent is never shorter than domain, and a wildcard is
// never returned at or above a public suffix.
//
// The Public Suffix List cannot be walked downwards, so a domain that
// hosts private suffixes (amazonaws.com hosts s3.amazonaws.com, whose
// subdomains are other parties' registrable domains) cannot be recognised
// from the list alone. As a second guard, no wildcard is proposed over a
// parent when any name seen (in others, the report's other dropped names)
// lies under it in a different registrable domain.
func generalise(domain string, names, others []string) []string {
	if len(names) < 2 {
		return names
	}
	parent := names[0]
	for _, n := range names[1:] {
		parent = commonParent(parent, n)
	}
	if len(parent) < len(domain) || !strings.HasSuffix(parent, domain) || !safeWildcardBase(parent) ||
		policy.CheckTarget("*."+parent) != nil { // under a wildcard-DNS zone such as nip.io
		return names
	}
	for _, o := range others {
		if strings.HasSuffix(o, "."+parent) {
			if d, err := publicsuffix.EffectiveTLDPlusOne(o); err != nil || d != domain {
				return names
			}
		}
	}
	below := 0
	var out []string
	for _, n := range names {
		if n == parent {
			out = append(out, parent)
		} else {
			below++
		}
	}
	if below < 2 {
		return names
	}
	return append(out, "*."+parent)
}

// commonParent is the longest common suffix of a and b made of whole
// labels ("" if none). A name counts as its own parent.
func commonParent(a, b string) string {
	la, lb := strings.Split(a, "."), strings.Split(b, ".")
	var common []string
	for i := 1; i <= len(la) && i <= len(lb); i++ {
		if la[len(la)-i] != lb[len(lb)-i] {
			break
		}
		common = append([]string{la[len(la)-i]}, common...)
	}
	return strings.Join(common, ".")
}

// safeWildcardBase reports whether "*.base" stays within one registrable
// domain: base is not a public suffix, nor above one.
func safeWildcardBase(base string) bool {
	if base == "" {
		return false
	}
	etld1, err := publicsuffix.EffectiveTLDPlusOne(base)
	if err != nil {
		return false
	}
	return base == etld1 || strings.HasSuffix(base, "."+etld1)
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func comparePorts(a, b string) int {
	var pa, pb int
	var qa, qb string
	fmt.Sscanf(strings.Replace(a, "/", " ", 1), "%d %s", &pa, &qa)
	fmt.Sscanf(strings.Replace(b, "/", " ", 1), "%d %s", &pb, &qb)
	if c := cmp.Compare(qa, qb); c != 0 {
		return c
	}
	return cmp.Compare(pa, pb)
}

// WriteSuggestions writes Suggest's rules as a YAML snippet ready to paste
// under "rules:" of the policy, with the flows each would allow counted in
// comments, and a warning when the counts are partial (Report.Loading).
func (r *Report) WriteSuggestions(w io.Writer) error {
	ew := &errWriter{w: w}
	sugs, comments := r.Suggest()
	fmt.Fprintf(ew, "# Suggested by egressd report --suggest at %s", fmtTime(r.GeneratedAt))
	if r.Since != nil {
		fmt.Fprintf(ew, " (since %s)", fmtTime(*r.Since))
	}
	fmt.Fprintf(ew, "\n# %d rule(s) that would allow what was dropped. Review them, then paste under \"rules:\".\n", len(sugs))
	fmt.Fprintln(ew, "# No wildcard is wider than a registrable domain (Public Suffix List).")
	if r.Loading != nil {
		// The start's read of the event log is not done (or failed): a
		// policy built from these would miss what the log holds.
		fmt.Fprintf(ew, "# WARNING: %s\n", commentSafe(r.Loading.note()))
	}
	for _, c := range comments {
		fmt.Fprintf(ew, "# %s\n", commentSafe(c))
	}
	switch {
	case len(sugs) > 0:
	case len(r.Dropped) == 0:
		fmt.Fprintln(ew, "# Nothing to suggest: nothing was dropped.")
	case !slices.ContainsFunc(r.Dropped, func(d DroppedReport) bool { return d.AllowedNow == "" }):
		fmt.Fprintln(ew, "# Nothing to suggest: the running policy allows what was dropped.")
	default:
		fmt.Fprintln(ew, "# Nothing to suggest: no rule would allow what was dropped.")
	}
	for _, s := range sugs {
		fmt.Fprintf(ew, "  - name: %s\n", s.Name)
		what := fmt.Sprintf("%d flow(s)", s.Flows)
		if s.Queries > 0 {
			what += fmt.Sprintf(", %d DNS %s", s.Queries, queries(s.Queries))
		}
		fmt.Fprintf(ew, "    # %s from %s client(s), %s to %s", what, fmtCount(s.Clients, s.ClientsTruncated), fmtTime(s.First), fmtTime(s.Last))
		if len(s.Reasons) > 0 {
			fmt.Fprintf(ew, "; denied as %s", strings.Join(s.Reasons, ", "))
		}
		fmt.Fprintln(ew)
		for _, n := range s.Notes {
			fmt.Fprintf(ew, "    # %s\n", n)
		}
		fmt.Fprintf(ew, "    why: suggested from %s observed\n", what)
		if len(s.From) > 0 {
			fmt.Fprintf(ew, "    from: [%s]\n", quoteList(s.From))
		} else {
			fmt.Fprintln(ew, "    # from: omitted: too many clients to list, so any LAN client")
		}
		fmt.Fprintf(ew, "    to: [%s]\n", quoteList(s.To))
		fmt.Fprintf(ew, "    ports: [%s]\n", strings.Join(s.Ports, ", "))
	}
	return ew.err
}

// commentSafe keeps a comment on its line whatever a journal held (a
// reason, a name): anything but printable ASCII becomes '?'.
func commentSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, s)
}

func queries(n uint64) string {
	if n == 1 {
		return "query"
	}
	return "queries"
}

func quoteList(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = `"` + v + `"`
	}
	return strings.Join(q, ", ")
}
