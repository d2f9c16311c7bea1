package dnsfilter

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/policy"
)

const labZone = `
www.allowed.test. 300 IN A 192.0.2.10
www.allowed.test. 300 IN AAAA 2001:db8::10
api.allowed.test. 300 IN A 192.0.2.11
cdn.allowed.test. 300 IN CNAME edge.evil.example.
edge.evil.example. 60 IN A 203.0.113.5
tracker.evil.example. 300 IN A 203.0.113.66
www.denied.test. 300 IN A 198.51.100.1
meta.allowed.test. 300 IN A 169.254.169.254
meta.allowed.test. 300 IN A 192.0.2.12
mixed.allowed.test. 300 IN AAAA ::ffff:10.0.0.1
mixed.allowed.test. 300 IN AAAA 2001:db8::12
printer.lan. 300 IN A 192.168.1.5
svc.allowed.test. 300 IN HTTPS 1 . alpn=h2 ipv4hint=192.0.2.13,10.1.1.1 ech=AEX+DQBBpQAgACBiKb0o0NGUNyCuUvfTaK7l5ImkkTAQGhzWKqS7C5xLHgAEAAEAAQASY2xvdWRmbGFyZS1lY2guY29tAAA=
only6.allowed.test. 300 IN AAAA 2001:db8::6
`

func TestForwardAllowed(t *testing.T) {
	up := newFakeUpstream(t, labZone+bigTXT(40))
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, proto := range []string{"udp", "tcp"} {
		for _, edns := range []bool{false, true} {
			t.Run(proto+map[bool]string{false: "", true: "-edns"}[edns], func(t *testing.T) {
				for i := 0; i < 2; i++ { // the second is a cache hit
					r := ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeA, edns)
					if r.Rcode != dns.RcodeSuccess || !r.Response || !r.RecursionAvailable {
						t.Fatalf("answer: %v", r)
					}
					if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.10")}) {
						t.Fatalf("addresses %v", got)
					}
					if (r.IsEdns0() != nil) != edns {
						t.Errorf("OPT in answer = %v, query had EDNS %v", r.IsEdns0() != nil, edns)
					}
				}
				r := ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeAAAA, edns)
				if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("2001:db8::10")}) {
					t.Fatalf("AAAA %v", got)
				}
			})
		}
	}
	if n := up.count("www.allowed.test"); n != 2 {
		t.Errorf("upstream asked %d times for www.allowed.test, want 2 (A and AAAA, then cache)", n)
	}
	ev, ok := ts.Sink.find("www.allowed.test")
	if !ok || ev.Verdict != policy.Allow || ev.Rule != "lab" || ev.Kind != "dns" || ev.Source != "dnsfilter" || !ev.CacheHit || ev.RCode != "NOERROR" {
		t.Errorf("audit event %+v", ev)
	}
	names := ts.Table().NamesFor(netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.0.2.10"))
	if !cmp.Equal(names, []string{"www.allowed.test"}) {
		t.Errorf("learned names %v", names)
	}
	if n := ts.Table().NamesFor(netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("192.0.2.10")); n != nil {
		t.Errorf("another client learned %v", n)
	}
	if n := ts.Table().NamesFor(netip.Addr{}, netip.MustParseAddr("2001:db8::10")); !cmp.Equal(n, []string{"www.allowed.test"}) {
		t.Errorf("any client: %v", n)
	}
}

func TestCaseAndTrailingDot(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for i, name := range []string{"WwW.AlLoWeD.TeSt.", "www.allowed.test", "WWW.ALLOWED.TEST."} {
		for _, proto := range []string{"udp", "tcp"} {
			r := ask(t, proto, ts.Addr, dns.Fqdn(name), dns.TypeA, i%2 == 0)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("%s over %s: %v", name, proto, r)
			}
			if r.Question[0].Name != dns.Fqdn(name) {
				t.Errorf("question spelled %q, client asked %q (0x20 must survive)", r.Question[0].Name, name)
			}
		}
	}
	if n := up.count("www.allowed.test"); n != 1 {
		t.Errorf("upstream asked %d times; case variants must share the cache", n)
	}
	// Denied names are denied whatever their spelling.
	r := ask(t, "udp", ts.Addr, "WWW.Denied.Test.", dns.TypeA, true)
	if r.Rcode != dns.RcodeRefused {
		t.Errorf("denied mixed case: %v", dns.RcodeToString[r.Rcode])
	}
}

func TestEnforceDenyAnswers(t *testing.T) {
	cases := []struct {
		deny  DenyAnswer
		qtype uint16
		rcode int
		check func(t *testing.T, r *dns.Msg)
	}{
		{"", dns.TypeA, dns.RcodeRefused, nil},
		{DenyRefused, dns.TypeTXT, dns.RcodeRefused, nil},
		{DenyNXDomain, dns.TypeA, dns.RcodeNameError, func(t *testing.T, r *dns.Msg) {
			if len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != dns.TypeSOA || r.Ns[0].(*dns.SOA).Minttl != 60 {
				t.Errorf("NXDOMAIN without the SOA for negative caching: %v", r.Ns)
			}
		}},
		{DenyNull, dns.TypeA, dns.RcodeSuccess, func(t *testing.T, r *dns.Msg) {
			if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.IPv4Unspecified()}) {
				t.Errorf("null A: %v", got)
			}
		}},
		{DenyNull, dns.TypeAAAA, dns.RcodeSuccess, func(t *testing.T, r *dns.Msg) {
			if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.IPv6Unspecified()}) {
				t.Errorf("null AAAA: %v", got)
			}
		}},
	}
	for _, c := range cases {
		t.Run(string(c.deny)+"-"+dns.TypeToString[c.qtype], func(t *testing.T) {
			up := newFakeUpstream(t, labZone)
			ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, Deny: c.deny}, Deps{})
			for _, proto := range []string{"udp", "tcp"} {
				for _, edns := range []bool{true, false} {
					for _, name := range []string{"www.denied.test.", "tracker.evil.example.", "edge.evil.example."} {
						r := ask(t, proto, ts.Addr, name, c.qtype, edns)
						if r.Rcode != c.rcode {
							t.Fatalf("%s %s edns=%v: rcode %s, want %s", proto, name, edns, dns.RcodeToString[r.Rcode], dns.RcodeToString[c.rcode])
						}
						if r.Question[0].Name != name || !r.Response {
							t.Errorf("question %v", r.Question)
						}
						code, text, ok := ede(r)
						if edns && (!ok || code != dns.ExtendedErrorCodeBlocked || !strings.Contains(text, "test-policy.yaml") || !strings.Contains(text, policy.ReasonNoRule)) {
							t.Errorf("EDE %d %q %v", code, text, ok)
						}
						if !edns && r.IsEdns0() != nil {
							t.Errorf("OPT in an answer to a query without EDNS")
						}
						if c.check != nil {
							c.check(t, r)
						}
					}
				}
			}
			if seen := up.Seen(); len(seen) != 0 {
				t.Errorf("denied names reached the upstream: %v", seen)
			}
			ev, ok := ts.Sink.find("www.denied.test")
			if !ok || ev.Verdict != policy.Deny || !ev.Enforced || ev.Mode != policy.ModeEnforce || ev.Reason != policy.ReasonNoRule {
				t.Errorf("event %+v", ev)
			}
			if n := ts.Table().NamesFor(netip.Addr{}, netip.MustParseAddr("198.51.100.1")); n != nil {
				t.Errorf("denied name learned: %v", n)
			}
		})
	}
}

func TestAuditModeForwardsAndRecords(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, auditPolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for i := 0; i < 2; i++ {
		for _, proto := range []string{"udp", "tcp"} {
			r := ask(t, proto, ts.Addr, "www.denied.test.", dns.TypeA, true)
			if r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
				t.Fatalf("audit mode must forward: %v", r)
			}
		}
	}
	if up.count("www.denied.test") != 1 {
		t.Errorf("upstream saw www.denied.test %d times, want 1 (then cached)", up.count("www.denied.test"))
	}
	ev, ok := ts.Sink.find("www.denied.test")
	if !ok || ev.Verdict != policy.Deny || ev.Enforced || ev.Mode != policy.ModeAudit || ev.Reason != policy.ReasonNoRule {
		t.Errorf("would-deny event %+v", ev)
	}
	// The would-deny answer is learned, with no rule: the reload to
	// enforce decides it again under the new policy (firewall/seed.go).
	if l := ts.Table().Lookup(netip.MustParseAddr("198.51.100.1")); len(l) != 1 || l[0].Name != "www.denied.test" || l[0].Rule != "" || l[0].Client != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("would-deny answer in the table: %+v, want www.denied.test for 127.0.0.1 with no rule", l)
	}
	// The allowed name in audit mode is an allow.
	ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	if ev, _ := ts.Sink.find("www.allowed.test"); ev.Verdict != policy.Allow || ev.Mode != policy.ModeAudit {
		t.Errorf("allow event %+v", ev)
	}
	if l := ts.Table().Lookup(netip.MustParseAddr("192.0.2.10")); len(l) != 1 || l[0].Rule != "lab" {
		t.Errorf("allowed answer in the table: %+v, want rule lab", l)
	}
	// Switching the store to enforce takes effect at once (reload).
	ts.pol.Swap(ts.pol.Load().WithMode(policy.ModeEnforce))
	if r := ask(t, "udp", ts.Addr, "www.denied.test.", dns.TypeA, true); r.Rcode != dns.RcodeRefused {
		t.Errorf("after swap to enforce: %s (cached answers must not bypass the policy)", dns.RcodeToString[r.Rcode])
	}
}

// TestAuditModeDeniedAnswersDoNotPushOutAllowed: in audit mode every name
// the LAN asks is learned, the ones no rule allows with no rule; a table
// full of allowed answers keeps them all, and the would-deny answer is
// not kept instead of one.
func TestAuditModeDeniedAnswersDoNotPushOutAllowed(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	tbl := NewTable(tableShards) // one item per shard
	client := netip.MustParseAddr("192.0.2.200")
	exp := time.Now().Add(time.Hour)
	for i := range 40 * tableShards {
		tbl.Learn(Learned{Client: client, Name: "www.allowed.test", Addr: netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}).Next(), Rule: "lab", Expires: exp})
		tbl.Learn(Learned{Client: client, Name: "www.allowed.test", Addr: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i), 14: byte(i >> 8)}), Rule: "lab", Expires: exp})
	}
	before := tbl.HeldAll(nil)
	if len(before) != tableShards {
		t.Fatalf("%d allowed entries, want every shard full (%d)", len(before), tableShards)
	}
	ts := startServer(t, auditPolicy, Config{Upstreams: []string{up.Addr}}, Deps{Table: tbl})
	for _, proto := range []string{"udp", "tcp", "udp"} {
		if r := ask(t, proto, ts.Addr, "www.denied.test.", dns.TypeA, true); r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) != 1 {
			t.Fatalf("audit mode must answer: %v", r)
		}
	}
	sortKey := func(ls []Learned) []string {
		var out []string
		for _, l := range ls {
			out = append(out, fmt.Sprintf("%s %s %s %s", l.Client, l.Name, l.Addr, l.Rule))
		}
		slices.Sort(out)
		return out
	}
	if got, want := sortKey(tbl.HeldAll(nil)), sortKey(before); !slices.Equal(got, want) {
		t.Errorf("the would-deny answer changed a table full of allowed ones:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if n := tbl.Evicted(); n == 0 {
		t.Errorf("the would-deny answer not kept was not counted as evicted")
	}
}

// bigTXT returns TXT records that do not fit 512 bytes nor 1232.
func bigTXT(n int) string {
	var b strings.Builder
	for i := 0; i < n; i++ {
		b.WriteString("big.allowed.test. 300 IN TXT \"" + strings.Repeat("x", 60) + string(rune('a'+i%26)) + "\"\n")
	}
	return b.String()
}

func TestTruncation(t *testing.T) {
	up := newFakeUpstream(t, labZone+bigTXT(40))
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	r := ask(t, "udp", ts.Addr, "big.allowed.test.", dns.TypeTXT, false)
	if !r.Truncated {
		t.Errorf("a 512-byte client got no TC bit (%d answers)", len(r.Answer))
	}
	r.Compress = true
	if m, _ := r.Pack(); len(m) > 512 {
		t.Errorf("UDP answer of %d bytes to a client without EDNS", len(m))
	}
	r = ask(t, "tcp", ts.Addr, "big.allowed.test.", dns.TypeTXT, false)
	if r.Truncated || len(r.Answer) != 40 {
		t.Errorf("TCP: truncated=%v answers=%d, want 40", r.Truncated, len(r.Answer))
	}
	var protos []string
	for _, s := range up.Seen() {
		if s.Name == "big.allowed.test" {
			protos = append(protos, s.Proto)
		}
	}
	if !cmp.Equal(protos, []string{"udp", "tcp"}) {
		t.Errorf("upstream transports %v, want a truncated UDP answer retried over TCP, then the cache", protos)
	}
}

// An upstream that sets TC on its TCP answer too: a TCP answer is not
// truncated for size, so both the general path (a TCP client) and the
// asynchronous miss path (a UDP client) use it, without the TC bit, and
// cache it.
func TestTruncatedOverTCP(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	up.tcAll.Store(true)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, c := range []struct{ proto, name string }{{"udp", "www.allowed.test"}, {"tcp", "api.allowed.test"}} {
		for i := 0; i < 2; i++ { // the second is a cache hit
			r := ask(t, c.proto, ts.Addr, c.name+".", dns.TypeA, true)
			if r.Rcode != dns.RcodeSuccess || r.Truncated || len(answerAddrs(r)) != 1 {
				t.Errorf("%s %s #%d: rcode %s, truncated %v, answers %v", c.proto, c.name, i, dns.RcodeToString[r.Rcode], r.Truncated, answerAddrs(r))
			}
		}
		var protos []string
		for _, s := range up.Seen() {
			if s.Name == c.name {
				protos = append(protos, s.Proto)
			}
		}
		if !cmp.Equal(protos, []string{"udp", "tcp"}) {
			t.Errorf("%s %s: upstream transports %v, want udp, tcp, then the cache", c.proto, c.name, protos)
		}
	}
}

func TestUpstreamFailover(t *testing.T) {
	good := newFakeUpstream(t, labZone)
	slow := newFakeUpstream(t, labZone)
	slow.delay.Store(int64(time.Second))
	// A closed port: the kernel answers ICMP unreachable.
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	closed := pc.LocalAddr().String()
	pc.Close()
	ts := startServer(t, enforcePolicy, Config{
		Upstreams:       []string{closed, slow.Addr, good.Addr},
		UpstreamTimeout: 200 * time.Millisecond, QueryTimeout: 2 * time.Second, DownAfter: 2, DownFor: time.Minute,
		CacheSize: -1,
	}, Deps{})
	for i := 0; i < 4; i++ {
		r := ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("query %d: %v", i, r)
		}
	}
	// After DownAfter failures the dead and slow upstreams are skipped.
	if n := slow.count("www.allowed.test"); n != 2 {
		t.Errorf("slow upstream asked %d times, want 2 (then marked down)", n)
	}
	if n := good.count("www.allowed.test"); n != 4 {
		t.Errorf("good upstream asked %d times, want 4", n)
	}
	ev, _ := ts.Sink.find("www.allowed.test")
	if ev.Upstream != good.Addr {
		t.Errorf("event upstream %q, want %q", ev.Upstream, good.Addr)
	}
}

func TestUpstreamDownServfail(t *testing.T) {
	dead := newFakeUpstream(t, labZone)
	dead.drop.Store(true)
	ts := startServer(t, enforcePolicy, Config{
		Upstreams:       []string{dead.Addr},
		UpstreamTimeout: 300 * time.Millisecond, QueryTimeout: 600 * time.Millisecond,
	}, Deps{})
	// The client waits up to 6s; the forwarder must answer SERVFAIL itself.
	for _, proto := range []string{"udp", "tcp"} {
		r := ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeA, true)
		if r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("%s: %s, want SERVFAIL", proto, dns.RcodeToString[r.Rcode])
		}
		if code, _, _ := ede(r); code != dns.ExtendedErrorCodeNoReachableAuthority {
			t.Errorf("EDE %d", code)
		}
	}
	ev, _ := ts.Sink.find("www.allowed.test")
	if ev.RCode != "SERVFAIL" || ev.Verdict != policy.Allow {
		t.Errorf("event %+v", ev)
	}
	// LookupNetIP fails with ErrUpstream rather than hanging.
	if _, err := ts.LookupNetIP(context.Background(), "api.allowed.test"); !errors.Is(err, ErrUpstream) {
		t.Errorf("LookupNetIP: %v", err)
	}
}

func TestSingleflight(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	up.delay.Store(int64(300 * time.Millisecond))
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := tryAsk("udp", ts.Addr, "api.allowed.test.", dns.TypeA, true)
			if err == nil && len(r.Answer) != 1 {
				err = errors.New(r.String())
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := up.count("api.allowed.test"); n != 1 {
		t.Errorf("20 identical concurrent queries went upstream %d times, want 1", n)
	}
}

// An answer with the query's ID but another question (a forgery, or a
// confused upstream) is not taken: the forwarder waits for the real one
// (THREATS.md E6), whatever case the client spelled the name in.
func TestAnswerMustRepeatQuestion(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	up.decoys.Store(true)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, CacheSize: -1}, Deps{})
	want := netip.MustParseAddr("192.0.2.11")
	for _, name := range []string{"api.allowed.test.", "API.Allowed.TEST."} {
		for _, edns := range []bool{true, false} {
			before := up.decoysOut.Load()
			r := ask(t, "udp", ts.Addr, name, dns.TypeA, edns)
			if got := answerAddrs(r); len(got) != 1 || got[0] != want {
				t.Errorf("%s (edns %v): answer %v, want only %v:\n%s", name, edns, got, want, r)
			}
			if (r.IsEdns0() != nil) != edns {
				t.Errorf("%s: OPT in the answer %v, query had EDNS %v", name, r.IsEdns0() != nil, edns)
			}
			if up.decoysOut.Load() == before {
				t.Fatalf("%s: the upstream sent no decoy: the test proves nothing", name)
			}
		}
	}
}

func TestCNAMEChainOutsideAllowedSet(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	r := ask(t, "udp", ts.Addr, "cdn.allowed.test.", dns.TypeA, true)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 2 {
		t.Fatalf("CNAME chain: %v", r)
	}
	if c, ok := r.Answer[0].(*dns.CNAME); !ok || c.Target != "edge.evil.example." {
		t.Errorf("first record %v", r.Answer[0])
	}
	// The chain's address is credited to the name asked.
	if n := ts.Table().NamesFor(netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("203.0.113.5")); !cmp.Equal(n, []string{"cdn.allowed.test"}) {
		t.Errorf("learned %v", n)
	}
	l := ts.Table().Lookup(netip.MustParseAddr("203.0.113.5"))
	if len(l) != 1 || l[0].Rule != "lab" || time.Until(l[0].Expires) > 61*time.Second {
		t.Errorf("learned entry %+v (expiry from the A record's 60s TTL)", l)
	}
	// The target itself is still denied when asked directly.
	if r := ask(t, "udp", ts.Addr, "edge.evil.example.", dns.TypeA, true); r.Rcode != dns.RcodeRefused {
		t.Errorf("chain target asked directly: %s", dns.RcodeToString[r.Rcode])
	}
}

func TestAnswerFilter(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	r := ask(t, "udp", ts.Addr, "meta.allowed.test.", dns.TypeA, true)
	if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.12")}) {
		t.Errorf("rebinding: %v, want only 192.0.2.12", got)
	}
	r = ask(t, "tcp", ts.Addr, "mixed.allowed.test.", dns.TypeAAAA, true)
	if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("2001:db8::12")}) {
		t.Errorf("mapped private AAAA: %v", got)
	}
	r = ask(t, "udp", ts.Addr, "printer.lan.", dns.TypeA, true)
	if got := answerAddrs(r); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.168.1.5")}) {
		t.Errorf("private name keeps private address: %v", got)
	}
	if n := ts.Table().NamesFor(netip.Addr{}, netip.MustParseAddr("169.254.169.254")); n != nil {
		t.Errorf("filtered address learned: %v", n)
	}
	ev, _ := ts.Sink.find("meta.allowed.test")
	if ev.Verdict != policy.Allow {
		t.Errorf("event %+v", ev)
	}
	addrs, err := ts.LookupNetIP(context.Background(), "META.allowed.test.")
	if err != nil || !slices.Equal(addrs, []netip.Addr{netip.MustParseAddr("192.0.2.12")}) {
		t.Errorf("LookupNetIP applies the filter: %v %v", addrs, err)
	}
}

func TestHTTPSRecordECH(t *testing.T) {
	for _, keep := range []bool{false, true} {
		up := newFakeUpstream(t, labZone)
		ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, KeepECH: keep}, Deps{})
		for _, proto := range []string{"udp", "tcp", "udp"} {
			r := ask(t, proto, ts.Addr, "svc.allowed.test.", dns.TypeHTTPS, true)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("HTTPS: %v", r)
			}
			h := r.Answer[0].(*dns.HTTPS)
			var ech bool
			var hints []string
			for _, kv := range h.Value {
				switch v := kv.(type) {
				case *dns.SVCBECHConfig:
					ech = true
				case *dns.SVCBIPv4Hint:
					for _, ip := range v.Hint {
						hints = append(hints, ip.String())
					}
				}
			}
			if ech != keep {
				t.Errorf("keep=%v: ech present=%v in %v", keep, ech, h)
			}
			if !cmp.Equal(hints, []string{"192.0.2.13"}) {
				t.Errorf("ipv4hint %v: the private hint must go", hints)
			}
		}
	}
}

func TestHardening(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	// Even a policy that opens every name keeps the hardening.
	ts := startServer(t, "version: 1\nmode: enforce\nrules:\n  - name: all\n    to: [\"*\"]\n    ports: [443/tcp]\n", Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, proto := range []string{"udp", "tcp"} {
		for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
			r := ask(t, proto, ts.Addr, "use-application-dns.net.", qt, true)
			if r.Rcode != dns.RcodeNameError {
				t.Errorf("canary %s %s: %s", proto, dns.TypeToString[qt], dns.RcodeToString[r.Rcode])
			}
		}
		if r := ask(t, proto, ts.Addr, "www.allowed.test.", dns.TypeANY, true); r.Rcode != dns.RcodeNotImplemented {
			t.Errorf("ANY: %s", dns.RcodeToString[r.Rcode])
		}
		if r := ask(t, proto, ts.Addr, "allowed.test.", dns.TypeAXFR, true); r.Rcode != dns.RcodeRefused {
			t.Errorf("AXFR: %s", dns.RcodeToString[r.Rcode])
		}
		for _, bad := range []string{"b\\195\\164d.allowed.test.", "sp\\032ace.allowed.test.", "."} {
			r := ask(t, proto, ts.Addr, bad, dns.TypeA, true)
			if r.Rcode != dns.RcodeRefused {
				t.Errorf("invalid name %q: %s", bad, dns.RcodeToString[r.Rcode])
			}
		}
		m := new(dns.Msg)
		m.SetQuestion("version.bind.", dns.TypeTXT)
		m.Question[0].Qclass = dns.ClassCHAOS
		c := &dns.Client{Net: proto, Timeout: 3 * time.Second}
		if r, _, err := c.Exchange(m, ts.Addr); err != nil || r.Rcode != dns.RcodeRefused {
			t.Errorf("CHAOS: %v %v", r, err)
		}
	}
	if seen := up.Seen(); len(seen) != 0 {
		t.Errorf("upstream asked %v", seen)
	}
	ev, _ := ts.Sink.find("use-application-dns.net")
	if ev.Reason != ReasonCanary || !ev.Enforced {
		t.Errorf("canary event %+v", ev)
	}
}

func TestRateLimit(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, ClientRate: 1, ClientBurst: 3}, Deps{})
	refused := 0
	for i := 0; i < 10; i++ {
		r := ask(t, "tcp", ts.Addr, "www.allowed.test.", dns.TypeA, true)
		if r.Rcode == dns.RcodeRefused {
			refused++
		}
	}
	if refused < 5 {
		t.Errorf("%d of 10 queries refused at 1/s with burst 3", refused)
	}
	// Over UDP the excess is dropped: no answer.
	m := new(dns.Msg)
	m.SetQuestion("www.allowed.test.", dns.TypeA)
	if _, _, err := (&dns.Client{Timeout: 500 * time.Millisecond}).Exchange(m, ts.Addr); err == nil {
		t.Errorf("rate-limited UDP query answered")
	}
}

// TestRateLimitAcrossTransports: on a wildcard listener (the default
// ":53") TCP is dual-stack and sees an IPv4 client as ::ffff:a.b.c.d; its
// UDP and TCP queries still draw on one bucket.
func TestRateLimitAcrossTransports(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Listen: []string{":0"}, Upstreams: []string{up.Addr}, ClientRate: 0.01, ClientBurst: 3}, Deps{})
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ts.Addrs()[0].Port())))
	for i := range 3 {
		if r := ask(t, "udp", addr, "www.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess {
			t.Fatalf("udp query %d within the burst: %s", i, dns.RcodeToString[r.Rcode])
		}
	}
	if r := ask(t, "tcp", addr, "www.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeRefused {
		t.Errorf("tcp query after the burst was spent over udp: %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
}

func TestNegativeCache(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for i := 0; i < 3; i++ {
		if r := ask(t, "udp", ts.Addr, "nope.allowed.test.", dns.TypeA, true); r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 {
			t.Fatalf("NXDOMAIN: %v", r)
		}
		if r := ask(t, "udp", ts.Addr, "only6.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
			t.Fatalf("NODATA: %v", r)
		}
		if r := ask(t, "udp", ts.Addr, "nosoa.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeNameError {
			t.Fatalf("NXDOMAIN without SOA: %v", r)
		}
	}
	if up.count("nope.allowed.test") != 1 || up.count("only6.allowed.test") != 1 {
		t.Errorf("negative answers with an SOA are cached: %d %d", up.count("nope.allowed.test"), up.count("only6.allowed.test"))
	}
	if up.count("nosoa.allowed.test") != 3 {
		t.Errorf("negative answer without an SOA cached (RFC 2308 §5): %d", up.count("nosoa.allowed.test"))
	}
	_, err := ts.LookupNetIP(context.Background(), "nope.allowed.test")
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("LookupNetIP NXDOMAIN: %v", err)
	}
	if _, err := ts.LookupNetIP(context.Background(), "bad name"); !errors.Is(err, ErrInvalidName) {
		t.Errorf("LookupNetIP invalid: %v", err)
	}
	addrs, err := ts.LookupNetIP(context.Background(), "www.allowed.test")
	if err != nil || len(addrs) != 2 {
		t.Errorf("LookupNetIP A+AAAA: %v %v", addrs, err)
	}
}

// TestCacheTTL uses the injectable clock: a hit ages the TTL, and the entry
// leaves the cache when the smallest TTL runs out.
func TestCacheTTL(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	tbl := NewTable(0)
	tbl.now = clock // before the server's goroutines can read it
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{Now: clock, Table: tbl})
	for _, proto := range []string{"udp", "tcp"} {
		r := ask(t, proto, ts.Addr, "cdn.allowed.test.", dns.TypeA, false)
		if ttl := r.Answer[1].Header().Ttl; ttl != 60 && proto == "udp" {
			t.Fatalf("first TTL %d", ttl)
		}
	}
	advance(25 * time.Second)
	for _, proto := range []string{"udp", "tcp"} {
		r := ask(t, proto, ts.Addr, "cdn.allowed.test.", dns.TypeA, false)
		if got := []uint32{r.Answer[0].Header().Ttl, r.Answer[1].Header().Ttl}; !cmp.Equal(got, []uint32{275, 35}) {
			t.Errorf("%s: aged TTLs %v, want [275 35]", proto, got)
		}
	}
	if up.count("cdn.allowed.test") != 1 {
		t.Fatalf("upstream asked %d times", up.count("cdn.allowed.test"))
	}
	advance(40 * time.Second)
	if n := ts.Table().NamesFor(netip.Addr{}, netip.MustParseAddr("203.0.113.5")); n != nil {
		t.Errorf("expired learned entry still named: %v", n)
	}
	ask(t, "udp", ts.Addr, "cdn.allowed.test.", dns.TypeA, false)
	if up.count("cdn.allowed.test") != 2 {
		t.Errorf("expired entry served from cache")
	}
}

// TestMissesInFlightAtClose: Close while misses wait for a slow upstream on
// the asynchronous path. Run returns, every query gets its one event
// (SERVFAIL, the upstream work cancelled), and nothing answers or panics
// after.
func TestMissesInFlightAtClose(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	up.delay.Store(int64(3 * time.Second))
	sink := &recSink{}
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{up.Addr}, ClientRate: -1,
		UpstreamTimeout: 5 * time.Second, QueryTimeout: 10 * time.Second},
		Deps{Policy: compile(t, enforcePolicy), Sink: sink})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	<-s.Ready()
	c, err := net.Dial("udp", s.Addrs()[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	names := []string{"www.allowed.test", "api.allowed.test", "cdn.allowed.test"}
	for i, n := range names {
		m := new(dns.Msg)
		m.SetQuestion(n+".", dns.TypeA)
		m.Id = uint16(i + 1)
		w, _ := m.Pack()
		if _, err := c.Write(w); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		all := true
		for _, n := range names {
			all = all && up.count(n) == 1
		}
		if all {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the queries did not reach the upstream")
		}
	}
	s.Close()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, net.ErrClosed) {
			t.Errorf("run: %v", err)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("Run did not return with misses in flight")
	}
	for _, n := range names {
		evs := 0
		for _, ev := range sink.Events() {
			if ev.Name == n {
				evs++
				if ev.RCode != "SERVFAIL" {
					t.Errorf("%s: rcode %s, want SERVFAIL", n, ev.RCode)
				}
			}
		}
		if evs != 1 {
			t.Errorf("%s: %d events, want 1", n, evs)
		}
	}
}

// TestOversizedUDPAnswer: an upstream that ignores our EDNS size and sends
// a UDP answer larger than the read buffer (minReadSlot). The datagram is
// cut by the kernel (MSG_TRUNC), so the answer is fetched again over TCP,
// on the asynchronous miss path (a UDP client) and on the general one (a
// TCP client).
func TestOversizedUDPAnswer(t *testing.T) {
	up := newFakeUpstream(t, labZone+bigTXT(100))
	up.big.Store(true)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, CacheSize: -1}, Deps{})
	for _, proto := range []string{"udp", "tcp"} {
		before := len(up.Seen())
		r := ask(t, proto, ts.Addr, "big.allowed.test.", dns.TypeTXT, true)
		if r.Rcode != dns.RcodeSuccess {
			t.Fatalf("%s: %v", proto, r)
		}
		if proto == "tcp" && len(r.Answer) != 100 {
			t.Errorf("tcp: %d TXT records, want 100", len(r.Answer))
		}
		if proto == "udp" && !r.Truncated {
			t.Errorf("udp: a %d-record answer larger than the client's buffer is not truncated", len(r.Answer))
		}
		var transports []string
		for _, s := range up.Seen()[before:] {
			transports = append(transports, s.Proto)
		}
		if !cmp.Equal(transports, []string{"udp", "tcp"}) {
			t.Errorf("%s client: upstream transports %v, want [udp tcp]", proto, transports)
		}
	}
}

// TestLookupNetIPCache: LookupNetIP answers from the cache what it has and
// asks the upstream only for the rest: a name whose A record a client's
// query cached costs one upstream query (AAAA), and a second lookup none.
func TestLookupNetIPCache(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	seen := func(qtype uint16) int {
		n := 0
		for _, q := range up.Seen() {
			if q.Name == "www.allowed.test" && q.Type == qtype {
				n++
			}
		}
		return n
	}
	ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	if a, aaaa := seen(dns.TypeA), seen(dns.TypeAAAA); a != 1 || aaaa != 0 {
		t.Fatalf("after the client's query: %d A and %d AAAA upstream queries, want 1 and 0", a, aaaa)
	}
	want := []netip.Addr{netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")}
	for i := range 2 {
		addrs, err := ts.LookupNetIP(context.Background(), "www.allowed.test")
		if err != nil || !slices.Equal(addrs, want) {
			t.Errorf("lookup %d: %v %v, want %v", i, addrs, err, want)
		}
		if a, aaaa := seen(dns.TypeA), seen(dns.TypeAAAA); a != 1 || aaaa != 1 {
			t.Errorf("after lookup %d: %d A and %d AAAA upstream queries, want 1 and 1", i, a, aaaa)
		}
	}
	// Neither type cached: both asked, and both answers returned.
	addrs, err := ts.LookupNetIP(context.Background(), "mixed.allowed.test")
	if err != nil || len(addrs) != 1 || addrs[0] != netip.MustParseAddr("2001:db8::12") {
		t.Errorf("lookup of an uncached name: %v %v", addrs, err)
	}
}

// BenchmarkLookupNetIPCached: the proxy's check of a destination for a
// client that did not ask our DNS, both answers cached.
func BenchmarkLookupNetIPCached(b *testing.B) {
	up := newFakeUpstream(b, labZone)
	ts := startServer(b, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	ctx := context.Background()
	if _, err := ts.LookupNetIP(ctx, "www.allowed.test"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ts.LookupNetIP(ctx, "www.allowed.test"); err != nil {
			b.Fatal(err)
		}
	}
}

// TestTCPClientNeverReads: a client that pipelines queries for a large
// answer over TCP and never reads the answers fills the socket buffers; the
// server's write then stalls. It must give the connection up after its
// write timeout (2s) rather than hold the goroutine and descriptor for
// as long as the client stays connected (which also kept Run from
// returning on Close).
func TestTCPClientNeverReads(t *testing.T) {
	var zone strings.Builder
	for i := range 200 {
		fmt.Fprintf(&zone, "huge.allowed.test. 300 IN TXT \"%s%03d\"\n", strings.Repeat("x", 240), i)
	}
	up := newFakeUpstream(t, zone.String())
	// 1000 answers of 50 KB: more than any socket buffers hold.
	const queries = 1000
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}, TCPMaxQueries: queries}, Deps{})
	// A small receive buffer, so the answers back up at once.
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 2048) })
	}}
	c, err := d.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var buf []byte
	for i := range queries {
		m := new(dns.Msg)
		m.SetQuestion("huge.allowed.test.", dns.TypeTXT)
		m.Id = uint16(i)
		w, _ := m.Pack()
		buf = binary.BigEndian.AppendUint16(buf, uint16(len(w)))
		buf = append(buf, w...)
	}
	if _, err := c.Write(buf); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * time.Second) // the write timeout, and some
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := 0
	for ; got < queries; got++ {
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			break
		}
		if _, err := io.ReadFull(c, make([]byte, binary.BigEndian.Uint16(l[:]))); err != nil {
			break
		}
	}
	if got == queries {
		t.Errorf("all %d answers arrived after the client stalled 4s: the server's writes have no timeout", got)
	}
}

// TestFilteredInEvent: what the answer filter removed (THREATS.md B1: the
// ech SvcParam; special address hints) is on the query's audit event,
// for an answer from upstream and one from the cache, in enforce mode and
// in audit mode (the filter runs in both): the report counts it, so an
// operator sees before switching to enforce mode which answers lose their
// ECH configs. Before, only the log line said so.
func TestFilteredInEvent(t *testing.T) {
	for _, pol := range []string{enforcePolicy, auditPolicy} {
		up := newFakeUpstream(t, labZone)
		ts := startServer(t, pol, Config{Upstreams: []string{up.Addr}}, Deps{})
		for i := range 2 {
			r := ask(t, "udp", ts.Addr, "svc.allowed.test.", dns.TypeHTTPS, true)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("HTTPS: %v", r)
			}
			for _, kv := range r.Answer[0].(*dns.HTTPS).Value {
				if _, ok := kv.(*dns.SVCBECHConfig); ok {
					t.Errorf("ech kept in %v", r.Answer[0])
				}
			}
			var ev audit.Event
			deadline := time.Now().Add(5 * time.Second)
			for {
				evs := ts.Sink.Events()
				if len(evs) == i+1 {
					ev = evs[i]
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d events, want %d", len(evs), i+1)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if ev.Filtered != "rebinding+ech" || ev.CacheHit != (i == 1) {
				t.Errorf("query %d (%s): filtered %q cache hit %v, want %q", i, ev.Mode, ev.Filtered, ev.CacheHit, "rebinding+ech")
			}
		}
	}
}

// TestLookupNetIPFindsDOAnswers: the proxy's fresh lookup of a name
// (LookupNetIP) is answered from an answer the cache holds for a client
// that set the DNSSEC OK bit (systemd-resolved does), not asked upstream
// again: a CDN that rotates its answers would give another address, and
// the client's connection to the address it was given would be refused
// (sni-mismatch). An answer fetched with checking disabled (CD) is not
// used: the upstream did not validate it.
func TestLookupNetIPFindsDOAnswers(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m := new(dns.Msg)
		m.SetQuestion("www.allowed.test.", qt)
		m.SetEdns0(1232, true) // DO
		if _, _, err := (&dns.Client{Net: "udp", Timeout: 6 * time.Second, UDPSize: 1232}).Exchange(m, ts.Addr); err != nil {
			t.Fatal(err)
		}
	}
	before := up.count("www.allowed.test")
	addrs, err := ts.LookupNetIP(context.Background(), "www.allowed.test")
	if err != nil || len(addrs) == 0 {
		t.Fatalf("LookupNetIP: %v %v", addrs, err)
	}
	if n := up.count("www.allowed.test") - before; n != 0 {
		t.Errorf("LookupNetIP asked upstream %d times for answers the cache held for a DO client", n)
	}

	// CD: not used.
	m := new(dns.Msg)
	m.SetQuestion("api.allowed.test.", dns.TypeA)
	m.SetEdns0(1232, false)
	m.CheckingDisabled = true
	if _, _, err := (&dns.Client{Net: "udp", Timeout: 6 * time.Second, UDPSize: 1232}).Exchange(m, ts.Addr); err != nil {
		t.Fatal(err)
	}
	before = up.count("api.allowed.test")
	ts.LookupNetIP(context.Background(), "api.allowed.test")
	if n := up.count("api.allowed.test") - before; n == 0 {
		t.Error("LookupNetIP took an answer fetched with checking disabled")
	}
}
