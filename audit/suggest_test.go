package audit

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/publicsuffix"

	"egressd/policy"
)

func TestSuggestGolden(t *testing.T) {
	var buf bytes.Buffer
	if err := fixtureReport(t).WriteSuggestions(&buf); err != nil {
		t.Fatal(err)
	}
	golden(t, "suggest.yaml", buf.Bytes())
}

// TestSuggestPastes pastes the snippet into the policy: it compiles, and
// the new policy allows every flow and query that was denied, except those
// only an expired rule explains (the snippet says to extend that rule).
func TestSuggestPastes(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("testdata", "policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var snip bytes.Buffer
	if err := fixtureReport(t).WriteSuggestions(&snip); err != nil {
		t.Fatal(err)
	}
	// The fixture policy ends with its rules list, so appending pastes
	// the snippet under "rules:".
	eng2, err := policy.Compile("suggested.yaml", append(append([]byte{}, src...), snip.Bytes()...))
	if err != nil {
		t.Fatalf("the suggested snippet does not compile: %v\n%s", err, snip.String())
	}
	eng := loadPolicy(t, "policy.yaml")
	for _, ev := range fixtureEvents(t, eng) {
		if ev.Verdict == policy.Allow || ev.Reason == policy.ReasonExpired {
			continue
		}
		pr, _ := policy.ParseProto(ev.Proto)
		in := policy.Input{Client: ev.Client, Dest: ev.Dest, Port: ev.DestPort, Proto: pr, Name: ev.Name, Now: ev.Time}
		in.ClientMAC, _ = net.ParseMAC(ev.ClientMAC) // a suggestion may name the client by MAC
		var d policy.Decision
		if ev.Kind == KindDNS {
			d = eng2.DecideName(in)
		} else {
			d = eng2.Decide(in)
		}
		if !d.Allowed() {
			t.Errorf("%s %s %s:%d/%s still denied (%s) with the suggestions", ev.Kind, ev.Client, ev.Name, ev.DestPort, ev.Proto, d.Reason)
		}
	}
	// And nothing the suggestions add is wider than they say: a client
	// that never asked is still denied tracker.example.
	d := eng2.Decide(policy.Input{Client: netip.MustParseAddr("192.168.10.200"), Dest: netip.MustParseAddr("203.0.113.9"), Port: 443, Proto: policy.TCP, Name: "tracker.example", Now: t0})
	if d.Allowed() {
		t.Errorf("tracker.example is allowed for a client that never asked (rule %s)", d.Rule)
	}
}

// suffixNames are dropped names under public suffixes of every kind.
var suffixNames = []string{
	"a.co.uk", "b.co.uk", "www.a.co.uk", // co.uk is a suffix: a.co.uk is registrable
	"x.com", "y.com", "api.x.com", "cdn.x.com",
	"bucket1.s3.amazonaws.com", "bucket2.s3.amazonaws.com", // private PSL entries
	"a.b.s3.amazonaws.com", "c.b.s3.amazonaws.com",
	"ec2-1.compute-1.amazonaws.com", "ec2-2.compute-1.amazonaws.com",
	"foo.amazonaws.com", "bar.amazonaws.com",
	"u1.github.io", "u2.github.io", "x.u1.github.io",
	"p.blogspot.com", "q.blogspot.com",
	"one.gov.uk", "two.gov.uk",
	"a.b.c.kawasaki.jp", "d.b.c.kawasaki.jp", // *.kawasaki.jp wildcard suffix rule
	"co.uk", "com", "s3.amazonaws.com", // public suffixes themselves
	"tracker.example", "ads.tracker.example",
}

// TestSuggestNeverAtPublicSuffix: no wildcard at or above a public suffix,
// none wider than a registrable domain, whatever mix of names was dropped.
func TestSuggestNeverAtPublicSuffix(t *testing.T) {
	r := &Report{GeneratedAt: t0}
	for i, n := range suffixNames {
		r.Dropped = append(r.Dropped, DroppedReport{Dest: n, Port: 443, Proto: "tcp", Flows: uint64(i + 1),
			Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: policy.ReasonNoRule, FirstSeen: t0, LastSeen: t0})
	}
	sugs, _ := r.Suggest()
	covered := map[string]bool{}
	for _, s := range sugs {
		for _, to := range s.To {
			checkTarget(t, to)
			covered[to] = true
		}
	}
	for _, want := range []string{"*.x.com", "*.b.s3.amazonaws.com", "bucket1.s3.amazonaws.com", "bucket2.s3.amazonaws.com", "a.co.uk", "b.co.uk", "www.a.co.uk", "co.uk"} {
		if !covered[want] {
			t.Errorf("expected target %q among suggestions", want)
		}
	}
	for _, bad := range []string{"*.co.uk", "*.com", "*.s3.amazonaws.com", "*.amazonaws.com", "*.github.io", "*.blogspot.com", "*.gov.uk", "*.kawasaki.jp", "*.c.kawasaki.jp"} {
		if covered[bad] {
			t.Errorf("suggested %q", bad)
		}
	}
}

func checkTarget(t testing.TB, to string) {
	t.Helper()
	base, ok := strings.CutPrefix(to, "*.")
	if !ok {
		return // an exact name or address is never wider than itself
	}
	if ps, _ := publicsuffix.PublicSuffix(base); ps == base {
		t.Errorf("wildcard %q is at a public suffix", to)
	}
	etld1, err := publicsuffix.EffectiveTLDPlusOne(base)
	if err != nil || (base != etld1 && !strings.HasSuffix(base, "."+etld1)) {
		t.Errorf("wildcard %q is wider than a registrable domain (%q, %v)", to, etld1, err)
	}
}

// FuzzSuggest checks the public-suffix property on arbitrary name pairs,
// each dropped on a port of its own, one of them also denied in DNS, for
// a reason: pasted under a clean policy, the suggestions always compile,
// and none shadows another.
func FuzzSuggest(f *testing.F) {
	f.Add("a.co.uk", "b.co.uk", uint16(443), uint16(443), "no-rule")                                // two registrable domains under one suffix
	f.Add("api.x.com", "cdn.x.com", uint16(443), uint16(80), "no-rule")                             // one domain: *.x.com is fine
	f.Add("bucket1.s3.amazonaws.com", "bucket2.s3.amazonaws.com", uint16(443), uint16(443), "")     // private suffix
	f.Add("a.b.c.kawasaki.jp", "d.b.c.kawasaki.jp", uint16(443), uint16(443), "port-not-allowed")   // wildcard suffix rule
	f.Add("com", "x.com", uint16(443), uint16(443), "no-rule")                                      // a suffix and a name
	f.Add("A.Example.COM.", "b.example.com", uint16(443), uint16(443), "client-not-allowed")        // case and trailing dot
	f.Add("example.com", "example.com", uint16(80), uint16(443), "no-rule")                         // one name, two ports
	f.Add("198.51.100.7", "2001:db8::7", uint16(123), uint16(123), "no-rule")                       // addresses
	f.Add(strings.Repeat("a", 63)+".example", "b.example", uint16(443), uint16(8443), "proxy-auth") // a long name
	f.Add("a.nip.io", "b.nip.io", uint16(80), uint16(80), "no-rule")                                // no wildcard under a wildcard-DNS zone
	f.Add("0", "1.2.3", uint16(443), uint16(443), "\x1c")                                           // numeric names; a control character
	f.Add("zero.example", "b.example", uint16(0), uint16(443), "no-rule")                           // no port seen
	f.Add("private", "PRIVATE.", uint16(443), uint16(80), "no-rule")                                // the keyword for RFC 1918 and ULA
	f.Fuzz(func(t *testing.T, a, b string, pa, pb uint16, reason string) {
		if len(a) > 300 || len(b) > 300 || len(reason) > 64 {
			return
		}
		r := &Report{GeneratedAt: t0}
		for i, n := range []string{a, b} {
			port, proto := pa, "tcp"
			if i == 1 {
				port, proto = pb, "udp"
				if pb%2 == 0 {
					proto = "tcp"
				}
			}
			r.Dropped = append(r.Dropped, DroppedReport{Dest: n, Port: port, Proto: proto, Flows: 1,
				Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: reason, FirstSeen: t0, LastSeen: t0})
		}
		r.Dropped = append(r.Dropped, DroppedReport{Dest: a, Port: 53, Proto: "dns", Queries: 1,
			Clients: []string{"192.168.10.6"}, ClientCount: 1, Reason: policy.ReasonNoRule, FirstSeen: t0, LastSeen: t0})
		sugs, _ := r.Suggest()
		for _, s := range sugs {
			for _, to := range s.To {
				checkTarget(t, to)
			}
		}
		var buf bytes.Buffer
		if err := r.WriteSuggestions(&buf); err != nil {
			t.Fatal(err)
		}
		eng, err := policy.Compile("pasted.yaml", []byte(suggestBase+buf.String()))
		if err != nil {
			t.Fatalf("the pasted suggestions do not compile: %v\n%s", err, buf.String())
		}
		for _, w := range eng.Warnings() {
			if strings.Contains(w.Msg, "shadowed") {
				t.Errorf("%s\n%s", w.Msg, buf.String())
			}
		}
		// A name opens no address but those DNS gives for it: no
		// suggestion allows a private address by address alone.
		_, errA := netip.ParseAddr(a)
		_, errB := netip.ParseAddr(b)
		for _, port := range []uint16{pa, pb} {
			in := policy.Input{Client: netip.MustParseAddr("192.168.10.5"), Dest: netip.MustParseAddr("10.255.254.253"), Port: port, Proto: policy.TCP, Now: t0}
			if d := eng.Decide(in); d.Allowed() && errA != nil && errB != nil {
				t.Errorf("the suggestions for names %q and %q allow 10.255.254.253:%d (rule %s):\n%s", a, b, port, d.Rule, buf.String())
			}
		}
	})
}

func TestSuggestNothing(t *testing.T) {
	var buf bytes.Buffer
	r := &Report{GeneratedAt: time.Now()}
	if err := r.WriteSuggestions(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "Nothing to suggest") {
		t.Errorf("got %q", buf.String())
	}
	_ = fmt.Sprint()
}

// unfixable are deny reasons no allow rule turns into an allow: the bytes
// of the connection, the proxy's own refusals, the DNS forwarder's local
// answers, the guarded ranges, and paths the report does not keep.
var unfixable = []string{
	"sni-mismatch", "special-range", "duplicate-sni", "hello-malformed", "hello-timeout",
	"hello-too-large", "http-malformed", "host-mismatch", "http-framing", "path-form",
	"ip-literal-form", "connection-limit", "shutdown", "fast-path-failed", "stream-mismatch", "fast-path-http", "no-original-dst", "resolve-failed", "proxy-auth",
	"reload-undecidable", "opened-before-enforce", "inbound", "urgent-data", "stream-conflict",
	policy.ReasonInvalidName, policy.ReasonNoDestination, policy.ReasonPath, policy.ReasonPathUnseen, policy.ReasonPrivateRelay,
	"doh-canary", "rate-limited", "qtype-refused", "class-refused", "opcode", "format-error", "upstream-failed",
}

// TestSuggestLeavesOutUnfixable: a drop that no rule could allow (the
// explicit proxy wanted credentials, the ClientHello did not parse) is not
// turned into a rule; the snippet says, per reason, how much was left out.
func TestSuggestLeavesOutUnfixable(t *testing.T) {
	r := &Report{GeneratedAt: t0}
	for i, reason := range unfixable {
		d := DroppedReport{Dest: fmt.Sprintf("host%d.example.net", i), Port: 443, Proto: "tcp", Flows: 2,
			Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: reason, FirstSeen: t0, LastSeen: t0}
		if strings.HasSuffix(reason, "-refused") || reason == "rate-limited" || reason == "doh-canary" {
			d.Port, d.Proto, d.Flows, d.Queries = 53, "dns", 0, 3
		}
		r.Dropped = append(r.Dropped, d)
	}
	// The same reason on two entries is one line, counted together.
	r.Dropped = append(r.Dropped, DroppedReport{Dest: "198.51.100.9", Port: 8080, Proto: "tcp", Flows: 5,
		Clients: []string{"192.168.10.6"}, ClientCount: 1, Reason: "proxy-auth", FirstSeen: t0, LastSeen: t0})
	fixable := map[string]string{
		"nr.example": policy.ReasonNoRule, "port.example": policy.ReasonPort,
		"client.example": policy.ReasonClient, "noreason.example": "",
	}
	for n, reason := range fixable {
		r.Dropped = append(r.Dropped, DroppedReport{Dest: n, Port: 443, Proto: "tcp", Flows: 1,
			Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: reason, FirstSeen: t0, LastSeen: t0})
	}
	sugs, _ := r.Suggest()
	got := map[string]bool{}
	for _, s := range sugs {
		for _, to := range s.To {
			got[to] = true
		}
	}
	for n := range fixable {
		if !got[n] {
			t.Errorf("%s (%s) not suggested", n, fixable[n])
		}
	}
	if len(got) != len(fixable) {
		t.Errorf("suggested %v, want only the fixable %v", got, fixable)
	}
	var buf bytes.Buffer
	if err := r.WriteSuggestions(&buf); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, reason := range unfixable {
		var lines []string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "# ") && strings.Contains(l, "denied as "+reason+":") {
				lines = append(lines, l)
			}
		}
		if len(lines) != 1 {
			t.Errorf("want one line for %s, got %q", reason, lines)
		}
	}
	if !strings.Contains(out, "# 7 flow(s) denied as proxy-auth:") {
		t.Errorf("proxy-auth's line does not count both entries' flows:\n%s", out)
	}
	if !strings.Contains(out, "# 3 DNS queries denied as rate-limited:") {
		t.Errorf("rate-limited's line does not count its queries:\n%s", out)
	}
	// Only such drops: nothing to suggest, though something was dropped.
	buf.Reset()
	r.Dropped = r.Dropped[:len(unfixable)]
	if err := r.WriteSuggestions(&buf); err != nil {
		t.Fatal(err)
	}
	if out := buf.String(); strings.Contains(out, "- name:") || !strings.Contains(out, "# Nothing to suggest: no rule would allow what was dropped.") {
		t.Errorf("unfixable drops only:\n%s", out)
	}
}

// suggestBase is a policy an operator pastes suggestions under: it lints
// clean, so any warning after pasting comes from the suggestions.
const suggestBase = `version: 1
mode: audit
rules:
  - name: web
    from: [192.168.10.0/28]
    to: ["api.partner.example", "portal.partner.example"]
    ports: [443/tcp]
  - name: nas-backup
    to: [198.51.100.200/32]
    ports: [22/tcp]
`

func drop(dest string, port uint16, proto, reason string, clients ...string) DroppedReport {
	d := DroppedReport{Dest: dest, Port: port, Proto: proto, Flows: 1, Clients: clients, ClientCount: len(clients),
		Reason: reason, FirstSeen: t0, LastSeen: t0.Add(time.Minute)}
	if proto == "dns" {
		d.Port, d.Flows, d.Queries = 53, 0, 2
	}
	return d
}

// TestSuggestPastesWithoutWarnings pastes the suggestions for realistic
// mixes of drops under a clean policy: it compiles with no warning (no
// suggestion shadows another, as when a name dropped on two ports and also
// denied in DNS gave a third rule naming it on both), and the new policy
// allows each drop, except a DNS query from a client that opened none of
// the name's flows (TestSuggestFromOnlyFlowClients).
func TestSuggestPastesWithoutWarnings(t *testing.T) {
	const nr = policy.ReasonNoRule
	c1, c2, c3 := "192.168.10.5", "192.168.10.6", "192.168.10.40"
	long := strings.Repeat("a", 63) + ".example"
	mixes := map[string][]DroppedReport{
		"name on two ports and in DNS": {
			drop("example.com", 80, "tcp", nr, c1), drop("example.com", 443, "tcp", nr, c1),
			drop("example.com", 0, "dns", nr, c1, c2),
		},
		"DNS-only names": {
			drop("a.dnsonly.example", 0, "dns", nr, c1), drop("b.dnsonly.example", 0, "dns", nr, c2),
			drop("c.dnsonly.example", 443, "tcp", nr, c1), drop("solo.example", 0, "dns", nr, c3),
		},
		"wildcard siblings": {
			drop("a.x.example", 443, "tcp", nr, c1), drop("b.x.example", 443, "tcp", nr, c2),
			drop("c.x.example", 80, "tcp", nr, c1), drop("a.x.example", 80, "tcp", nr, c1),
			drop("a.x.example", 0, "dns", nr, c1, c3), drop("x.example", 443, "tcp", nr, c2),
			drop("d.x.example", 0, "dns", nr, c2), drop("x.example", 0, "dns", nr, c1),
		},
		"addresses": {
			drop("198.51.100.7", 443, "tcp", nr, c1), drop("198.51.100.7", 8443, "tcp", nr, c1),
			drop("198.51.100.8", 443, "tcp", nr, c2), drop("2001:db8::7", 443, "tcp", nr, c1),
			drop("2001:db8::7", 443, "udp", nr, c2), drop("203.0.113.5", 123, "udp", nr, c1, c2, c3),
		},
		"beside existing rules": {
			drop("api.partner.example", 8443, "tcp", policy.ReasonPort, c1),
			drop("api.partner.example", 443, "tcp", policy.ReasonClient, c3),
			drop("api.partner.example", 0, "dns", policy.ReasonClient, c3),
			drop("portal.partner.example", 443, "tcp", policy.ReasonClient, c3),
			drop("198.51.100.200", 2222, "tcp", policy.ReasonPort, c1),
			drop("new.partner.example", 443, "tcp", nr, c1),
		},
		"long names": {
			drop(long, 443, "tcp", nr, c1), drop(long, 80, "tcp", nr, c1), drop(long, 0, "dns", nr, c1),
			drop("b."+long, 443, "tcp", nr, c1), drop("c."+long, 443, "tcp", nr, c1),
		},
	}
	// Many clients: the rule is open to any, and still shadows nothing.
	var many []string
	for i := range 20 {
		many = append(many, fmt.Sprintf("192.168.10.%d", 100+i))
	}
	crowd := drop("crowd.example", 443, "tcp", nr, many[:maxFromClients]...)
	crowd.ClientCount, crowd.ClientsTruncated = len(many), true
	mixes["many clients"] = []DroppedReport{crowd, drop("crowd.example", 80, "tcp", nr, c1), drop("crowd.example", 0, "dns", nr, c2)}

	for name, drops := range mixes {
		t.Run(name, func(t *testing.T) {
			r := &Report{GeneratedAt: t0, Dropped: drops}
			var snip bytes.Buffer
			if err := r.WriteSuggestions(&snip); err != nil {
				t.Fatal(err)
			}
			eng, err := policy.Compile("pasted.yaml", []byte(suggestBase+snip.String()))
			if err != nil {
				t.Fatalf("the pasted suggestions do not compile: %v\n%s", err, snip.String())
			}
			for _, w := range eng.Warnings() {
				t.Errorf("warning: %s", w.Msg)
			}
			if t.Failed() {
				t.Logf("suggestions:\n%s", snip.String())
			}
			flowClients := map[string]map[string]bool{}
			for _, d := range drops {
				if d.Proto != "dns" {
					if flowClients[d.Dest] == nil {
						flowClients[d.Dest] = map[string]bool{}
					}
					for _, c := range d.Clients {
						flowClients[d.Dest][c] = true
					}
				}
			}
			for _, d := range drops {
				for _, c := range d.Clients {
					if fc := flowClients[d.Dest]; d.Proto == "dns" && fc != nil && !fc[c] {
						continue // only asked: no from: for it
					}
					in := policy.Input{Client: netip.MustParseAddr(c), Port: d.Port, Now: t0}
					if a, err := netip.ParseAddr(d.Dest); err == nil {
						in.Dest = a
					} else {
						in.Name, in.Dest = d.Dest, netip.MustParseAddr("203.0.113.77")
					}
					var dec policy.Decision
					if d.Proto == "dns" {
						dec = eng.DecideName(in)
					} else {
						in.Proto, _ = policy.ParseProto(d.Proto)
						dec = eng.Decide(in)
					}
					if !dec.Allowed() {
						t.Errorf("%s from %s to %s %d/%s still denied (%s)", d.Reason, c, d.Dest, d.Port, d.Proto, dec.Reason)
					}
				}
			}
		})
	}
}

// TestSuggestFromOnlyFlowClients: a client that only asked DNS for a name
// that others opened flows to is not given the rule's from: (nor counted
// in its clients); only the clients of the denied flows are. A name with
// no flow at all (the port is assumed) still lists the clients that asked.
func TestSuggestFromOnlyFlowClients(t *testing.T) {
	for _, reason := range []string{policy.ReasonNoRule, policy.ReasonClient} {
		r := &Report{GeneratedAt: t0, Dropped: []DroppedReport{
			{Dest: "api.vendor.example", Port: 443, Proto: "tcp", Flows: 3, Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: reason, FirstSeen: t0, LastSeen: t0},
			{Dest: "api.vendor.example", Proto: "dns", Queries: 4, Clients: []string{"192.168.10.5", "192.168.10.99"}, ClientCount: 2, Reason: reason, FirstSeen: t0, LastSeen: t0},
			{Dest: "only-asked.example", Proto: "dns", Queries: 1, Clients: []string{"192.168.10.7"}, ClientCount: 1, Reason: reason, FirstSeen: t0, LastSeen: t0},
		}}
		sugs, _ := r.Suggest()
		got := map[string][]string{}
		for _, s := range sugs {
			got[strings.Join(s.To, ",")] = s.From
			if s.To[0] == "api.vendor.example" && (s.Clients != 1 || s.Flows != 3 || s.Queries != 4) {
				t.Errorf("%s: %s: clients %d flows %d queries %d, want 1, 3, 4", reason, s.Name, s.Clients, s.Flows, s.Queries)
			}
		}
		if f := got["api.vendor.example"]; len(f) != 1 || f[0] != "192.168.10.5" {
			t.Errorf("%s: api.vendor.example from: %v, want only the client of the flows [192.168.10.5]", reason, f)
		}
		if f := got["only-asked.example"]; len(f) != 1 || f[0] != "192.168.10.7" {
			t.Errorf("%s: only-asked.example from: %v, want [192.168.10.7]", reason, f)
		}
	}
}

// TestSuggestFromKeepsResolvingClients: the clients of a name's flows
// that never asked the forwarder for it resolved it through another
// address: a LAN resolver that asks egressd (Pi-hole, AdGuard Home), the
// device's IPv6 address asking while it connects over IPv4. In enforce
// mode the forwarder decides the query by its asker's address, so a rule
// whose from: lists only the flows' clients refuses the resolution those
// flows need: the askers stay in from:. Where every flow client asked
// itself, a client that only asked still gets none
// (TestSuggestFromOnlyFlowClients).
func TestSuggestFromKeepsResolvingClients(t *testing.T) {
	for _, c := range []struct {
		what          string
		flows, askers []string
		want          []string
	}{
		{"lan-resolver", []string{"192.168.10.5", "192.168.10.6"}, []string{"192.168.10.53"}, []string{"192.168.10.5", "192.168.10.53", "192.168.10.6"}},
		{"dual-stack", []string{"192.168.10.5"}, []string{"fd00::5"}, []string{"192.168.10.5", "fd00::5"}},
		{"asked-itself", []string{"192.168.10.5"}, []string{"192.168.10.5", "192.168.10.99"}, []string{"192.168.10.5"}},
	} {
		r := &Report{GeneratedAt: t0, Dropped: []DroppedReport{
			{Dest: "api.vendor.example", Port: 443, Proto: "tcp", Flows: 3, Clients: c.flows, ClientCount: len(c.flows), Reason: policy.ReasonNoRule, FirstSeen: t0, LastSeen: t0},
			{Dest: "api.vendor.example", Proto: "dns", Queries: 4, Clients: c.askers, ClientCount: len(c.askers), Reason: policy.ReasonNoRule, FirstSeen: t0, LastSeen: t0},
		}}
		sugs, _ := r.Suggest()
		if len(sugs) != 1 {
			t.Fatalf("%s: suggestions %+v, want one", c.what, sugs)
		}
		got := slices.Clone(sugs[0].From)
		slices.Sort(got)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: from: %v, want %v", c.what, got, c.want)
		}
	}
}
