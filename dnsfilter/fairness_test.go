package dnsfilter

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fairPolicy allows a vendor's names and the attacker's wildcard.
const fairPolicy = `version: 1
mode: enforce
rules:
  - name: tenant
    to: ["*.tenant.test"]
    ports: [443/tcp]
  - name: vendor
    to: ["api.vendor.test", "cdn.vendor.test"]
    ports: [443/tcp]
`

// exchangeFrom asks addr over proto from the loopback address src.
func exchangeFrom(t testing.TB, src, proto, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	d := &net.Dialer{Timeout: 6 * time.Second}
	if proto == "tcp" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	} else {
		d.LocalAddr = &net.UDPAddr{IP: net.ParseIP(src)}
	}
	c := &dns.Client{Net: proto, Timeout: 6 * time.Second, UDPSize: 1232, Dialer: d}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s from %s: %s %s: %v", proto, src, name, dns.TypeToString[qtype], err)
	}
	return r
}

// TestFloodKeepsOtherClients: a LAN client (127.0.0.2) that also runs the
// authoritative server of names under the allowed *.tenant.test asks
// forty of them; each answer (over TCP) holds 300 addresses with a TTL of
// an hour. Another client (127.0.0.1) was given the 8 addresses of
// cdn.vendor.test for 60 s. The table (1,024 items here) is full, and
// evicting the soonest-expiring first pushed the other client's entries
// out: its connections then failed the proxy's SNI check (A2) in enforce
// mode. Now one answer adds at most maxAnswerAddrs addresses (the rest
// are dropped from the answer and counted), and a client holding its
// share of a full shard gives up its own items before anyone else's.
func TestFloodKeepsOtherClients(t *testing.T) {
	up := newHostileUpstream(t, func(q dns.Question, m *dns.Msg) {
		if q.Qtype != dns.TypeA {
			return
		}
		switch {
		case q.Name == "cdn.vendor.test.":
			for i := 1; i <= 8; i++ {
				m.Answer = append(m.Answer, mustRR(t, fmt.Sprintf("%s 60 IN A 203.0.113.%d", q.Name, i)))
			}
		case strings.HasSuffix(q.Name, ".tenant.test."):
			n, _ := strconv.Atoi(strings.TrimPrefix(strings.SplitN(q.Name, ".", 2)[0], "f"))
			for i := range 300 {
				m.Answer = append(m.Answer, mustRR(t, fmt.Sprintf("%s 3600 IN A 198.18.%d.%d", q.Name, n, i%250+1)))
				if i >= 250 {
					m.Answer[len(m.Answer)-1].(*dns.A).A = net.IPv4(198, 19, byte(n), byte(i-249))
				}
			}
		}
	})
	ts := startServer(t, fairPolicy, Config{Upstreams: []string{up}, TableSize: 1024}, Deps{})
	victim := netip.MustParseAddr("127.0.0.1")
	r := exchangeFrom(t, "127.0.0.1", "udp", ts.Addr, "cdn.vendor.test.", dns.TypeA)
	if len(r.Answer) != 8 {
		t.Fatalf("cdn.vendor.test: %v", r)
	}
	for i := range 40 {
		r := exchangeFrom(t, "127.0.0.2", "tcp", ts.Addr, fmt.Sprintf("f%d.tenant.test.", i), dns.TypeA)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 {
			t.Fatalf("flood %d: %v", i, r)
		}
		if len(r.Answer) > maxAnswerAddrs && i == 0 {
			t.Errorf("flood %d: %d addresses passed on, more than the %d learned", i, len(r.Answer), maxAnswerAddrs)
		}
	}
	lost := 0
	for i := 1; i <= 8; i++ {
		a := netip.AddrFrom4([4]byte{203, 0, 113, byte(i)})
		if got := ts.Table().NamesFor(victim, a); !slices.Equal(got, []string{"cdn.vendor.test"}) {
			lost++
		}
	}
	if lost > 0 {
		t.Errorf("%d of the 8 addresses 127.0.0.1 was given for cdn.vendor.test were pushed out of the table by 127.0.0.2's answers (table %d items)", lost, ts.Table().Len())
	}
	if got, want := ts.Table().Refused(), uint64(40*(300-maxAnswerAddrs)); got < want {
		t.Errorf("Refused() = %d, want at least the %d addresses past the per-answer bound", got, want)
	}
}

// TestAddrFloodKeepsOtherClients: the attacker answers the address another
// client was given for an allowed name (a shared CDN address) under a
// hundred of its own names, an hour each. An address keeps maxPerAddr
// (client, name) pairs and replaced the soonest-expiring: the other
// client's. Now a client holding a quarter of an address's pairs
// replaces its own.
func TestAddrFloodKeepsOtherClients(t *testing.T) {
	tb := NewTable(0)
	victim, attacker := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.66")
	shared := netip.MustParseAddr("203.0.113.10")
	now := time.Now()
	tb.Learn(Learned{Client: victim, Name: "cdn.vendor.test", Addr: shared, Rule: "vendor", Expires: now.Add(60 * time.Second)})
	for i := range 100 {
		tb.Learn(Learned{Client: attacker, Name: fmt.Sprintf("f%d.tenant.test", i), Addr: shared, Rule: "tenant", Expires: now.Add(time.Hour)})
	}
	if got := tb.NamesFor(victim, shared); !slices.Equal(got, []string{"cdn.vendor.test"}) {
		t.Errorf("the victim's pair for %s: %v, want cdn.vendor.test", shared, got)
	}
	if n := len(tb.NamesFor(attacker, shared)); n < maxPerAddr/shareDiv || n > maxPerAddr-1 {
		t.Errorf("the attacker holds %d pairs of %s", n, shared)
	}
	// A client alone on an address still fills it, its oldest pairs
	// giving way to its new ones.
	solo := netip.MustParseAddr("203.0.113.11")
	for i := range 100 {
		tb.Learn(Learned{Client: attacker, Name: fmt.Sprintf("s%d.tenant.test", i), Addr: solo, Rule: "tenant", Expires: now.Add(time.Duration(i+1) * time.Minute)})
	}
	if got := tb.NamesFor(attacker, solo); len(got) != maxPerAddr || !slices.Contains(got, "s99.tenant.test") {
		t.Errorf("a lone client's pairs of %s: %d, newest kept %v", solo, len(got), slices.Contains(got, "s99.tenant.test"))
	}
}
