package dnsfilter

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"egressd/audit"
	"egressd/policy"
)

// gatePolicy: api.allowed.test is a TCP-only rule (the proxy sees it; the
// firewall does not want its addresses), the other allowed names are a
// UDP rule whose addresses the firewall must have first.
const gatePolicy = `version: 1
mode: enforce
rules:
  - name: web
    to: [api.allowed.test, printer.lan]
    ports: [443/tcp]
  - name: ntp
    to: ["*.allowed.test"]
    ports: [123/udp]
`

// recFirewall is a Firewall that records what it is given. While hold is
// set, Learn waits for it to be closed (or for its deadline), as a
// firewall whose netlink transaction is slow would.
type recFirewall struct {
	wants map[string]bool

	mu      sync.Mutex // guards the fields below
	calls   [][]Learned
	engs    []*policy.Engine // the policy of each call
	hold    chan struct{}
	entered chan struct{} // gets a value as each Learn starts, if set
}

func (f *recFirewall) Wants(rule string) bool { return f.wants[rule] }

func (f *recFirewall) WantsAny() bool {
	for _, w := range f.wants {
		if w {
			return true
		}
	}
	return false
}

func (f *recFirewall) Learn(ctx context.Context, eng *policy.Engine, ls []Learned) error {
	f.mu.Lock()
	f.calls = append(f.calls, slices.Clone(ls))
	f.engs = append(f.engs, eng)
	hold, entered := f.hold, f.entered
	f.mu.Unlock()
	if entered != nil {
		entered <- struct{}{}
	}
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (f *recFirewall) setHold(hold, entered chan struct{}) {
	f.mu.Lock()
	f.hold, f.entered = hold, entered
	f.mu.Unlock()
}

func (f *recFirewall) Calls() [][]Learned {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// syncBuffer is a log destination written by the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFirewallBeforeAnswer: an allowed answer whose rule the firewall
// wants is not written before Learn has returned, over UDP and TCP; a
// cache hit does not ask again under the same policy, does after a
// reload; answers of rules the firewall ignores never wait.
func TestFirewallBeforeAnswer(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	fw := &recFirewall{wants: map[string]bool{"ntp": true}}
	store := compile(t, gatePolicy)
	ts := startServer(t, "", Config{Upstreams: []string{up.Addr}, LearnTimeout: 5 * time.Second}, Deps{Policy: store, Firewall: fw})

	for _, c := range []struct {
		proto string
		qtype uint16
		addr  string
	}{{"udp", dns.TypeA, "192.0.2.10"}, {"tcp", dns.TypeAAAA, "2001:db8::10"}} {
		t.Run(c.proto, func(t *testing.T) {
			hold, entered := make(chan struct{}), make(chan struct{}, 1)
			fw.setHold(hold, entered)
			before := len(fw.Calls())
			start := time.Now()
			answer := make(chan *dns.Msg, 1)
			go func() {
				r, err := tryAsk(c.proto, ts.Addr, "www.allowed.test.", c.qtype, false)
				if err != nil {
					t.Error(err)
				}
				answer <- r
			}()
			select {
			case <-entered:
			case <-time.After(5 * time.Second):
				t.Fatal("Learn was not called")
			}
			select {
			case r := <-answer:
				t.Fatalf("answer sent while the firewall had not taken its addresses: %v", r)
			case <-time.After(200 * time.Millisecond):
			}
			close(hold)
			r := <-answer
			if r == nil || r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 || answerAddrs(r)[0].String() != c.addr {
				t.Fatalf("answer %v", r)
			}
			calls := fw.Calls()[before:]
			if len(calls) != 1 || len(calls[0]) != 1 {
				t.Fatalf("Learn calls %+v, want one of one address", calls)
			}
			l := calls[0][0]
			if l.Addr.String() != c.addr || l.Rule != "ntp" || l.Name != "www.allowed.test" || l.Client != netip.MustParseAddr("127.0.0.1") {
				t.Errorf("learned %+v", l)
			}
			// TTL 300, plus the second the wire's TTL rounds down to.
			if lo, hi := start.Add(300*time.Second), time.Now().Add(301*time.Second); l.Expires.Before(lo) || l.Expires.After(hi) {
				t.Errorf("expires in %v, want 300s-301s", time.Until(l.Expires))
			}
			fw.setHold(nil, nil)
			// A hit: the firewall has them already.
			for range 3 {
				ask(t, c.proto, ts.Addr, "www.allowed.test.", c.qtype, false)
			}
			if n := len(fw.Calls()) - before; n != 1 {
				t.Errorf("%d Learn calls after 3 cache hits, want 1", n)
			}
		})
	}

	// A name only a rule the firewall does not want allows: never asked.
	before := len(fw.Calls())
	ask(t, "udp", ts.Addr, "printer.lan.", dns.TypeA, false)
	ask(t, "udp", ts.Addr, "printer.lan.", dns.TypeA, false)
	if n := len(fw.Calls()) - before; n != 0 {
		t.Errorf("%d Learn calls for a rule the firewall ignores", n)
	}

	// A name credited to that rule (web comes first) that a wanted rule
	// allows too (ntp's *.allowed.test): ntp's set takes the address, or
	// enforce mode would drop the UDP 123 the policy allows. Once.
	before = len(fw.Calls())
	ask(t, "udp", ts.Addr, "api.allowed.test.", dns.TypeA, false)
	ask(t, "udp", ts.Addr, "api.allowed.test.", dns.TypeA, false)
	if calls := fw.Calls()[before:]; len(calls) != 1 || len(calls[0]) != 1 || calls[0][0].Rule != "ntp" || calls[0][0].Addr.String() != "192.0.2.11" {
		t.Errorf("Learn calls for api.allowed.test (credited to web, allowed by ntp too): %+v, want one for ntp", calls)
	}

	// A reload: the next hit asks again (the new ruleset may lack the
	// address), once.
	eng, err := policy.Compile("test-policy.yaml", []byte(gatePolicy))
	if err != nil {
		t.Fatal(err)
	}
	store.Swap(eng)
	before = len(fw.Calls())
	for range 3 {
		ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	}
	if n := len(fw.Calls()) - before; n != 1 {
		t.Errorf("%d Learn calls for 3 hits after a reload, want 1", n)
	}
	// Each call names the policy its answers were decided under: the
	// firewall learns them for its rules only if its installed policy
	// agrees.
	fw.mu.Lock()
	engs := slices.Clone(fw.engs)
	fw.mu.Unlock()
	if len(engs) < 2 || engs[len(engs)-1] != eng || engs[0] == nil || engs[0] == eng {
		t.Errorf("Learn's policies %p, want the first policy then %p", engs, eng)
	}
	if got := counterValue(ts.m.learnOK); got != 4 {
		t.Errorf("firewall_learn_total{result=ok} = %v, want 4", got)
	}
}

// TestFirewallTimeout: a firewall that does not answer in LearnTimeout
// delays the answer, does not lose it; the miss is counted and logged, and
// the next hit asks again.
func TestFirewallTimeout(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	fw := &recFirewall{wants: map[string]bool{"ntp": true}}
	var logs syncBuffer
	ts := startServer(t, gatePolicy, Config{Upstreams: []string{up.Addr}, LearnTimeout: 100 * time.Millisecond},
		Deps{Firewall: fw, Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	fw.setHold(make(chan struct{}), nil) // never released
	for i := 0; i < 2; i++ {
		r := ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
		if r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
			t.Fatalf("answer %d after a firewall timeout: %v", i, r)
		}
	}
	if got := counterValue(ts.m.learnTimeout); got != 2 {
		t.Errorf("firewall_learn_total{result=timeout} = %v, want 2", got)
	}
	if n := len(fw.Calls()); n != 2 {
		t.Errorf("%d Learn calls, want 2 (a hit after a timeout asks again)", n)
	}
	if !strings.Contains(logs.String(), `"firewall_learn":"timeout"`) || !strings.Contains(logs.String(), `"level":"WARN"`) {
		t.Errorf("no warning with firewall_learn=timeout in the log:\n%s", logs.String())
	}
	// The canonical line says what it is about, as the proxy's and
	// capture's do (kind flow or request).
	if !strings.Contains(logs.String(), `"kind":"dns","client":`) {
		t.Errorf("no decision line with kind dns in the log:\n%s", logs.String())
	}
	fw.setHold(nil, nil)
	for range 3 {
		ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	}
	if n := len(fw.Calls()); n != 3 {
		t.Errorf("%d Learn calls, want 3 (one more once the firewall answers, then none)", n)
	}
}

// TestZeroTTLAnswerLearned: an allowed address with a TTL of 0 (for the
// transaction in progress, RFC 1035 §3.2.1) is one the client uses at
// once: the firewall gets it before the answer, and the table learns it,
// as for any other TTL.
func TestZeroTTLAnswerLearned(t *testing.T) {
	up := newFakeUpstream(t, "zero.allowed.test. 0 IN A 192.0.2.20\n")
	fw := &recFirewall{wants: map[string]bool{"ntp": true}}
	ts := startServer(t, gatePolicy, Config{Upstreams: []string{up.Addr}}, Deps{Firewall: fw})
	feed, stop := ts.Table().Subscribe(8)
	defer stop()
	want := netip.MustParseAddr("192.0.2.20")
	for _, proto := range []string{"udp", "tcp"} {
		before := len(fw.Calls())
		r := ask(t, proto, ts.Addr, "zero.allowed.test.", dns.TypeA, false)
		if got := answerAddrs(r); len(got) != 1 || got[0] != want || r.Answer[0].Header().Ttl != 0 {
			t.Fatalf("%s: answer %v", proto, r)
		}
		calls := fw.Calls()[before:]
		if len(calls) != 1 || len(calls[0]) != 1 || calls[0][0].Addr != want || !calls[0][0].Expires.After(time.Now()) {
			t.Errorf("%s: Learn calls %+v, want one for %v, unexpired", proto, calls, want)
		}
		select {
		case l := <-feed:
			if l.Addr != want || l.Name != "zero.allowed.test" || l.Rule != "ntp" {
				t.Errorf("%s: learned %+v", proto, l)
			}
		default:
			t.Errorf("%s: the table learned nothing from the answer", proto)
		}
	}
}

// TestFirewallHitAllocs: on the UDP fast path, a cache hit for a rule the
// firewall ignores, or whose addresses it already has, allocates no more
// than a hit with no firewall at all.
func TestFirewallHitAllocs(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	pkt, src := fastQuery(t)
	allocs := func(fw Firewall) float64 {
		deps := Deps{}
		if fw != nil {
			deps.Firewall = fw
		}
		ts := startServer(t, gatePolicy, Config{Upstreams: []string{up.Addr}}, deps)
		ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false) // fills the cache (and the firewall)
		conn := ts.firstUDP()
		sc := newScratch()
		return testing.AllocsPerRun(200, func() {
			if !ts.fast(sc, conn, pkt, src) {
				t.Fatal("not answered on the fast path")
			}
		})
	}
	base := allocs(nil)
	ignoring := allocs(&recFirewall{wants: map[string]bool{}})
	holding := allocs(&recFirewall{wants: map[string]bool{"ntp": true}})
	t.Logf("allocations per hit: %v without a firewall, %v ignoring the rule, %v holding the addresses", base, ignoring, holding)
	if ignoring != base || holding != base {
		t.Errorf("allocations per hit: %v without a firewall, %v ignoring the rule, %v holding the addresses", base, ignoring, holding)
	}
}

// TestFastPathHitNoAllocs: a UDP cache hit on the fast path allocates
// nothing, its decision line and event included (the event is not moved
// to the heap by asking the sink's budget of decision lines).
func TestFastPathHitNoAllocs(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	pkt, src := fastQuery(t)
	ts := startServer(t, gatePolicy, Config{Upstreams: []string{up.Addr}}, Deps{Sink: audit.Discard})
	ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false) // fills the cache
	conn := ts.firstUDP()
	sc := newScratch()
	if n := testing.AllocsPerRun(200, func() {
		if !ts.fast(sc, conn, pkt, src) {
			t.Fatal("not answered on the fast path")
		}
	}); n != 0 {
		t.Errorf("%v allocations per cache hit on the fast path, want 0", n)
	}
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

// BenchmarkFastPathHit measures a UDP cache hit on the fast path (parse,
// policy, cache, render, send) without a firewall, with one that ignores
// the rule, and with one that already holds the answer's addresses: the
// three should cost the same.
func BenchmarkFastPathHit(b *testing.B) {
	up := newFakeUpstream(b, labZone)
	pkt, src := fastQuery(b)
	for _, c := range []struct {
		name string
		fw   Firewall
	}{{"none", nil}, {"ignored", &recFirewall{wants: map[string]bool{}}}, {"held", &recFirewall{wants: map[string]bool{"ntp": true}}}} {
		b.Run(c.name, func(b *testing.B) {
			deps := Deps{Sink: audit.Discard}
			if c.fw != nil {
				deps.Firewall = c.fw
			}
			ts := startServer(b, gatePolicy, Config{Upstreams: []string{up.Addr}}, deps)
			ask(b, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
			conn := ts.firstUDP()
			sc := newScratch()
			b.ReportAllocs()
			for b.Loop() {
				if !ts.fast(sc, conn, pkt, src) {
					b.Fatal("not answered on the fast path")
				}
			}
		})
	}
}

// BenchmarkNeedsGate measures the check a cache hit adds when a firewall
// is wired: a rule it ignores, and an answer whose addresses it holds.
func BenchmarkNeedsGate(b *testing.B) {
	store := compile(b, gatePolicy)
	eng := store.Load()
	r := new(dns.Msg)
	r.SetQuestion("www.allowed.test.", dns.TypeA)
	rr, err := dns.NewRR("www.allowed.test. 300 IN A 192.0.2.10")
	if err != nil {
		b.Fatal(err)
	}
	r.Answer = []dns.RR{rr}
	e := newEntry("www.allowed.test", r, false, 1232, time.Now(), time.Hour, time.Hour, "up", "")
	e.gate.Store(&gateMark{eng: eng, rules: []int{1}}) // ntp
	client, now := netip.MustParseAddr("192.0.2.50"), time.Now()
	for _, c := range []struct {
		name  string
		wants map[string]bool
	}{{"ignored", map[string]bool{}}, {"held", map[string]bool{"ntp": true}}} {
		s := &Server{fw: &recFirewall{wants: c.wants}}
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if s.needsGate(e, eng, policy.Decision{Verdict: policy.Allow, RuleIndex: 1}, client, nil, now) {
					b.Fatal("needs the firewall")
				}
			}
		})
	}
}

// TestTopBitTTL: an upstream TTL with the top bit set counts as 0 (RFC
// 2181 §8): the answer is not cached, and its address is learned for the
// one second a TTL of 0 gets, not for 68 years.
func TestTopBitTTL(t *testing.T) {
	now := time.Now()
	m := new(dns.Msg)
	m.SetQuestion("big.allowed.test.", dns.TypeA)
	m.Response = true
	m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "big.allowed.test.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0x80000010}, A: net.IPv4(192, 0, 2, 30)}}
	e := newEntry("big.allowed.test", m, false, 1232, now, time.Hour, 15*time.Minute, "up", "")
	if e.expires != 0 {
		t.Errorf("entry expires in %v, want not cached", time.Duration(e.expires-now.UnixNano()))
	}
	if len(e.addrs) != 1 || time.Duration(e.addrs[0].expires-now.UnixNano()) != time.Second {
		t.Errorf("learned %+v, want 192.0.2.30 for 1s", e.addrs)
	}
	// The same for a negative answer's SOA.
	n := new(dns.Msg)
	n.SetQuestion("none.allowed.test.", dns.TypeA)
	n.Response, n.Rcode = true, dns.RcodeNameError
	n.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Name: "allowed.test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 0xfffffff0}, Ns: "ns.allowed.test.", Mbox: "h.allowed.test.", Minttl: 0xfffffff0}}
	if e := newEntry("none.allowed.test", n, false, 1232, now, time.Hour, 15*time.Minute, "up", ""); e.expires != 0 {
		t.Errorf("negative entry expires in %v, want not cached", time.Duration(e.expires-now.UnixNano()))
	}
}
