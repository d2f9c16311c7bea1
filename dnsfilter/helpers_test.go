package dnsfilter

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/internal/testnet"
	"egressd/policy"
)

// seenQuery is one query an upstream received.
type seenQuery struct {
	Name  string // lower case, no trailing dot
	Type  uint16
	Proto string
	ID    uint16
	Port  uint16
}

// fakeUpstream is an in-process authoritative server on loopback (UDP and
// TCP on one port) that records every query it receives.
type fakeUpstream struct {
	Addr  string
	zone  map[string][]dns.RR // lower-case fqdn -> records
	delay atomic.Int64        // nanoseconds before answering
	drop  atomic.Bool         // never answer
	big   atomic.Bool         // ignore the EDNS size: UDP answers go out whole
	tcAll atomic.Bool         // set TC on every answer, over TCP too
	// decoys: before each UDP answer, send two with its ID but another
	// question (another name, another type), both with 203.0.113.66.
	decoys    atomic.Bool
	decoysOut atomic.Int32
	// mangle, when set, changes each answer last, before it is sent
	// (proto "udp" or "tcp").
	mangle atomic.Pointer[func(m *dns.Msg, proto string)]

	mu   sync.Mutex // guards seen
	seen []seenQuery
}

const testSOA = "allowed.test. 300 IN SOA ns.allowed.test. h.allowed.test. 1 3600 600 86400 30"

// newUpstream starts an upstream serving the records in zone (one RR per
// line, zone-file syntax with absolute names).
func newFakeUpstream(t testing.TB, zone string) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{zone: map[string][]dns.RR{}}
	for _, line := range strings.Split(zone, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		rr, err := dns.NewRR(line)
		if err != nil {
			t.Fatalf("zone line %q: %v", line, err)
		}
		k := strings.ToLower(rr.Header().Name)
		u.zone[k] = append(u.zone[k], rr)
	}
	var pc net.PacketConn
	var l net.Listener
	for i := 0; ; i++ {
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
		if i > 10 {
			t.Fatal(err)
		}
	}
	u.Addr = pc.LocalAddr().String()
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: u}, {Listener: l, Handler: u}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return u
}

func (u *fakeUpstream) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	if len(r.Question) != 1 {
		return
	}
	q := r.Question[0]
	proto := "udp"
	var port uint16
	switch a := w.RemoteAddr().(type) {
	case *net.TCPAddr:
		proto, port = "tcp", uint16(a.Port)
	case *net.UDPAddr:
		port = uint16(a.Port)
	}
	u.mu.Lock()
	u.seen = append(u.seen, seenQuery{Name: strings.TrimSuffix(strings.ToLower(q.Name), "."), Type: q.Qtype, Proto: proto, ID: r.Id, Port: port})
	u.mu.Unlock()
	if u.drop.Load() {
		return
	}
	if d := u.delay.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	name := strings.ToLower(q.Name)
	found := false
	for hops := 0; hops < 8; hops++ {
		rrs, ok := u.zone[name]
		if !ok {
			break
		}
		found = true
		next := ""
		for _, rr := range rrs {
			if rr.Header().Rrtype == q.Qtype {
				m.Answer = append(m.Answer, dns.Copy(rr))
			} else if c, ok := rr.(*dns.CNAME); ok {
				m.Answer = append(m.Answer, dns.Copy(rr))
				next = strings.ToLower(c.Target)
			}
		}
		if next == "" {
			break
		}
		name = next
	}
	if !found {
		m.Rcode = dns.RcodeNameError
	}
	if len(m.Answer) == 0 && !strings.Contains(name, "nosoa") {
		soa, _ := dns.NewRR(testSOA)
		m.Ns = append(m.Ns, soa)
	}
	if opt := r.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), opt.Do())
	}
	if proto == "udp" && !u.big.Load() {
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		m.Truncate(size)
	}
	if u.tcAll.Load() {
		m.Truncated = true
	}
	if proto == "udp" && u.decoys.Load() {
		for _, dq := range []dns.Question{{Name: "decoy.allowed.test.", Qtype: q.Qtype, Qclass: q.Qclass}, {Name: q.Name, Qtype: dns.TypeTXT, Qclass: q.Qclass}} {
			d := new(dns.Msg)
			d.SetReply(r)
			d.Question = []dns.Question{dq}
			d.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.IPv4(203, 0, 113, 66)}}
			if w.WriteMsg(d) == nil {
				u.decoysOut.Add(1)
			}
		}
	}
	if f := u.mangle.Load(); f != nil {
		(*f)(m, proto)
	}
	_ = w.WriteMsg(m)
}

func (u *fakeUpstream) Seen() []seenQuery {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenQuery(nil), u.seen...)
}

func (u *fakeUpstream) count(name string) int {
	n := 0
	for _, s := range u.Seen() {
		if s.Name == name {
			n++
		}
	}
	return n
}

// recSink keeps audit events.
type recSink struct {
	mu  sync.Mutex
	evs []audit.Event
}

func (r *recSink) Emit(ev audit.Event) {
	r.mu.Lock()
	r.evs = append(r.evs, ev)
	r.mu.Unlock()
}

func (r *recSink) Events() []audit.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]audit.Event(nil), r.evs...)
}

// find returns the last event for name.
func (r *recSink) find(name string) (audit.Event, bool) {
	evs := r.Events()
	for i := len(evs) - 1; i >= 0; i-- {
		if evs[i].Name == name {
			return evs[i], true
		}
	}
	return audit.Event{}, false
}

const enforcePolicy = `version: 1
mode: enforce
rules:
  - name: lab
    to: ["*.allowed.test", "printer.lan"]
    ports: [443/tcp]
`

const auditPolicy = `version: 1
mode: audit
rules:
  - name: lab
    to: ["*.allowed.test"]
    ports: [443/tcp]
`

func compile(t testing.TB, src string) *policy.Store {
	t.Helper()
	e, err := policy.Compile("test-policy.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return policy.NewStore(e)
}

// procsAtLeast raises GOMAXPROCS to n for the test, so that n-1 listener
// readers may wait outside the netpoller (rawReaders) whatever the
// machine's CPU count. The tests of this package do not run in parallel.
func procsAtLeast(t testing.TB, n int) {
	t.Helper()
	setProcs(t, max(n, runtime.GOMAXPROCS(0)))
}

// setProcs sets GOMAXPROCS to n for the test.
func setProcs(t testing.TB, n int) {
	t.Helper()
	old := runtime.GOMAXPROCS(n)
	t.Cleanup(func() { runtime.GOMAXPROCS(old) })
}

type testServer struct {
	*Server
	Addr string // host:port, UDP and TCP
	Sink *recSink
}

// fastQuery is a UDP query for www.allowed.test A, packed, and the
// address of a loopback socket (open until tb ends) it comes from: what
// fast takes besides the server's socket.
func fastQuery(tb testing.TB) ([]byte, netip.AddrPort) {
	tb.Helper()
	client, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { client.Close() })
	q := new(dns.Msg)
	q.SetQuestion("www.allowed.test.", dns.TypeA)
	pkt, err := q.Pack()
	if err != nil {
		tb.Fatal(err)
	}
	return pkt, client.LocalAddr().(*net.UDPAddr).AddrPort()
}

// firstUDP is the first UDP socket ts reads.
func (ts *testServer) firstUDP() udpConn {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.udp[0]
}

// startServer runs a forwarder on a free loopback port until the test ends.
func startServer(t testing.TB, pol string, cfg Config, deps Deps) *testServer {
	t.Helper()
	if cfg.Listen == nil {
		cfg.Listen = []string{"127.0.0.1:0"}
	}
	if cfg.UDPReaders == 0 {
		cfg.UDPReaders = 2
	}
	if cfg.ClientRate == 0 {
		cfg.ClientRate = -1
	}
	sink := &recSink{}
	if deps.Policy == nil {
		deps.Policy = compile(t, pol)
	}
	if deps.Sink == nil {
		deps.Sink = sink
	}
	s, err := New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	runServer(t, s, nil)
	return &testServer{Server: s, Addr: s.Addrs()[0].String(), Sink: sink}
}

// runServer runs s until the test ends, from inside ns where one is
// given: Run binds in the goroutine that calls it, so its listening
// sockets are that namespace's (its upstream sockets, made later on
// other threads, are the test's namespace's).
func runServer(t testing.TB, s *Server, ns *testnet.NS) {
	t.Helper()
	run := func() error { return s.Run(context.Background()) }
	if ns != nil {
		run = func() error { return ns.Do(func() error { return s.Run(context.Background()) }) }
	}
	done := make(chan error, 1)
	go func() { done <- run() }()
	select {
	case <-s.Ready():
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(func() {
		_ = s.Close()
		if err := <-done; err != nil && !errors.Is(err, net.ErrClosed) {
			t.Errorf("run: %v", err)
		}
	})
}

// ask sends one query with miekg's client.
func ask(t testing.TB, proto, addr, name string, qtype uint16, edns bool) *dns.Msg {
	t.Helper()
	r, err := tryAsk(proto, addr, name, qtype, edns)
	if err != nil {
		t.Fatalf("%s %s %s: %v", proto, name, dns.TypeToString[qtype], err)
	}
	return r
}

func tryAsk(proto, addr, name string, qtype uint16, edns bool) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	if edns {
		m.SetEdns0(1232, false)
	}
	c := &dns.Client{Net: proto, Timeout: 6 * time.Second, UDPSize: 1232}
	r, _, err := c.Exchange(m, addr)
	return r, err
}

func answerAddrs(m *dns.Msg) []netip.Addr {
	var out []netip.Addr
	for _, rr := range m.Answer {
		switch v := rr.(type) {
		case *dns.A:
			a, _ := netip.AddrFromSlice(v.A.To4())
			out = append(out, a)
		case *dns.AAAA:
			a, _ := netip.AddrFromSlice(v.AAAA)
			out = append(out, a)
		}
	}
	return out
}

func ede(m *dns.Msg) (uint16, string, bool) {
	if opt := m.IsEdns0(); opt != nil {
		for _, o := range opt.Option {
			if e, ok := o.(*dns.EDNS0_EDE); ok {
				return e.InfoCode, e.ExtraText, true
			}
		}
	}
	return 0, "", false
}

func portOf(addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(p)
	return n
}
