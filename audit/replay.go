package audit

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"egressd/policy"
)

// ReplayResult says what a candidate policy would change for recorded
// flows and queries: newly dropped, newly allowed, and allowed by another
// rule. Each flow counts once, as in the ledger.
type ReplayResult struct {
	Policy    string `json:"policy"`
	Events    uint64 `json:"events"`
	Flows     uint64 `json:"flows"`
	Queries   uint64 `json:"queries"`
	Requests  uint64 `json:"requests,omitempty"` // later HTTP requests on plain-HTTP connections, requests in inspected ones
	Unchanged uint64 `json:"unchanged"`
	// NoMAC counts the flows, requests and queries decided without a
	// client MAC under a candidate that names clients by MAC: their
	// events carry none (the proxy and the DNS forwarder record one only
	// while the running policy names MACs; a client behind a router has
	// none), so its MAC rules matched none of them.
	NoMAC uint64 `json:"no_mac,omitempty"`
	// PathCut counts the flows and requests, of those Unchanged, whose
	// recorded path was cut at MaxPathBytes and which a host/path rule of
	// the candidate decides on what the log no longer holds: the verdict
	// the candidate gives the whole path is not known, so the record
	// stays, as capture keeps it at a reload (policy.Input.PathCut).
	PathCut uint64 `json:"path_cut,omitempty"`
	// RotatedOut, when the state directory holds a summary of event log
	// files rotation deleted, says how many files and events it holds:
	// those events cannot be replayed, so the flows they were are not
	// judged here.
	RotatedOut   *RotatedOut    `json:"rotated_out,omitempty"`
	NewlyDropped []ReplayChange `json:"newly_dropped"`
	NewlyAllowed []ReplayChange `json:"newly_allowed"`
	RuleChanged  []ReplayChange `json:"rule_changed"`
}

// ReplayChange groups the flows (or queries) of one destination, port and
// protocol whose verdict or rule changes the same way.
type ReplayChange struct {
	Dest        string    `json:"dest"`
	IP          string    `json:"ip"`
	Port        uint16    `json:"port"`
	Proto       string    `json:"proto"` // "tcp", "udp", or "dns" for queries
	Flows       uint64    `json:"flows"`
	Queries     uint64    `json:"queries,omitempty"`
	Requests    uint64    `json:"requests,omitempty"`
	Clients     []string  `json:"clients"`
	ClientCount int       `json:"client_count"`
	OldVerdict  string    `json:"old_verdict"`
	OldRule     string    `json:"old_rule,omitempty"`
	OldReason   string    `json:"old_reason,omitempty"`
	NewVerdict  string    `json:"new_verdict"`
	NewRule     string    `json:"new_rule,omitempty"`
	NewReason   string    `json:"new_reason,omitempty"`
	FirstSeen   time.Time `json:"first_seen"`
	LastSeen    time.Time `json:"last_seen"`
}

// Replayer runs recorded events against a candidate policy. Feed it with
// Add (it is a Sink too), then call Result.
type Replayer struct {
	eng    *policy.Engine
	now    time.Time
	dedup  *Ledger // for counting each flow once
	res    ReplayResult
	groups map[replayKey]*replayGroup
}

type replayKey struct {
	dest, proto      string
	port             uint16
	oldRule, newRule string
	oldV, newV       policy.Verdict
	newReason        string
}

type replayGroup struct {
	ch      ReplayChange
	clients clientSet
}

// NewReplayer returns a replayer for the candidate policy eng. Rules that
// expire are judged at now (zero: time.Now()), when the candidate would
// be applied.
func NewReplayer(eng *policy.Engine, now time.Time) *Replayer {
	if now.IsZero() {
		now = time.Now()
	}
	return &Replayer{eng: eng, now: now, dedup: NewLedger(nil, LedgerOptions{}), groups: map[replayKey]*replayGroup{},
		res: ReplayResult{Policy: eng.Policy().File, NewlyDropped: []ReplayChange{}, NewlyAllowed: []ReplayChange{}, RuleChanged: []ReplayChange{}}}
}

// Emit adds one recorded event.
func (r *Replayer) Emit(ev Event) {
	ev.Bound() // a log written before events were bounded
	r.res.Events++
	if ev.Kind != KindFlow && ev.Kind != KindDNS && ev.Kind != KindRequest {
		return
	}
	r.dedup.mu.Lock()
	first := r.dedup.addLocked(&ev)
	r.dedup.mu.Unlock()
	if !first {
		return
	}
	var mac net.HardwareAddr
	if ev.ClientMAC != "" {
		mac, _ = net.ParseMAC(ev.ClientMAC)
	}
	if mac == nil && r.eng.HasMACs() {
		r.res.NoMAC++
	}
	pr, _ := policy.ParseProto(ev.Proto)
	if (ev.Proto == "icmp" || ev.Proto == "ipv6-icmp") && ev.Reason != "protocol-not-allowed" {
		// An echo request, which capture decides with the protocol icmp;
		// another ICMP request is protocol-not-allowed, as before.
		pr = policy.ICMP
	}
	replaced := false // the path's bytes from the first U+FFFD are not known
	in := policy.Input{Client: ev.Client.Unmap(), ClientMAC: mac, Dest: ev.Dest.Unmap(), Port: ev.DestPort, Proto: pr,
		Name: ev.Name, Path: ev.Path, Now: r.now,
		// A flow that showed no path is decided so again; a path-unseen
		// denial says so by itself (events from before NoPath was
		// recorded).
		NoPath: ev.NoPath || ev.Reason == policy.ReasonPathUnseen}
	if ev.PathLen > 0 && ev.Kind != KindDNS {
		// Cut at MaxPathBytes, or changed where bytes not UTF-8 were
		// written as U+FFFD (Bound): decided on the start kept as sent,
		// before the first U+FFFD, as capture judges a cut connection at
		// a reload. A path sent with a U+FFFD of its own is cut there
		// too: that only leaves more not known.
		start := strings.TrimSuffix(ev.Path, TruncMark)
		if i := strings.IndexRune(start, utf8.RuneError); i >= 0 {
			start, replaced = start[:i], true
		}
		in.Path, in.PathCut = start, true
	}
	var d policy.Decision
	switch ev.Kind {
	case KindDNS:
		r.res.Queries++
		d = r.eng.DecideName(in)
	case KindRequest:
		r.res.Requests++
		d = r.eng.Decide(in)
	case KindFlow:
		r.res.Flows++
		if ev.LearnedName != "" {
			// A flow nftables forwards by address, let out by the
			// learned set of the answer for LearnedName: judged as the
			// forward chain judges its next packet and capture's reload
			// judges it (capture/reload.go), by the address (a CIDR
			// rule) and then that name, whatever names its hellos
			// carried (Name, OtherNames: the chain reads no hello), in
			// the order the proxy and capture decide a name DNS gave an
			// address out for (policy.DecideLearned). No path either:
			// the chain reads none. A deny is listed under that name,
			// as capture records it.
			in.Name, in.Path, in.PathCut, in.NoPath, replaced = "", "", false, false, false
			d, _ = r.eng.DecideLearned(in, r.eng.Decide(in), []string{ev.LearnedName})
			if !d.Allowed() {
				ev.Name = ev.LearnedName
			}
			break
		}
		d = r.eng.Decide(in)
		// A QUIC flow's other names (its later connections' hellos)
		// must each be allowed too, as capture lets a later connection
		// through only where the policy allows its name: the first the
		// candidate does not allow decides the flow and names the
		// change. (A log written before session 32 does not carry the
		// name its address was learned for, by which capture's reload
		// judges the flow: LearnedName, above.)
		for _, o := range ev.OtherNames {
			oin := in
			oin.Name = o
			if od := r.eng.Decide(oin); d.Allowed() && !od.Allowed() {
				d, ev.Name = od, o
			}
		}
	}
	oldV := ev.Verdict
	if oldV != policy.Allow {
		oldV = policy.Deny
	}
	if replaced && d.Allowed() {
		// The bytes replaced may be what made the path one an origin
		// reads as another (a raw "\xc0\xae" is an overlong dot): where
		// only a host/path rule allows it, PathForm of the whole path
		// is not known, as the verdict past a cut is not.
		host := in
		host.Path, host.PathCut = "", false
		if !r.eng.HostLevel().Decide(host).Allowed() {
			d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: policy.ReasonPathCut, Mode: r.eng.Mode()}
		}
	}
	if d.Reason == policy.ReasonPathCut {
		// The start cannot tell a host/path rule ranked before any that
		// allows: allowed whatever the path where a rule allows the host
		// (a recorded deny becomes that rule's), else only the whole path
		// could tell, and the record stays (capture's rejudge likewise).
		// What the whole path cannot change is known, though: the guard
		// refuses any allow to a range no CIDR rule names, and a deny
		// the component gave besides the rules stays.
		in.Path, in.PathCut = "", false
		switch g := r.guard(in, policy.Decision{Verdict: policy.Allow}); {
		case !g.Allowed():
			d = g
		case oldV == policy.Deny && !policyReason(ev.Reason):
			r.res.Unchanged++
			return
		default:
			hd := r.guard(in, r.eng.HostLevel().Decide(in))
			if oldV == policy.Allow || !hd.Allowed() {
				r.res.Unchanged++
				r.res.PathCut++
				return
			}
			d = hd
		}
	}
	if ev.Kind != KindDNS {
		d = r.guard(in, r.eng.PathForm(in, in.Path, d))
	}
	switch {
	case oldV == d.Verdict && (d.Verdict == policy.Deny || ev.Rule == d.Rule):
		r.res.Unchanged++
		return
	case oldV == policy.Deny && !policyReason(ev.Reason):
		// The component refused it besides the rules (see policyReason):
		// a candidate whose rules allow the name does not lift that.
		r.res.Unchanged++
		return
	}
	k := replayKey{dest: destName(&ev), proto: ev.Proto, port: ev.DestPort, oldRule: ev.Rule, newRule: d.Rule, oldV: oldV, newV: d.Verdict, newReason: d.Reason}
	if ev.Kind == KindDNS {
		k.proto, k.port = "dns", 53
	}
	g := r.groups[k]
	if g == nil {
		g = &replayGroup{ch: ReplayChange{Dest: k.dest, Port: k.port, Proto: k.proto,
			OldVerdict: string(oldV), OldRule: ev.Rule, OldReason: ev.Reason,
			NewVerdict: string(d.Verdict), NewRule: d.Rule, NewReason: d.Reason}}
		r.groups[k] = g
	}
	t := ev.Time.UTC()
	if ev.Kind == KindDNS {
		g.ch.Queries++
	} else {
		if ev.Kind == KindRequest {
			g.ch.Requests++
		} else {
			g.ch.Flows++
		}
		if ev.Dest.IsValid() {
			g.ch.IP = ev.Dest.Unmap().String()
		}
	}
	g.clients.add(ev.Client.Unmap(), ev.ClientMAC, 64)
	if g.ch.FirstSeen.IsZero() || t.Before(g.ch.FirstSeen) {
		g.ch.FirstSeen = t
	}
	if t.After(g.ch.LastSeen) {
		g.ch.LastSeen = t
	}
}

// guard is the special-range guard the proxy, the firewall and capture
// put after the rules (policy.Engine.GuardRefuses): a flow or request the
// candidate allows to a guarded range, or under the engine's NAT64
// prefixes to one's NAT64 form, is refused unless a CIDR rule names it.
// Recorded flows passed the running gateway's guard; a candidate or a
// NAT64 prefix it did not have can move one into it (a "*" that replaces
// the CIDR rule naming 169.254.169.254, the NAT64 form of metadata under
// --nat64-prefix). The gateway's own addresses are not known here; DNS to
// port 53 is the forwarder's, as everywhere; loopback no rule opens from
// the LAN (policy.Engine.LANRefuses: enforce's antispoof chain drops it).
func (r *Replayer) guard(in policy.Input, d policy.Decision) policy.Decision {
	if !d.Allowed() {
		return d
	}
	if _, refused := r.eng.LANRefuses(in, nil, nil); !refused {
		return d
	}
	return policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: reasonSpecialRange, Mode: r.eng.Mode()}
}

// reasonSpecialRange is the guard's reason, as the proxy and capture
// record it.
const reasonSpecialRange = "special-range"

// policyReason reports whether a recorded denial's reason is one the
// policy gives, which a candidate's rules decide again. The components'
// own reasons are refusals besides the rules: a malformed or duplicate
// ClientHello, an HTTP head the proxy refuses, an SNI for an address
// nobody resolved (sni-mismatch), the special-range guard, a client over
// its DNS rate. Re-deciding only the name and address would call those
// flows newly allowed, even against the policy that recorded them.
// path-unseen is the policy's: the flow showed no path (Event.NoPath), and
// it is decided again with Input.NoPath; so is private-relay, which only a
// rule naming iCloud Private Relay's ingress exactly lifts. The price: a candidate that would lift one of them (a CIDR rule that vouches
// for the address of an sni-mismatch, one naming a special range) is not
// shown as doing so.
func policyReason(reason string) bool {
	switch reason {
	case "", policy.ReasonNoRule, policy.ReasonPort, policy.ReasonPath, policy.ReasonPathUnseen, policy.ReasonClient,
		policy.ReasonExpired, policy.ReasonInvalidName, policy.ReasonNoDestination, policy.ReasonPrivateRelay:
		return true
	}
	return false
}

// Result returns what changes.
func (r *Replayer) Result() *ReplayResult {
	res := r.res
	res.NewlyDropped, res.NewlyAllowed, res.RuleChanged = []ReplayChange{}, []ReplayChange{}, []ReplayChange{}
	for _, g := range r.groups {
		ch := g.ch
		ch.Clients = g.clients.list()
		ch.ClientCount = len(ch.Clients)
		switch {
		case ch.OldVerdict == string(policy.Allow) && ch.NewVerdict == string(policy.Deny):
			res.NewlyDropped = append(res.NewlyDropped, ch)
		case ch.OldVerdict == string(policy.Deny) && ch.NewVerdict == string(policy.Allow):
			res.NewlyAllowed = append(res.NewlyAllowed, ch)
		default:
			res.RuleChanged = append(res.RuleChanged, ch)
		}
	}
	for _, l := range [][]ReplayChange{res.NewlyDropped, res.NewlyAllowed, res.RuleChanged} {
		slices.SortFunc(l, func(a, b ReplayChange) int {
			if c := cmp.Compare(b.Flows+b.Queries+b.Requests, a.Flows+a.Queries+a.Requests); c != 0 {
				return c
			}
			if c := cmp.Compare(a.Dest, b.Dest); c != 0 {
				return c
			}
			if c := cmp.Compare(a.Port, b.Port); c != 0 {
				return c
			}
			return cmp.Compare(a.Proto, b.Proto)
		})
	}
	return &res
}

// ReplayPath feeds every recorded event of a state directory (or of one
// events file, when path is a file) to r. It never repairs anything.
// Events of files rotated out of a state directory's log are only in its
// summary and cannot be replayed: the result says how many (RotatedOut).
func ReplayPath(path string, r *Replayer) (LoadStats, error) {
	st, a, err := readPath(path, r.Emit)
	if a != nil {
		r.res.RotatedOut = &RotatedOut{From: a.From, Until: a.Until, Files: a.Files, Events: a.Events}
		st.Summarized, st.SummarizedFiles = a.Events, a.Files
	}
	return st, err
}

// WriteJSON writes the result as indented JSON.
func (res *ReplayResult) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(res); err != nil {
		return fmt.Errorf("audit: write replay: %w", err)
	}
	return nil
}

// WriteText writes the result as terminal tables.
func (res *ReplayResult) WriteText(w io.Writer) error {
	ew := &errWriter{w: w}
	fmt.Fprintf(ew, "replay against %s: %d recorded events, %d flows and %d DNS queries (each counted once)", res.Policy, res.Events, res.Flows, res.Queries)
	if res.Requests > 0 {
		fmt.Fprintf(ew, ", %d further HTTP requests on plain-HTTP and inspected connections", res.Requests)
	}
	fmt.Fprintln(ew)
	if ro := res.RotatedOut; ro != nil {
		fmt.Fprintf(ew, "not replayed: %d events of %d event log files rotated out (%s to %s); only a summary of their counts is kept, so flows from then are not judged here\n",
			ro.Events, ro.Files, fmtTime(ro.From), fmtTime(ro.Until))
	}
	changed := func(title string, l []ReplayChange, was, now func(ReplayChange) string) {
		fmt.Fprintf(ew, "\n%s (%d)\n", title, len(l))
		if len(l) == 0 {
			fmt.Fprintln(ew, "  (none)")
			return
		}
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  DEST\tIP\tPORT\tFLOWS\tQUERIES\tREQUESTS\tCLIENTS\tWAS\tNOW\tFIRST SEEN\tLAST SEEN")
		for _, c := range l {
			ip := c.IP
			if ip == "" || ip == c.Dest {
				ip = "-"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d/%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s\n", textName(c.Dest), ip, c.Port, c.Proto, c.Flows, c.Queries, c.Requests,
				c.ClientCount, was(c), now(c), fmtTime(c.FirstSeen), fmtTime(c.LastSeen))
		}
		tw.Flush()
	}
	allowed := func(rule string) string { return "allow (" + rule + ")" }
	denied := func(reason string) string { return "deny (" + reason + ")" }
	changed("NEWLY DROPPED", res.NewlyDropped,
		func(c ReplayChange) string { return allowed(c.OldRule) }, func(c ReplayChange) string { return denied(c.NewReason) })
	changed("NEWLY ALLOWED", res.NewlyAllowed,
		func(c ReplayChange) string { return denied(c.OldReason) }, func(c ReplayChange) string { return allowed(c.NewRule) })
	changed("ALLOWED BY ANOTHER RULE", res.RuleChanged,
		func(c ReplayChange) string { return allowed(c.OldRule) }, func(c ReplayChange) string { return allowed(c.NewRule) })
	fmt.Fprintf(ew, "\nunchanged: %d\n", res.Unchanged)
	if res.PathCut > 0 {
		fmt.Fprintf(ew, "  of which %d with a path cut at %d bytes in the log that a path rule of the candidate decides past the cut: their verdict under it is not known\n", res.PathCut, MaxPathBytes)
	}
	return ew.err
}
