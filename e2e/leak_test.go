package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestReloadChurnLeaks runs egressd in enforce mode with --inspect through
// 200 reloads (every tenth one refused: a policy that does not parse),
// with short connections and DNS queries between them: allowed and denied
// TLS on the transparent listener, an inspected one, explicit-proxy
// requests, UDP and TCP queries. Afterwards the daemon's goroutines
// (go_goroutines) and open descriptors (/proc/PID/fd) must come back to
// what they were after one round of the same: an appliance reloads its
// policy for months, and whatever a reload or a connection leaves behind
// adds up.
func TestReloadChurnLeaks(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--inspect"}
	d.start()
	pem := tp.gw.MustRun(egressdBin, "ca", "export", "--state-dir", d.stateDir)
	if !strings.Contains(pem, "BEGIN CERTIFICATE") {
		t.Fatalf("egressd ca export: %s", pem)
	}
	if !tp.pool.AppendCertsFromPEM([]byte(pem)) {
		t.Fatal("egressd ca export: no certificate")
	}

	base := testPolicy(t)
	withRule := append(bytes.Clone(base), newRule...)
	bad := []byte("version: 1\nmode: enforce\nrules: [\n")
	tcpDNS := &dns.Client{Net: "tcp", Timeout: 3 * time.Second}

	// churn makes the connections and queries of one round; their
	// outcomes are not the test's concern (other tests check them), only
	// that each ends.
	failed := 0 // allowed connections that did not go through
	churn := func() {
		if body, _, err := tp.tlsGet(dockerIP4+":443", dockerName, nil, nil); err != nil || body == "" { // allowed, spliced
			failed++
		}
		tp.tlsGet(trackerIP+":443", trackerName, nil, nil) // denied
		tp.tlsGet(notionIP+":443", notionName, nil, nil)   // inspected, path denied
		tp.rawHTTP(vendorIP+":80", "GET / HTTP/1.1\r\nHost: "+vendorName+"\r\nConnection: close\r\n\r\n")
		tp.rawHTTP(gwLAN4+":3128", "GET http://"+trackerName+"/ HTTP/1.1\r\nHost: "+trackerName+"\r\nConnection: close\r\n\r\n")
		connectOnce(tp, dockerName+":443") // a tunnel the client closes
		tp.dnsQuery(dockerName, dns.TypeA, 2*time.Second)
		tp.dnsQuery(trackerName, dns.TypeA, 2*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		if c, err := tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(gwLAN4, "53")); err == nil {
			m := new(dns.Msg)
			m.SetQuestion(dns.Fqdn(vendorName), dns.TypeA)
			tcpDNS.ExchangeWithConn(m, &dns.Conn{Conn: c})
			c.Close()
		}
		cancel()
	}
	reload := func(i int) {
		switch {
		case i%10 == 9:
			d.writePolicy(bad)
			d.hup(false)
		case i%2 == 0:
			d.writePolicy(withRule)
			d.hup(true)
		default:
			d.writePolicy(base)
			d.hup(true)
		}
	}
	goroutines := func() int { return int(d.metric("go_goroutines")) }

	// Warm up: one round of everything, a good and a refused reload, so
	// that what is made once (pools, the leaf cache, lazily started
	// goroutines) is in the baseline.
	for i := range 2 {
		churn()
		reload(i)
	}
	reload(9)
	d.writePolicy(base)
	d.hup(true)
	time.Sleep(2 * time.Second)
	g0, fd0 := goroutines(), d.fds()
	t.Logf("baseline: %d goroutines, %d fds", g0, fd0)

	const rounds = 200
	deadline := time.Now().Add(4 * time.Minute)
	n := 0
	for ; n < rounds && time.Now().Before(deadline); n++ {
		churn()
		reload(n)
	}
	// A slow box may not do them all; too few would hide a slow leak.
	if n < rounds/4 {
		t.Fatalf("only %d of %d rounds in 4 minutes: too few to show a leak", n, rounds)
	} else if n < rounds {
		t.Logf("only %d rounds in 4 minutes", n)
	}
	d.writePolicy(base)
	d.hup(true)
	// A leak grows with the rounds; a few goroutines or descriptors
	// of things in flight (a closing connection, a timer's) are not one.
	const slack = 10
	var g, fd int
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		g, fd = goroutines(), d.fds()
		if g <= g0+slack && fd <= fd0+slack || time.Now().After(end) {
			break
		}
	}
	t.Logf("after %d rounds: %d goroutines, %d fds", n, g, fd)
	if failed > 0 {
		t.Errorf("%d of %d allowed connections failed: the rounds did not exercise the proxy", failed, n+2)
	}
	if g > g0+slack || fd > fd0+slack {
		_, body, _ := d.get("/metrics")
		var b strings.Builder
		for _, l := range strings.Split(body, "\n") {
			if strings.HasPrefix(l, "egress_proxy_active") || strings.HasPrefix(l, "go_goroutines") || strings.HasPrefix(l, "process_open_fds") {
				fmt.Fprintln(&b, l)
			}
		}
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.proc.Cmd.Process.Pid))
		for _, e := range ents {
			l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", d.proc.Cmd.Process.Pid, e.Name()))
			fmt.Fprintf(&b, "fd %s -> %s\n", e.Name(), l)
		}
		t.Errorf("after %d rounds (reloads, connections, queries), 30 s later: %d goroutines (baseline %d), %d fds (baseline %d)\n%s",
			n, g, g0, fd, fd0, b.String())
	}
	d.stop()
}

// connectOnce opens a tunnel through the explicit proxy to hostport, reads
// the proxy's answer and closes it.
func connectOnce(tp *topo, hostport string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.dialTCP(ctx, gwLAN4+":3128")
	if err != nil {
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", hostport, hostport)
	http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
}
