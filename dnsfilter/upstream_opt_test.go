package dnsfilter

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestUpstreamMalformedOPT: an upstream answer whose OPT record breaks
// RFC 6891 §6.1.1-§6.1.2 (owned by a name other than the root, two of
// them, one outside the additional section) is malformed, as a client's
// query so is (FORMERR since session 28): it is not taken for the answer
// (it could be a forgery), so the attempt fails and the next upstream is
// asked; with none left the client gets SERVFAIL. Over UDP and over TCP
// (the UDP answer truncated). Before, the forwarder dropped the upstream's
// OPT records whatever their owner or number and passed the rest on:
// the bad upstream's address was answered and learned.
func TestUpstreamMalformedOPT(t *testing.T) {
	badOPT := func(name string) *dns.OPT {
		return &dns.OPT{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeOPT, Class: 1232}}
	}
	shapes := []struct {
		name string
		tcp  bool // the UDP answer is truncated; the bad one comes over TCP
		set  func(m *dns.Msg)
	}{
		{"OPT owned by example.", false, func(m *dns.Msg) { m.Extra = append(m.Extra, badOPT("example.")) }},
		{"OPT owned by the question's name", false, func(m *dns.Msg) { m.Extra = append(m.Extra, badOPT(m.Question[0].Name)) }},
		{"two OPT records", false, func(m *dns.Msg) { m.Extra = append(m.Extra, badOPT("."), badOPT(".")) }},
		{"OPT in the answer section", false, func(m *dns.Msg) { m.Answer = append(m.Answer, badOPT(".")) }},
		{"OPT in the authority section", false, func(m *dns.Msg) { m.Ns = append(m.Ns, badOPT(".")) }},
		{"OPT owned by example. over TCP", true, func(m *dns.Msg) { m.Extra = append(m.Extra, badOPT("example.")) }},
	}
	for _, sh := range shapes {
		t.Run(sh.name, func(t *testing.T) {
			bad := newFakeUpstream(t, "www.allowed.test. 300 IN A 203.0.113.66")
			mangle := func(m *dns.Msg, proto string) {
				if proto == "udp" && sh.tcp {
					m.Truncated = true
					return
				}
				sh.set(m)
			}
			bad.mangle.Store(&mangle)
			good := newFakeUpstream(t, "www.allowed.test. 300 IN A 192.0.2.10")
			ts := startServer(t, enforcePolicy, Config{Upstreams: []string{bad.Addr, good.Addr},
				UpstreamTimeout: 300 * time.Millisecond, QueryTimeout: 2 * time.Second}, Deps{})
			r := ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, true)
			if got := answerAddrs(r); r.Rcode != dns.RcodeSuccess || !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.10")}) {
				t.Errorf("answer %s %v, want the good upstream's 192.0.2.10", dns.RcodeToString[r.Rcode], got)
			}
			if ns := ts.Table().NamesFor(netip.Addr{}, netip.MustParseAddr("203.0.113.66")); ns != nil {
				t.Errorf("the malformed answer's address was learned for %v", ns)
			}

			// The bad upstream alone: SERVFAIL.
			ts2 := startServer(t, enforcePolicy, Config{Upstreams: []string{bad.Addr},
				UpstreamTimeout: 300 * time.Millisecond, QueryTimeout: time.Second}, Deps{})
			r = ask(t, "udp", ts2.Addr, "www.allowed.test.", dns.TypeA, true)
			if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 {
				t.Errorf("the bad upstream alone: %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], answerAddrs(r))
			}
		})
	}
}
