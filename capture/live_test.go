package capture

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestLiveAFPacket captures on a veth inside a test namespace while real
// clients (curl, dig) in the peer namespace talk to real servers (Go's
// HTTPS and HTTP servers, a miekg/dns server): the flows and their names
// come out as expected and the kernel drops nothing.
func TestLiveAFPacket(t *testing.T) {
	testnet.RequireRoot(t)
	for _, tool := range []string{"curl", "dig"} {
		if _, err := lookPath(tool); err != nil {
			t.Fatalf("%s is needed for the live capture test (Debian: curl, dnsutils): %v", tool, err)
		}
	}
	cli := testnet.New(t, "capc")
	gw := testnet.New(t, "capg")
	testnet.Link(t, cli, "lan0", []string{"198.18.0.2/24"}, gw, "lan1", []string{"198.18.0.1/24", "198.18.0.3/24", "198.18.0.4/24", "198.18.0.5/24"})

	// Servers in the gateway namespace.
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello " + r.Host)) })
	listen := func(addr string) net.Listener {
		ln, err := gw.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		return ln
	}
	for _, addr := range []string{"198.18.0.1:443", "198.18.0.4:443"} {
		s := httptest.NewUnstartedServer(handler)
		s.Listener = listen(addr)
		s.StartTLS()
		defer s.Close()
	}
	for _, addr := range []string{"198.18.0.1:80", "198.18.0.3:8080"} {
		s := httptest.NewUnstartedServer(handler)
		s.Listener = listen(addr)
		s.Start()
		defer s.Close()
	}
	pc, err := gw.ListenPacket("udp", "198.18.0.5:53")
	if err != nil {
		t.Fatal(err)
	}
	dnsSrv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		if len(r.Question) == 1 && r.Question[0].Qtype == dns.TypeA {
			a := "198.18.0.3"
			if q := r.Question[0].Name; q == "www.allowed.test." || q == "plain.allowed.test." {
				a = "198.18.0.1"
			}
			rr, _ := dns.NewRR(r.Question[0].Name + " 60 IN A " + a)
			m.Answer = append(m.Answer, rr)
		}
		w.WriteMsg(m)
	})}
	go dnsSrv.ActivateAndServe()
	defer dnsSrv.Shutdown()

	// Capture on the gateway's LAN side, the socket opened in its namespace.
	// The servers stand for the internet on the gateway namespace's own
	// addresses, so the captures are told it has none (Config.OwnAddrs).
	rec := &recorder{}
	eng := testEngine(t, testPolicy)
	c := startLive(t, gw, Config{Interfaces: []string{"lan1"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(eng), Sink: rec})
	// A twin capture on the same interface copies whole frames: the snap
	// filter of the first must change no count.
	recFull := &recorder{}
	full := startLive(t, gw, Config{Interfaces: []string{"lan1"}, FullFrames: true, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(eng), Sink: recFull})

	// Real clients in the client namespace. The names are looked up
	// first: capture reads the answers, which vouch for the addresses
	// the SNI and Host go to.
	for _, name := range []string{"www.allowed.test", "plain.allowed.test"} {
		if out := cli.MustRun("dig", "+short", "+time=3", "+tries=1", "@198.18.0.5", name, "A"); strings.TrimSpace(out) != "198.18.0.1" {
			t.Fatalf("dig %s: %q", name, out)
		}
	}
	out := cli.MustRun("curl", "-sk", "--max-time", "10", "--resolve", "www.allowed.test:443:198.18.0.1", "https://www.allowed.test/")
	if !strings.Contains(out, "hello www.allowed.test") {
		t.Fatalf("curl https: %q", out)
	}
	out = cli.MustRun("curl", "-s", "--max-time", "10", "--resolve", "plain.allowed.test:80:198.18.0.1", "http://plain.allowed.test/")
	if !strings.Contains(out, "hello plain.allowed.test") {
		t.Fatalf("curl http: %q", out)
	}
	out = cli.MustRun("dig", "+short", "+time=3", "+tries=1", "@198.18.0.5", "api.allowed.test", "A")
	if strings.TrimSpace(out) != "198.18.0.3" {
		t.Fatalf("dig: %q", out)
	}
	// An address literal: named only by the DNS answer capture saw.
	cli.MustRun("curl", "-s", "--max-time", "10", "http://198.18.0.3:8080/")
	// An allowed SNI sent to an address no DNS answer gave out for it
	// (THREATS.md A2): the server answers, capture reports sni-mismatch.
	out = cli.MustRun("curl", "-sk", "--max-time", "10", "--resolve", "www.allowed.test:443:198.18.0.4", "https://www.allowed.test/")
	if !strings.Contains(out, "hello www.allowed.test") {
		t.Fatalf("curl https to 198.18.0.4: %q", out)
	}

	// Wait for the flows to end (FIN both ways) and reach the capture.
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().Flows < 4 && time.Now().Before(deadline) { // the four TCP flows; UDP ones end at shutdown
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // TPACKET_V3 hands blocks over after 64 ms
	for _, lc := range []*liveCapture{c, full} {
		if err := lc.stop(); err != nil {
			t.Fatalf("Run: %v", err)
		}
	}
	st, stFull := c.Stats(), full.Stats()
	if st.KernelDrops != 0 || stFull.KernelDrops != 0 {
		t.Errorf("kernel dropped %d and %d packets on the capture sockets", st.KernelDrops, stFull.KernelDrops)
	}
	// (Packet totals may differ by a stray IPv6 neighbour packet sent
	// between the two sockets' opening; the flows may not.)
	if st.Flows != stFull.Flows {
		t.Errorf("snapped capture: %d flows; whole frames: %d", st.Flows, stFull.Flows)
	}
	if st.Snapped == 0 || stFull.Snapped != 0 {
		t.Errorf("frames cut short: %d by the snap filter (want some: the server's certificate), %d with whole frames", st.Snapped, stFull.Snapped)
	}
	type key struct {
		port uint16
		dest netip.Addr
	}
	fullEvs := map[key]audit.Event{}
	for _, ev := range recFull.all() {
		fullEvs[key{ev.ClientPort, ev.Dest}] = ev
	}
	for _, ev := range rec.all() {
		fe := fullEvs[key{ev.ClientPort, ev.Dest}]
		if fe.BytesIn != ev.BytesIn || fe.BytesOut != ev.BytesOut || fe.Name != ev.Name || fe.Verdict != ev.Verdict || fe.Reason != ev.Reason {
			t.Errorf("snapped capture: %+v\nwhole frames: %+v", ev, fe)
		}
	}
	type want struct {
		port    uint16
		dest    string
		proto   string
		name    string
		src     audit.NameSource
		verdict policy.Verdict
	}
	wants := []want{
		{443, "198.18.0.1", "tcp", "www.allowed.test", audit.NameSNI, policy.Allow},
		{443, "198.18.0.4", "tcp", "www.allowed.test", audit.NameSNI, policy.Deny},
		{80, "198.18.0.1", "tcp", "plain.allowed.test", audit.NameHost, policy.Allow},
		{53, "198.18.0.5", "udp", "", audit.NameNone, policy.Allow},
		// Allowed names, but not on port 8080: denied. The reason is the
		// name's (port-not-allowed: its rule lacks the port), the name
		// the best one known, as the proxy's decideAddr records a flow no
		// name allows (policy.DecideLearned).
		{8080, "198.18.0.3", "tcp", "api.allowed.test", audit.NameDNSAnswer, policy.Deny},
	}
	evs := rec.all()
	client := netip.MustParseAddr("198.18.0.2")
	for _, w := range wants {
		found := false
		for _, ev := range evs {
			if ev.DestPort != w.port || ev.Proto != w.proto || ev.Dest != netip.MustParseAddr(w.dest) {
				continue
			}
			found = true
			if ev.Client != client || ev.Dest != netip.MustParseAddr(w.dest) || ev.Name != w.name || ev.NameSource != w.src || ev.Verdict != w.verdict {
				t.Errorf("port %d: event %+v, want name %q (%s) %s", w.port, ev, w.name, w.src, w.verdict)
			}
			if w.proto == "tcp" && (ev.BytesOut == 0 || ev.BytesIn == 0 || (ev.Close != "fin" && ev.Close != "rst")) {
				t.Errorf("port %d: bytes %d/%d close %q", w.port, ev.BytesOut, ev.BytesIn, ev.Close)
			}
			if w.port == 8080 && ev.Reason != policy.ReasonPort {
				t.Errorf("port 8080: reason %q, want %q", ev.Reason, policy.ReasonPort)
			}
			if w.dest == "198.18.0.4" && ev.Reason != ReasonSNIMismatch {
				t.Errorf("SNI to 198.18.0.4: reason %q, want %q", ev.Reason, ReasonSNIMismatch)
			}
			if ev.ClientMAC == "" {
				t.Errorf("port %d: no client MAC", w.port)
			}
		}
		if !found {
			t.Errorf("no flow to port %d/%s in %+v", w.port, w.proto, evs)
		}
	}
}

// TestLiveNeverWaitsInPoll: Run waits for packets on a Go timer, never in
// poll(2), where its thread would hold a Go processor until sysmon took it
// back (live.go, minRingWait). While a capture runs on an idle interface
// no thread of this process may be found in ppoll; with the old wait (a
// 100 ms poll timeout) its thread was there nearly all the time. Packets
// still come through: datagrams across the link are captured. They go to
// the capturing namespace's own address, which Open read: the flow is
// counted as the gateway's own and not recorded.
func TestLiveNeverWaitsInPoll(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.New(t, "cpa")
	b := testnet.New(t, "cpb")
	testnet.Link(t, a, "pl0", []string{"198.18.9.1/24"}, b, "pl1", []string{"198.18.9.2/24"})
	c := startLive(t, b, Config{Interfaces: []string{"pl1"}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}})
	sink, err := b.ListenPacket("udp", "198.18.9.2:9")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	conn, err := a.DialContext(context.Background(), "udp", "198.18.9.2:9")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	send := func() {
		t.Helper()
		if _, err := conn.Write([]byte("egressd capture test")); err != nil {
			t.Fatal(err)
		}
	}
	// Run is in its loop: it has read a datagram. Before, a fixed 300 ms
	// stood for it, and a Run that had not begun by the end of the looks
	// (a busy box) had them find no thread in ppoll, whatever Run's wait.
	send()
	deadline := time.Now().Add(10 * time.Second)
	for st := c.Stats(); st.Packets-st.NotIP < 1; st = c.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("capture read no datagram 10 s after one was sent (stats %+v)", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the interface idle
	inPoll := 0
	for range 50 {
		tasks, _ := filepath.Glob("/proc/self/task/*/syscall")
		for _, f := range tasks {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			if nr, _, _ := strings.Cut(string(b), " "); nr == strconv.Itoa(unix.SYS_PPOLL) {
				inPoll++
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if inPoll > 0 {
		t.Errorf("a thread was in ppoll in %d of 50 looks while capture ran on an idle interface", inPoll)
	}
	for range 3 {
		send()
		time.Sleep(50 * time.Millisecond)
	}
	// Wait until Run has read the datagrams themselves, not any 4
	// packets: the link's ARP packets (NotIP: 6 of the 8 or 9 packets)
	// reach that count first, and a stop then, with Run behind the ring
	// (a loaded box, or a wait of up to maxRingWait after the idle
	// spell), left datagrams unread: once "0 own flows".
	deadline = time.Now().Add(10 * time.Second)
	for st := c.Stats(); time.Now().Before(deadline) && (st.Own == 0 || st.Packets-st.NotIP < 4); st = c.Stats() {
		time.Sleep(20 * time.Millisecond)
	}
	if err := c.stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	if st := c.Stats(); st.Own != 1 || st.Flows != 0 || st.Packets-st.NotIP < 4 {
		t.Errorf("datagrams to the namespace's own 198.18.9.2: %d own flows, %d recorded, %d IP packets; want 1, 0 and the 4 datagrams at least (stats %+v)",
			st.Own, st.Flows, st.Packets-st.NotIP, st)
	}
}

// liveCapture is a capture running on a socket opened in a test
// namespace.
type liveCapture struct {
	*Capture
	cancel context.CancelFunc
	errc   chan error
}

// startLive builds a capture, opens its socket in ns (a socket belongs to
// the namespace of the thread that made it) and runs it. It is closed when
// the test ends.
func startLive(tb testing.TB, ns *testnet.NS, cfg Config, deps Deps) *liveCapture {
	tb.Helper()
	c, err := New(cfg, deps)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	if err := ns.Do(c.Open); err != nil {
		tb.Fatalf("open AF_PACKET on %s in the namespace: %v", cfg.Interfaces, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	lc := &liveCapture{Capture: c, cancel: cancel, errc: make(chan error, 1)}
	go func() { lc.errc <- c.Run(ctx) }()
	return lc
}

// stop ends Run and returns its error.
func (lc *liveCapture) stop() error {
	lc.cancel()
	return <-lc.errc
}
