package main

import (
	"cmp"
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/dnsfilter"
	"egressd/firewall"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestSetFullAnswer: in enforce mode a rule's learned set full of live
// addresses refused the address of a new answer, and the forwarder still
// gave the client that address: a DNS success, then a silent timeout, as
// the firewall dropped the client's packets to it. The client now gets
// SERVFAIL for a name none of whose addresses the firewall took, and an
// answer with only the learned addresses when some were; what it gets it
// can reach (setFullGateway).
func TestSetFullAnswer(t *testing.T) {
	ask, reach, led := setFullGateway(t, "n1", "{name: ntp, to: [ntp.test, pool.test], ports: [123/udp]}",
		map[string][]string{"ntp.test.": {"198.18.2.2"}, "pool.test.": {"198.18.2.2", "198.18.2.10"}})

	// ntp.test's only address: refused by the full set.
	r := ask("ntp.test.")
	got := setFullAddrs(r)
	for _, a := range got {
		if !reach(a) {
			t.Errorf("ntp.test: the client got %s (rcode %s) and its packets to it are dropped", a, dns.RcodeToString[r.Rcode])
		}
	}
	if r.Rcode != dns.RcodeServerFailure || len(got) != 0 {
		t.Errorf("ntp.test with the set full: rcode %s, addresses %v; want SERVFAIL and none", dns.RcodeToString[r.Rcode], got)
	}

	// pool.test: one address in the set already, one refused.
	r = ask("pool.test.")
	got = setFullAddrs(r)
	for _, a := range got {
		if !reach(a) {
			t.Errorf("pool.test: the client got %s and its packets to it are dropped", a)
		}
	}
	if want := []netip.Addr{netip.MustParseAddr("198.18.2.10")}; r.Rcode != dns.RcodeSuccess || !slices.Equal(got, want) {
		t.Errorf("pool.test with the set full: rcode %s, addresses %v; want NOERROR and %v", dns.RcodeToString[r.Rcode], got, want)
	}

	// The report says so: both queries under ntp, both with answers
	// withheld (the forwarder's events: allow, enforced).
	var u *audit.RuleReport
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		u = nil
		rep := led.Report(audit.ReportOptions{})
		for i := range rep.Rules {
			if rep.Rules[i].Name == "ntp" {
				u = &rep.Rules[i]
			}
		}
		if u != nil && u.Queries >= 2 || time.Now().After(deadline) {
			break
		}
	}
	if u == nil || u.Queries != 2 || u.AnswersWithheld != 2 {
		t.Errorf("the report's ntp: %+v; want 2 queries, 2 answers withheld", u)
	}
}

// TestSetFullAnswerCIDR: a rule with names and a CIDR opens the CIDR's
// addresses whatever its learned set took. Its set full refusing one does
// not keep the client from it: the answer keeps it, and the client's
// packets go out by the CIDR's accept.
func TestSetFullAnswerCIDR(t *testing.T) {
	ask, reach, _ := setFullGateway(t, "n2", "{name: ntp, to: [ntp.test, 198.18.2.2/32], ports: [123/udp]}",
		map[string][]string{"ntp.test.": {"198.18.2.2"}})
	r := ask("ntp.test.")
	want := []netip.Addr{netip.MustParseAddr("198.18.2.2")}
	if got := setFullAddrs(r); r.Rcode != dns.RcodeSuccess || !slices.Equal(got, want) {
		t.Errorf("ntp.test, in the rule's CIDR, its set full: rcode %s, addresses %v; want NOERROR and %v", dns.RcodeToString[r.Rcode], got, want)
	}
	if !reach(want[0]) {
		t.Errorf("198.18.2.2, in the rule's CIDR: no echo")
	}
}

// TestSetFullAnswerReload: a reload's ruleset goes in while a query the
// old policy decided is on its way to the firewall (reloadPolicy swaps the
// store first; the hook replaces the ruleset before the query's Learn).
// The old rule's CIDR opened the address, the new rule has none: the
// client must not get an address the installed ruleset drops. The
// forwarder asked the old engine (DestOpens) whether the rule opens it,
// and kept it in the answer: a success, then a silent timeout.
func TestSetFullAnswerReload(t *testing.T) {
	newEng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - {name: ntp, to: [ntp.test], ports: [123/udp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	ask, reach, _ := setFullGatewayHook(t, "n3", "{name: ntp, to: [ntp.test, 198.18.2.2/32], ports: [123/udp]}",
		map[string][]string{"ntp.test.": {"198.18.2.2"}}, func(fw *firewall.Firewall) {
			once.Do(func() {
				if err := fw.Replace(newEng); err != nil {
					t.Errorf("replace: %v", err)
				}
			})
		}, nil)
	r := ask("ntp.test.")
	if reach(netip.MustParseAddr("198.18.2.2")) {
		t.Fatal("198.18.2.2 reachable after the reload: the new ruleset does not drop it, the test shows nothing")
	}
	if got := setFullAddrs(r); r.Rcode != dns.RcodeServerFailure || len(got) != 0 {
		t.Errorf("ntp.test, its set full, the installed rule without the CIDR: rcode %s, addresses %v (unreachable); want SERVFAIL and none", dns.RcodeToString[r.Rcode], got)
	}
}

// TestSetFullAnswerReloadRemembered: a query of the reloaded policy
// (reloadPolicy swaps the store first) reaches the firewall before the
// new ruleset goes in: the installed rule's CIDR opens the address, and
// the answer keeps it, rightly. The refusal is remembered with the cached
// answer for a second; the new ruleset (no CIDR) goes in, and the next
// hit within that second gave the client the address again, which the
// installed ruleset now drops. A refusal the firewall judged with a
// ruleset other than the answer's policy's is not remembered.
func TestSetFullAnswerReloadRemembered(t *testing.T) {
	newEng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - {name: ntp, to: [ntp.test], ports: [123/udp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	var fwp atomic.Pointer[firewall.Firewall]
	ask, reach, _ := setFullGatewayHook(t, "n4", "{name: ntp, to: [ntp.test, 198.18.2.2/32], ports: [123/udp]}",
		map[string][]string{"ntp.test.": {"198.18.2.2"}}, func(fw *firewall.Firewall) { fwp.Store(fw) }, newEng)
	want := []netip.Addr{netip.MustParseAddr("198.18.2.2")}
	if r := ask("ntp.test."); r.Rcode != dns.RcodeSuccess || !slices.Equal(setFullAddrs(r), want) {
		t.Fatalf("ntp.test before the new ruleset goes in (the installed rule's CIDR opens it): rcode %s, addresses %v; want NOERROR and %v",
			dns.RcodeToString[r.Rcode], setFullAddrs(r), want)
	}
	if err := fwp.Load().Replace(newEng); err != nil {
		t.Fatal(err)
	}
	r := ask("ntp.test.") // a cache hit, within the second the refusal is remembered
	if reach(want[0]) {
		t.Fatal("198.18.2.2 reachable after the reload: the new ruleset does not drop it, the test shows nothing")
	}
	if got := setFullAddrs(r); r.Rcode != dns.RcodeServerFailure || len(got) != 0 {
		t.Errorf("ntp.test after the new ruleset went in (no CIDR), its set full: rcode %s, addresses %v (unreachable); want SERVFAIL and none", dns.RcodeToString[r.Rcode], got)
	}
}

// hookGate is a firewallGate that calls hook before each Learn.
type hookGate struct {
	*firewallGate
	hook func()
}

func (h *hookGate) Learn(ctx context.Context, eng *policy.Engine, ls []dnsfilter.Learned) error {
	h.hook()
	return h.firewallGate.Learn(ctx, eng, ls)
}

// setFullGateway builds a gateway whose firewall (MaxLearned 2) installs
// a policy of the one rule given, named ntp, its learned set full of live
// addresses (198.18.2.10, 198.18.2.11), and a DNS forwarder answering
// zone's A records through it. ask queries the forwarder; reach reports
// whether the client's UDP to port 123 of an address is echoed (the
// server echoes on 198.18.2.2 and 198.18.2.10).
//
//	client eth0 198.18.1.2 ── lan0 198.18.1.1 gateway (firewall) wan0 198.18.2.1 ── eth0 198.18.2.x server
func setFullGateway(t *testing.T, tag, rule string, zone map[string][]string) (ask func(name string) *dns.Msg, reach func(netip.Addr) bool, led *audit.Ledger) {
	t.Helper()
	return setFullGatewayHook(t, tag, rule, zone, nil, nil)
}

// setFullGatewayHook is setFullGateway whose forwarder calls hook with the
// firewall before each Learn (nil: none), and decides its queries under
// store (nil: the installed policy's engine). Its forwarder's events go
// to led.
func setFullGatewayHook(t *testing.T, tag, rule string, zone map[string][]string, hook func(*firewall.Firewall), store *policy.Engine) (ask func(name string) *dns.Msg, reach func(netip.Addr) bool, led *audit.Ledger) {
	t.Helper()
	testnet.RequireRoot(t)
	client, gw, server := testnet.New(t, tag+"c"), testnet.New(t, tag+"g"), testnet.New(t, tag+"s")
	testnet.Link(t, client, "eth0", []string{"198.18.1.2/24"}, gw, "lan0", []string{"198.18.1.1/24"})
	testnet.Link(t, gw, "wan0", []string{"198.18.2.1/24"}, server, "eth0", []string{"198.18.2.2/24", "198.18.2.10/24", "198.18.2.11/24"})
	client.MustRun("ip", "route", "add", "default", "via", "198.18.1.1")
	server.MustRun("ip", "route", "add", "198.18.1.0/24", "via", "198.18.2.1")
	gw.MustRun("sysctl", "-qw", "net.ipv4.ip_forward=1")
	for _, a := range []string{"198.18.2.2:123", "198.18.2.10:123"} {
		pc, err := server.ListenPacket("udp", a)
		if err != nil {
			t.Fatal(err)
		}
		testnet.UDPEcho(t, pc, nil)
	}

	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - "+rule+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	led = audit.NewLedger(eng, audit.LedgerOptions{})
	fw, err := firewall.New(firewall.Config{NetNS: "/var/run/netns/" + gw.Name, LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: 3129, DNSPort: 53, MaxLearned: 2}, firewall.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	// The set full of live addresses: 198.18.2.10 (an answer of a while
	// ago) and 198.18.2.11.
	for _, a := range []string{"198.18.2.10", "198.18.2.11"} {
		if err := fw.Learn("ntp", netip.MustParseAddr(a), 10*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	if err := fw.Learn("ntp", netip.MustParseAddr("198.18.2.12"), 10*time.Minute); !errors.Is(err, firewall.ErrSetFull) {
		t.Fatalf("a third address into a set of 2: %v, want ErrSetFull", err)
	}

	up := setFullUpstream(t, zone)
	g := &firewallGate{}
	g.fw.Store(fw)
	var gate dnsfilter.Firewall = g
	if hook != nil {
		gate = &hookGate{firewallGate: g, hook: func() { hook(fw) }}
	}
	s, err := dnsfilter.New(dnsfilter.Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{up}, ClientRate: -1, AllowPrivateAnswers: true},
		dnsfilter.Deps{Policy: policy.NewStore(cmp.Or(store, eng)), Firewall: gate, Sink: led})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	<-s.Ready()
	t.Cleanup(func() { s.Close(); <-done })
	dnsAddr := s.Addrs()[0].String()

	reach = func(a netip.Addr) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := client.DialContext(ctx, "udp", netip.AddrPortFrom(a, 123).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return false
		}
		_, err = c.Read(make([]byte, 64))
		return err == nil
	}
	// The path works for an address the set holds: what is dropped later
	// is dropped by the firewall.
	if !reach(netip.MustParseAddr("198.18.2.10")) {
		t.Fatal("198.18.2.10, in the set: no echo; the topology does not forward")
	}
	return func(name string) *dns.Msg { return setFullAsk(t, dnsAddr, name) }, reach, led
}

// setFullUpstream serves A records on loopback (UDP) until the test ends.
func setFullUpstream(t *testing.T, zone map[string][]string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		for _, a := range zone[r.Question[0].Name] {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.ParseIP(a)})
		}
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown() })
	return pc.LocalAddr().String()
}

func setFullAsk(t *testing.T, addr, name string) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	r, _, err := (&dns.Client{Timeout: 5 * time.Second}).Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return r
}

func setFullAddrs(m *dns.Msg) []netip.Addr {
	var out []netip.Addr
	for _, rr := range m.Answer {
		if a, ok := rr.(*dns.A); ok {
			ip, _ := netip.AddrFromSlice(a.A.To4())
			out = append(out, ip)
		}
	}
	return out
}
