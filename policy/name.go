package policy

import (
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/net/idna"
)

// patternProfile maps configured patterns the way resolvers map what users
// type (UTS #46 for lookup, non-transitional): fullwidth letters, ideographic
// full stops and upper case become their ASCII forms, Unicode labels become
// punycode. It is applied to patterns only, never to names seen on the wire.
var patternProfile = idna.New(
	idna.MapForLookup(),
	idna.Transitional(false),
	idna.StrictDomainName(false), // allows '_' and '*'; checked below
	idna.BidiRule(),
)

// NormalizeName returns the policy key of a name seen on the wire (an SNI, a
// Host header, a DNS question): lower case, without a trailing dot. It
// reports false when the name is not an ASCII hostname (letters, digits, '-'
// and '_' in labels of 1 to 63 bytes, at most 253 bytes in all): such a name
// never matches a name rule. A name that is already normal is returned
// without allocating.
func NormalizeName(s string) (string, bool) {
	if strings.HasSuffix(s, ".") {
		s = s[:len(s)-1]
	}
	if len(s) == 0 || len(s) > 253 {
		return "", false
	}
	upper := false
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			label++
		case c >= 'A' && c <= 'Z':
			upper = true
			label++
		case c == '.':
			if label == 0 {
				return "", false
			}
			label = 0
			continue
		default:
			return "", false
		}
		if label > 63 {
			return "", false
		}
	}
	if label == 0 {
		return "", false
	}
	if upper {
		s = strings.ToLower(s)
	}
	return s, true
}

// NormalizeInput is NormalizeName for names typed by a person (the CLI's
// --to): it applies the same UTS #46 mapping as patterns get, so "ＥＸＡＭＰＬＥ．com"
// and "faß.de" find the rules they would resolve to.
func NormalizeInput(s string) (string, bool) {
	a, err := patternProfile.ToASCII(s)
	if err != nil {
		return "", false
	}
	return NormalizeName(a)
}

// normalizePattern maps a configured name pattern to ASCII and checks it.
func normalizePattern(s string) (string, error) {
	if s == "" {
		return "", fmt.Errorf("empty name")
	}
	a, err := patternProfile.ToASCII(s)
	if err != nil {
		return "", fmt.Errorf("%q is not a valid domain name: %v", s, strings.TrimPrefix(err.Error(), "idna: "))
	}
	a = strings.TrimSuffix(strings.ToLower(a), ".")
	if a == "" {
		return "", fmt.Errorf("%q is not a valid domain name", s)
	}
	labels := strings.Split(a, ".")
	for i, l := range labels {
		if l == "" {
			return "", fmt.Errorf("%q has an empty label", s)
		}
		if len(l) > 63 {
			return "", fmt.Errorf("%q has a label longer than 63 bytes", s)
		}
		for j := 0; j < len(l); j++ {
			c := l[j]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '*') {
				return "", fmt.Errorf("%q has the character %q: names are letters, digits, '-', '_' and '*' as a wildcard", s, c)
			}
		}
		if strings.Contains(l, "**") {
			return "", fmt.Errorf("%q: '**' is not a wildcard here; write \"*.%s\" to match subdomains at any depth", s, strings.Join(labels[i+1:], "."))
		}
		if strings.Contains(l, "*") && strings.HasPrefix(l, "xn--") {
			// Punycode encodes a label as a whole: "bü*" becomes
			// "xn--b*-xka", a glob that no name under "bü…" matches.
			return "", fmt.Errorf("%q: a '*' cannot stand in a label with non-ASCII letters (its punycode form encodes the whole label); write the names out", s)
		}
		if strings.Contains(l, "*") && i == len(labels)-1 {
			return "", fmt.Errorf("%q: a wildcard in the last label would match any top-level domain", s)
		}
	}
	if len(a) > 253 {
		return "", fmt.Errorf("%q is longer than 253 bytes", s)
	}
	if allDigits(labels[len(labels)-1]) {
		return "", fmt.Errorf("%q is neither an IP address nor a domain name (a top-level domain is never all digits)", s)
	}
	return a, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// Dest is a destination typed by a person: a name, an address, or a URL.
type Dest struct {
	Name string     // normalised name, empty for an address
	Addr netip.Addr // valid when the destination is an address, unmapped
	// Mapped is set when Addr was written in its IPv4-mapped form
	// (::ffff:198.51.100.2), which the explicit proxy is asked for as such.
	Mapped bool
	Path   string // URL path, empty when none was given
	Port   uint16 // port from a URL or host:port, 0 when none
}

// ParseDest parses a name ("api.nirovision.com"), an address ("17.1.2.3",
// "2001:db8::1"), a host:port, or a URL ("https://notion.so/nirovision/x").
func ParseDest(s string) (Dest, error) {
	var d Dest
	orig := s
	scheme := ""
	if i := strings.Index(s, "://"); i >= 0 {
		scheme, s = strings.ToLower(s[:i]), s[i+3:]
	}
	if i := strings.IndexAny(s, "/?#"); i >= 0 {
		rest := s[i:]
		s = s[:i]
		if rest[0] == '/' {
			if j := strings.IndexAny(rest, "?#"); j >= 0 {
				rest = rest[:j]
			}
			d.Path = rest
		}
	}
	if i := strings.LastIndex(s, "@"); i >= 0 {
		s = s[i+1:]
	}
	host := s
	if strings.HasPrefix(s, "[") {
		end := strings.Index(s, "]")
		if end < 0 {
			return d, fmt.Errorf("policy: %q: unclosed '['", orig)
		}
		host = s[1:end]
		rest := s[end+1:]
		if rest != "" {
			if rest[0] != ':' {
				return d, fmt.Errorf("policy: %q: junk after ']'", orig)
			}
			p, err := parsePortNumber(rest[1:])
			if err != nil {
				return d, fmt.Errorf("policy: %q: %v", orig, err)
			}
			d.Port = p
		}
		a, err := netip.ParseAddr(host)
		if err != nil {
			return d, fmt.Errorf("policy: %q: only an IPv6 address may stand in brackets", orig)
		}
		d.Addr, d.Mapped = a.Unmap(), a.Is4In6()
	} else {
		if strings.Count(s, ":") == 1 {
			i := strings.IndexByte(s, ':')
			p, err := parsePortNumber(s[i+1:])
			if err != nil {
				return d, fmt.Errorf("policy: %q: %v", orig, err)
			}
			d.Port, host = p, s[:i]
		}
		if a, err := netip.ParseAddr(host); err == nil {
			d.Addr, d.Mapped = a.Unmap(), a.Is4In6()
		} else {
			n, ok := NormalizeInput(host)
			if !ok {
				return d, fmt.Errorf("policy: %q is not a hostname, an IP address or a URL", orig)
			}
			d.Name = n
		}
	}
	if d.Port == 0 {
		switch scheme {
		case "https":
			d.Port = 443
		case "http":
			d.Port = 80
		}
	}
	return d, nil
}

func parsePortNumber(s string) (uint16, error) {
	if s == "" || len(s) > 5 || !allDigits(s) || s[0] == '0' {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
	}
	n := 0
	for i := 0; i < len(s); i++ {
		n = n*10 + int(s[i]-'0')
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
	}
	return uint16(n), nil
}
