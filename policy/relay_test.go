package policy

import (
	"net/netip"
	"strings"
	"testing"
)

// relayPolicy opens Apple's 17.0.0.0/8 the way Apple's network
// requirements ask (apple-mdm of the seed profile), every icloud.com name
// (common for device management), and every destination for one client
// ("*"): each would carry Private Relay's ingress.
const relayPolicy = `
version: 1
mode: enforce
rules:
  - name: apple
    to: [17.0.0.0/8]
    ports: [443/tcp, 443/udp, 5223/tcp]
  - name: icloud
    to: ["*.icloud.com", "mask-*.icloud.com"]
    ports: [443/tcp]
  - name: star
    from: [198.51.100.7]
    to: ["*"]
    ports: [443/tcp]
  - name: anywhere
    to: ["0.0.0.0/0", "::/0"]
    ports: [8443/tcp]
`

// TestPrivateRelayRefused (THREATS.md B3, B4): iCloud Private Relay's
// ingress names are refused (private-relay) under a CIDR rule that holds
// the address, a wildcard or "*" that holds the name, for flows and for
// DNS alike; the same address without the name, and other names of the
// zone, stay allowed.
func TestPrivateRelayRefused(t *testing.T) {
	e := mustCompile(t, relayPolicy)
	a := netip.MustParseAddr
	apple := a("17.253.1.2")
	cli := a("192.0.2.9")
	for _, c := range []struct {
		what   string
		in     Input
		rule   string // "" = deny
		reason string
	}{
		{"h2 by CIDR", Input{Client: cli, Dest: apple, Name: "mask-h2.icloud.com", Port: 443, Proto: TCP}, "", ReasonPrivateRelay},
		{"quic by CIDR", Input{Client: cli, Dest: apple, Name: "mask.icloud.com", Port: 443, Proto: UDP}, "", ReasonPrivateRelay},
		{"case and dot", Input{Client: cli, Dest: apple, Name: "MASK-H2.iCloud.com.", Port: 443, Proto: TCP}, "", ReasonPrivateRelay},
		{"mapped address", Input{Client: cli, Dest: a("::ffff:17.253.1.2"), Name: "mask-h2.icloud.com", Port: 443, Proto: TCP}, "", ReasonPrivateRelay},
		{"by wildcard, no address", Input{Client: cli, Name: "mask-h2.icloud.com", Port: 443, Proto: TCP}, "", ReasonPrivateRelay},
		{"by star", Input{Client: a("198.51.100.7"), Dest: a("203.0.113.5"), Name: "mask-h2.icloud.com", Port: 443, Proto: TCP}, "", ReasonPrivateRelay},
		{"by 0.0.0.0/0", Input{Client: cli, Dest: a("203.0.113.5"), Name: "mask-h2.icloud.com", Port: 8443, Proto: TCP}, "", ReasonPrivateRelay},
		{"no rule at all", Input{Client: cli, Dest: a("203.0.113.5"), Name: "mask.icloud.com", Port: 22, Proto: TCP}, "", ReasonPrivateRelay},
		// Controls: the rules do allow these.
		{"address alone", Input{Client: cli, Dest: apple, Port: 443, Proto: TCP}, "apple", ReasonAllowed},
		{"another name on the address", Input{Client: cli, Dest: apple, Name: "api.push.apple.com", Port: 443, Proto: TCP}, "apple", ReasonAllowed},
		{"another icloud name", Input{Client: cli, Name: "p01-caldav.icloud.com", Port: 443, Proto: TCP}, "icloud", ReasonAllowed},
		{"a name under the relay's", Input{Client: cli, Name: "x.mask.icloud.com", Port: 443, Proto: TCP}, "icloud", ReasonAllowed},
		{"a look-alike", Input{Client: cli, Name: "mask-h3.icloud.com", Port: 443, Proto: TCP}, "icloud", ReasonAllowed},
		{"star, another name", Input{Client: a("198.51.100.7"), Dest: a("203.0.113.5"), Name: "example.com", Port: 443, Proto: TCP}, "star", ReasonAllowed},
	} {
		d := e.Decide(c.in)
		if (c.rule != "") != d.Allowed() || d.Rule != c.rule || d.Reason != c.reason {
			t.Errorf("%s: Decide = %+v, want rule %q reason %s", c.what, d, c.rule, c.reason)
		}
		if d.Mode != ModeEnforce {
			t.Errorf("%s: mode %s", c.what, d.Mode)
		}
	}
	for _, c := range []struct {
		client netip.Addr
		name   string
		rule   string
		reason string
	}{
		{cli, "mask.icloud.com", "", ReasonPrivateRelay},
		{cli, "Mask-H2.icloud.com.", "", ReasonPrivateRelay},
		{a("198.51.100.7"), "mask-h2.icloud.com", "", ReasonPrivateRelay},
		{cli, "www.icloud.com", "icloud", ReasonAllowed},
		{a("198.51.100.7"), "example.com", "star", ReasonAllowed},
	} {
		d := e.DecideName(Input{Client: c.client, Name: c.name})
		if (c.rule != "") != d.Allowed() || d.Rule != c.rule || d.Reason != c.reason {
			t.Errorf("DecideName(%s, %s) = %+v, want rule %q reason %s", c.client, c.name, d, c.rule, c.reason)
		}
		if got := e.NameRules(Input{Client: c.client, Name: c.name}, 0, nil); (len(got) > 0) != d.Allowed() {
			t.Errorf("NameRules(%s, %s) = %v, DecideName %+v", c.client, c.name, got, d)
		}
	}
	// DecideLearned: a relay name that DNS gave out (another resolver's
	// answer, in audit mode) does not open the address more than the
	// address alone does.
	in := Input{Client: cli, Dest: a("203.0.113.5"), Port: 443, Proto: TCP}
	if d, _ := e.DecideLearned(in, e.Decide(in), []string{"mask-h2.icloud.com"}); d.Allowed() {
		t.Errorf("DecideLearned with mask-h2.icloud.com: %+v", d)
	}
}

// TestPrivateRelayNamedExactly: a rule that names a relay name exactly
// (a name or host/path target, not a wildcard) means it: that name is
// decided by such rules only, with their ports, clients and expiry; the
// other relay name stays refused.
func TestPrivateRelayNamedExactly(t *testing.T) {
	e := mustCompile(t, relayPolicy+`
  - name: relay
    from: [192.0.2.0/24]
    to: [mask-h2.icloud.com]
    ports: [443/tcp]
  - name: relay-path
    to: ["mask.icloud.com/x/*"]
    ports: [80/tcp]
  - name: relay-old
    to: [mask.icloud.com]
    ports: [443/udp]
    expires: 2020-01-01
`)
	a := netip.MustParseAddr
	apple := a("17.253.1.2")
	for _, c := range []struct {
		what   string
		in     Input
		rule   string
		reason string
	}{
		// The CIDR rule comes first in the file; only the exact rule counts.
		{"named, its client", Input{Client: a("192.0.2.9"), Dest: apple, Name: "mask-h2.icloud.com", Port: 443, Proto: TCP}, "relay", ReasonAllowed},
		{"named, another client", Input{Client: a("198.51.100.1"), Dest: apple, Name: "mask-h2.icloud.com", Port: 443, Proto: TCP}, "", ReasonClient},
		{"named, another port", Input{Client: a("192.0.2.9"), Dest: apple, Name: "mask-h2.icloud.com", Port: 5223, Proto: TCP}, "", ReasonPort},
		{"host/path, the path", Input{Client: a("192.0.2.9"), Name: "mask.icloud.com", Path: "/x/1", Port: 80, Proto: TCP}, "relay-path", ReasonAllowed},
		{"host/path, another path", Input{Client: a("192.0.2.9"), Name: "mask.icloud.com", Path: "/y", Port: 80, Proto: TCP}, "", ReasonPath},
		{"expired", Input{Client: a("192.0.2.9"), Dest: apple, Name: "mask.icloud.com", Port: 443, Proto: UDP}, "relay-old", ReasonExpired},
		{"the other name, by CIDR", Input{Client: a("192.0.2.9"), Dest: apple, Name: "mask.icloud.com", Port: 443, Proto: TCP}, "", ReasonPort},
	} {
		d := e.Decide(c.in)
		if (c.reason == ReasonAllowed) != d.Allowed() || d.Rule != c.rule || d.Reason != c.reason {
			t.Errorf("%s: Decide = %+v, want rule %q reason %s", c.what, d, c.rule, c.reason)
		}
	}
	if d := e.DecideName(Input{Client: a("192.0.2.9"), Name: "mask-h2.icloud.com"}); d.Rule != "relay" {
		t.Errorf("DecideName of the named relay: %+v", d)
	}
	if d := e.DecideName(Input{Client: a("198.51.100.1"), Name: "mask-h2.icloud.com"}); d.Allowed() || d.Reason != ReasonClient {
		t.Errorf("DecideName of the named relay, another client: %+v", d)
	}
	if d := e.DecideName(Input{Client: a("192.0.2.9"), Name: "mask.icloud.com"}); d.Rule != "relay-path" {
		t.Errorf("DecideName of mask.icloud.com (a host/path rule names it): %+v", d)
	}
}

// TestPrivateRelayNameOnly: IsPrivateRelay knows the two names in their
// normal form only.
func TestPrivateRelayNameOnly(t *testing.T) {
	for n, want := range map[string]bool{
		"mask.icloud.com": true, "mask-h2.icloud.com": true,
		"mask-api.icloud.com": false, "icloud.com": false, "a.mask.icloud.com": false, "mask.icloud.com.evil.net": false, "": false,
	} {
		if got := IsPrivateRelay(n); got != want {
			t.Errorf("IsPrivateRelay(%q) = %v, want %v", n, got, want)
		}
	}
}

// TestLintPrivateRelay: policy check says that a wildcard or "*" which
// matches a relay name leaves it refused, and how to allow it; a CIDR, an
// exact name, or a pattern that matches neither name does not warn, and a
// rule that names a relay name after a wildcard is not "shadowed".
func TestLintPrivateRelay(t *testing.T) {
	for _, c := range []struct {
		to    string
		names []string // the names the warning lists; nil: no warning
	}{
		{`"*.icloud.com"`, []string{"mask.icloud.com", "mask-h2.icloud.com"}},
		{`"*"`, []string{"mask.icloud.com", "mask-h2.icloud.com"}},
		{`"mask-*.icloud.com"`, []string{"mask-h2.icloud.com"}},
		{`"*.com"`, []string{"mask.icloud.com", "mask-h2.icloud.com"}},
		{`"*.icloud.com/path/*"`, []string{"mask.icloud.com", "mask-h2.icloud.com"}},
		{`17.0.0.0/8`, nil},
		{`"0.0.0.0/0"`, nil},
		{`"*.apple.com"`, nil},
		{`mask-h2.icloud.com`, nil},
	} {
		e := mustCompile(t, "version: 1\nrules:\n  - name: r\n    to: ["+c.to+"]\n    ports: [443/tcp]\n")
		var got []string
		for _, w := range e.Warnings() {
			if strings.Contains(w.Msg, "Private Relay") {
				got = append(got, w.Msg)
			}
		}
		if c.names == nil {
			if len(got) != 0 {
				t.Errorf("%s: %q, want no Private Relay warning", c.to, got)
			}
			continue
		}
		if len(got) != 1 {
			t.Errorf("%s: %d Private Relay warnings %q, want 1", c.to, len(got), got)
			continue
		}
		for _, n := range []string{"mask.icloud.com", "mask-h2.icloud.com"} {
			want := false
			for _, x := range c.names {
				want = want || x == n
			}
			if strings.Contains(got[0], n+",") || strings.Contains(got[0], n+" ") || strings.HasSuffix(got[0], n) {
				if !want {
					t.Errorf("%s: warning names %s: %q", c.to, n, got[0])
				}
			} else if want {
				t.Errorf("%s: warning does not name %s: %q", c.to, n, got[0])
			}
		}
		if !strings.Contains(got[0], "exactly") {
			t.Errorf("%s: warning does not say how to allow it: %q", c.to, got[0])
		}
	}
	// Named exactly elsewhere: the wildcard's warning leaves that name out;
	// the exact rule is not shadowed by the wildcard before it.
	e := mustCompile(t, `version: 1
rules:
  - {name: wide, to: ["*.icloud.com"], ports: [443/tcp]}
  - {name: relay, to: [mask-h2.icloud.com], ports: [443/tcp]}
`)
	for _, w := range e.Warnings() {
		if strings.Contains(w.Msg, "shadowed") {
			t.Errorf("warning %q: the wildcard does not allow mask-h2.icloud.com", w.Msg)
		}
		if strings.Contains(w.Msg, "Private Relay") && strings.Contains(w.Msg, "mask-h2.icloud.com") {
			t.Errorf("warning %q names mask-h2.icloud.com, which rule relay names exactly", w.Msg)
		}
	}
	// A second exact rule after the first is shadowed as usual.
	e = mustCompile(t, `version: 1
rules:
  - {name: relay, to: [mask-h2.icloud.com], ports: [443/tcp]}
  - {name: again, to: [mask-h2.icloud.com], ports: [443/tcp]}
`)
	shadowed := false
	for _, w := range e.Warnings() {
		shadowed = shadowed || strings.Contains(w.Msg, "rule again is shadowed by relay")
	}
	if !shadowed {
		t.Errorf("a repeated exact relay rule is not reported shadowed: %v", e.Warnings())
	}
}
