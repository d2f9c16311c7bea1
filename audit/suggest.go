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
	Ports   []string // "443/tcp"
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
	ports  string
}

// maxFromClients is the most clients a suggestion lists in "from";
// beyond it the rule is left open to every client, with a comment.
const maxFromClients = 8

// Suggest turns the dropped list into rules that would allow it, grouped
// and generalised safely:
//   - names are grouped by registrable domain (eTLD+1 from the Public
//     Suffix List, private entries such as s3.amazonaws.com included) and
//     by the ports they used; two or more names under a common parent
//     become "*.parent", where the parent is the longest common suffix of
//     the names and never shorter than their registrable domain, so no
//     suggestion is ever wider than a registrable domain, and none is at
//     or above a public suffix;
//   - addresses are suggested one by one, never as wider prefixes;
//   - "from" lists the clients seen (when few enough), so a suggestion
//     opens nothing to clients that did not ask;
//   - denials only an expired rule explains are not turned into rules
//     (the comment says to extend the rule), nor is the overflow entry.
//
// Denied DNS queries with no flow (enforce mode: the name never resolved)
// are suggested with 443/tcp and a comment saying the port is assumed.
func (r *Report) Suggest() (sugs []Suggestion, comments []string) {
	type group struct {
		names   map[string]bool
		addrs   map[string]bool
		ports   []string
		flows   uint64
		queries uint64
		clients map[string]bool
		trunc   bool
		first   time.Time
		last    time.Time
		reasons map[string]bool
		assumed bool
	}
	// Ports per destination, so that a name's rule carries the ports it
	// used, and DNS-only names borrow them when the name also had flows.
	portsOf := map[string]map[string]bool{}
	for _, d := range r.Dropped {
		if d.Proto == "tcp" || d.Proto == "udp" {
			if portsOf[d.Dest] == nil {
				portsOf[d.Dest] = map[string]bool{}
			}
			portsOf[d.Dest][fmt.Sprintf("%d/%s", d.Port, d.Proto)] = true
		}
	}
	groups := map[suggestKey]*group{}
	for _, d := range r.Dropped {
		if d.Dest == overflowKey.dest {
			comments = append(comments, fmt.Sprintf("%d flows to further destinations were not kept one by one (the dropped list is full); they are not suggested", d.Flows))
			continue
		}
		if d.Reason == policy.ReasonExpired {
			comments = append(comments, fmt.Sprintf("%s %d/%s: %d flows only the expired rule %q would allow; extend its expires: instead of adding a rule", d.Dest, d.Port, d.Proto, d.Flows, d.Rule))
			continue
		}
		var k suggestKey
		isAddr := false
		name := d.Dest
		if a, err := netip.ParseAddr(d.Dest); err == nil {
			isAddr = true
			k.domain = a.Unmap().String()
		} else {
			n, ok := policy.NormalizeName(d.Dest)
			if !ok {
				comments = append(comments, fmt.Sprintf("%q is not a valid host name; not suggested", d.Dest))
				continue
			}
			name = n
			dom, err := publicsuffix.EffectiveTLDPlusOne(n)
			if err != nil {
				// The name is itself a public suffix (or has no label
				// above one): only the exact name is ever suggested.
				dom = n
			}
			k.domain = dom
		}
		ps := portsOf[d.Dest]
		assumed := false
		if d.Proto == "dns" {
			// A name that also had flows gets their ports (and its
			// queries count with them); else the port is a guess.
			if len(ps) == 0 {
				ps = map[string]bool{"443/tcp": true}
				assumed = true
			}
		} else {
			ps = map[string]bool{fmt.Sprintf("%d/%s", d.Port, d.Proto): true}
		}
		ports := make([]string, 0, len(ps))
		for p := range ps {
			ports = append(ports, p)
		}
		slices.SortFunc(ports, comparePorts)
		k.ports = strings.Join(ports, ",")
		g := groups[k]
		if g == nil {
			g = &group{names: map[string]bool{}, addrs: map[string]bool{}, ports: ports, clients: map[string]bool{}, reasons: map[string]bool{}}
			groups[k] = g
		}
		if isAddr {
			g.addrs[k.domain] = true
		} else {
			g.names[name] = true
		}
		g.flows += d.Flows
		g.queries += d.Queries
		for _, c := range d.Clients {
			g.clients[c] = true
		}
		g.trunc = g.trunc || d.ClientsTruncated
		if g.first.IsZero() || d.FirstSeen.Before(g.first) {
			g.first = d.FirstSeen
		}
		if d.LastSeen.After(g.last) {
			g.last = d.LastSeen
		}
		if d.Reason != "" {
			g.reasons[d.Reason] = true
		}
		g.assumed = g.assumed || assumed
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
		return cmp.Compare(a.ports, b.ports)
	})
	for _, k := range keys {
		g := groups[k]
		s := Suggestion{Ports: g.ports, Flows: g.flows, Queries: g.queries, Clients: len(g.clients),
			ClientsTruncated: g.trunc, First: g.first, Last: g.last}
		if len(g.addrs) > 0 {
			s.To = sortedKeys(g.addrs)
		} else {
			s.To = generalise(k.domain, sortedKeys(g.names), allNames)
		}
		if !g.trunc && len(g.clients) <= maxFromClients {
			s.From = sortedKeys(g.clients)
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
		base := "allow-" + strings.NewReplacer(".", "-", ":", "-").Replace(k.domain)
		if hasOtherPorts(keys, k) {
			base += "-" + strings.ReplaceAll(g.ports[0], "/", "")
		}
		s.Name = base
		for i := 2; taken[s.Name]; i++ {
			s.Name = fmt.Sprintf("%s-%d", base, i)
		}
		taken[s.Name] = true
		sugs = append(sugs, s)
	}
	return sugs, comments
}

// hasOtherPorts says whether another group has the same domain.
func hasOtherPorts(keys []suggestKey, k suggestKey) bool {
	for _, o := range keys {
		if o.domain == k.domain && o.ports != k.ports {
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
	if len(parent) < len(domain) || !strings.HasSuffix(parent, domain) || !safeWildcardBase(parent) {
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
// comments.
func (r *Report) WriteSuggestions(w io.Writer) error {
	ew := &errWriter{w: w}
	sugs, comments := r.Suggest()
	fmt.Fprintf(ew, "# Suggested by egressd report --suggest at %s", fmtTime(r.GeneratedAt))
	if r.Since != nil {
		fmt.Fprintf(ew, " (since %s)", fmtTime(*r.Since))
	}
	fmt.Fprintf(ew, "\n# %d rule(s) that would allow what was dropped. Review them, then paste under \"rules:\".\n", len(sugs))
	fmt.Fprintln(ew, "# No wildcard is wider than a registrable domain (Public Suffix List).")
	for _, c := range comments {
		fmt.Fprintf(ew, "# %s\n", c)
	}
	if len(sugs) == 0 {
		fmt.Fprintln(ew, "# Nothing to suggest: nothing was dropped.")
	}
	for _, s := range sugs {
		fmt.Fprintf(ew, "  - name: %s\n", s.Name)
		what := fmt.Sprintf("%d flow(s)", s.Flows)
		if s.Queries > 0 {
			what += fmt.Sprintf(", %d DNS quer%s", s.Queries, map[bool]string{true: "y", false: "ies"}[s.Queries == 1])
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

func quoteList(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = `"` + v + `"`
	}
	return strings.Join(q, ", ")
}
