package dnsfilter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"egressd/audit"
	"egressd/policy"
)

const setFullZone = `
one.full.test. 300 IN A 192.0.2.22
multi.full.test. 300 IN A 192.0.2.20
multi.full.test. 300 IN A 192.0.2.21
two.full.test. 300 IN A 192.0.2.23
web.full.test. 300 IN A 192.0.2.24
cidr.full.test. 300 IN A 192.0.2.17
cidr.full.test. 300 IN A 192.0.2.40
in.full.test. 300 IN A 192.0.2.18
out.full.test. 300 IN A 192.0.2.40
meta.full.test. 300 IN A 169.254.169.254
`

// setFullPolicy: web's names go through the proxy (the firewall does not
// want them); ntp and sip feed learned sets.
const setFullPolicy = `version: 1
mode: enforce
rules:
  - name: web
    to: [web.full.test]
    ports: [443/tcp]
  - name: ntp
    to: ["*.full.test"]
    ports: [123/udp]
  - name: sip
    to: [two.full.test]
    ports: [5060/udp]
`

// fullErr is a firewall's refusal of one address by a full set.
type fullErr struct {
	rule string
	addr netip.Addr
	ok   bool
	prov bool // Provisional: judged with a ruleset other than the answer's policy's
}

func (e *fullErr) Provisional() bool { return e.prov }

func (e *fullErr) Error() string { return "full: " + e.rule + " " + e.addr.String() }
func (e *fullErr) Unreachable() (string, string, netip.Addr, bool) {
	return e.rule, "dns4_" + e.rule, e.addr, e.ok
}

// fullFirewall refuses the addresses in full[rule], as a firewall whose
// learned set for the rule is full of live addresses; enforced says
// whether that keeps the client from them (but those the rule's CIDR or
// "*" opens, as firewall.SetFullError says).
type fullFirewall struct {
	mu       sync.Mutex
	full     map[string][]netip.Addr
	enforced bool
	other    bool      // judged with an installed policy other than the answer's (a reload going in)
	wants    []string  // the rules with learned sets; nil: ntp and sip
	asked    []Learned // every address Learn was given, in order
	calls    int
}

func (f *fullFirewall) Wants(rule string) bool {
	if f.wants == nil {
		return rule == "ntp" || rule == "sip"
	}
	return slices.Contains(f.wants, rule)
}
func (f *fullFirewall) WantsAny() bool { return true }

func (f *fullFirewall) Learn(ctx context.Context, eng *policy.Engine, ls []Learned) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.asked = append(f.asked, ls...)
	var errs []error
	for _, l := range ls {
		if slices.Contains(f.full[l.Rule], l.Addr) {
			// Keeps the client out unless the rule opens the address
			// otherwise: the firewall judges that with its installed
			// policy (firewall.SetFullError), here the answer's.
			errs = append(errs, fmt.Errorf("learn: %w", &fullErr{l.Rule, l.Addr, f.enforced && !destOpens(eng, l.Rule, l.Addr), f.other}))
		}
	}
	return errors.Join(errs...)
}

// destOpens is firewall's: whether eng's rule of that name opens addr by
// a CIDR or "*" of its own.
func destOpens(eng *policy.Engine, rule string, addr netip.Addr) bool {
	for i, r := range eng.Rules() {
		if r.Name == rule {
			return eng.DestOpens(i, addr)
		}
	}
	return false
}

// learns returns how often Learn was called and the addresses it was
// given since the last learns, and forgets them.
func (f *fullFirewall) learns() (int, []netip.Addr) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.Addr
	for _, l := range f.asked {
		out = append(out, l.Addr)
	}
	n := f.calls
	f.calls, f.asked = 0, nil
	return n, out
}

func (f *fullFirewall) set(full map[string][]netip.Addr, enforced bool) {
	f.mu.Lock()
	f.full, f.enforced = full, enforced
	f.mu.Unlock()
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// TestSetFullWithheld: in enforce mode an address a full learned set
// refused for every rule that needs it, and that no proxied rule covers,
// is not given to the client: the answer leaves it out, or is SERVFAIL
// when nothing is left, with one canonical line naming the rule and set,
// and a count. Addresses another path reaches stay; audit mode never
// changes an answer; room again gives the whole answer.
func TestSetFullWithheld(t *testing.T) {
	up := newFakeUpstream(t, setFullZone)
	fw := &fullFirewall{}
	store := compile(t, setFullPolicy)
	logs := &syncBuffer{}
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: store, Firewall: fw, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	full := map[string][]netip.Addr{
		"ntp": addrs("192.0.2.22", "192.0.2.20", "192.0.2.23", "192.0.2.24"),
		"sip": nil,
	}
	fw.set(full, true)

	for _, proto := range []string{"udp", "tcp"} {
		for i := range 2 { // the second a cache hit: the refusal remembered
			r := ask(t, proto, ts.Addr, "one.full.test.", dns.TypeA, true)
			if r.Rcode != dns.RcodeServerFailure || len(answerAddrs(r)) != 0 {
				t.Errorf("%s #%d one.full.test, its only address refused: rcode %s, %v; want SERVFAIL", proto, i, dns.RcodeToString[r.Rcode], answerAddrs(r))
			}
			if _, text, ok := ede(r); !ok || !strings.Contains(text, "learned set full") {
				t.Errorf("%s one.full.test: EDE %q, want the full set named", proto, text)
			}
			r = ask(t, proto, ts.Addr, "multi.full.test.", dns.TypeA, false)
			if got := answerAddrs(r); r.Rcode != dns.RcodeSuccess || !slices.Equal(got, addrs("192.0.2.21")) {
				t.Errorf("%s #%d multi.full.test, 192.0.2.20 refused: rcode %s, %v; want 192.0.2.21", proto, i, dns.RcodeToString[r.Rcode], got)
			}
		}
	}
	// sip's set took two.full.test's address: UDP 5060 reaches it.
	// web.full.test goes through the proxy too.
	for _, name := range []string{"two.full.test.", "web.full.test."} {
		if r := ask(t, "udp", ts.Addr, name, dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
			t.Errorf("%s, refused by ntp but reached by another rule: rcode %s, %v; want its address", name, dns.RcodeToString[r.Rcode], answerAddrs(r))
		}
	}
	if n := counterValue(ts.m.setFullServfail); n != 4 {
		t.Errorf("servfail count %v, want 4", n)
	}
	if n := counterValue(ts.m.setFullTrimmed); n != 4 {
		t.Errorf("trimmed count %v, want 4", n)
	}
	// The line is written once the answer is: wait for the last.
	oneLines := func() []string { return nameLines(logs, "one.full.test") }
	waitFor(t, func() bool { return len(oneLines()) >= 4 })
	lines := oneLines()
	for _, l := range lines {
		// The set's first refusal in the interval is a warning
		// (TestSetFullRemembered): UDP's miss. Told by proto and
		// cache_hit, not by order: each line is written after its
		// answer, by the goroutine that sent it.
		level := `"level":"INFO"`
		if strings.Contains(l, `"proto":"udp"`) && strings.Contains(l, `"cache_hit":false`) {
			level = `"level":"WARN"`
		}
		if !strings.Contains(l, `"set_full":"ntp/dns4_ntp"`) || !strings.Contains(l, `"withheld":"192.0.2.22"`) || !strings.Contains(l, `"rcode":"SERVFAIL"`) || !strings.Contains(l, level) {
			t.Errorf("line %s\nwant %s, SERVFAIL, set_full ntp/dns4_ntp, withheld 192.0.2.22", l, level)
		}
	}
	if len(lines) != 4 {
		t.Errorf("%d lines for one.full.test's 4 answers, want one each\n%s", len(lines), logs.String())
	}

	// A refusal that keeps nobody out (the firewall in audit mode, which
	// a reload puts in: a new engine, the refusal not remembered).
	store.Swap(compile(t, setFullPolicy).Load())
	fw.set(full, false)
	if r := ask(t, "udp", ts.Addr, "one.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
		t.Errorf("one.full.test, refused by an audit-mode firewall: rcode %s, %v; want its address", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	// Audit mode never changes an answer.
	fw.set(full, true)
	eng, err := policy.Compile("p.yaml", []byte(strings.Replace(setFullPolicy, "mode: enforce", "mode: audit", 1)))
	if err != nil {
		t.Fatal(err)
	}
	store.Swap(eng)
	if r := ask(t, "udp", ts.Addr, "one.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
		t.Errorf("one.full.test in audit mode: rcode %s, %v; want its address", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	// Room again: the whole answer.
	store.Swap(compile(t, setFullPolicy).Load())
	fw.set(nil, true)
	if r := ask(t, "udp", ts.Addr, "multi.full.test.", dns.TypeA, false); len(answerAddrs(r)) != 2 {
		t.Errorf("multi.full.test with room: %v, want both", answerAddrs(r))
	}
}

// TestSetFullDuplicateRecord: an answer that repeats an address (RFC 2181
// §5 says not to; a hostile or sloppy server does) asks the firewall for
// it twice per rule, and a full set refuses it twice. The address sip's
// set took is still reachable: it stays in the answer.
func TestSetFullDuplicateRecord(t *testing.T) {
	up := newFakeUpstream(t, "two.full.test. 300 IN A 192.0.2.23\ntwo.full.test. 300 IN A 192.0.2.23\n")
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.23")}, true)
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: compile(t, setFullPolicy), Firewall: fw})
	r := ask(t, "udp", ts.Addr, "two.full.test.", dns.TypeA, false)
	if got := answerAddrs(r); r.Rcode != dns.RcodeSuccess || len(got) == 0 {
		t.Errorf("two.full.test, refused by ntp twice but taken by sip: rcode %s, %v; want its address", dns.RcodeToString[r.Rcode], got)
	}
}

// slowFullFirewall refuses 192.0.2.20 for ntp (a full set) and does not
// finish writing 192.0.2.21 before ctx is done, as firewall.LearnAll
// waiting on a slow netlink batch: its error joins both.
type slowFullFirewall struct{}

func (slowFullFirewall) Wants(rule string) bool { return rule == "ntp" }
func (slowFullFirewall) WantsAny() bool         { return true }
func (slowFullFirewall) Learn(ctx context.Context, eng *policy.Engine, ls []Learned) error {
	var errs []error
	slow := false
	for _, l := range ls {
		switch l.Addr {
		case netip.MustParseAddr("192.0.2.20"):
			errs = append(errs, &fullErr{rule: l.Rule, addr: l.Addr, ok: true})
		case netip.MustParseAddr("192.0.2.21"):
			slow = true
		}
	}
	if slow {
		<-ctx.Done()
		errs = append(errs, fmt.Errorf("learn: %w", ctx.Err()))
	}
	return errors.Join(errs...)
}

// TestSetFullWithheldOnTimeout: the wait for one address timing out does
// not give the client another that a full set refused for good.
func TestSetFullWithheldOnTimeout(t *testing.T) {
	up := newFakeUpstream(t, setFullZone)
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true, LearnTimeout: 20 * time.Millisecond},
		Deps{Policy: compile(t, setFullPolicy), Firewall: slowFullFirewall{}})
	r := ask(t, "udp", ts.Addr, "multi.full.test.", dns.TypeA, false)
	if got := answerAddrs(r); r.Rcode != dns.RcodeSuccess || !slices.Equal(got, addrs("192.0.2.21")) {
		t.Errorf("multi.full.test, 192.0.2.20 refused, 192.0.2.21 slow: rcode %s, %v; want 192.0.2.21", dns.RcodeToString[r.Rcode], got)
	}
	if n := counterValue(ts.m.learnTimeout); n != 1 {
		t.Errorf("learn timeouts %v, want 1", n)
	}
}

// BenchmarkForwarderCachedSetFull is BenchmarkForwarderCached (filter off)
// for a name a rule's learned set takes ("room": hits pass the gate on
// its mark) and for one whose set is full ("full": every hit asks the
// firewall again and trims the answer). The firewall is fullFirewall, not
// firewall/'s: its lock and bookkeeping are not in the figure.
//
//	go test ./dnsfilter -run '^$' -bench 'ForwarderCachedSetFull$' -benchtime 100000x
func BenchmarkForwarderCachedSetFull(b *testing.B) {
	for _, bc := range []struct {
		name string
		full []netip.Addr
	}{{"room", nil}, {"full", addrs("192.0.2.20")}} {
		b.Run(bc.name, func(b *testing.B) {
			up := newFakeUpstream(b, setFullZone)
			fw := &fullFirewall{}
			fw.set(map[string][]netip.Addr{"ntp": bc.full}, true)
			ts := startServer(b, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
				Deps{Policy: compile(b, setFullPolicy), Firewall: fw})
			if r := ask(b, "udp", ts.Addr, "multi.full.test.", dns.TypeA, false); len(answerAddrs(r)) != 2-len(bc.full) {
				b.Fatalf("answer %v", answerAddrs(r))
			}
			benchUDPQueries(b, ts.Addr, "multi.full.test.")
		})
	}
}

// TestSetFullCNAME: the addresses at the end of a CNAME chain are
// withheld as the name's own (the chain is kept over what is left), and
// none left is SERVFAIL, not a CNAME pointing at nothing; AAAA as A.
func TestSetFullCNAME(t *testing.T) {
	up := newFakeUpstream(t, `
alias.full.test. 300 IN CNAME edge.cdn.test.
edge.cdn.test. 300 IN A 192.0.2.30
edge.cdn.test. 300 IN A 192.0.2.31
edge.cdn.test. 300 IN AAAA 2001:db8::30
gone.full.test. 300 IN CNAME gone.cdn.test.
gone.cdn.test. 300 IN A 192.0.2.32
`)
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.30", "192.0.2.32", "2001:db8::30")}, true)
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: compile(t, setFullPolicy), Firewall: fw})
	r := ask(t, "udp", ts.Addr, "alias.full.test.", dns.TypeA, true)
	if got := answerAddrs(r); r.Rcode != dns.RcodeSuccess || !slices.Equal(got, addrs("192.0.2.31")) || len(r.Answer) != 2 {
		t.Errorf("alias.full.test A: rcode %s, %v; want the CNAME and 192.0.2.31", dns.RcodeToString[r.Rcode], r.Answer)
	}
	for _, c := range []struct {
		name  string
		qtype uint16
	}{{"alias.full.test.", dns.TypeAAAA}, {"gone.full.test.", dns.TypeA}} {
		r := ask(t, "udp", ts.Addr, c.name, c.qtype, true)
		if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 {
			t.Errorf("%s %s, its only address refused: rcode %s, %v; want SERVFAIL", c.name, dns.TypeToString[c.qtype], dns.RcodeToString[r.Rcode], r.Answer)
		}
	}
}

// TestSetFullTrimmedNotAuthenticated: a trimmed answer is not the RRset
// the zone signed, so it does not go out with the upstream's AD bit (RFC
// 4035 §3.2.3: AD vouches for every RRset of the answer as authentic); an
// answer passed on whole keeps it.
func TestSetFullTrimmedNotAuthenticated(t *testing.T) {
	up := newFakeUpstream(t, setFullZone)
	ad := func(m *dns.Msg, _ string) { m.AuthenticatedData = true }
	up.mangle.Store(&ad)
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.20")}, true)
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: compile(t, setFullPolicy), Firewall: fw})
	if r := ask(t, "udp", ts.Addr, "web.full.test.", dns.TypeA, true); !r.AuthenticatedData {
		t.Fatalf("web.full.test, passed on whole: AD clear, want the upstream's AD")
	}
	for i := range 2 {
		r := ask(t, "udp", ts.Addr, "multi.full.test.", dns.TypeA, true)
		if got := answerAddrs(r); !slices.Equal(got, addrs("192.0.2.21")) || r.AuthenticatedData {
			t.Errorf("#%d multi.full.test trimmed: %v, AD %v; want 192.0.2.21, AD clear", i, got, r.AuthenticatedData)
		}
	}
}

// TestSetFullCIDR: a rule with names and a CIDR (or "*", 0.0.0.0/0) opens
// an address its CIDR holds whatever its learned set took: the firewall's
// accept for the CIDR lets the client's packets out. Its full set refusing
// the address does not withhold it; an address only a full set would have
// opened is withheld still, and so is a guarded one inside a CIDR wider
// than its range (the accept for such a CIDR leaves the range out).
func TestSetFullCIDR(t *testing.T) {
	rule := func(name, to, ports string) string {
		return "  - name: " + name + "\n    to: " + to + "\n    ports: [" + ports + "]\n"
	}
	head := "version: 1\nmode: enforce\nrules:\n"
	all := addrs("192.0.2.17", "192.0.2.18", "192.0.2.40", "169.254.169.254")
	for _, c := range []struct {
		what   string
		policy string
		full   map[string][]netip.Addr
		name   string
		want   []netip.Addr // nil: SERVFAIL
	}{
		{"names and a CIDR holding one of two", head + rule("ntp", `["*.full.test", 192.0.2.16/30]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "cidr.full.test.", addrs("192.0.2.17")},
		{"names and a CIDR holding the only one", head + rule("ntp", `["*.full.test", 192.0.2.16/30]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "in.full.test.", addrs("192.0.2.18")},
		{"names and a CIDR holding none", head + rule("ntp", `["*.full.test", 192.0.2.16/30]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "out.full.test.", nil},
		{"names and *", head + rule("ntp", `["*", "*.full.test"]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "out.full.test.", addrs("192.0.2.40")},
		{"names and 0.0.0.0/0", head + rule("ntp", `["*.full.test", 0.0.0.0/0]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "out.full.test.", addrs("192.0.2.40")},
		// Not "*": the firewall keeps no learned set for a rule with
		// "*" (Wants is false), so no set of its refuses an address and
		// withhold never asks what its "*" opens (policy's and
		// firewall's TestDestOpens* hold "*" off the guarded ranges). A
		// CIDR wider than a guarded range is the case a set serves:
		// 128.0.0.0/1 leaves the rule its IPv4 set, and its accept
		// leaves out 169.254.0.0/16.
		{"a CIDR wider than a guarded range does not open it", head + rule("ntp", `["*.full.test", 128.0.0.0/1]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "meta.full.test.", nil},
		{"a CIDR inside a guarded range opens it", head + rule("ntp", `["*.full.test", 169.254.169.254/32]`, "123/udp"),
			map[string][]netip.Addr{"ntp": all}, "meta.full.test.", addrs("169.254.169.254")},
		{"another rule's CIDR, both sets full", head + rule("ntp", `["*.full.test"]`, "123/udp") + rule("sip", `[in.full.test, 192.0.2.16/30]`, "5060/udp"),
			map[string][]netip.Addr{"ntp": all, "sip": all}, "in.full.test.", addrs("192.0.2.18")},
	} {
		t.Run(c.what, func(t *testing.T) {
			up := newFakeUpstream(t, setFullZone)
			fw := &fullFirewall{wants: []string{"ntp", "sip"}}
			fw.set(c.full, true)
			ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
				Deps{Policy: compile(t, c.policy), Firewall: fw})
			for _, proto := range []string{"udp", "tcp"} {
				r := ask(t, proto, ts.Addr, c.name, dns.TypeA, true)
				got := answerAddrs(r)
				switch {
				case c.want == nil && (r.Rcode != dns.RcodeServerFailure || len(got) != 0):
					t.Errorf("%s %s: rcode %s, %v; want SERVFAIL", proto, c.name, dns.RcodeToString[r.Rcode], got)
				case c.want != nil && (r.Rcode != dns.RcodeSuccess || !slices.Equal(got, c.want)):
					t.Errorf("%s %s: rcode %s, %v; want %v", proto, c.name, dns.RcodeToString[r.Rcode], got, c.want)
				}
			}
		})
	}
}

// TestSetFullUndecodable: an answer withholdAnswer cannot unpack (here the
// rendered answer cut short by withheldWire) is SERVFAIL with the EDNS
// error, logged at Error with why and counted, not silence: the client
// got no answer and waited out its timeout. UDP's miss and hit (the fast
// path's query, never unpacked) and TCP's; the answer carries the
// question as the client spelled it.
func TestSetFullUndecodable(t *testing.T) {
	up := newFakeUpstream(t, setFullZone)
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.20", "192.0.2.22")}, true)
	logs := &syncBuffer{}
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, UDPReaders: 2, ClientRate: -1, Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: compile(t, setFullPolicy), Firewall: fw, Sink: &recSink{}, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	s.withheldWire = func(w []byte) []byte { return w[:len(w)-1] }
	runServer(t, s, nil)
	addr := s.Addrs()[0].String()
	n := 0
	for _, proto := range []string{"udp", "udp", "tcp"} {
		for _, name := range []string{"MuLtI.full.test.", "one.full.test."} {
			n++
			r, err := tryAsk(proto, addr, name, dns.TypeA, true)
			if err != nil {
				t.Errorf("%s %s, its answer undecodable: %v; want SERVFAIL", proto, name, err)
				continue
			}
			if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 || len(r.Question) != 1 || r.Question[0].Name != name {
				t.Errorf("%s %s, its answer undecodable: rcode %s, %v, question %v; want SERVFAIL to the question asked", proto, name, dns.RcodeToString[r.Rcode], r.Answer, r.Question)
			}
			if _, text, ok := ede(r); !ok || !strings.Contains(text, "learned set full") {
				t.Errorf("%s %s: EDE %q, want the full set named", proto, name, text)
			}
		}
	}
	if got := counterValue(s.m.setFullServfail); got != float64(n) {
		t.Errorf("servfail count %v, want %d", got, n)
	}
	// The line is written once the answer is: wait for the last.
	multi := func() (out []string) {
		for _, l := range strings.Split(logs.String(), "\n") {
			if strings.Contains(l, `"name":"multi.full.test"`) {
				out = append(out, l)
			}
		}
		return out
	}
	waitFor(t, func() bool { return len(multi()) >= 3 })
	lines := multi()
	for _, l := range lines {
		if !strings.Contains(l, `"level":"ERROR"`) || !strings.Contains(l, `does not unpack`) || !strings.Contains(l, `"rcode":"SERVFAIL"`) {
			t.Errorf("line %s\nwant ERROR, SERVFAIL, the unpack error", l)
		}
	}
	if len(lines) != 3 {
		t.Errorf("%d lines for multi.full.test's 3 answers, want 3\n%s", len(lines), logs.String())
	}
}

// startSetFull starts a forwarder for setFullZone and setFullPolicy with
// fw, logging JSON to logs, that remembers a full set's refusal for
// recheck.
func startSetFull(t *testing.T, fw Firewall, logs *syncBuffer, recheck time.Duration) *Server {
	t.Helper()
	up := newFakeUpstream(t, setFullZone)
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, UDPReaders: 2, ClientRate: -1, Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: compile(t, setFullPolicy), Firewall: fw, Sink: &recSink{}, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	s.fullRecheck = recheck
	runServer(t, s, nil)
	return s
}

// TestSetFullRemembered: cache hits of a name whose set stays full do not
// ask the firewall again while the refusal is remembered (each would take
// its lock, and write a warning): the answers are withheld as the first
// was, one canonical line each with set_full and withheld, a warning only
// for the first refusal of the set in the interval, the others at info.
func TestSetFullRemembered(t *testing.T) {
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22", "192.0.2.20")}, true)
	logs := &syncBuffer{}
	s := startSetFull(t, fw, logs, time.Hour)
	addr := s.Addrs()[0].String()
	for i := range 10 {
		proto := []string{"udp", "tcp"}[i%2]
		r := ask(t, proto, addr, "one.full.test.", dns.TypeA, true)
		if r.Rcode != dns.RcodeServerFailure || len(answerAddrs(r)) != 0 {
			t.Errorf("%s #%d one.full.test: rcode %s, %v; want SERVFAIL", proto, i, dns.RcodeToString[r.Rcode], answerAddrs(r))
		}
	}
	if n, got := fw.learns(); n != 1 {
		t.Errorf("firewall asked %d times (%v) for 10 answers of one.full.test, want once", n, got)
	}
	for i := range 5 {
		if r := ask(t, "udp", addr, "multi.full.test.", dns.TypeA, false); !slices.Equal(answerAddrs(r), addrs("192.0.2.21")) {
			t.Errorf("#%d multi.full.test: %v, want 192.0.2.21", i, answerAddrs(r))
		}
	}
	if n, got := fw.learns(); n != 1 {
		t.Errorf("firewall asked %d times (%v) for 5 answers of multi.full.test, want once", n, got)
	}
	lines := func() []string {
		return append(nameLines(logs, "one.full.test"), nameLines(logs, "multi.full.test")...)
	}
	waitFor(t, func() bool { return len(lines()) >= 15 })
	warn := 0
	for _, l := range lines() {
		if !strings.Contains(l, `"set_full":"ntp/dns4_ntp"`) || !strings.Contains(l, `"withheld":"192.0.2.2`) {
			t.Errorf("line %s\nwant set_full ntp/dns4_ntp and withheld", l)
		}
		if strings.Contains(l, `"level":"WARN"`) {
			warn++
		} else if !strings.Contains(l, `"level":"INFO"`) {
			t.Errorf("line %s\nwant WARN or INFO", l)
		}
	}
	if warn != 1 {
		t.Errorf("%d warnings for ntp/dns4_ntp's refusals in one interval, want 1\n%s", warn, logs.String())
	}
}

// TestSetFullRecheck: once the remembered refusal is older than the
// interval, a hit asks the firewall again for the refused addresses only
// (the ones it took it keeps until they expire), and gives the whole
// answer when the set has room again.
func TestSetFullRecheck(t *testing.T) {
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.20")}, true)
	recheck := 50 * time.Millisecond
	s := startSetFull(t, fw, &syncBuffer{}, recheck)
	addr := s.Addrs()[0].String()
	if r := ask(t, "udp", addr, "multi.full.test.", dns.TypeA, false); !slices.Equal(answerAddrs(r), addrs("192.0.2.21")) {
		t.Fatalf("multi.full.test: %v, want 192.0.2.21", answerAddrs(r))
	}
	if _, got := fw.learns(); !slices.Equal(got, addrs("192.0.2.20", "192.0.2.21")) {
		t.Errorf("first answer asked the firewall for %v, want both", got)
	}
	time.Sleep(2 * recheck)
	if r := ask(t, "udp", addr, "multi.full.test.", dns.TypeA, false); !slices.Equal(answerAddrs(r), addrs("192.0.2.21")) {
		t.Errorf("multi.full.test again: %v, want 192.0.2.21", answerAddrs(r))
	}
	if n, got := fw.learns(); n != 1 || !slices.Equal(got, addrs("192.0.2.20")) {
		t.Errorf("recheck asked the firewall %d times for %v, want once for 192.0.2.20 (192.0.2.21 is held)", n, got)
	}
	fw.set(nil, true)
	time.Sleep(2 * recheck)
	for i := range 3 {
		if r := ask(t, "udp", addr, "multi.full.test.", dns.TypeA, false); len(answerAddrs(r)) != 2 {
			t.Errorf("#%d multi.full.test with room again: %v, want both", i, answerAddrs(r))
		}
	}
	if n, got := fw.learns(); n != 1 || !slices.Equal(got, addrs("192.0.2.20")) {
		t.Errorf("with room: firewall asked %d times for %v, want once for 192.0.2.20", n, got)
	}
}

// histCount is the number of observations of a histogram's child.
func histCount(h prometheus.Observer) uint64 {
	var m dto.Metric
	if err := h.(prometheus.Metric).Write(&m); err != nil {
		return 0
	}
	return m.GetHistogram().GetSampleCount()
}

// TestSetFullServfailPath: the SERVFAIL of an answer whose addresses full
// sets refused is timed under the path the answer came by (upstream,
// cache: the time includes the exchange and the firewall's wait), as a
// trimmed answer is, not as a local answer (README's metric table:
// "local" is an answer made here without asking upstream).
func TestSetFullServfailPath(t *testing.T) {
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22")}, true)
	s := startSetFull(t, fw, &syncBuffer{}, time.Hour)
	addr := s.Addrs()[0].String()
	for range 2 { // a miss, then a hit
		if r := ask(t, "udp", addr, "one.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("one.full.test: %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
		}
	}
	waitFor(t, func() bool { return histCount(s.durCache)+histCount(s.durUpstream)+histCount(s.durLocal) >= 2 })
	if up, hit, local := histCount(s.durUpstream), histCount(s.durCache), histCount(s.durLocal); up != 1 || hit != 1 || local != 0 {
		t.Errorf("query_duration_seconds upstream %d, cache %d, local %d; want 1, 1, 0", up, hit, local)
	}
}

// setFullClients: ntp's set feeds 127.0.0.1's answers, sip's 127.0.0.2's,
// for the same names.
const setFullClients = `version: 1
mode: enforce
rules:
  - name: ntp
    from: [127.0.0.1]
    to: ["*.full.test"]
    ports: [123/udp]
  - name: sip
    from: [127.0.0.2]
    to: ["*.full.test"]
    ports: [5060/udp]
`

// startSetFullClock is startSetFull with setFullClients and a clock the
// test moves forward (by adding to skew).
func startSetFullClock(t *testing.T, fw Firewall, recheck time.Duration, skew *atomic.Int64) *Server {
	t.Helper()
	up := newFakeUpstream(t, setFullZone)
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, UDPReaders: 2, ClientRate: -1, Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: compile(t, setFullClients), Firewall: fw, Sink: &recSink{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	s.fullRecheck = recheck
	s.now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	runServer(t, s, nil)
	return s
}

// TestSetFullRecheckOtherClient: a hit of a client whose rules the
// refusal is not of (sip's 127.0.0.2) does not renew another rule's
// remembered refusal (ntp's): 127.0.0.1's first hit after the interval
// asks the firewall again. It did renew it (the mark's one "until"):
// a sip client asking the name every second kept ntp's clients from an
// address the set had room for, without end.
func TestSetFullRecheckOtherClient(t *testing.T) {
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22")}, true)
	var skew atomic.Int64
	recheck := 100 * time.Second // 2.25 of them within the answer's TTL (300 s)
	s := startSetFullClock(t, fw, recheck, &skew)
	addr := s.Addrs()[0].String()
	if r := exchangeFrom(t, "127.0.0.1", "udp", addr, "one.full.test.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("ntp client: %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	fw.set(nil, true) // room again
	for i := range 3 {
		skew.Add(int64(recheck) * 3 / 4)
		if r := exchangeFrom(t, "127.0.0.2", "udp", addr, "one.full.test.", dns.TypeA); !slices.Equal(answerAddrs(r), addrs("192.0.2.22")) {
			t.Errorf("#%d sip client: %s %v, want 192.0.2.22", i, dns.RcodeToString[r.Rcode], answerAddrs(r))
		}
		// 1.5 intervals after the refusal, and on.
		if i == 0 {
			continue
		}
		if r := exchangeFrom(t, "127.0.0.1", "udp", addr, "one.full.test.", dns.TypeA); !slices.Equal(answerAddrs(r), addrs("192.0.2.22")) {
			t.Errorf("#%d ntp client %v after the refusal, room again: %s %v, want 192.0.2.22",
				i, time.Duration(skew.Load()), dns.RcodeToString[r.Rcode], answerAddrs(r))
		}
	}
}

// TestSetFullConcurrentHits: hits of two clients of different rules at
// once, refusals remembered for a moment so marks are replaced while
// others read them (run with -race): the ntp client, whose set stays
// full, is never given the address, the sip client always is.
func TestSetFullConcurrentHits(t *testing.T) {
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22")}, true)
	var skew atomic.Int64
	s := startSetFullClock(t, fw, time.Millisecond, &skew)
	addr := s.Addrs()[0].String()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src := []string{"127.0.0.1", "127.0.0.2"}[g%2]
			for range 25 {
				r, err := tryAskFrom(src, addr, "one.full.test.")
				if err != nil {
					t.Errorf("%s: %v", src, err)
					return
				}
				got := answerAddrs(r)
				if src == "127.0.0.1" && (r.Rcode != dns.RcodeServerFailure || len(got) != 0) {
					t.Errorf("ntp client (set full): %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], got)
				}
				if src == "127.0.0.2" && !slices.Equal(got, addrs("192.0.2.22")) {
					t.Errorf("sip client: %s %v, want 192.0.2.22", dns.RcodeToString[r.Rcode], got)
				}
			}
		}()
	}
	wg.Wait()
}

// tryAskFrom is exchangeFrom over UDP, returning its error (for
// goroutines other than the test's).
func tryAskFrom(src, addr, name string) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	c := &dns.Client{Net: "udp", Timeout: 6 * time.Second, Dialer: &net.Dialer{Timeout: 6 * time.Second, LocalAddr: &net.UDPAddr{IP: net.ParseIP(src)}}}
	r, _, err := c.Exchange(m, addr)
	return r, err
}

// TestSetFullEventEnforced: the event and line of an answer enforcement
// changed (a full set's address left out: trimmed, or SERVFAIL) say
// enforced, under the allow verdict and rule the policy gave; one no
// address was left out of, and audit mode's, say not. The report counts
// the queries as the rule's (the policy allowed them), none as a drop.
func TestSetFullEventEnforced(t *testing.T) {
	up := newFakeUpstream(t, setFullZone)
	fw := &fullFirewall{}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22", "192.0.2.20")}, true)
	store := compile(t, setFullPolicy)
	logs := &syncBuffer{}
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, AllowPrivateAnswers: true},
		Deps{Policy: store, Firewall: fw, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	for _, c := range []struct {
		name     string
		rcode    int
		enforced bool
	}{
		{"one.full.test", dns.RcodeServerFailure, true},
		{"multi.full.test", dns.RcodeSuccess, true}, // trimmed
		{"in.full.test", dns.RcodeSuccess, false},
	} {
		for i := range 2 { // a miss, then a hit (the refusal remembered)
			if r := ask(t, "udp", ts.Addr, c.name+".", dns.TypeA, false); r.Rcode != c.rcode {
				t.Fatalf("%s #%d: %s, want %s", c.name, i, dns.RcodeToString[r.Rcode], dns.RcodeToString[c.rcode])
			}
			var ev audit.Event
			waitFor(t, func() bool {
				evs := 0
				for _, e := range ts.Sink.Events() {
					if e.Name == c.name {
						evs++
						ev = e
					}
				}
				return evs == i+1
			})
			if ev.Enforced != c.enforced || ev.Verdict != policy.Allow || ev.Rule != "ntp" {
				t.Errorf("%s #%d: event enforced %v, verdict %s, rule %s; want enforced %v, allow, ntp", c.name, i, ev.Enforced, ev.Verdict, ev.Rule, c.enforced)
			}
		}
		waitFor(t, func() bool { return len(nameLines(logs, c.name)) == 2 })
		for _, l := range nameLines(logs, c.name) {
			if want := fmt.Sprintf(`"enforced":%v`, c.enforced); !strings.Contains(l, want) {
				t.Errorf("line %s\nwant %s", l, want)
			}
		}
	}
	led := audit.NewLedger(store.Load(), audit.LedgerOptions{})
	for _, ev := range ts.Sink.Events() {
		led.Emit(ev)
	}
	rep := led.Report(audit.ReportOptions{})
	if len(rep.Dropped) != 0 {
		t.Errorf("report drops %+v, want none (the policy allowed every query)", rep.Dropped)
	}
	for _, r := range rep.Rules {
		if r.Name == "ntp" && r.Queries != 6 {
			t.Errorf("report: ntp credited %d queries, want 6", r.Queries)
		}
	}

	// Audit mode never changes an answer: not enforced.
	eng, err := policy.Compile("p.yaml", []byte(strings.Replace(setFullPolicy, "mode: enforce", "mode: audit", 1)))
	if err != nil {
		t.Fatal(err)
	}
	store.Swap(eng)
	if r := ask(t, "udp", ts.Addr, "one.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("one.full.test in audit mode: %s", dns.RcodeToString[r.Rcode])
	}
	waitFor(t, func() bool { return len(nameLines(logs, "one.full.test")) == 3 })
	if ev, _ := ts.Sink.find("one.full.test"); ev.Enforced || ev.Mode != policy.ModeAudit {
		t.Errorf("one.full.test in audit mode: event enforced %v, mode %s; want false, audit", ev.Enforced, ev.Mode)
	}
}

// TestSetFullProvisionalNotRemembered: a refusal the firewall judged with
// a ruleset other than the answer's policy's (Provisional: a reload going
// in, whose ruleset may open or close the address at once) is not
// remembered for fullRecheck: the next hit asks the firewall again, where
// a settled refusal is remembered (cmd/egressd
// TestSetFullAnswerReloadRemembered: the hit gave an address the new
// ruleset drops).
func TestSetFullProvisionalNotRemembered(t *testing.T) {
	for _, other := range []bool{false, true} {
		fw := &fullFirewall{}
		fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22")}, true)
		fw.other = other
		var skew atomic.Int64
		s := startSetFullClock(t, fw, time.Hour, &skew)
		addr := s.Addrs()[0].String()
		for i := range 2 {
			if r := exchangeFrom(t, "127.0.0.1", "udp", addr, "one.full.test.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
				t.Errorf("provisional %v, #%d: %s %v, want SERVFAIL", other, i, dns.RcodeToString[r.Rcode], answerAddrs(r))
			}
			n, _ := fw.learns()
			want := 1
			if i == 1 && !other {
				want = 0 // remembered for the hour
			}
			if n != want {
				t.Errorf("provisional %v, #%d: the firewall asked %d times, want %d", other, i, n, want)
			}
		}
	}
}

// TestSetFullWarnedReload: the sets whose refusals were warned of
// (Server.fullWarned) are the running policy's: a reload forgets the
// others, so that the map holds at most two sets a rule whatever the
// reloads before named, and the first refusal of a set after a reload is
// a warning again, as the reload asks the firewall everything again.
// Before, the map was pruned only past 64 sets: each reload that renamed
// a rule left its sets in it, and a reload kept a set's refusals quiet.
func TestSetFullWarnedReload(t *testing.T) {
	const reloads = 10
	fw := &fullFirewall{full: map[string][]netip.Addr{}, enforced: true}
	for i := range reloads {
		name := fmt.Sprintf("ntp%d", i)
		fw.wants = append(fw.wants, name)
		fw.full[name] = addrs("192.0.2.22")
	}
	logs := &syncBuffer{}
	s := startSetFull(t, fw, logs, time.Hour)
	addr := s.Addrs()[0].String()
	reload := func(i int) {
		t.Helper()
		eng, err := policy.Compile("p", []byte(strings.ReplaceAll(setFullPolicy, "name: ntp", fmt.Sprintf("name: ntp%d", i))))
		if err != nil {
			t.Fatal(err)
		}
		s.pol.Swap(eng)
		if r := ask(t, "udp", addr, "one.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeServerFailure {
			t.Errorf("reload %d: one.full.test: %s %v, want SERVFAIL", i, dns.RcodeToString[r.Rcode], answerAddrs(r))
		}
	}
	for i := range reloads {
		reload(i)
	}
	reload(reloads - 1) // the same policy again: a reload all the same
	s.fullMu.Lock()
	warned := slices.Sorted(maps.Keys(s.fullWarned))
	s.fullMu.Unlock()
	if rules := len(s.pol.Load().Rules()); len(warned) > 2*rules {
		t.Errorf("%d sets remembered as warned of after %d reloads, want at most %d (two a rule): %v", len(warned), reloads+1, 2*rules, warned)
	}
	waitFor(t, func() bool { return len(nameLines(logs, "one.full.test")) >= reloads+1 })
	warn := 0
	for _, l := range nameLines(logs, "one.full.test") {
		if strings.Contains(l, `"level":"WARN"`) {
			warn++
		}
	}
	if warn != reloads+1 {
		t.Errorf("%d warnings for %d refusals each the first after a reload, want %d\n%s", warn, reloads+1, reloads+1, logs.String())
	}
}

// heldFullFirewall is a fullFirewall whose Learn under hold waits, once
// it has said so on entered, until release is closed.
type heldFullFirewall struct {
	*fullFirewall
	hold    atomic.Pointer[policy.Engine]
	entered chan struct{}
	release chan struct{}
}

func (f *heldFullFirewall) Learn(ctx context.Context, eng *policy.Engine, ls []Learned) error {
	if eng == f.hold.Load() {
		close(f.entered)
		<-f.release
	}
	return f.fullFirewall.Learn(ctx, eng, ls)
}

// TestSetFullWarnedInFlightReload: a query decided under the policy a
// reload replaced, whose firewall answer lands after the first refusal
// under the new policy was warned of, neither forgets the sets warned of
// nor warns: it is not the running policy's (warnFull compares with the
// Store's), and the set's refusal was a warning already in the interval.
// A later refusal of the same set under the running policy is quiet too.
// Had the late query taken its policy for a new one, it would have
// cleared the map and warned, and the next query under the running
// policy, finding its policy changed again, cleared and warned once more.
func TestSetFullWarnedInFlightReload(t *testing.T) {
	fw := &heldFullFirewall{fullFirewall: &fullFirewall{}, entered: make(chan struct{}), release: make(chan struct{})}
	fw.set(map[string][]netip.Addr{"ntp": addrs("192.0.2.22", "192.0.2.20", "192.0.2.21", "192.0.2.18")}, true)
	logs := &syncBuffer{}
	s := startSetFull(t, fw, logs, time.Hour)
	fw.hold.Store(s.pol.Load())
	addr := s.Addrs()[0].String()
	late := make(chan *dns.Msg, 1)
	go func() {
		r, err := tryAskFrom("127.0.0.1", addr, "one.full.test.")
		if err != nil {
			t.Errorf("one.full.test under the old policy: %v", err)
		}
		late <- r
	}()
	select {
	case <-fw.entered:
	case <-time.After(10 * time.Second):
		close(fw.release)
		t.Fatal("the firewall was not asked for one.full.test")
	}
	eng, err := policy.Compile("p", []byte(setFullPolicy))
	if err != nil {
		close(fw.release)
		t.Fatal(err)
	}
	s.pol.Swap(eng)
	if r := ask(t, "udp", addr, "multi.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("multi.full.test under the new policy: %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	close(fw.release)
	if r := <-late; r != nil && r.Rcode != dns.RcodeServerFailure {
		t.Errorf("one.full.test under the old policy: %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	waitFor(t, func() bool { return len(nameLines(logs, "one.full.test")) >= 1 })
	if r := ask(t, "udp", addr, "in.full.test.", dns.TypeA, false); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("in.full.test under the new policy: %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], answerAddrs(r))
	}
	lines := func() []string {
		return slices.Concat(nameLines(logs, "multi.full.test"), nameLines(logs, "one.full.test"), nameLines(logs, "in.full.test"))
	}
	waitFor(t, func() bool { return len(lines()) >= 3 })
	for i, l := range lines() {
		want := `"level":"INFO"`
		if i == 0 {
			want = `"level":"WARN"` // the first refusal under the new policy
		}
		if !strings.Contains(l, want) || !strings.Contains(l, `"set_full":"ntp/dns4_ntp"`) {
			t.Errorf("line %d: %s\nwant %s and set_full ntp/dns4_ntp", i, l, want)
		}
	}
	s.fullMu.Lock()
	fullEng := s.fullEng
	s.fullMu.Unlock()
	if fullEng != eng {
		t.Errorf("the sets warned of are taken as another policy's than the running one")
	}
}
