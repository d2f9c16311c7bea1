package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// explainPolicy mixes the kinds of rule `policy explain` decides: names
// (a wildcard and exact ones) on 443/tcp, a CIDR rule with a port range,
// UDP to a CIDR, ping, a rule naming a guarded address (the gateway's
// loopback) and 0.0.0.0/0 on two ports. Every address is one the
// topology assigns, or the gateway's loopback.
const explainPolicy = `mode: enforce
rules:
  - name: x-wild
    to: ["*.docker.com"]
    ports: [443/tcp]
  - name: x-exact
    to: [notion.so, api.nirovision.com]
    ports: [443/tcp]
  - name: x-range
    to: ["198.51.100.128/25"]
    ports: [5220-5225/tcp]
  - name: x-ntp
    to: ["198.51.100.200/30"]
    ports: [123/udp]
  - name: x-ping
    to: ["` + udpDenyIP + `/32"]
    ports: [icmp]
  - name: x-loop
    why: names the gateway's loopback, which no rule opens
    to: ["127.0.0.1/32"]
    ports: [9902/tcp, 7780/udp, icmp]
  - name: x-wide
    to: ["0.0.0.0/0"]
    ports: [8443/tcp, 7777/udp]
`

// explainCase is one destination asked of explain and tried for real.
type explainCase struct {
	kind string // "name" (curl: TLS with SNI, or plain HTTP on 80), "sni" (a ClientHello to a witness), "tcp", "udp", "icmp", "connect" (the explicit proxy asked for the gateway's loopback)
	to   string // explain's --to: a name or an address
	port string // explain's --port
	ip   string // where the attempt goes (a name's address in the zone)
	loop bool   // the gateway's loopback: tried while the LAN routes 127.0.0.1 to it
	// byAddr: a CIDR rule holds the name's address on this port, which
	// explain of the name cannot know (it knows no DNS answer): its note
	// says so, and explain of the address DNS gave is the prediction.
	byAddr bool
}

// TestExplainMatchesDaemon: `egressd policy explain --json` predicts what
// the running daemon (enforce mode, its real nftables) does, case by
// case: TCP to names the daemon's DNS answers or refuses, TCP to a CIDR
// in and out of its range and port range, UDP in and out, ICMP echo, and
// the gateway's loopback under 0.0.0.0/0 and under a rule naming
// 127.0.0.1/32. Each attempt is first shown to get through without
// egressd (the loopback ones on a gateway with route_localnet=1, as
// kube-proxy sets it). Before session 32 explain said ALLOW for UDP, ICMP
// and TCP to 127.0.0.1 under the rule naming it, which the firewall's
// antispoof chain drops from the LAN.
func TestExplainMatchesDaemon(t *testing.T) {
	tp := newTopo(t)
	const (
		inRange  = "198.51.100.140" // in x-range's 198.51.100.128/25
		outside  = "192.0.2.140"    // only x-wide holds it
		ntpIn    = "198.51.100.201" // in x-ntp's /30
		ntpOut   = "198.51.100.205"
		loopback = "127.0.0.1"
	)
	cases := []explainCase{
		{kind: "name", to: dockerName, port: "443/tcp", ip: dockerIP4},  // wildcard
		{kind: "name", to: notionName, port: "443/tcp", ip: notionIP},   // exact
		{kind: "name", to: vendorName, port: "80/tcp", ip: vendorIP},    // named, not on 80
		{kind: "name", to: trackerName, port: "443/tcp", ip: trackerIP}, // no rule
		{kind: "name", to: lookalike, port: "443/tcp", ip: lookalikeIP}, // *.docker.com must not hold it
		// x-exact names notion.so on 443 only; x-wide holds its address on 8443.
		{kind: "sni", to: notionName, port: "8443/tcp", ip: notionIP, byAddr: true},
		{kind: "tcp", to: inRange, port: "5222/tcp"},
		{kind: "tcp", to: inRange, port: "5226/tcp"},
		{kind: "tcp", to: outside, port: "5222/tcp"},
		{kind: "tcp", to: outside, port: "8443/tcp"},
		{kind: "tcp", to: outside, port: "8444/tcp"},
		{kind: "udp", to: ntpIn, port: "123/udp"},
		{kind: "udp", to: ntpOut, port: "123/udp"},
		{kind: "udp", to: outside, port: "7777/udp"},
		{kind: "udp", to: outside, port: "7778/udp"},
		{kind: "icmp", to: udpDenyIP, port: "icmp"},
		{kind: "icmp", to: outside, port: "icmp"},
		// The gateway's loopback: under 0.0.0.0/0 only, and under x-loop.
		{kind: "tcp", to: loopback, port: "8443/tcp", loop: true},
		{kind: "udp", to: loopback, port: "7777/udp", loop: true},
		{kind: "tcp", to: loopback, port: "9902/tcp", loop: true},
		{kind: "udp", to: loopback, port: "7780/udp", loop: true},
		{kind: "icmp", to: loopback, port: "icmp", loop: true},
		// The explicit proxy, asked for the gateway's loopback, takes it
		// under the rule naming it (proxy's selfDecision), not under
		// 0.0.0.0/0: explain's note says which.
		{kind: "connect", to: loopback, port: "9902/tcp"},
		{kind: "connect", to: loopback, port: "8443/tcp"},
	}

	addr := func(c explainCase) string {
		if c.ip != "" {
			return c.ip
		}
		return c.to
	}
	// The servers: witnesses in the internet namespace, and services on
	// the gateway's loopback counting what reaches them.
	var tcpW, udpW []string
	for _, c := range cases {
		if c.loop || c.kind == "name" || c.kind == "icmp" || c.kind == "connect" {
			continue
		}
		hp := net.JoinHostPort(addr(c), strings.Split(c.port, "/")[0])
		if c.kind != "udp" {
			tcpW = append(tcpW, hp)
		} else {
			udpW = append(udpW, hp)
		}
	}
	w := tp.newWitness(t, tcpW, udpW)
	svc := startLoopServices(t, tp, []string{"8443", "9902"}, []string{"7777", "7780"})
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
	tp.gw.MustRun("sysctl", "-qw", "net.ipv4.conf.lan0.route_localnet=1")

	attempt := func(c explainCase, ip string) bool {
		if c.loop {
			var ok bool
			tp.loopbackViaGW(t, func() { ok = tryCase(t, tp, w, svc, c, ip) })
			return ok
		}
		return tryCase(t, tp, w, svc, c, ip)
	}
	for _, c := range cases {
		if c.kind == "connect" {
			continue // the explicit proxy is egressd's
		}
		if !attempt(c, addr(c)) {
			t.Fatalf("without egressd, %s %s (%s) does not get through: the test would prove nothing", c.kind, c.to, c.port)
		}
	}

	d := newDaemon(t, tp, "enforce")
	d.writePolicy([]byte(explainPolicy))
	d.start()
	defer d.stop()

	for _, c := range cases {
		t.Run(c.kind+"/"+c.to+"/"+c.port, func(t *testing.T) {
			ex := explain(t, d.policy, c.to, c.port)
			ip := addr(c)
			if c.kind == "name" || c.kind == "sni" {
				// The client asks the daemon's DNS first; explain's "dns"
				// says whether it answers.
				rcode, addrs := tp.dig(t, c.to, "A")
				resolved := rcode == "NOERROR" && len(addrs) > 0
				if resolved != (ex.DNS == "allow") {
					t.Errorf("explain says dns %q (rule %q), the daemon's DNS answered %s %v", ex.DNS, ex.DNSRule, rcode, addrs)
				}
				if resolved {
					ip = addrs[0]
				}
				// A name DNS refused is tried at the address anyway, as a
				// client that learned it elsewhere would.
			}
			if c.byAddr {
				if w := strings.Join(ex.Warnings, "\n"); !strings.Contains(w, "does not know the addresses") {
					t.Errorf("explain of %s on %s (%s) has no note that a CIDR rule may allow its address: %q", c.to, c.port, ex.Verdict, ex.Warnings)
				}
				ex = explain(t, d.policy, ip, c.port)
			}
			got := attempt(c, ip)
			if c.kind == "connect" {
				// A client's own connection to loopback is refused (the
				// cases above); the note says what the explicit proxy does.
				if explicit := strings.Contains(strings.Join(ex.Warnings, "\n"), "the explicit proxy allows it"); ex.Verdict != "deny" || got != explicit {
					t.Errorf("explain says %s, the explicit proxy allows it: %v (notes %q); CONNECT %s:%s got through: %v", ex.Verdict, explicit, ex.Warnings, c.to, c.port, got)
				}
				return
			}
			if got != (ex.Verdict == "allow") {
				t.Errorf("explain says %s (rule %q, reason %s, notes %q); the real attempt from the LAN got through: %v\nevents:\n%s",
					ex.Verdict, ex.Rule, ex.Reason, ex.Warnings, got, d.events())
			}
			t.Logf("%s %s: explain %s %s %s, got through %v", c.to, c.port, ex.Verdict, ex.Rule, ex.Reason, got)
		})
	}
}

// explanation is the JSON of `policy explain --json`, the fields the test reads.
type explanation struct {
	Verdict, Rule, Reason, DNS string
	DNSRule                    string `json:"dns_rule"`
	Warnings                   []string
}

// explain runs `egressd policy explain FILE --to to --port port --json`
// (offline: no namespace needed) with the daemon's policy file.
func explain(t *testing.T, file, to, port string) explanation {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, egressdBin, "policy", "explain", file, "--to", to, "--port", port, "--json")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("egressd policy explain --to %s --port %s: %v\n%s", to, port, err, stderr.String())
	}
	var ex explanation
	if err := json.Unmarshal(out, &ex); err != nil {
		t.Fatalf("policy explain --json: %v: %s", err, out)
	}
	return ex
}

// gwLoopServices are services on the gateway's loopback, counting what
// reaches 127.0.0.1: TCP connections on each port of tcp (startOwnServer),
// UDP datagrams on each of udp (echoed).
type gwLoopServices struct {
	tcp map[string]*ownServer
	udp map[string]*atomic.Int64
}

func startLoopServices(t *testing.T, tp *topo, tcp, udp []string) *gwLoopServices {
	t.Helper()
	s := &gwLoopServices{tcp: map[string]*ownServer{}, udp: map[string]*atomic.Int64{}}
	for _, port := range tcp {
		s.tcp[port] = startOwnServer(t, tp.gw, port)
	}
	for _, port := range udp {
		pc, err := tp.gw.ListenPacket("udp", "127.0.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		n := &atomic.Int64{}
		s.udp[port] = n
		testnet.UDPEcho(t, pc, func(p []byte, _ net.Addr) []byte { n.Add(1); return p })
	}
	return s
}

// hits is how many connections or datagrams reached 127.0.0.1 on port/proto.
func (s *gwLoopServices) hits(port, proto string) int64 {
	if proto == "udp" {
		return s.udp[port].Load()
	}
	return int64(s.tcp[port].count("127.0.0.1"))
}

// tryCase makes one real attempt from the LAN at c, to ip, and reports
// whether it got through: the origin answered the name (curl), a witness
// or loopback service counted the TCP connection or UDP datagram (and
// the echo came back), the echo reply came back.
func tryCase(t *testing.T, tp *topo, w *witness, loop *gwLoopServices, c explainCase, ip string) bool {
	t.Helper()
	portStr, proto, _ := strings.Cut(c.port, "/")
	hp := net.JoinHostPort(ip, portStr)
	count := func() int64 {
		switch {
		case c.loop || c.kind == "connect":
			return loop.hits(portStr, proto)
		case proto == "udp":
			return int64(w.hits("udp:" + hp))
		default:
			return int64(w.hits(hp))
		}
	}
	switch c.kind {
	case "name":
		var port int
		fmt.Sscan(portStr, &port)
		body, err := tp.curl(c.to, port, ip, "/", port != 80)
		return err == nil && strings.Contains(body, "host="+c.to)
	case "icmp":
		return tp.icmpEchoed(t, ip)
	case "connect":
		before := count()
		connectVia(tp.dialTCP, net.JoinHostPort(gwLAN4, "3128"), hp)
		for deadline := time.Now().Add(2 * time.Second); count() == before && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		return count() > before
	case "sni":
		before := count()
		tp.sendHello(hp, buildHello(helloSpec{sni: [][]string{{c.to}}}), 0, 0)
		w.settle()
		return count() > before
	case "udp":
		before := count()
		err := udpExchange(tp, hp, []byte("explain"))
		w.settle()
		return err == nil && count() > before
	}
	before := count()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := tp.lan.DialContext(ctx, "tcp", hp)
	if err == nil {
		// The proxy dials the origin once it has decided, on the first
		// bytes (or its wait for them): read until the origin's "hit".
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		conn.Write([]byte("explain\n"))
		buf := make([]byte, 4)
		conn.Read(buf)
		conn.Close()
	}
	w.settle()
	return count() > before
}

// icmpEchoed sends one ICMP echo request from the LAN client to dst and
// reports whether its reply came back within 2 s.
func (tp *topo) icmpEchoed(t *testing.T, dst string) bool {
	t.Helper()
	pc, err := tp.lan.ListenPacket("ip4:icmp", lanClient4)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	msg := icmpEcho([]byte("explain"))
	if _, err := pc.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
		t.Fatalf("ICMP echo to %s: %v", dst, err)
	}
	want := netip.MustParseAddr(dst)
	pc.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return false
		}
		a, ok := netip.AddrFromSlice(from.(*net.IPAddr).IP)
		// An echo reply (type 0) with our identifier, from dst.
		if ok && a.Unmap() == want && n >= 8 && buf[0] == 0 && buf[4] == msg[4] && buf[5] == msg[5] {
			return true
		}
	}
}
