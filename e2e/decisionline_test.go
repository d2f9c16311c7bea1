package e2e

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestOneDecisionLinePerConnection: a connection through the transparent
// proxy is one decision, and gets one canonical `decision` line, however
// many components see it. In enforce mode the proxy decides it and capture
// sees it on the LAN interface too: the line is the proxy's (it has the
// close reason and the bytes it relayed), capture's report is an event
// only. In audit mode capture alone decides it. An allowed and a denied
// curl each, by the name the line names (curl is given the address: no
// DNS line names it). So with --no-firewall and the operator's own
// redirect to the proxy (enforce-operator-redirect): the proxy tells
// capture the connections it accepted; before session 27 each had two
// lines there, capture's and the proxy's.
func TestOneDecisionLinePerConnection(t *testing.T) {
	for _, sub := range []string{"enforce", "audit", "enforce-operator-redirect"} {
		t.Run(sub, func(t *testing.T) {
			mode, _, operator := strings.Cut(sub, "-")
			tp := newTopo(t)
			d := newDaemon(t, tp, mode)
			if operator {
				d.extra = append(d.extra, "--no-firewall")
			}
			d.start()
			if operator {
				tp.gw.MustRun("nft", "add table inet q2_operator")
				tp.gw.MustRun("nft", "add chain inet q2_operator pre { type nat hook prerouting priority dstnat; policy accept; }")
				tp.gw.MustRun("nft", `add rule inet q2_operator pre iifname "lan0" tcp dport 443 redirect to :15001`)
			}
			cases := []struct {
				name, ip string
				verdict  string
			}{
				{dockerName, dockerIP4, "allow"},
				{trackerName, trackerIP, "deny"},
			}
			for _, c := range cases {
				out, err := tp.lan.Run("curl", "-sS", "-o", "/dev/null", "--max-time", "5", "--cacert", tp.caFile,
					"--resolve", fmt.Sprintf("%s:443:%s", c.name, c.ip), "https://"+c.name+"/")
				if (err == nil) != (c.verdict == "allow" || mode == "audit") {
					t.Errorf("curl %s: %v: %s", c.name, err, out)
				}
			}
			// Capture reports a flow when it sees its end, the proxy when
			// it closes the connection: wait (at most 10 s) for each
			// component's event of each, then stop.
			reported := func() bool {
				ev := d.events()
				for _, c := range cases {
					if !strings.Contains(ev, "capture") || !regexp.MustCompile(`capture .* `+regexp.QuoteMeta(c.name)+` `).MatchString(ev) {
						return false
					}
					if mode == "enforce" && !regexp.MustCompile(`proxy .* `+regexp.QuoteMeta(c.name)+` `).MatchString(ev) {
						return false
					}
				}
				return true
			}
			for i := 0; i < 100 && !reported(); i++ {
				time.Sleep(100 * time.Millisecond)
			}
			if !reported() {
				t.Fatalf("not every component reported each connection in 10 s:\n%s", d.events())
			}
			d.stop()
			logs := d.logs()
			for _, c := range cases {
				lines := flowLinesNaming(logs, c.name)
				if len(lines) != 1 {
					t.Errorf("%s: %d decision lines for the one connection, want 1:\n%s", c.name, len(lines), strings.Join(lines, "\n"))
					continue
				}
				if !strings.Contains(lines[0], `"verdict":"`+c.verdict+`"`) {
					t.Errorf("%s: line is not %s: %s", c.name, c.verdict, lines[0])
				}
				if want := map[string]string{"enforce": `"component":"proxy"`, "audit": `"component":"capture"`}[mode]; !strings.Contains(lines[0], want) {
					t.Errorf("%s: line is not %s's: %s", c.name, want, lines[0])
				}
			}
		})
	}
}

// TestDecisionLineWithoutRedirect: enforce mode with the proxy running
// but no firewall of egressd's (--no-firewall: the operator brings
// traffic to the listeners, here none does; the same as a firewall that
// failed to install, or a proxy whose listener did not open): nothing
// redirects the connection to the proxy, which never sees it, so
// capture's line is its only one. Before, capture left the line to the
// proxy whenever a proxy was configured, and the connection went out
// with no decision line at all.
func TestDecisionLineWithoutRedirect(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = append(d.extra, "--no-firewall")
	d.start()
	out, err := tp.lan.Run("curl", "-sS", "-o", "/dev/null", "--max-time", "5", "--cacert", tp.caFile,
		"--resolve", fmt.Sprintf("%s:443:%s", trackerName, trackerIP), "https://"+trackerName+"/")
	if err != nil {
		t.Fatalf("curl %s with no firewall: %v: %s", trackerName, err, out)
	}
	re := regexp.MustCompile(`capture .* ` + regexp.QuoteMeta(trackerName) + ` `)
	for i := 0; i < 100 && !re.MatchString(d.events()); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if !re.MatchString(d.events()) {
		t.Fatalf("capture did not report the connection in 10 s:\n%s", d.events())
	}
	d.stop()
	lines := flowLinesNaming(d.logs(), trackerName)
	if len(lines) != 1 || !strings.Contains(lines[0], `"component":"capture"`) {
		t.Errorf("%d decision lines for the connection the proxy never saw, want capture's one:\n%s", len(lines), strings.Join(lines, "\n"))
	}
}

// TestOneDecisionLinePortClash: a LAN client that opens a second
// connection from the source port of a first one, toward another
// destination, while the first's conntrack entry lingers, clashes behind
// the REDIRECT (both reply tuples are the proxy listener's and that
// port): NAT remaps the second's source port, and the proxy's socket
// shows a port the client never used. The proxy corrects it from
// conntrack for its line; capture, told by the proxy which connections
// it accepted, must match the connection by the port the client used,
// so each connection still has one decision line. Before, the proxy
// told capture the socket's port, capture found no word of the
// connection it saw, and wrote a line beside the proxy's.
func TestOneDecisionLinePortClash(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	reuse := func(fd uintptr) error {
		return syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	}
	names := map[string]string{trackerIP: "r7-clash-a.example", lookalikeIP: "r7-clash-b.example"}
	port := 0
	for _, ip := range []string{trackerIP, lookalikeIP} {
		var laddr *net.TCPAddr
		if port != 0 {
			laddr = &net.TCPAddr{Port: port}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := tp.dialWith(ctx, ip+":443", laddr, reuse)
		cancel()
		if err != nil {
			t.Fatalf("dial %s from port %d: %v", ip, port, err)
		}
		port = c.LocalAddr().(*net.TCPAddr).Port
		c.Write(buildHello(helloSpec{sni: [][]string{{names[ip]}}}))
		if o := readVerdict(c); !o.denied {
			t.Errorf("%s (%s) from port %d not denied: %+v", names[ip], ip, port, o)
		}
		c.Close()
	}
	waitReported(t, d, []string{names[trackerIP], names[lookalikeIP]}, "capture", "proxy")
	d.stop()
	if !regexp.MustCompile(`proxy .*:\d+ > ` + regexp.QuoteMeta(lookalikeIP) + `:443/tcp`).MatchString(d.events()) {
		t.Fatalf("no proxy event of the second connection:\n%s", d.events())
	}
	for ip, n := range names {
		if lines := flowLinesNaming(d.logs(), n); len(lines) != 1 {
			t.Errorf("%s (%s, client port %d): %d decision lines, want 1:\n%s\nevents:\n%s", n, ip, port, len(lines), strings.Join(lines, "\n"), d.events())
		}
	}
}

// TestOneDecisionLineResetBurst: a burst of LAN connections, each a
// ClientHello and at once a reset, denied by the proxy. The proxy takes
// them from its accept queue one by one, so capture can see a client's
// reset, and report the connection, before the proxy says it accepted
// it: each connection still has one decision line, whichever of the two
// comes first. Before, capture wrote its line for each it reported
// first, and the proxy its own when it took the connection from its
// queue: two lines (a run of 1,500 had from 1 to 216).
func TestOneDecisionLineResetBurst(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	flows0 := d.metricSum("egress_capture_flows_total")
	drops0 := d.metric("egress_capture_kernel_drops_total")
	const n = 1500
	name := func(i int) string { return fmt.Sprintf("r7-burst-%d.example", i) }
	var wg sync.WaitGroup
	var mu sync.Mutex
	var opened []int
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := tp.dialWith(ctx, trackerIP+":443", nil, nil)
			if err != nil {
				return // the burst overflows the gateway's queues: not opened
			}
			c.Write(buildHello(helloSpec{sni: [][]string{{name(i)}}}))
			c.SetLinger(0)
			c.Close()
			mu.Lock()
			opened = append(opened, i)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if len(opened) < n/2 {
		t.Fatalf("only %d of %d connections opened", len(opened), n)
	}
	// Wait (at most 60 s) until the proxy has an event of each opened
	// connection, by its name (so it had read the hello), or a refusal
	// without one, or has had no new one for 2 s (a connection whose
	// handshake's end the kernel dropped on the full queue never reaches
	// it): then its lines are written.
	needle := fmt.Appendf(nil, `"dest_ip":%q`, trackerIP)
	proxied := func() int {
		k := 0
		for _, ev := range d.eventsWith(needle) {
			if ev.Source == "proxy" && (strings.HasPrefix(ev.Name, "r7-burst-") || ev.Name == "") {
				k++
			}
		}
		return k
	}
	for i, last, still := 0, -1, 0; i < 600 && still < 20; i++ {
		k := proxied()
		if k >= len(opened) {
			break
		}
		if k == last {
			still++
		} else {
			last, still = k, 0
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Wait (at most 30 s) for capture's reports of the last ones: it has
	// reported a flow (once each, its decision line then or never) for
	// every opened connection. When the kernel dropped packets of the
	// burst capture may never see some: then until it has read all the
	// kernel kept (its packet count holds still for 2 s).
	for deadline, last, still := time.Now().Add(30*time.Second), -1.0, 0; d.metricSum("egress_capture_flows_total")-flows0 < float64(len(opened)); {
		if pk := d.metric("egress_capture_packets_total"); pk != last {
			last, still = pk, 0
		} else if still++; still >= 20 && d.metric("egress_capture_kernel_drops_total") > drops0 {
			t.Logf("capture reported %v flows of %d opened connections; the kernel dropped packets (%s)", d.metricSum("egress_capture_flows_total")-flows0, len(opened), d.captureCounters())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("in 30 s capture reported %v flows of %d opened connections (%s)", d.metricSum("egress_capture_flows_total")-flows0, len(opened), d.captureCounters())
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.stop()
	lines := map[string]int{}
	unnamed, summed := 0, 0
	for _, l := range strings.Split(d.logs(), "\n") {
		if !strings.Contains(l, `"msg":"decision"`) || !strings.Contains(l, `"kind":"flow"`) || !strings.Contains(l, `"dest":"`+trackerIP+`"`) {
			continue
		}
		if _, c, ok := strings.Cut(l, `"count":`); ok {
			// A summary line of the journal's line budget: a noisy
			// device's denials past it are counted, not each lined.
			k, _ := strconv.Atoi(strings.TrimRight(strings.SplitN(c, ",", 2)[0], "}"))
			summed += k
			continue
		}
		_, rest, ok := strings.Cut(l, `"name":"`)
		if n, _, _ := strings.Cut(rest, `"`); ok && n != "" {
			lines[n]++
		} else {
			unnamed++
		}
	}
	hist := map[int]int{}
	for _, i := range opened {
		hist[lines[name(i)]]++
	}
	t.Logf("%d connections opened; decision lines per connection: %v; %d lines name none (refused before the hello), %d decisions in summary lines", len(opened), hist, unnamed, summed)
	if hist[2]+hist[3] > 0 || hist[0] > unnamed+summed {
		t.Errorf("decision lines per connection %v (and %d naming none, %d in summaries), want one each", hist, unnamed, summed)
	}
}

// TestOneDecisionLineLinkLocalClient: a LAN client that connects from its
// IPv6 link-local address (the firewall passes link-local sources, and
// the REDIRECT brings the connection to the proxy) is known to the proxy
// by an address with the LAN interface's zone (fe80::…%lan0); capture's,
// from the packet, has none. The proxy's word of the connection must
// still match it: one decision line.
func TestOneDecisionLineLinkLocalClient(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	ll, idx := tp.lan.LinkLocal(t, "eth0")
	const name = "r7-linklocal.example"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	// The zone by index (testnet's IfIndex).
	c, err := tp.dialWith(ctx, "["+dockerIP6+"]:443", &net.TCPAddr{IP: ll.AsSlice(), Zone: idx}, nil)
	cancel()
	if err != nil {
		t.Fatalf("dial from %s: %v", ll, err)
	}
	c.Write(buildHello(helloSpec{sni: [][]string{{name}}}))
	o := readVerdict(c)
	c.Close()
	t.Logf("from %s: %+v", ll, o)
	waitReported(t, d, []string{name}, "capture", "proxy")
	d.stop()
	if lines := flowLinesNaming(d.logs(), name); len(lines) != 1 {
		t.Errorf("%d decision lines for the link-local client's connection, want 1:\n%s\n%s", len(lines), strings.Join(lines, "\n"), d.events())
	}
}

// waitReported waits (at most 10 s) until each of sources has an event
// naming each of names, else fails the test.
func waitReported(t *testing.T, d *daemon, names []string, sources ...string) {
	t.Helper()
	reported := func() bool {
		ev := d.events()
		for _, n := range names {
			for _, src := range sources {
				if !regexp.MustCompile(src + ` .* ` + regexp.QuoteMeta(n) + ` `).MatchString(ev) {
					return false
				}
			}
		}
		return true
	}
	for i := 0; i < 100 && !reported(); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if !reported() {
		t.Fatalf("not every component (%v) reported each connection in 10 s:\n%s", sources, d.events())
	}
}

// flowLinesNaming returns the canonical decision lines of flows in logs
// that name name.
func flowLinesNaming(logs, name string) []string {
	var lines []string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, `"msg":"decision"`) && strings.Contains(l, `"kind":"flow"`) && strings.Contains(l, `"name":"`+name+`"`) {
			lines = append(lines, l)
		}
	}
	return lines
}
