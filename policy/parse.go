package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/gobwas/glob"
	"go.yaml.in/yaml/v3"
)

// Problem is one error or warning about a policy file, with its position.
type Problem struct {
	File string
	Line int // 1-based; 0 when the problem has no position
	Col  int
	Msg  string
	// Code names a warning a caller may judge by what it knows and the
	// policy does not (WarnPathNeedsInspection); empty for the others.
	Code string
}

// WarnPathNeedsInspection is the Code of the warning that a host/path
// rule acts at host level on HTTPS unless inspection is on: egressd run
// with --inspect inspects those hosts and leaves it out.
const WarnPathNeedsInspection = "path-needs-inspection"

func (p Problem) String() string {
	if p.Line == 0 {
		return fmt.Sprintf("%s: %s", p.File, p.Msg)
	}
	if p.Col == 0 {
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Msg)
	}
	return fmt.Sprintf("%s:%d:%d: %s", p.File, p.Line, p.Col, p.Msg)
}

// Error lists every problem found in a policy, not only the first.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(p.String())
	}
	return b.String()
}

// Policy is a parsed and validated policy file.
type Policy struct {
	File    string
	Version int
	Mode    Mode
	Groups  []Group
	Rules   []Rule
	// Warnings are problems that do not stop the policy from loading.
	Warnings []Problem
}

// Group is a named set of clients.
type Group struct {
	Name    string
	Members ClientSet
	Line    int
}

// ClientSet is a set of clients by address prefix or MAC address.
type ClientSet struct {
	Prefixes []netip.Prefix
	MACs     []net.HardwareAddr
}

// Any reports whether the set places no restriction (it is empty).
func (c ClientSet) Any() bool { return len(c.Prefixes) == 0 && len(c.MACs) == 0 }

// Contains reports whether the client matches the set. An empty set matches
// every client, an unknown client only the empty set.
func (c ClientSet) Contains(addr netip.Addr, mac net.HardwareAddr) bool {
	if c.Any() {
		return true
	}
	if addr.IsValid() {
		// A link-local client arrives with its interface as the zone
		// (fe80::1%eth0), and a prefix never contains a zoned address.
		addr = addr.Unmap().WithZone("")
		for _, p := range c.Prefixes {
			if p.Contains(addr) {
				return true
			}
		}
	}
	if len(mac) != 0 {
		for _, m := range c.MACs {
			if string(m) == string(mac) {
				return true
			}
		}
	}
	return false
}

// Rule is one rule of the policy, in file order.
type Rule struct {
	Name    string
	Why     string
	From    ClientSet // empty: any LAN client
	To      []Target
	Ports   []PortRange
	Expires time.Time // zero: never; else the first instant it no longer matches
	Line    int
	Col     int
}

// TargetKind says what a Target matches.
type TargetKind uint8

// The kinds of targets.
const (
	TargetAny      TargetKind = iota + 1 // "*": any destination, and DNS for every name
	TargetName                           // a name pattern
	TargetHostPath                       // a name pattern plus a path glob
	TargetPrefix                         // a CIDR or an address
)

// Target is one entry of a rule's "to".
type Target struct {
	Kind    TargetKind
	Raw     string       // as written
	Pattern string       // TargetName, TargetHostPath: normalised name pattern
	Path    string       // TargetHostPath: the path glob, starting with '/'
	Prefix  netip.Prefix // TargetPrefix
	Line    int
	Col     int

	path *glob.Pattern
}

// PortRange is an inclusive port range of one protocol. The "icmp" of a
// rule's ports is {0, 0, ICMP}: ICMP echo has no ports.
type PortRange struct {
	Lo, Hi uint16
	Proto  Proto
}

func (p PortRange) String() string {
	if p.Proto == ICMP {
		return "icmp"
	}
	if p.Lo == 1 && p.Hi == 65535 {
		return "any/" + p.Proto.String()
	}
	if p.Lo == p.Hi {
		return fmt.Sprintf("%d/%s", p.Lo, p.Proto)
	}
	return fmt.Sprintf("%d-%d/%s", p.Lo, p.Hi, p.Proto)
}

// Contains reports whether the port and protocol are in the range.
func (p PortRange) Contains(port uint16, proto Proto) bool {
	return p.Proto == proto && port >= p.Lo && port <= p.Hi
}

// PrivatePrefixes are what the keyword "private" stands for: the site's own
// ranges, RFC 1918 and ULA. Link-local is not included.
var PrivatePrefixes = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("fc00::/7"),
}

// wildcardDNSZones resolve any address embedded in the name, so a wildcard
// under them opens every address (THREATS.md D5).
var wildcardDNSZones = []string{"nip.io", "sslip.io", "xip.io", "traefik.me", "localtest.me", "lvh.me", "nip.direct", "backname.io"}

var ruleNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// Parse reads a policy file. file names it in errors. All problems are
// reported at once, in an *Error.
func Parse(file string, src []byte) (*Policy, error) {
	p := &parser{pol: &Policy{File: file, Version: 1, Mode: ModeAudit}}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(src))
	if err := dec.Decode(&doc); err != nil && err != io.EOF {
		p.yamlErr(src, err)
		return nil, &Error{Problems: p.errs}
	}
	if len(doc.Content) == 0 {
		p.errf(0, 0, "the policy is empty (expected version, mode, groups and rules)")
		return nil, &Error{Problems: p.errs}
	}
	// A second document ("---") would be dropped without a word by a
	// decoder that reads only the first, and with it every rule it holds:
	// say so instead. Empty documents hold nothing to lose.
	for {
		var more yaml.Node
		err := dec.Decode(&more)
		if err == io.EOF {
			break
		}
		if err != nil {
			p.yamlErr(src, err)
			return nil, &Error{Problems: p.errs}
		}
		if len(more.Content) > 0 && more.Content[0].Tag != "!!null" {
			p.errf(more.Line, more.Column, "a second YAML document starts here (after \"---\"); a policy is one document: put all its rules under one \"rules:\"")
			return nil, &Error{Problems: p.errs}
		}
	}
	// Aliases are refused up front, each where it stands: the checks
	// below read a node's own shape and would call an alias of a list
	// "not a list".
	if p.aliases(doc.Content[0]); len(p.errs) > 0 {
		return nil, &Error{Problems: p.errs}
	}
	p.top(doc.Content[0])
	slices.SortStableFunc(p.errs, func(a, b Problem) int {
		if a.Line != b.Line {
			return a.Line - b.Line
		}
		return a.Col - b.Col
	})
	if len(p.errs) > 0 {
		return nil, &Error{Problems: p.errs}
	}
	p.pol.Warnings = append(p.pol.Warnings, p.warns...)
	return p.pol, nil
}

// aliases reports every YAML alias (*name) under n. Anchors alone are
// harmless; the aliases themselves are not followed.
func (p *parser) aliases(n *yaml.Node) {
	if n.Kind == yaml.AliasNode {
		p.errAt(n, "YAML aliases (*%s) are not supported in a policy: write the value out", n.Value)
		return
	}
	for _, c := range n.Content {
		p.aliases(c)
	}
}

// yamlErr reports a YAML syntax error at the line the decoder gives. An
// unquoted pattern that starts with "*" (the seed page writes
// [*.nirovision.com]) is read by YAML as an alias: the error then says to
// quote it.
func (p *parser) yamlErr(src []byte, err error) {
	msg := yamlLineRE.ReplaceAllString(strings.TrimPrefix(err.Error(), "yaml: "), "")
	msg = strings.TrimPrefix(msg, ": ")
	line := yamlLine(err)
	if yamlParserErrors[msg] {
		// The library counts its parser's lines from 0 (its scanner's
		// from 1), and names none for the first.
		line++
	}
	if strings.Contains(msg, "did not find expected alphabetic or numeric character") && unquotedStar(src, line) {
		msg += ` (a pattern that starts with "*" must be quoted, such as "*.example.com": unquoted, YAML reads * as an alias)`
	}
	line, col := yamlCol(src, line, msg)
	p.errf(line, col, "YAML syntax: %s", msg)
}

// yamlCol finds the column (from 1) of a YAML syntax error on line n of
// src, which the library does not give: the character its message is
// about, or the start of the list, mapping or quoted string it names (the
// library's line is where that starts). A tab the library reports at the
// line before its own is looked for on the next line too, and the line
// moves there. Column 0 when nothing on the line fits: the error then
// names the line alone, as before.
func yamlCol(src []byte, n int, msg string) (int, int) {
	lines := bytes.Split(src, []byte("\n"))
	at := func(i int) []byte {
		if i < 1 || i > len(lines) {
			return nil
		}
		return bytes.TrimSuffix(lines[i-1], []byte("\r"))
	}
	l := at(n)
	col := func(i int) (int, int) {
		if i < 0 {
			return n, 0
		}
		return n, utf8.RuneCount(l[:i]) + 1
	}
	indent := len(l) - len(bytes.TrimLeft(l, " \t"))
	switch {
	case strings.HasPrefix(msg, "found a tab character"):
		if bytes.IndexByte(l, '\t') < 0 && bytes.IndexByte(at(n+1), '\t') >= 0 {
			n, l = n+1, at(n+1)
		}
		return col(bytes.IndexByte(l, '\t'))
	case strings.HasPrefix(msg, "found character that cannot start any token"):
		if i := bytes.IndexByte(l[:indent], '\t'); i >= 0 {
			return col(i)
		}
		return col(bytes.IndexAny(l, "@`\t"))
	case strings.HasPrefix(msg, "did not find expected alphabetic or numeric character"):
		if m := unquotedStarRE.FindIndex(l); m != nil {
			return col(m[1] - 1)
		}
		return col(bytes.IndexAny(l, "*&"))
	case strings.HasPrefix(msg, "found unexpected end of stream"):
		return col(bytes.IndexAny(l, "\"'"))
	case msg == "mapping values are not allowed in this context":
		// The second key: value on the line, or the first where the
		// line goes on a value begun before (a key indented under one).
		var colons []int
		for i := range l {
			if l[i] == ':' && (i+1 == len(l) || l[i+1] == ' ') {
				colons = append(colons, i)
			}
		}
		switch len(colons) {
		case 0:
			return n, 0
		case 1:
			return col(colons[0])
		default:
			return col(colons[1])
		}
	case msg == "did not find expected ',' or ']'":
		return col(bytes.IndexByte(l, '['))
	case msg == "did not find expected ',' or '}'":
		return col(bytes.IndexByte(l, '{'))
	case msg == "did not find expected '-' indicator":
		return col(bytes.IndexByte(l, '-'))
	case msg == "did not find expected key":
		// The mapping's first key: past the indent and any "- ".
		i := indent
		for i+1 < len(l) && l[i] == '-' && l[i+1] == ' ' {
			i += 2
			for i < len(l) && l[i] == ' ' {
				i++
			}
		}
		if i >= len(l) {
			return n, 0
		}
		return col(i)
	}
	return n, 0
}

// unquotedStar says whether line n (from 1) of src has a "*" where YAML
// starts a value: after "[", ",", "- " or ": ".
var unquotedStarRE = regexp.MustCompile(`(^|[\[,:]|-)\s*\*`)

func unquotedStar(src []byte, n int) bool {
	lines := bytes.Split(src, []byte("\n"))
	if n < 1 || n > len(lines) {
		return false
	}
	return unquotedStarRE.Match(lines[n-1])
}

// yamlParserErrors are the YAML library's parser errors (go.yaml.in/yaml/v3
// parserc.go), whose "line N" counts from 0; the others are its
// scanner's, counted from 1.
var yamlParserErrors = map[string]bool{
	"did not find expected ',' or ']'":       true,
	"did not find expected ',' or '}'":       true,
	"did not find expected '-' indicator":    true,
	"did not find expected <document start>": true,
	"did not find expected <stream-start>":   true,
	"did not find expected key":              true,
	"did not find expected node content":     true,
	"found duplicate %TAG directive":         true,
	"found duplicate %YAML directive":        true,
	"found incompatible YAML document":       true,
	"found undefined tag handle":             true,
}

var yamlLineRE = regexp.MustCompile(`line (\d+)(: )?`)

func yamlLine(err error) int {
	if m := yamlLineRE.FindStringSubmatch(err.Error()); m != nil {
		n, _ := strconv.Atoi(m[1])
		return n
	}
	return 0
}

type parser struct {
	pol    *Policy
	errs   []Problem
	warns  []Problem
	groups map[string]*Group
}

func (p *parser) errf(line, col int, format string, args ...any) {
	p.errs = append(p.errs, Problem{File: p.pol.File, Line: line, Col: col, Msg: fmt.Sprintf(format, args...)})
}

func (p *parser) errAt(n *yaml.Node, format string, args ...any) {
	p.errf(n.Line, n.Column, format, args...)
}

func (p *parser) warnAt(line, col int, format string, args ...any) {
	p.warns = append(p.warns, Problem{File: p.pol.File, Line: line, Col: col, Msg: fmt.Sprintf(format, args...)})
}

// mapping walks a mapping node, calling fn for each key it knows and
// reporting unknown and duplicate keys.
func (p *parser) mapping(n *yaml.Node, what string, known []string, fn func(key string, k, v *yaml.Node)) {
	if n.Kind != yaml.MappingNode {
		p.errAt(n, "%s must be a mapping with keys %s", what, strings.Join(known, ", "))
		return
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		key := k.Value
		ok := false
		for _, kn := range known {
			if kn == key {
				ok = true
			}
		}
		if !ok {
			p.errAt(k, "%s: unknown key %q (expected one of %s)", what, key, strings.Join(known, ", "))
			continue
		}
		if seen[key] {
			p.errAt(k, "%s: duplicate key %q", what, key)
			continue
		}
		seen[key] = true
		fn(key, k, v)
	}
}

func (p *parser) scalar(n *yaml.Node, what string) (string, bool) {
	if n.Kind != yaml.ScalarNode {
		p.errAt(n, "%s must be a single value", what)
		return "", false
	}
	return n.Value, true
}

// list accepts a sequence of scalars, or one scalar as a list of one.
func (p *parser) list(n *yaml.Node, what string) []*yaml.Node {
	switch n.Kind {
	case yaml.SequenceNode:
		var out []*yaml.Node
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				p.errAt(c, "%s: each entry must be a single value", what)
				continue
			}
			out = append(out, c)
		}
		return out
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return nil
		}
		return []*yaml.Node{n}
	}
	p.errAt(n, "%s must be a list", what)
	return nil
}

func (p *parser) top(n *yaml.Node) {
	var rulesNode *yaml.Node
	var groupsNode *yaml.Node
	p.mapping(n, "policy", []string{"version", "mode", "groups", "rules"}, func(key string, k, v *yaml.Node) {
		switch key {
		case "version":
			if s, ok := p.scalar(v, "version"); ok && s != "1" {
				p.errAt(v, "version %q is not supported (expected 1)", s)
			}
		case "mode":
			if s, ok := p.scalar(v, "mode"); ok {
				m, ok := ParseMode(s)
				if !ok {
					p.errAt(v, "mode %q is not known (expected audit or enforce)", s)
				}
				p.pol.Mode = m
			}
		case "groups":
			groupsNode = v
		case "rules":
			rulesNode = v
		}
	})
	if n.Kind != yaml.MappingNode {
		return
	}
	p.groups = map[string]*Group{}
	if groupsNode != nil {
		p.parseGroups(groupsNode)
	}
	if rulesNode == nil {
		p.errAt(n, "policy has no rules (expected a list under \"rules:\")")
		return
	}
	if rulesNode.Kind != yaml.SequenceNode {
		p.errAt(rulesNode, "rules must be a list of rules")
		return
	}
	if len(rulesNode.Content) == 0 {
		p.warnAt(rulesNode.Line, rulesNode.Column, "the policy has no rules: everything is denied")
	}
	names := map[string]int{}
	for _, rn := range rulesNode.Content {
		r, ok := p.parseRule(rn)
		if r.Name != "" {
			if prev, dup := names[r.Name]; dup {
				p.errf(r.Line, r.Col, "duplicate rule name %q (first used on line %d)", r.Name, prev)
				continue
			}
			names[r.Name] = r.Line
		}
		if ok {
			p.pol.Rules = append(p.pol.Rules, r)
		}
	}
}

func (p *parser) parseGroups(n *yaml.Node) {
	if n.Kind != yaml.MappingNode {
		p.errAt(n, "groups must be a mapping of group name to a list of CIDRs, IPs or MAC addresses")
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		name := k.Value
		if !ruleNameRE.MatchString(name) {
			p.errAt(k, "group name %q must be letters, digits, '-', '_' and '.'", name)
			continue
		}
		if name == "private" || name == "any" {
			p.errAt(k, "group name %q is a keyword", name)
			continue
		}
		if _, dup := p.groups[name]; dup {
			p.errAt(k, "duplicate group %q", name)
			continue
		}
		g := &Group{Name: name, Line: k.Line}
		items := p.list(v, "group "+name)
		if len(items) == 0 {
			p.errAt(v, "group %q is empty (expected CIDRs, IPs or MAC addresses)", name)
		}
		for _, it := range items {
			if !p.addClient(&g.Members, it, false) {
				p.errAt(it, "group %s: %q is not a CIDR, an IP address or a MAC address", name, it.Value)
			}
		}
		p.groups[name] = g
		p.pol.Groups = append(p.pol.Groups, *g)
	}
}

// addClient adds one client entry; groups are allowed when withGroups.
func (p *parser) addClient(cs *ClientSet, n *yaml.Node, withGroups bool) bool {
	s := strings.TrimSpace(n.Value)
	if pf, err := netip.ParsePrefix(s); err == nil {
		// Only a length of 96 or more stays inside the IPv4-mapped range;
		// a shorter one is an IPv6 prefix, as in parseTarget.
		if pf.Addr().Is4In6() && pf.Bits() >= 96 {
			pf = netip.PrefixFrom(pf.Addr().Unmap(), pf.Bits()-96)
		}
		if pf.Masked() != pf {
			p.warnAt(n.Line, n.Column, "%q has host bits set; it means %s", s, pf.Masked())
		}
		cs.Prefixes = append(cs.Prefixes, pf.Masked())
		return true
	}
	if a, err := netip.ParseAddr(s); err == nil {
		a = a.Unmap()
		cs.Prefixes = append(cs.Prefixes, netip.PrefixFrom(a, a.BitLen()))
		return true
	}
	if strings.Count(s, ":") == 5 || strings.Count(s, "-") == 5 {
		if mac, err := net.ParseMAC(s); err == nil && len(mac) == 6 {
			cs.MACs = append(cs.MACs, mac)
			return true
		}
	}
	if s == "private" {
		cs.Prefixes = append(cs.Prefixes, PrivatePrefixes...)
		return true
	}
	if withGroups {
		if g, ok := p.groups[s]; ok {
			cs.Prefixes = append(cs.Prefixes, g.Members.Prefixes...)
			cs.MACs = append(cs.MACs, g.Members.MACs...)
			return true
		}
	}
	return false
}

func (p *parser) parseRule(n *yaml.Node) (Rule, bool) {
	r := Rule{Line: n.Line, Col: n.Column}
	nerr := len(p.errs)
	var hasTo, hasPorts, hasName bool
	p.mapping(n, "rule", []string{"name", "why", "from", "to", "ports", "expires"}, func(key string, k, v *yaml.Node) {
		switch key {
		case "name":
			s, ok := p.scalar(v, "name")
			if !ok {
				return
			}
			hasName = true
			if !ruleNameRE.MatchString(s) {
				p.errAt(v, "rule name %q must be 1 to 63 letters, digits, '-', '_' and '.'", s)
			}
			r.Name = s
		case "why":
			r.Why, _ = p.scalar(v, "why")
		case "from":
			items := p.list(v, "from")
			if len(items) == 0 {
				p.errAt(v, "rule %s: from is empty (omit it to mean any client)", r.Name)
			}
			for _, it := range items {
				if !p.addClient(&r.From, it, true) {
					p.errAt(it, "rule %s: from: %q is not a known group, a CIDR, an IP address or a MAC address", ruleLabel(r), it.Value)
				}
			}
		case "to":
			hasTo = true
			items := p.list(v, "to")
			if len(items) == 0 {
				p.errAt(v, "rule %s: to is empty (expected names, host/path globs, CIDRs, IPs, private or *)", ruleLabel(r))
			}
			for _, it := range items {
				ts, err := parseTarget(it.Value)
				if err != nil {
					p.errAt(it, "rule %s: to: %v", ruleLabel(r), err)
					continue
				}
				for _, t := range ts {
					t.Line, t.Col = it.Line, it.Column
					r.To = append(r.To, t)
				}
			}
		case "ports":
			hasPorts = true
			items := p.list(v, "ports")
			if len(items) == 0 {
				p.errAt(v, "rule %s: ports is empty (expected N/tcp, N-M/udp, any or icmp)", ruleLabel(r))
			}
			for _, it := range items {
				pr, err := parsePorts(it.Value)
				if err != nil {
					p.errAt(it, "rule %s: ports: %v", ruleLabel(r), err)
					continue
				}
				r.Ports = append(r.Ports, pr...)
			}
		case "expires":
			s, ok := p.scalar(v, "expires")
			if !ok {
				return
			}
			t, err := parseExpiry(s)
			if err != nil {
				p.errAt(v, "rule %s: expires: %q is not a date (expected YYYY-MM-DD or an RFC 3339 time)", ruleLabel(r), s)
				return
			}
			r.Expires = t
		}
	})
	if n.Kind != yaml.MappingNode {
		return r, false
	}
	if !hasName {
		p.errAt(n, "rule has no name (every rule needs a unique name: reports use it)")
	}
	if !hasTo {
		p.errAt(n, "rule %s has no \"to\" (expected names, host/path globs, CIDRs, IPs, private or *)", ruleLabel(r))
	}
	if !hasPorts {
		p.errAt(n, "rule %s has no \"ports\" (expected N/tcp, N-M/udp, any or icmp)", ruleLabel(r))
	}
	return r, len(p.errs) == nerr
}

func ruleLabel(r Rule) string {
	if r.Name == "" {
		return fmt.Sprintf("on line %d", r.Line)
	}
	return r.Name
}

// CheckTarget reports why s cannot stand in a rule's "to", or nil when a
// policy takes it.
func CheckTarget(s string) error {
	_, err := parseTarget(s)
	return err
}

// CheckName reports why the host name s (normalised: NormalizeName),
// written in a rule's "to", would not stand for that one name: a policy
// does not take it, or reads it as something else. "private" is a valid
// host name, which any LAN client can ask for, and the keyword for RFC
// 1918 and ULA in a rule's "to".
func CheckName(s string) error {
	ts, err := parseTarget(s)
	if err != nil {
		return err
	}
	if len(ts) != 1 || ts[0].Kind != TargetName || ts[0].Pattern != s || strings.Contains(s, "*") {
		return fmt.Errorf("%q in a rule's to: is not that one name but %s", s, targetWhat(ts))
	}
	return nil
}

// targetWhat says what a parsed "to" entry stands for, for CheckName.
func targetWhat(ts []Target) string {
	if len(ts) == 1 && ts[0].Kind == TargetName {
		if strings.Contains(ts[0].Pattern, "*") {
			return fmt.Sprintf("the pattern %q", ts[0].Pattern)
		}
		return fmt.Sprintf("the name %q", ts[0].Pattern)
	}
	if len(ts) == 1 && ts[0].Kind == TargetAny {
		return "any destination"
	}
	var pfs []string
	for _, t := range ts {
		pfs = append(pfs, t.Prefix.String())
	}
	what := "the addresses " + strings.Join(pfs, ", ")
	if len(ts) > 0 && ts[0].Raw == "private" {
		what = "the keyword for " + strings.Join(pfs, ", ")
	}
	return what
}

// parseTarget parses one "to" entry. "private" expands to several prefixes.
func parseTarget(s string) ([]Target, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "":
		return nil, errors.New("empty entry")
	case "*":
		return []Target{{Kind: TargetAny, Raw: s}}, nil
	case "private":
		var ts []Target
		for _, pf := range PrivatePrefixes {
			ts = append(ts, Target{Kind: TargetPrefix, Raw: s, Prefix: pf})
		}
		return ts, nil
	}
	if strings.Contains(s, "://") {
		return nil, fmt.Errorf("%q: write the host and path without a scheme, like notion.so/nirovision/*", s)
	}
	if pf, err := netip.ParsePrefix(s); err == nil {
		if pf.Addr().Is4In6() && pf.Bits() >= 96 {
			pf = netip.PrefixFrom(pf.Addr().Unmap(), pf.Bits()-96)
		}
		if pf.Masked() != pf {
			return nil, fmt.Errorf("%q has host bits set (did you mean %s?)", s, pf.Masked())
		}
		return []Target{{Kind: TargetPrefix, Raw: s, Prefix: pf}}, nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return nil, fmt.Errorf("%q: an address with a zone cannot be a destination", s)
		}
		a = a.Unmap()
		return []Target{{Kind: TargetPrefix, Raw: s, Prefix: netip.PrefixFrom(a, a.BitLen())}}, nil
	}
	host, path, hasPath := strings.Cut(s, "/")
	if hasPath && looksNumeric(host) {
		return nil, fmt.Errorf("%q is not a valid CIDR (expected an address/prefix length such as 17.0.0.0/8)", s)
	}
	if host == "*" {
		return nil, fmt.Errorf("%q: a path rule needs a host", s)
	}
	if looksNumeric(host) {
		return nil, fmt.Errorf("%q is not a valid IP address", s)
	}
	if strings.ContainsAny(host, "[]:") {
		return nil, fmt.Errorf("%q: write a name, an IP address or a CIDR; ports go under ports", s)
	}
	pat, err := normalizePattern(host)
	if err != nil {
		return nil, err
	}
	for _, z := range wildcardDNSZones {
		if pat == z || strings.HasSuffix(pat, "."+z) {
			if strings.Contains(pat, "*") {
				return nil, fmt.Errorf("%q: %s is a wildcard-DNS zone that resolves any address written into the name, so this opens every address", s, z)
			}
		}
	}
	t := Target{Kind: TargetName, Raw: s, Pattern: pat}
	if hasPath {
		if path == "" {
			path = "*"
		}
		// Matched in normal form (NormalPath, normalGlob), as request paths are.
		g, err := glob.Compile(normalGlob("/" + path))
		if err != nil {
			return nil, fmt.Errorf("%q: bad path glob: %v", s, err)
		}
		t.Kind, t.Path, t.path = TargetHostPath, "/"+path, g
	}
	if strings.Contains(pat, "*") {
		if _, err := compileNameGlob(pat); err != nil {
			return nil, fmt.Errorf("%q: bad glob: %v", s, err)
		}
	}
	return []Target{t}, nil
}

// looksNumeric reports whether s is made of digits, dots, hex colons and
// hex letters only, like a mistyped address ("10.0.0.300", "2001:db8::g").
func looksNumeric(s string) bool {
	if s == "" {
		return false
	}
	dots := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= '0' && c <= '9':
		case c == '.':
			dots++
		case c == ':':
			return true
		default:
			return false
		}
	}
	return dots > 0 || allDigits(s)
}

// parsePorts parses "443/tcp", "5228-5230/tcp", "any" (TCP and UDP, not
// ICMP) or "icmp" (ICMP and ICMPv6 echo request).
func parsePorts(s string) ([]PortRange, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "any":
		return []PortRange{{1, 65535, TCP}, {1, 65535, UDP}}, nil
	case "icmp":
		return []PortRange{{0, 0, ICMP}}, nil
	}
	num, proto, ok := strings.Cut(s, "/")
	if !ok {
		return nil, fmt.Errorf("%q has no protocol (expected N/tcp, N-M/udp, any or icmp)", s)
	}
	if num == "icmp" {
		return nil, fmt.Errorf("%q: icmp takes no protocol (write icmp: ICMP echo for IPv4 and IPv6)", s)
	}
	if strings.EqualFold(proto, "icmp") {
		return nil, fmt.Errorf("%q: icmp takes no port (write icmp: ICMP echo for IPv4 and IPv6)", s)
	}
	pr, ok := ParseProto(proto)
	if !ok {
		return nil, fmt.Errorf("%q: protocol %q is not tcp or udp", s, proto)
	}
	if num == "any" {
		return []PortRange{{1, 65535, pr}}, nil
	}
	lo, hi, isRange := strings.Cut(num, "-")
	l, err := parsePortNumber(lo)
	if err != nil {
		return nil, fmt.Errorf("%q: %v", s, err)
	}
	h := l
	if isRange {
		if h, err = parsePortNumber(hi); err != nil {
			return nil, fmt.Errorf("%q: %v", s, err)
		}
		if h < l {
			return nil, fmt.Errorf("%q: the range runs backwards (expected low-high, like %d-%d/%s)", s, h, l, pr)
		}
	}
	return []PortRange{{l, h, pr}}, nil
}

func parseExpiry(s string) (time.Time, error) {
	if t, err := time.Parse("2006-01-02", s); err == nil {
		// A date means "through that day": the rule stops matching at the
		// start of the next day, UTC.
		return t.AddDate(0, 0, 1), nil
	}
	return time.Parse(time.RFC3339, s)
}

func compileNameGlob(pat string) (*glob.Pattern, error) {
	// A leading "*." matches any depth; elsewhere '*' stays in its label.
	g := pat
	if strings.HasPrefix(g, "*.") {
		g = "**" + g[1:]
	}
	return glob.Compile(g, '.')
}
