package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"time"

	"egressd/internal/httpwire"
	"egressd/policy"
	"egressd/profiles"
	"egressd/proxy"
)

func init() {
	commands["policy"] = command{"policy check [-q] FILE | policy explain FILE --to DEST [--port N/proto] [--from IP] [--mac MAC] [--nat64-prefix PREFIX,...] [--json]",
		"validate a policy, or explain its verdict for a destination", cmdPolicy}
}

func cmdPolicy(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: egressd "+commands["policy"].usage)
		return exitUsage
	}
	switch args[0] {
	case "check":
		return cmdPolicyCheck(args[1:], stdout, stderr)
	case "explain":
		return cmdPolicyExplain(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "egressd policy: unknown subcommand %q (expected check or explain)\n", args[0])
	return exitUsage
}

// loadEngine compiles a policy file, or an embedded profile when file is
// "profile:NAME". Warnings go to stderr.
func loadEngine(file string, stderr io.Writer) (*policy.Engine, error) {
	return loadEngineAs(file, file, stderr)
}

// loadEngineAs is loadEngine of file under another name (the file's
// origin, for the state directory's copy of a policy): errors,
// warnings and reports name it.
func loadEngineAs(file, name string, stderr io.Writer) (*policy.Engine, error) {
	src, err := policySource(file)
	if err != nil {
		return nil, err
	}
	eng, err := policy.Compile(name, src)
	if err != nil {
		return nil, err
	}
	for _, w := range eng.Warnings() {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	return eng, nil
}

// policySource reads a policy file, "-", or "profile:NAME".
func policySource(file string) ([]byte, error) {
	var src []byte
	var err error
	if name, ok := strings.CutPrefix(file, "profile:"); ok {
		src, err = profiles.Get(name)
	} else {
		src, err = readPolicySource(file)
	}
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	return src, nil
}

func cmdPolicyCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("policy check", stderr)
	quiet := fs.Bool("q", false, "print nothing when the policy is valid")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 1 {
		fmt.Fprintln(stderr, "usage: egressd policy check [-q] FILE   (FILE may be - or profile:NAME)")
		return exitUsage
	}
	warnTo := stderr
	if *quiet {
		// Silent when valid, warnings too: egressd run logs them itself.
		warnTo = io.Discard
	}
	eng, err := loadEngine(pos[0], warnTo)
	if err != nil {
		var pe *policy.Error
		if errors.As(err, &pe) {
			fmt.Fprintln(stderr, pe.Error())
			fmt.Fprintf(stderr, "%s: %d error(s)\n", pos[0], len(pe.Problems))
		} else {
			fmt.Fprintln(stderr, "egressd:", err)
		}
		return exitFail
	}
	if !*quiet {
		fmt.Fprintf(stdout, "%s: valid, %d rules, mode %s, %d warning(s)\n", pos[0], len(eng.Rules()), eng.Mode(), len(eng.Warnings()))
	}
	return exitOK
}

// printLoadErr prints why a policy did not load: its problems as they are
// (each starts with file:line:col), anything else (a file that cannot be
// read, an unknown profile) after the command's prefix.
func printLoadErr(stderr io.Writer, err error) {
	var pe *policy.Error
	if errors.As(err, &pe) {
		fmt.Fprintln(stderr, pe.Error())
		return
	}
	fmt.Fprintln(stderr, "egressd:", err)
}

// explanation is the JSON of `policy explain --json`.
type explanation struct {
	Verdict  policy.Verdict `json:"verdict"`
	Rule     string         `json:"rule"`
	Reason   string         `json:"reason"`
	Why      string         `json:"why,omitempty"`
	Mode     policy.Mode    `json:"mode"`
	Dest     string         `json:"dest"`
	Name     string         `json:"name,omitempty"`
	IP       string         `json:"ip,omitempty"`
	Path     string         `json:"path,omitempty"`
	Port     string         `json:"port"`
	From     string         `json:"from,omitempty"`
	DNS      policy.Verdict `json:"dns,omitempty"` // for names: may the client resolve it
	DNSRule  string         `json:"dns_rule,omitempty"`
	Warnings []string       `json:"warnings,omitempty"`
	// SpecialRange is the guarded range the special-range guard refuses
	// the destination by (reason special-range); AllowedBy the rule that
	// allows it but for the guard, if any.
	SpecialRange string `json:"special_range,omitempty"`
	AllowedBy    string `json:"allowed_by,omitempty"`
	// Guard is the guard that refused it (reason special-range):
	// proxy.GuardLANLoopback, GuardSelf, GuardSpecialRange, or
	// guardMartian.
	Guard string `json:"guard,omitempty"`
	// Explicit and Transparent are what each proxy does with a TCP
	// connection to an address (proxy.DecideLiteral, the proxy's own
	// guards): the explicit proxy asked for the literal as written, the
	// transparent proxy a client's redirected flow (not on port 53, the
	// DNS forwarder's). The verdict above is a client's own connection's,
	// but for an IPv4-mapped literal, which only the explicit proxy is
	// asked for as such.
	Explicit    *proxyExplanation `json:"explicit,omitempty"`
	Transparent *proxyExplanation `json:"transparent,omitempty"`
}

// proxyExplanation is one proxy's decision in explain's JSON.
type proxyExplanation struct {
	Verdict      policy.Verdict `json:"verdict"`
	Rule         string         `json:"rule,omitempty"`
	Reason       string         `json:"reason"`
	Mode         policy.Mode    `json:"mode"`
	Guard        string         `json:"guard,omitempty"`
	SpecialRange string         `json:"special_range,omitempty"`
}

// guardMartian: Linux drops a packet from the LAN to 0.0.0.0 as a
// martian destination before the forward chain, in either mode, whatever
// the rules; only the REDIRECTs (TCP to the proxy, DNS to the forwarder)
// come before it (policy.LANThisHost). The rest of 0.0.0.0/8 it routes
// like any address (since Linux 5.3): the special-range guard's.
const guardMartian = "martian"

// literalExplained is proxy.DecideLiteral's decision of in (the explicit
// proxy's when explicit), for explain: the gateway's own addresses and
// the configured exceptions are not known here.
func literalExplained(eng *policy.Engine, in policy.Input, explicit bool) *proxyExplanation {
	d, r := proxy.DecideLiteral(eng, in, nil, nil, explicit)
	pe := &proxyExplanation{Verdict: d.Verdict, Rule: d.Rule, Reason: d.Reason, Mode: d.Mode, Guard: r.Guard}
	if r.Guard != "" {
		pe.SpecialRange = r.Range.String()
	}
	return pe
}

// proxyLine is the text of one proxy's decision.
func proxyLine(pe *proxyExplanation) string {
	if pe.Verdict == policy.Allow {
		return fmt.Sprintf("ALLOW (rule %s)", pe.Rule)
	}
	if pe.Guard != "" {
		return fmt.Sprintf("DENY (%s, %s guard, %s)", pe.Reason, pe.Guard, pe.SpecialRange)
	}
	return fmt.Sprintf("DENY (%s)", pe.Reason)
}

func cmdPolicyExplain(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("policy explain", stderr)
	to := fs.String("to", "", "destination: a name, an IP address or a URL (required)")
	port := fs.String("port", "443/tcp", "destination port and protocol, N/tcp or N/udp, or icmp (ICMP echo)")
	from := fs.String("from", "", "client IP address (default: any client)")
	mac := fs.String("mac", "", "client MAC address")
	asJSON := fs.Bool("json", false, "print one JSON object")
	var nat64 string
	nat64Flag(fs, &nat64)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 1 || *to == "" {
		switch {
		case len(pos) == 0:
			fmt.Fprintln(stderr, "egressd policy explain: no policy FILE given")
		case len(pos) > 1:
			fmt.Fprintf(stderr, "egressd policy explain: one policy FILE, not %d arguments (%q)\n", len(pos), pos)
		default:
			fmt.Fprintln(stderr, "egressd policy explain: --to DEST is required")
		}
		fmt.Fprintln(stderr, "usage: egressd policy explain FILE --to DEST [--port N/proto] [--from IP] [--mac MAC] [--nat64-prefix PREFIX,...] [--json]")
		return exitUsage
	}
	in, dest, err := explainInput(*to, *port, *from, *mac, fs)
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitUsage
	}
	nat, ok := nat64Prefixes("policy explain", nat64, stderr)
	if !ok {
		return exitUsage
	}
	eng, err := loadEngine(pos[0], io.Discard)
	if err != nil {
		printLoadErr(stderr, err)
		return exitFail
	}
	eng = eng.WithNAT64(nat)
	// As the proxy decides a request: a path an origin may read as
	// another one is refused where only a host/path rule would allow it.
	d := eng.PathForm(in, in.Path, eng.Decide(in))
	var rawNote string
	query := urlQuery(*to)
	if !httpwire.TargetBytes(in.Path + query) {
		// The bytes as given: the proxy refuses a request target with a
		// raw byte 0x80 or above, a space or a control (http-malformed,
		// in every mode and whatever rule allows the host). curl sends
		// a path's raw bytes escaped, a query's as given: say what the
		// escaped request is decided.
		ein := in
		ein.Path = escapeTarget(in.Path)
		ed := eng.PathForm(ein, ein.Path, eng.Decide(ein))
		decided := fmt.Sprintf("%s (%s)", strings.ToUpper(string(ed.Verdict)), ed.Reason)
		if ed.Allowed() {
			decided = fmt.Sprintf("ALLOW (rule %s)", ed.Rule)
		}
		if httpwire.TargetBytes(query) {
			rawNote = fmt.Sprintf("the path has raw bytes (0x80 and above, a space or a control): the proxy refuses it as sent (%s); a client such as curl sends the path escaped, %s, which is decided %s",
				proxy.ReasonHTTPBad, ein.Path, decided)
		} else {
			rawNote = fmt.Sprintf("the query has raw bytes (0x80 and above, a space or a control): the proxy refuses it as sent (%s), as curl sends it (curl escapes a path's raw bytes, not a query's); escaped, %s, it is decided %s",
				proxy.ReasonHTTPBad, ein.Path+escapeTarget(query), decided)
		}
		d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: proxy.ReasonHTTPBad, Mode: eng.Mode()}
	}
	// The special-range guard after the rules (THREATS.md F1, F2), the
	// one the proxy calls (policy.Engine.GuardRefuses); the firewall's
	// guarded sets keep forwarded traffic (UDP, ICMP) out alike. DNS
	// (port 53) is the forwarder's, whatever its destination, as capture
	// and audit --replay judge it. Loopback is no destination from the
	// LAN, whatever the rules say, a CIDR rule naming it too: the
	// antispoof chain drops every packet to 127.0.0.0/8 from the LAN
	// before the redirects (DNS and TCP included) and the forward chain,
	// and Linux drops ::1 anyway; the proxy refuses it, and the
	// unspecified address on TCP, in audit mode too (its selfDecision:
	// the explicit proxy). The gateway's own addresses are not known here
	// (README).
	var guardNote, guardRange, allowedBy, guard string
	var explicitPx, transparentPx *proxyExplanation
	if rawNote == "" && dest.Addr.IsValid() {
		a := dest.Addr.Unmap()
		loop := a.IsLoopback()
		self := loop || in.Proto == policy.TCP && a.IsUnspecified()
		gin := in
		if dest.Mapped && in.Proto == policy.TCP {
			// The explicit proxy is asked for the mapped form as written
			// (decideTarget guards the literal); a transparent flow's
			// destination and forwarded traffic are never mapped.
			gin.Dest = netip.AddrFrom16(dest.Addr.As16())
		}
		if in.Proto == policy.TCP {
			// What each proxy does, by the proxy's own guards.
			explicitPx = literalExplained(eng, gin, true)
			if in.Port != 53 {
				transparentPx = literalExplained(eng, in, false)
			}
		}
		g, refused := eng.GuardRefuses(gin, nil, nil)
		guard = proxy.GuardSpecialRange
		if self && in.Proto == policy.TCP {
			guard = proxy.GuardSelf
		}
		// The explicit proxy is asked for loopback itself: a CIDR rule
		// inside the range that names it opens it there (selfDecision).
		explicitOpens := self && explicitPx != nil && explicitPx.Verdict == policy.Allow
		if lg, ok := policy.LANLoopback(a); ok {
			g, refused, guard = lg, true, proxy.GuardLANLoopback
		}
		if transparentPx != nil && transparentPx.Guard == proxy.GuardLANLoopback && !loop && !refused {
			// "This host" (0.0.0.0, ::) under a CIDR rule naming it: the
			// transparent proxy refuses a redirected flow to it as
			// loopback, whatever the rules (the explicit proxy, asked
			// for it, dials it under that rule).
			g, refused, guard = netip.PrefixFrom(a, a.BitLen()), true, proxy.GuardLANLoopback
		}
		// "This host" over another protocol than TCP: a martian
		// (policy.LANThisHost, as capture and audit --replay judge it).
		martian := false
		if mg, ok := policy.LANThisHost(a, in.Proto); ok && !dest.Mapped && in.Proto != policy.TCP {
			martian = true
			g, refused, guard = mg, true, guardMartian
		}
		if refused && (in.Port != 53 || loop) && (d.Allowed() || self || martian) {
			mode := eng.Mode()
			if self && in.Proto == policy.TCP || martian {
				mode = policy.ModeEnforce
			}
			held := fmt.Sprintf("%s is in the guarded range %s", dest.Addr, g)
			if d.Allowed() {
				held = fmt.Sprintf("rule %s allows %s, but it is in the guarded range %s", d.Rule, dest.Addr, g)
			}
			guardNote = fmt.Sprintf("%s: the proxy and the firewall refuse it (%s) unless a CIDR rule inside %s names it, holding no guarded range it does not open (\"*\", a /0 or a broader prefix do not)",
				held, proxy.ReasonSpecialRange, g)
			if g.Bits() == 0 {
				// SpecialRange's placeholder for the mapped form of an
				// address no range guards (CIDRNames): named by any IPv4
				// CIDR rule holding the address.
				g = netip.MustParsePrefix("::ffff:0:0/96")
				guardNote = fmt.Sprintf("rule %s allows %s, but the explicit proxy, asked for its IPv4-mapped form %s, refuses it (%s) unless an IPv4 CIDR rule holds %s (0.0.0.0/0 does; \"*\" and ::/0 do not); a transparent flow to %s is not refused so",
					d.Rule, dest.Addr, gin.Dest, proxy.ReasonSpecialRange, dest.Addr, dest.Addr)
			}
			for _, n := range nat {
				if g.Bits() < n.Bits() && g.Contains(n.Addr()) {
					guardNote += fmt.Sprintf("; %s holds the NAT64 prefix %s, whose guarded forms a rule naming %s does not open", g, n, g)
				}
			}
			if self {
				guardNote = selfNote(held, g, loop, in.Proto, explicitOpens)
			}
			if martian {
				guardNote = fmt.Sprintf("%s: Linux drops a packet from the LAN to %s as a martian destination before the forward chain, in either mode, whatever the rules, a CIDR rule naming it too (%s, guard %s); only TCP, which the proxy takes (--port N/tcp), and DNS reach the gateway so",
					held, g, proxy.ReasonSpecialRange, guardMartian)
			}
			guardRange, allowedBy = g.String(), d.Rule
			d = policy.Decision{Verdict: policy.Deny, RuleIndex: -1, Reason: proxy.ReasonSpecialRange, Mode: mode}
		} else {
			guard = ""
		}
	}
	ex := explanation{Verdict: d.Verdict, Rule: d.Rule, Reason: d.Reason, Mode: d.Mode, Dest: *to,
		Name: dest.Name, Path: dest.Path, Port: policy.PortRange{Lo: in.Port, Hi: in.Port, Proto: in.Proto}.String(), From: *from,
		SpecialRange: guardRange, AllowedBy: allowedBy, Guard: guard, Explicit: explicitPx, Transparent: transparentPx}
	if dest.Addr.IsValid() {
		ex.IP = dest.Addr.String()
	}
	if d.RuleIndex >= 0 {
		ex.Why = eng.Rules()[d.RuleIndex].Why
		for _, w := range eng.Warnings() {
			if strings.Contains(w.Msg, "rule "+d.Rule+":") && d.Verdict == policy.Allow && in.Path == "" {
				ex.Warnings = append(ex.Warnings, w.Msg)
			}
		}
	}
	if d.Reason == policy.ReasonPath && !strings.HasPrefix(strings.ToLower(*to), "http://") {
		// The path decides only where it is seen: on HTTPS without
		// inspection the proxy decides by host, which a host/path rule
		// then allows as a whole.
		host := in
		host.Path = ""
		if hd := eng.Decide(host); hd.Allowed() {
			ex.Warnings = append(ex.Warnings, fmt.Sprintf("on HTTPS without --inspect the path is not seen: the proxy allows %s as a whole (rule %s); this path is refused on plain HTTP and with --inspect", dest.Name, hd.Rule))
		}
	}
	if rawNote != "" {
		ex.Warnings = append(ex.Warnings, rawNote)
	}
	if dest.Name != "" && !dest.Addr.IsValid() && (d.Reason == policy.ReasonNoRule || d.Reason == policy.ReasonPort) {
		// The proxy decides a name's connection by its address first (a
		// CIDR rule that allows it decides); which addresses DNS answers
		// is not known here.
		for _, r := range cidrRulesFor(eng, in) {
			ex.Warnings = append(ex.Warnings, fmt.Sprintf("explain does not know the addresses DNS answers for %s: rule %s allows the addresses it holds (%s) on %s, whatever the name; ask with --to ADDRESS",
				dest.Name, r.name, strings.Join(r.prefixes, ", "), ex.Port))
		}
	}
	if guardNote != "" {
		ex.Warnings = append(ex.Warnings, guardNote)
	}
	if v4, p, ok := policy.NAT64Embedded(nat, dest.Addr); ok {
		ex.Warnings = append(ex.Warnings, fmt.Sprintf("%s is %s behind the NAT64 prefix %s: decided as both", dest.Addr, v4, p))
	}
	if dest.Port != 0 && dest.Port != in.Port {
		ex.Warnings = append(ex.Warnings, fmt.Sprintf("decided on --port %s, not on port %d that --to names", ex.Port, dest.Port))
	}
	if d.Reason == policy.ReasonPrivateRelay {
		ex.Warnings = append(ex.Warnings, fmt.Sprintf("%s is iCloud Private Relay's ingress, a tunnel past every rule: egressd's DNS answers it NXDOMAIN (so Apple devices connect directly) and the proxies refuse it, whatever wildcard, \"*\" or CIDR rule holds it; only a rule that names %s exactly allows it", dest.Name, dest.Name))
	}
	if dest.Name != "" {
		dn := eng.DecideName(in)
		ex.DNS, ex.DNSRule = dn.Verdict, dn.Rule
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		if err := enc.Encode(ex); err != nil {
			fmt.Fprintln(stderr, "egressd:", err)
			return exitFail
		}
		return exitOK
	}
	target := *to
	fmt.Fprintf(stdout, "%s %s on %s", strings.ToUpper(string(d.Verdict)), target, ex.Port)
	if *from != "" {
		fmt.Fprintf(stdout, " from %s", *from)
	}
	fmt.Fprintln(stdout)
	switch {
	case d.Verdict == policy.Allow:
		fmt.Fprintf(stdout, "  rule:   %s\n", d.Rule)
		if ex.Why != "" { // a rule without one: no empty line
			fmt.Fprintf(stdout, "  why:    %s\n", ex.Why)
		}
	case d.Rule != "":
		fmt.Fprintf(stdout, "  reason: %s (rule %s)\n", d.Reason, d.Rule)
	case ex.SpecialRange != "":
		fmt.Fprintf(stdout, "  reason: %s (%s)\n", d.Reason, ex.SpecialRange)
		fmt.Fprintf(stdout, "  guard:  %s\n", ex.Guard)
	default:
		fmt.Fprintf(stdout, "  reason: %s\n", d.Reason)
	}
	// Each proxy's decision where one differs from the verdict above.
	top := &proxyExplanation{Verdict: d.Verdict, Rule: d.Rule, Reason: d.Reason, Mode: d.Mode, Guard: ex.Guard, SpecialRange: ex.SpecialRange}
	for _, px := range []struct {
		name string
		pe   *proxyExplanation
	}{{"explicit proxy", ex.Explicit}, {"transparent proxy", ex.Transparent}} {
		if px.pe != nil && proxyLine(px.pe) != proxyLine(top) {
			fmt.Fprintf(stdout, "  %s: %s\n", px.name, proxyLine(px.pe))
		}
	}
	if ex.DNS != "" {
		if ex.DNS == policy.Allow {
			fmt.Fprintf(stdout, "  dns:    %s resolves through egressd (rule %s)\n", dest.Name, ex.DNSRule)
		} else {
			fmt.Fprintf(stdout, "  dns:    %s does not resolve through egressd\n", dest.Name)
		}
	}
	for _, w := range ex.Warnings {
		fmt.Fprintf(stdout, "  note:   %s\n", w)
	}
	fmt.Fprintf(stdout, "  mode:   %s\n", d.Mode)
	return exitOK
}

// cidrRule is a rule's name and its CIDR targets as written.
type cidrRule struct {
	name     string
	prefixes []string
}

// cidrRulesFor are the rules with CIDR targets that apply to in's
// client, port and protocol now: they allow a name's connection by its
// address, whatever the name, but for loopback (policy.LANLoopback).
func cidrRulesFor(eng *policy.Engine, in policy.Input) []cidrRule {
	var out []cidrRule
	now := time.Now()
	for _, r := range eng.Rules() {
		if !r.Expires.IsZero() && !now.Before(r.Expires) || !r.From.Contains(in.Client, in.ClientMAC) ||
			!slices.ContainsFunc(r.Ports, func(p policy.PortRange) bool { return p.Contains(in.Port, in.Proto) }) {
			continue
		}
		c := cidrRule{name: r.Name}
		for _, t := range r.To {
			// Loopback no rule opens from the LAN (a prefix inside it
			// allows nothing; one around it the rest).
			if g, loop := policy.LANLoopback(t.Prefix.Addr()); t.Kind == policy.TargetPrefix && !(loop && policy.OpensGuarded(t.Prefix, g)) {
				c.prefixes = append(c.prefixes, t.Raw)
			}
		}
		if len(c.prefixes) > 0 {
			out = append(out, c)
		}
	}
	return out
}

// selfNote is explain's note for a destination that is the gateway
// itself (loopback, or the unspecified address on TCP) and no rule opens
// to a client's own connection: held says which rule allows it, if any;
// explicitOpens that a CIDR rule inside the range names it, which the
// explicit proxy takes.
func selfNote(held string, g netip.Prefix, loop bool, proto policy.Proto, explicitOpens bool) string {
	var by []string
	if loop {
		if g.Addr().Is4() {
			by = append(by, "the firewall drops every packet from the LAN to 127.0.0.0/8 in enforce mode, before the proxy, the DNS forwarder and the forward chain (Linux drops it as a martian anyway unless route_localnet=1)")
		} else {
			by = append(by, "Linux drops ::1 from the LAN whatever the settings")
		}
	}
	if !loop && proto == policy.TCP {
		by = append(by, "the transparent proxy refuses a LAN client's connection to it whatever the rules, in audit mode too (guard "+proxy.GuardLANLoopback+"): dialled, it would reach the gateway's own services")
	}
	switch {
	case explicitOpens:
		by = append(by, "but the explicit proxy allows it: asked for it (CONNECT, an absolute URL), it dials the gateway's own service under the CIDR rule inside "+g.String()+" that names it")
	case proto == policy.TCP:
		by = append(by, "the proxy refuses it, the explicit proxy too, in audit mode too, unless a CIDR rule inside "+g.String()+" names it")
	}
	if !loop {
		return fmt.Sprintf("%s: it is the gateway itself (%s): %s", held, proxy.ReasonSpecialRange, strings.Join(by, "; "))
	}
	return fmt.Sprintf("%s: it is the gateway itself, which no rule opens to a client's own connection (%s): %s", held, proxy.ReasonSpecialRange, strings.Join(by, "; "))
}

// escapeTarget is path with each byte a request target does not carry
// raw (httpwire.TargetBytes) written as its escape, "%xx", as curl 7.88
// writes a path's raw bytes (in lower case).
func escapeTarget(path string) string {
	const hex = "0123456789abcdef"
	var b strings.Builder
	for i := 0; i < len(path); i++ {
		if c := path[i]; c <= ' ' || c >= 0x7f {
			b.WriteString("%" + hex[c>>4:c>>4+1] + hex[c&0xf:c&0xf+1])
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// urlQuery is the query of a --to URL with its '?' ("?q=1"), before any
// fragment (a client does not send it); "" when it has none. Where
// policy.ParseDest finds the path, the query follows it.
func urlQuery(to string) string {
	if _, rest, ok := strings.Cut(to, "://"); ok {
		to = rest
	}
	i := strings.IndexAny(to, "/?#")
	if i < 0 {
		return ""
	}
	to, _, _ = strings.Cut(to[i:], "#")
	if j := strings.IndexByte(to, '?'); j >= 0 {
		return to[j:]
	}
	return ""
}

// explainInput builds the policy input of `policy explain`.
func explainInput(to, port, from, mac string, fs interface{ Visit(func(*flagT)) }) (policy.Input, policy.Dest, error) {
	var in policy.Input
	dest, err := policy.ParseDest(to)
	if err != nil {
		return in, dest, err
	}
	prs, err := parsePortFlag(port)
	if err != nil {
		return in, dest, err
	}
	in.Port, in.Proto = prs.Lo, prs.Proto
	explicitPort := false
	fs.Visit(func(f *flagT) {
		if f.Name == "port" {
			explicitPort = true
		}
	})
	if dest.Port != 0 && !explicitPort {
		in.Port = dest.Port
	}
	in.Name, in.Dest, in.Path = dest.Name, dest.Addr, dest.Path
	if from != "" {
		a, err := parseAddr(from)
		if err != nil {
			return in, dest, fmt.Errorf("--from: %v", err)
		}
		in.Client = a
	}
	if mac != "" {
		m, err := parseMAC(mac)
		if err != nil {
			return in, dest, fmt.Errorf("--mac: %v", err)
		}
		in.ClientMAC = m
	}
	return in, dest, nil
}
