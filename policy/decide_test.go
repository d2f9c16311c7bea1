package policy

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

const matchPolicy = `
version: 1
mode: enforce
groups:
  servers: [192.168.10.0/24]
  kiosks: [192.168.20.0/24, "aa:bb:cc:dd:ee:ff"]
rules:
  - name: exact
    to: [example.com]
    ports: [443/tcp]
  - name: wild
    to: ["*.nirovision.com", "*.docker.com", "*.Docker.IO."]
    ports: [443/tcp]
  - name: inlabel
    to: ["api-*.example.net", "alt*-mtalk.google.com"]
    ports: [443/tcp, 5228-5230/tcp]
  - name: deepglob
    to: ["*.cdn-*.example.org"]
    ports: [443/tcp]
  - name: docs
    to: ["notion.so/nirovision/*"]
    ports: [443/tcp, 80/tcp]
  - name: apple
    to: [17.0.0.0/8]
    ports: [5223/tcp, 443/tcp, 2197/tcp]
  - name: v6net
    to: ["2001:db8:17::/48"]
    ports: [443/tcp]
  - name: lan
    to: [private]
    ports: [7001/tcp, 5000/tcp]
  - name: servers-only
    from: [servers]
    to: ["*.internal-api.test"]
    ports: [8443/tcp]
  - name: kiosk-mac
    from: [kiosks]
    to: [kiosk.example.com]
    ports: [443/tcp]
  - name: old
    to: [legacy.example.com]
    ports: [443/tcp]
    expires: 2020-01-01
  - name: unicode
    to: ["ｅｘａｍｐｌｅ．ｅｄｕ", "faß.de", "bücher.example"]
    ports: [443/tcp]
  - name: ntp-any
    to: ["0.0.0.0/0", "::/0"]
    ports: [123/udp]
  - name: dns-star
    from: [198.51.100.7]
    to: ["*"]
    ports: [53/udp]
  - name: relay
    from: [kiosks]
    to: [mask-h2.icloud.com]
    ports: [443/tcp]
`

func mustCompile(t testing.TB, src string) *Engine {
	t.Helper()
	e, err := Compile("test.yaml", []byte(src))
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return e
}

func TestDecideTable(t *testing.T) {
	e := mustCompile(t, matchPolicy)
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	a := netip.MustParseAddr
	mac := func(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }
	tcp := func(name string, port uint16) Input { return Input{Name: name, Port: port, Proto: TCP} }
	ip := func(addr string, port uint16, p Proto) Input { return Input{Dest: a(addr), Port: port, Proto: p} }
	cases := []struct {
		name   string
		in     Input
		rule   string // "" = deny
		reason string // checked when set
	}{
		// Exact names, case, trailing dot (THREATS D1).
		{"exact", tcp("example.com", 443), "exact", ReasonAllowed},
		{"exact upper", tcp("EXAMPLE.COM", 443), "exact", ""},
		{"exact mixed trailing dot", tcp("Example.Com.", 443), "exact", ""},
		{"exact wrong port", tcp("example.com", 444), "", ReasonPort},
		{"exact udp", Input{Name: "example.com", Port: 443, Proto: UDP}, "", ReasonPort},
		{"exact does not cover sub", tcp("www.example.com", 443), "", ReasonNoRule},
		{"suffix lookalike", tcp("evilexample.com", 443), "", ReasonNoRule},
		{"suffix appended", tcp("example.com.evil.net", 443), "", ReasonNoRule},
		{"no dot lookalike", tcp("examplexcom", 443), "", ReasonNoRule},
		{"double trailing dot", tcp("example.com..", 443), "", ReasonInvalidName},
		{"empty label", tcp("example..com", 443), "", ReasonInvalidName},
		// Leading wildcard: any depth, never the apex (D4).
		{"wild one level", tcp("api.nirovision.com", 443), "wild", ""},
		{"wild deep", tcp("a.b.c.nirovision.com", 443), "wild", ""},
		{"wild apex", tcp("nirovision.com", 443), "", ReasonNoRule},
		{"wild lookalike", tcp("evilnirovision.com", 443), "", ReasonNoRule},
		{"wild appended", tcp("api.nirovision.com.evil.net", 443), "", ReasonNoRule},
		{"docker cdn", tcp("production.cloudflare.docker.com", 443), "wild", ""},
		{"docker io pattern normalised", tcp("registry-1.docker.io", 443), "wild", ""},
		{"docker io evil", tcp("docker.io.evil.net", 443), "", ReasonNoRule},
		{"wild upper", tcp("API.NIROVISION.COM", 443), "wild", ""},
		{"wild trailing dot", tcp("api.nirovision.com.", 443), "wild", ""},
		{"wild wrong port", tcp("api.nirovision.com", 80), "", ReasonPort},
		// In-label wildcards stay in their label.
		{"inlabel", tcp("api-v2.example.net", 443), "inlabel", ""},
		{"inlabel empty star", tcp("api-.example.net", 443), "inlabel", ""},
		{"inlabel no cross", tcp("api-x.y.example.net", 443), "", ReasonNoRule},
		{"inlabel prefix only", tcp("apix.example.net", 443), "", ReasonNoRule},
		{"inlabel mtalk", tcp("alt7-mtalk.google.com", 5229), "inlabel", ""},
		{"inlabel mtalk range low", tcp("alt1-mtalk.google.com", 5228), "inlabel", ""},
		{"inlabel mtalk range high", tcp("alt1-mtalk.google.com", 5230), "inlabel", ""},
		{"inlabel mtalk range above", tcp("alt1-mtalk.google.com", 5231), "", ReasonPort},
		{"inlabel mtalk range below", tcp("alt1-mtalk.google.com", 5227), "", ReasonPort},
		{"inlabel mtalk deeper", tcp("x.alt1-mtalk.google.com", 443), "", ReasonNoRule},
		{"deep glob", tcp("a.b.cdn-7.example.org", 443), "deepglob", ""},
		{"deep glob needs label", tcp("cdn-7.example.org", 443), "", ReasonNoRule},
		// Host/path rules.
		{"path unknown host level", tcp("notion.so", 443), "docs", ""},
		{"path allowed", Input{Name: "notion.so", Path: "/nirovision/page-1", Port: 80, Proto: TCP}, "docs", ""},
		{"path deep", Input{Name: "notion.so", Path: "/nirovision/a/b", Port: 80, Proto: TCP}, "docs", ""},
		{"path other", Input{Name: "notion.so", Path: "/evil/page", Port: 80, Proto: TCP}, "", ReasonPath},
		{"path prefix lookalike", Input{Name: "notion.so", Path: "/nirovisionx/a", Port: 80, Proto: TCP}, "", ReasonPath},
		{"path host sub", Input{Name: "www.notion.so", Path: "/nirovision/a", Port: 80, Proto: TCP}, "", ReasonNoRule},
		// Cleartext without an HTTP/1 path (h2c, other protocols): host/path
		// rules do not match; host-level rules still do.
		{"path unseen", Input{Name: "notion.so", NoPath: true, Port: 80, Proto: TCP}, "", ReasonPathUnseen},
		{"path unseen host rule", Input{Name: "a.nirovision.com", NoPath: true, Port: 443, Proto: TCP}, "wild", ""},
		// CIDRs.
		{"apple 5223", ip("17.1.2.3", 5223, TCP), "apple", ""},
		{"apple 2197", ip("17.255.255.255", 2197, TCP), "apple", ""},
		{"apple 5224", ip("17.1.2.3", 5224, TCP), "", ReasonPort},
		{"apple outside", ip("18.0.0.1", 5223, TCP), "", ReasonNoRule},
		{"apple mapped v6", ip("::ffff:17.1.2.3", 443, TCP), "apple", ""},
		{"apple v6 not v4", ip("2001:db8::1101:203", 443, TCP), "", ReasonNoRule},
		{"v6 cidr", ip("2001:db8:17:5::1", 443, TCP), "v6net", ""},
		{"v6 cidr outside", ip("2001:db8:18::1", 443, TCP), "", ReasonNoRule},
		{"private 10", ip("10.2.3.4", 7001, TCP), "lan", ""},
		{"private 172", ip("172.31.0.1", 5000, TCP), "lan", ""},
		{"private 172 outside", ip("172.32.0.1", 5000, TCP), "", ReasonNoRule},
		{"private 192.168", ip("192.168.1.1", 7001, TCP), "lan", ""},
		{"private ula", ip("fd00::1", 7001, TCP), "lan", ""},
		{"private not link-local", ip("169.254.169.254", 7001, TCP), "", ReasonNoRule},
		{"private not cgnat", ip("100.64.0.1", 7001, TCP), "", ReasonNoRule},
		{"private mapped", ip("::ffff:10.0.0.1", 7001, TCP), "lan", ""},
		{"private wrong port", ip("10.0.0.1", 22, TCP), "", ReasonPort},
		// A name and an address: either may allow.
		{"name no rule, ip allowed", Input{Name: "courier.push.apple.com", Dest: a("17.5.5.5"), Port: 5223, Proto: TCP}, "apple", ""},
		// 0.0.0.0/0 versus *.
		{"any v4 udp", ip("203.0.113.5", 123, UDP), "ntp-any", ""},
		{"any v6 udp", ip("2001:db8::5", 123, UDP), "ntp-any", ""},
		{"cidr any no name", Input{Name: "pool.ntp.org", Port: 123, Proto: UDP}, "", ReasonNoRule},
		{"star from client", Input{Client: a("198.51.100.7"), Name: "anything.test", Port: 53, Proto: UDP}, "dns-star", ""},
		{"star other client", Input{Client: a("198.51.100.8"), Name: "anything.test", Port: 53, Proto: UDP}, "", ReasonClient},
		// Groups of CIDRs and MACs.
		{"group cidr", Input{Client: a("192.168.10.5"), Name: "x.internal-api.test", Port: 8443, Proto: TCP}, "servers-only", ""},
		{"group cidr mapped client", Input{Client: a("::ffff:192.168.10.5"), Name: "x.internal-api.test", Port: 8443, Proto: TCP}, "servers-only", ""},
		{"group other client", Input{Client: a("192.168.11.5"), Name: "x.internal-api.test", Port: 8443, Proto: TCP}, "", ReasonClient},
		{"group unknown client", tcp("x.internal-api.test", 8443), "", ReasonClient},
		{"group mac", Input{Client: a("10.9.9.9"), ClientMAC: mac("AA:BB:CC:DD:EE:FF"), Name: "kiosk.example.com", Port: 443, Proto: TCP}, "kiosk-mac", ""},
		{"group kiosk cidr", Input{Client: a("192.168.20.9"), Name: "kiosk.example.com", Port: 443, Proto: TCP}, "kiosk-mac", ""},
		{"group wrong mac", Input{Client: a("10.9.9.9"), ClientMAC: mac("aa:bb:cc:dd:ee:00"), Name: "kiosk.example.com", Port: 443, Proto: TCP}, "", ReasonClient},
		// Expiry.
		{"expired", tcp("legacy.example.com", 443), "", ReasonExpired},
		// IDNA in patterns; the wire must be ASCII (D3).
		{"fullwidth pattern", tcp("example.edu", 443), "unicode", ""},
		{"eszett punycode", tcp("xn--fa-hia.de", 443), "unicode", ""},
		{"eszett transitional form", tcp("fass.de", 443), "", ReasonNoRule},
		{"unicode on wire", tcp("bücher.example", 443), "", ReasonInvalidName},
		{"punycode on wire", tcp("xn--bcher-kva.example", 443), "unicode", ""},
		{"homograph", tcp("ex\u0430mple.com", 443), "", ReasonInvalidName},
		{"homograph punycode", tcp("xn--exmple-4nf.com", 443), "", ReasonNoRule},
		{"nul in name", tcp("example.com\x00.evil", 443), "", ReasonInvalidName},
		{"space in name", tcp("example.com ", 443), "", ReasonInvalidName},
		{"ip-literal name", tcp("17.1.2.3", 443), "", ReasonNoRule},
		{"bracketed name", tcp("[example.com]", 443), "", ReasonInvalidName},
		{"name with port", tcp("example.com:443", 443), "", ReasonInvalidName},
		{"nothing", Input{Port: 443, Proto: TCP}, "", ReasonNoDestination},
	}
	if len(cases) < 60 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.in.Now = now
			d := e.Decide(c.in)
			if c.rule == "" {
				if d.Verdict != Deny {
					t.Fatalf("got %s by %s (%s), want deny", d.Verdict, d.Rule, d.Reason)
				}
				if c.reason == ReasonExpired && d.Rule == "" {
					t.Fatalf("expired deny should name the rule")
				}
			} else if d.Verdict != Allow || d.Rule != c.rule {
				t.Fatalf("got %s by %q (%s), want allow by %q", d.Verdict, d.Rule, d.Reason, c.rule)
			}
			if c.reason != "" && d.Reason != c.reason {
				t.Fatalf("reason %q, want %q", d.Reason, c.reason)
			}
			if d.Mode != ModeEnforce {
				t.Fatalf("mode %q", d.Mode)
			}
		})
	}
}

func TestFirstRuleCredited(t *testing.T) {
	e := mustCompile(t, `
rules:
  - {name: narrow-later-port, to: [a.example.com], ports: [8443/tcp]}
  - {name: broad, to: ["*.example.com"], ports: [443/tcp]}
  - {name: exact, to: [a.example.com], ports: [443/tcp]}
  - {name: cidr, to: [203.0.113.0/24], ports: [443/tcp]}
  - {name: host, to: [203.0.113.9], ports: [443/tcp]}
`)
	for _, c := range []struct {
		in   Input
		rule string
	}{
		{Input{Name: "a.example.com", Port: 443, Proto: TCP}, "broad"},
		{Input{Name: "a.example.com", Port: 8443, Proto: TCP}, "narrow-later-port"},
		{Input{Dest: netip.MustParseAddr("203.0.113.9"), Port: 443, Proto: TCP}, "cidr"},
		{Input{Name: "a.example.com", Dest: netip.MustParseAddr("203.0.113.9"), Port: 443, Proto: TCP}, "broad"},
	} {
		if d := e.Decide(c.in); d.Rule != c.rule {
			t.Errorf("%+v: credited %q, want %q", c.in, d.Rule, c.rule)
		}
	}
	ws := e.Warnings()
	found := false
	for _, w := range ws {
		if w.Line > 0 && contains(w.Msg, "rule exact is shadowed by broad") {
			found = true
		}
		if contains(w.Msg, "rule host is shadowed by cidr") {
			found = found && true
		}
	}
	if !found {
		t.Errorf("no shadow warning for rule exact: %v", ws)
	}
}

func TestDecideName(t *testing.T) {
	e := mustCompile(t, matchPolicy)
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		client, name, rule string
	}{
		{"192.168.1.9", "api.nirovision.com", "wild"},
		{"192.168.1.9", "API.nirovision.com.", "wild"},
		{"192.168.1.9", "notion.so", "docs"}, // path rules open the host
		{"192.168.1.9", "nirovision.com", ""},
		{"192.168.1.9", "courier.push.apple.com", ""}, // a CIDR opens no names
		{"192.168.1.9", "pool.ntp.org", ""},           // 0.0.0.0/0 opens no names
		{"198.51.100.7", "anything.test", "dns-star"}, // "*" opens every name
		{"192.168.10.9", "db.internal-api.test", "servers-only"},
		{"192.168.30.9", "db.internal-api.test", ""},
		{"192.168.1.9", "legacy.example.com", ""},
	} {
		d := e.DecideName(Input{Client: netip.MustParseAddr(c.client), Name: c.name, Now: now})
		if (c.rule != "") != d.Allowed() || (d.Allowed() && d.Rule != c.rule) {
			t.Errorf("DecideName(%s, %s) = %s by %q (%s), want %q", c.client, c.name, d.Verdict, d.Rule, d.Reason, c.rule)
		}
	}
}

func TestExpiresBoundary(t *testing.T) {
	e := mustCompile(t, "rules:\n  - {name: tb, to: [x.test], ports: [443/tcp], expires: 2026-12-31}\n")
	in := Input{Name: "x.test", Port: 443, Proto: TCP}
	in.Now = time.Date(2026, 12, 31, 23, 59, 59, 0, time.UTC)
	if d := e.Decide(in); !d.Allowed() {
		t.Fatalf("rule should match through its last day: %+v", d)
	}
	in.Now = time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)
	if d := e.Decide(in); d.Allowed() || d.Reason != ReasonExpired || d.Rule != "tb" {
		t.Fatalf("rule should have expired: %+v", d)
	}
}

func TestStoreSwap(t *testing.T) {
	a := mustCompile(t, "rules:\n  - {name: a, to: [a.test], ports: [443/tcp]}\n")
	b := mustCompile(t, "rules:\n  - {name: b, to: [b.test], ports: [443/tcp]}\n")
	s := NewStore(a)
	in := Input{Name: "b.test", Port: 443, Proto: TCP}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 2000; i++ {
			d := s.Decide(in)
			if d.Allowed() && d.Rule != "b" {
				t.Errorf("torn decision %+v", d)
				return
			}
		}
	}()
	for i := 0; i < 1000; i++ {
		if i%2 == 0 {
			s.Swap(b)
		} else {
			s.Swap(a)
		}
	}
	<-done
	s.Swap(b)
	if d := s.Decide(in); d.Rule != "b" {
		t.Fatalf("after swap: %+v", d)
	}
}

func TestWithMode(t *testing.T) {
	e := mustCompile(t, "mode: audit\nrules:\n  - {name: a, to: [a.test], ports: [443/tcp]}\n")
	if e.WithMode(ModeEnforce).Decide(Input{Name: "x.test", Port: 443, Proto: TCP}).Mode != ModeEnforce {
		t.Fatal("WithMode did not change the mode")
	}
	if e.Mode() != ModeAudit {
		t.Fatal("WithMode changed the original")
	}
}

func TestNormalizeName(t *testing.T) {
	for in, want := range map[string]string{
		"EXAMPLE.COM":  "example.com",
		"example.com.": "example.com",
		"Example.Com.": "example.com",
		"_dmarc.x.org": "_dmarc.x.org",
		"a":            "a",
	} {
		if got, ok := NormalizeName(in); !ok || got != want {
			t.Errorf("NormalizeName(%q) = %q, %v", in, got, ok)
		}
	}
	for _, in := range []string{"", ".", "a..b", ".a", "a b", "é.com", "a/b", "[a]", "a:1", string(make([]byte, 254))} {
		if _, ok := NormalizeName(in); ok {
			t.Errorf("NormalizeName(%q) accepted", in)
		}
	}
	long := "a"
	for len(long) < 63 {
		long += "a"
	}
	if _, ok := NormalizeName(long + "a.com"); ok {
		t.Error("64-byte label accepted")
	}
	if n := testing.AllocsPerRun(100, func() { NormalizeName("api.nirovision.com") }); n != 0 {
		t.Errorf("NormalizeName allocates %v times on a normal name", n)
	}
}

func TestParseDest(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Dest
		err  bool
	}{
		{in: "Example.Com.", want: Dest{Name: "example.com"}},
		{in: "Example.Com.:8443", want: Dest{Name: "example.com", Port: 8443}},
		{in: "https://notion.so/nirovision/x?y=1", want: Dest{Name: "notion.so", Path: "/nirovision/x", Port: 443}},
		{in: "http://user@notion.so", want: Dest{Name: "notion.so", Port: 80}},
		{in: "17.1.2.3", want: Dest{Addr: netip.MustParseAddr("17.1.2.3")}},
		{in: "::ffff:17.1.2.3", want: Dest{Addr: netip.MustParseAddr("17.1.2.3"), Mapped: true}},
		{in: "[2001:db8::1]:443", want: Dest{Addr: netip.MustParseAddr("2001:db8::1"), Port: 443}},
		{in: "ｅｘａｍｐｌｅ．ｃｏｍ", want: Dest{Name: "example.com"}},
		{in: "[example.com]", err: true},
		{in: "[[example.net]]:1337", err: true},
		{in: "example.com:007", err: true},
		{in: "example.com:-12", err: true},
		{in: "example.com:91337", err: true},
		{in: "example.com:https", err: true},
		{in: "a\u200db.com", err: true},
	} {
		got, err := ParseDest(c.in)
		if (err != nil) != c.err {
			t.Errorf("ParseDest(%q) error = %v", c.in, err)
			continue
		}
		if !c.err && got != c.want {
			t.Errorf("ParseDest(%q) = %+v, want %+v", c.in, got, c.want)
		}
	}
}

func TestDecideAllocs(t *testing.T) {
	e := mustCompile(t, matchPolicy)
	in := Input{Client: netip.MustParseAddr("192.168.1.2"), Dest: netip.MustParseAddr("104.16.1.1"), Name: "production.cloudflare.docker.com", Port: 443, Proto: TCP}
	if n := testing.AllocsPerRun(1000, func() { e.Decide(in) }); n != 0 {
		t.Errorf("Decide allocates %v times", n)
	}
}

func contains(s, sub string) bool { return len(s) >= len(sub) && (s == sub || indexOf(s, sub) >= 0) }

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

// TestMappedClientPrefix checks client CIDRs written in IPv4-mapped form:
// ::ffff:a.b.c.d/N with N >= 96 is the IPv4 prefix it carries; with a
// shorter length it is an IPv6 prefix, never an invalid one that matches
// nobody (and that the firewall would be handed).
func TestMappedClientPrefix(t *testing.T) {
	p, err := Parse("p.yaml", []byte(`
groups:
  lan: ["::ffff:192.168.0.0/112"]
  short: ["::ffff:192.168.0.0/16"]
rules:
  - {name: a, from: [lan], to: [a.test], ports: [443/tcp]}
  - {name: b, from: [short, "::ffff:10.0.0.0/8"], to: [b.test], ports: [443/tcp]}
`))
	if err != nil {
		t.Fatal(err)
	}
	want := [][]string{{"192.168.0.0/16"}, {"::/16", "::/8"}}
	for i, r := range p.Rules {
		var got []string
		for _, pf := range r.From.Prefixes {
			if !pf.IsValid() {
				t.Errorf("rule %s: invalid client prefix", r.Name)
			}
			got = append(got, pf.String())
		}
		if fmt.Sprint(got) != fmt.Sprint(want[i]) {
			t.Errorf("rule %s: from %v, want %v", r.Name, got, want[i])
		}
	}
	for _, w := range p.Warnings {
		if strings.Contains(w.Msg, "invalid") {
			t.Errorf("warning %s", w)
		}
	}
	e := New(p)
	if d := e.Decide(Input{Client: netip.MustParseAddr("192.168.1.2"), Name: "a.test", Port: 443, Proto: TCP}); !d.Allowed() {
		t.Errorf("mapped /112 client: %+v", d)
	}
}

// TestLinkLocalClient checks a client whose address carries a zone, as a
// link-local LAN client's does when it comes from the socket
// (fe80::1%eth0): the zone names the interface, not the client, so the
// rule's client CIDRs and IPs still match it.
func TestLinkLocalClient(t *testing.T) {
	e := mustCompile(t, "rules:\n  - {name: ll, from: [\"fe80::/10\"], to: [a.test], ports: [443/tcp]}\n  - {name: one, from: [\"fe80::2\"], to: [b.test], ports: [443/tcp]}\n")
	for _, c := range []struct{ client, name, rule string }{
		{"fe80::1%eth0", "a.test", "ll"},
		{"fe80::2%br-lan", "b.test", "one"},
		{"fe80::3%eth0", "b.test", ""},
	} {
		in := Input{Client: netip.MustParseAddr(c.client), Name: c.name, Port: 443, Proto: TCP}
		if d := e.Decide(in); d.Rule != c.rule {
			t.Errorf("Decide from %s to %s: %+v, want rule %q", c.client, c.name, d, c.rule)
		}
		if d := e.DecideName(in); d.Rule != c.rule {
			t.Errorf("DecideName from %s for %s: %+v, want rule %q", c.client, c.name, d, c.rule)
		}
	}
}

// TestWarnAnyAsName: "any" in to is a host name; policy check says so,
// since "ports: any" suggests it means every destination.
func TestWarnAnyAsName(t *testing.T) {
	e := mustCompile(t, "rules:\n  - {name: r, to: [any, any.example.com], ports: [443/tcp]}\n")
	n := 0
	for _, w := range e.Warnings() {
		if contains(w.Msg, `"any" in to is the host name any`) {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d warnings about \"any\", want 1: %v", n, e.Warnings())
	}
}

// TestFarExpiry: a rule that expires centuries from now allows until then
// (UnixNano of the year 9999 is undefined: the rule looked expired from
// the start), one that expired centuries ago never does.
func TestFarExpiry(t *testing.T) {
	e := mustCompile(t, `rules:
  - {name: far, to: [far.example.com], ports: [443/tcp], expires: 9999-12-31}
  - {name: old, to: [old.example.com], ports: [443/tcp], expires: 1600-01-01}
`)
	if d := e.Decide(Input{Name: "far.example.com", Port: 443, Proto: TCP}); d.Rule != "far" {
		t.Errorf("expires 9999-12-31: %+v, want allowed by far", d)
	}
	if d := e.Decide(Input{Name: "old.example.com", Port: 443, Proto: TCP}); d.Allowed() || d.Reason != ReasonExpired {
		t.Errorf("expires 1600-01-01: %+v, want denied as expired", d)
	}
}

// TestNameRules: every rule that lets the client resolve a name, not only
// the first (DecideName's), each once; from-groups and expiry count.
func TestNameRules(t *testing.T) {
	e := mustCompile(t, `rules:
  - {name: web, to: ["*.example.com"], ports: [443/tcp]}
  - {name: lab-only, from: [192.0.2.0/24], to: [time.example.com], ports: [123/udp]}
  - {name: ntp, to: [time.example.com, "time.*.com"], ports: [123/udp]}
  - {name: gone, to: [time.example.com], ports: [123/udp], expires: 2020-01-01}
  - {name: other, to: [other.test], ports: [53/udp]}
`)
	got := e.NameRules(Input{Client: netip.MustParseAddr("198.51.100.7"), Name: "Time.Example.com."}, 0, nil)
	slices.Sort(got)
	if !slices.Equal(got, []int{0, 2}) {
		t.Errorf("rules for time.example.com from 198.51.100.7: %v, want [0 2] (web, ntp)", got)
	}
	got = e.NameRules(Input{Client: netip.MustParseAddr("192.0.2.9"), Name: "time.example.com"}, 0, make([]int, 0, 8))
	slices.Sort(got)
	if !slices.Equal(got, []int{0, 1, 2}) {
		t.Errorf("rules for time.example.com from 192.0.2.9: %v, want [0 1 2]", got)
	}
	if d := e.DecideName(Input{Client: netip.MustParseAddr("192.0.2.9"), Name: "time.example.com"}); d.RuleIndex != 0 {
		t.Errorf("DecideName credits %d, want 0 (the first of NameRules)", d.RuleIndex)
	}
	if got := e.NameRules(Input{Client: netip.MustParseAddr("192.0.2.9"), Name: "time.example.com"}, 1, nil); !slices.Equal(got, []int{1, 2}) {
		t.Errorf("rules from index 1: %v, want [1 2]", got)
	}
	if got := e.NameRules(Input{Name: "nothing.test"}, 0, nil); len(got) != 0 {
		t.Errorf("rules for nothing.test: %v", got)
	}
	buf := make([]int, 0, 8)
	if n := testing.AllocsPerRun(100, func() { buf = e.NameRules(Input{Name: "time.example.com"}, 0, buf[:0]) }); n != 0 {
		t.Errorf("NameRules with room in dst: %v allocations", n)
	}
}

// TestWarnPathRuleOnUDP: a host/path rule that lists UDP ports warns that
// UDP is forwarded at host level (nftables sees no path), naming the
// ports; one on TCP only does not.
func TestWarnPathRuleOnUDP(t *testing.T) {
	e := mustCompile(t, `rules:
  - {name: quic, to: ["notion.so/nirovision/*"], ports: [443/tcp, 443/udp, 5000-5010/udp]}
  - {name: tcp, to: ["docs.example.com/public/*"], ports: [80/tcp, 443/tcp]}
  - {name: plain, to: [example.org], ports: [443/udp]}
`)
	var udp []string
	for _, w := range e.Warnings() {
		if contains(w.Msg, "UDP") {
			udp = append(udp, w.Msg)
		}
	}
	if len(udp) != 1 || !contains(udp[0], "rule quic") || !contains(udp[0], "443/udp") || !contains(udp[0], "5000-5010/udp") || !contains(udp[0], "notion.so") {
		t.Errorf("UDP warnings %q, want one for rule quic naming its UDP ports", udp)
	}
}

// TestHasMACs: an engine says whether any rule's clients include a MAC
// (directly or through a group), so that components look a client's MAC
// up only then; the engines derived from it say the same.
func TestHasMACs(t *testing.T) {
	for _, c := range []struct {
		name, src string
		want      bool
	}{
		{"no from", "version: 1\nrules:\n  - name: a\n    to: [example.com]\n    ports: [443/tcp]\n", false},
		{"prefixes only", "version: 1\ngroups:\n  g: [192.0.2.0/24]\nrules:\n  - name: a\n    from: [g, 198.51.100.7]\n    to: [example.com]\n    ports: [443/tcp]\n", false},
		{"a MAC group", "version: 1\ngroups:\n  g: [192.0.2.0/24, \"aa:bb:cc:dd:ee:ff\"]\nrules:\n  - name: a\n    to: [example.com]\n    ports: [443/tcp]\n  - name: b\n    from: [g]\n    to: [example.com/x/*]\n    ports: [443/tcp]\n", true},
		{"a MAC in from", "version: 1\nrules:\n  - name: a\n    from: [\"aa:bb:cc:dd:ee:ff\"]\n    to: [10.0.0.0/8]\n    ports: [any]\n", true},
		{"an unused MAC group", "version: 1\ngroups:\n  g: [\"aa:bb:cc:dd:ee:ff\"]\nrules:\n  - name: a\n    to: [example.com]\n    ports: [443/tcp]\n", false},
	} {
		e := mustCompile(t, c.src)
		if got := e.HasMACs(); got != c.want {
			t.Errorf("%s: HasMACs %v, want %v", c.name, got, c.want)
		}
		if got := e.WithMode(ModeEnforce).HasMACs(); got != c.want {
			t.Errorf("%s: WithMode: HasMACs %v, want %v", c.name, got, c.want)
		}
		if got := e.HostLevel().HasMACs(); got != c.want {
			t.Errorf("%s: HostLevel: HasMACs %v, want %v", c.name, got, c.want)
		}
	}
	e := mustCompile(t, "version: 1\nrules:\n  - name: a\n    from: [\"aa:bb:cc:dd:ee:ff\"]\n    to: [example.com]\n    ports: [443/tcp]\n")
	if n := testing.AllocsPerRun(100, func() { e.HasMACs() }); n != 0 {
		t.Errorf("HasMACs allocates %v times", n)
	}
}

// TestLintMACs: a policy whose rules name clients by MAC gets one warning,
// at the first such rule, naming them all: a client behind a router has
// no MAC for the proxy and the forwarder, and the router's for the
// forward chain. A policy without MACs gets none.
func TestLintMACs(t *testing.T) {
	count := func(e *Engine) (n int, w Problem) {
		for _, p := range e.Warnings() {
			if strings.Contains(p.Msg, "by MAC address") {
				n, w = n+1, p
			}
		}
		return n, w
	}
	e := mustCompile(t, "version: 1\ngroups:\n  g: [192.0.2.0/24, \"aa:bb:cc:dd:ee:ff\"]\nrules:\n  - name: a\n    to: [example.com]\n    ports: [443/tcp]\n  - name: b\n    from: [g]\n    to: [example.net]\n    ports: [443/tcp]\n  - name: c\n    from: [\"aa:bb:cc:dd:ee:01\"]\n    to: [example.org]\n    ports: [123/udp]\n")
	n, w := count(e)
	if n != 1 || w.Line != 8 || !strings.Contains(w.Msg, "rules b, c name clients by MAC") || !strings.Contains(w.Msg, "behind a router") {
		t.Errorf("%d MAC warnings, the last %+v; want one at line 8 naming b and c", n, w)
	}
	if n, w := count(mustCompile(t, "version: 1\ngroups:\n  g: [192.0.2.0/24]\nrules:\n  - name: a\n    from: [g]\n    to: [example.com]\n    ports: [443/tcp]\n")); n != 0 {
		t.Errorf("a policy without MACs: %+v", w)
	}
}
