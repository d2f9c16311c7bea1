package dnsfilter

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestHugeTTLCapped: a hostile authoritative server of a name under an
// allowed wildcard answers with the largest TTL the wire allows that is
// not taken as 0 (2^31-1 s, 68 years). The client is told at most
// MaxTTL, and the learned-address table (which the proxy's A2 check and
// capture read) keeps the address no longer than that: before, the table
// vouched for it for 68 years while the cache dropped it after an hour.
func TestHugeTTLCapped(t *testing.T) {
	up := newFakeUpstream(t, "forever.allowed.test. 2147483647 IN A 192.0.2.77\n"+
		"forever.allowed.test. 2147483647 IN AAAA 2001:db8::77\n")
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		for _, proto := range []string{"udp", "tcp"} { // a miss, then a hit
			r := ask(t, proto, ts.Addr, "forever.allowed.test.", qt, true)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("%s %s: %v", proto, dns.TypeToString[qt], r)
			}
			if ttl := r.Answer[0].Header().Ttl; ttl > uint32(defaultMaxTTL/time.Second) {
				t.Errorf("%s %s: client told TTL %d, more than the %v cap", proto, dns.TypeToString[qt], ttl, defaultMaxTTL)
			}
		}
	}
	for _, a := range []string{"192.0.2.77", "2001:db8::77"} {
		l := ts.Table().Lookup(netip.MustParseAddr(a))
		if len(l) != 1 {
			t.Fatalf("learned %s: %+v", a, l)
		}
		if d := time.Until(l[0].Expires); d > defaultMaxTTL+time.Second {
			t.Errorf("learned %s for %v, more than the %v cap", a, d.Round(time.Hour), defaultMaxTTL)
		}
	}
}

// newHostileUpstream starts an upstream (UDP and TCP on one loopback
// port) whose answers fill builds: what the attacker's authoritative
// server of a name under an allowed wildcard returns.
func newHostileUpstream(t testing.TB, fill func(q dns.Question, m *dns.Msg)) string {
	t.Helper()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Authoritative = true
		if len(r.Question) == 1 {
			fill(r.Question[0], m)
		}
		_ = w.WriteMsg(m)
	})
	return listenDNS(t, h)
}

// listenDNS serves h on one loopback port, UDP and TCP, until the test
// ends, and returns the address.
func listenDNS(t testing.TB, h dns.Handler) string {
	t.Helper()
	var pc net.PacketConn
	var l net.Listener
	for i := 0; ; i++ { // the TCP port of the UDP one may be taken
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if l, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if i >= 10 {
			t.Fatal(err)
		}
	}
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: l, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return pc.LocalAddr().String()
}

func mustRR(t testing.TB, s string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(s)
	if err != nil {
		t.Fatalf("record %q: %v", s, err)
	}
	return rr
}

// TestOtherOwnersNotLearned: the attacker's server answers a question for
// its own name under the allowed wildcard with address records of OTHER
// names (another rule's name, spelled in other case, with an escaped
// dot), of a CNAME chain's end that is not the chain's, of another type
// than asked, and glue in the authority and additional sections. The
// table learns only the addresses on the question's own CNAME chain, of
// the type asked: what the client's resolver takes from the answer. Before,
// every address record of the answer section was credited to the name
// asked, whatever its owner or type.
func TestOtherOwnersNotLearned(t *testing.T) {
	own, chained := "192.0.2.70", "192.0.2.71"
	addr := newHostileUpstream(t, func(q dns.Question, m *dns.Msg) {
		n := q.Name
		switch {
		case strings.HasPrefix(n, "stuffed.") && q.Qtype == dns.TypeA:
			m.Answer = []dns.RR{
				mustRR(t, n+" 300 IN A "+own),
				mustRR(t, "api.vendor.test. 300 IN A 203.0.113.66"),
				mustRR(t, "API.Vendor.Test. 300 IN A 203.0.113.67"),
				mustRR(t, `api\.vendor.test. 300 IN A 203.0.113.68`),
				mustRR(t, "api.vendor.test. 300 IN AAAA 2001:db8::66"),
				mustRR(t, "tenant.test. 300 IN DNAME vendor.test."),
			}
			m.Ns = []dns.RR{mustRR(t, "vendor.test. 300 IN NS api.vendor.test.")}
			m.Extra = []dns.RR{mustRR(t, "api.vendor.test. 300 IN A 203.0.113.69")}
		case strings.HasPrefix(n, "chain.") && q.Qtype == dns.TypeA:
			// Out of the zone and back, then a dangling address of a
			// name that is not on the chain.
			m.Answer = []dns.RR{
				mustRR(t, n+" 300 IN CNAME hop.elsewhere.test."),
				mustRR(t, "hop.elsewhere.test. 300 IN CNAME back.tenant.test."),
				mustRR(t, "back.tenant.test. 300 IN A "+chained),
				mustRR(t, "api.vendor.test. 300 IN A 203.0.113.70"),
			}
		case strings.HasPrefix(n, "txt."):
			// Another type than asked: TXT answered with addresses.
			m.Answer = []dns.RR{mustRR(t, n+" 300 IN A 203.0.113.71")}
		}
	})
	ts := startServer(t, fairPolicy, Config{Upstreams: []string{addr}}, Deps{})
	r := ask(t, "udp", ts.Addr, "stuffed.tenant.test.", dns.TypeA, true)
	if r.Rcode != dns.RcodeSuccess {
		t.Fatalf("stuffed: %v", r)
	}
	r = ask(t, "udp", ts.Addr, "chain.tenant.test.", dns.TypeA, true)
	if r.Rcode != dns.RcodeSuccess {
		t.Fatalf("chain: %v", r)
	}
	ask(t, "udp", ts.Addr, "txt.tenant.test.", dns.TypeTXT, true)
	// The proxy's fresh lookup (THREATS.md A2's fallback for a client
	// that did not ask our DNS) reads the same answers: only the name's
	// own addresses.
	for name, want := range map[string][]netip.Addr{
		"stuffed.tenant.test": {netip.MustParseAddr(own)},
		"chain.tenant.test":   {netip.MustParseAddr(chained)},
	} {
		got, err := ts.LookupNetIP(context.Background(), name)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("LookupNetIP(%s) = %v, %v; want %v", name, got, err, want)
		}
	}
	cli := netip.MustParseAddr("127.0.0.1")
	for a, want := range map[string][]string{
		own: {"stuffed.tenant.test"}, chained: {"chain.tenant.test"},
		"203.0.113.66": nil, "203.0.113.67": nil, "203.0.113.68": nil, "2001:db8::66": nil,
		"203.0.113.69": nil, "203.0.113.70": nil, "203.0.113.71": nil,
	} {
		if got := ts.Table().NamesFor(cli, netip.MustParseAddr(a)); !slices.Equal(got, want) {
			t.Errorf("%s learned for %v, want %v", a, got, want)
		}
	}
}

// TestRealChainsLearned: answers a recursive resolver really passes on,
// which the client's resolver accepts, are learned whole (an address not
// learned fails the proxy's SNI check, an outage): a DNAME with the CNAME
// it synthesizes (RFC 6672), a chain of 16 CNAMEs (the most resolvers
// follow), and the owners spelled in other case than asked (0x20). (A
// question name with an escaped dot is refused before: not a hostname.)
func TestRealChainsLearned(t *testing.T) {
	addr := newHostileUpstream(t, func(q dns.Question, m *dns.Msg) {
		n := q.Name
		switch {
		case strings.HasPrefix(n, "www.dname."):
			m.Answer = []dns.RR{
				mustRR(t, "dname.allowed.test. 300 IN DNAME cdn.allowed.test."),
				mustRR(t, n+" 300 IN CNAME www.cdn.allowed.test."),
				mustRR(t, "www.cdn.allowed.test. 300 IN A 192.0.2.80"),
			}
		case strings.HasPrefix(n, "long."):
			prev := n
			for i := range 16 {
				next := fmt.Sprintf("L%d.Edge.allowed.test.", i)
				m.Answer = append(m.Answer, mustRR(t, prev+" 300 IN CNAME "+next))
				prev = strings.ToUpper(next)
			}
			m.Answer = append(m.Answer, mustRR(t, prev+" 300 IN A 192.0.2.81"))
		}
	})
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{addr}}, Deps{})
	cli := netip.MustParseAddr("127.0.0.1")
	for name, want := range map[string]string{
		"www.dname.allowed.test.": "192.0.2.80",
		"Long.Allowed.Test.":      "192.0.2.81",
	} {
		r := ask(t, "udp", ts.Addr, name, dns.TypeA, true)
		if r.Rcode != dns.RcodeSuccess || !slices.Contains(answerAddrs(r), netip.MustParseAddr(want)) {
			t.Errorf("%s: %v", name, r)
			continue
		}
		if got := ts.Table().NamesFor(cli, netip.MustParseAddr(want)); len(got) != 1 {
			t.Errorf("%s: %s learned for %v", name, want, got)
		}
	}
}
