package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestMemoryMaxUnderChurn: egressd under the memory limit of
// TestMemoryMaxUnderFlood survives floods that change the denied name
// every time — the audit log's detail budget keeps a table entry per
// shape, the ledger a dropped entry per name — and serves a legitimate
// client after each: DNS queries for a new long name each, from 64
// addresses of the LAN client's namespace (one device); TLS hellos with a
// new server name each; plain-HTTP requests with a new Host each and a
// target of 60 KB, mostly a fragment (a short path kept from a long
// head). It logs what the event log wrote for each flood (README, "One
// noisy device": what a churning device costs).
func TestMemoryMaxUnderChurn(t *testing.T) {
	tp := newTopo(t)
	const sources = 64
	var srcs []string
	for i := range sources {
		a := fmt.Sprintf("198.18.1.%d", 100+i)
		tp.lan.MustRun("ip", "addr", "add", a+"/32", "dev", "eth0")
		srcs = append(srcs, a)
	}
	cg := newMemoryGroup(t, memoryMax)
	d := newDaemon(t, tp, "enforce")
	// gctrace: the runtime prints the heap each collection left live.
	d.wrap = []string{"sh", "-c", cg.join + " && export GODEBUG=gctrace=1 && exec \"$@\"", "sh"}
	d.start()
	t.Cleanup(func() {
		if d.alive() {
			d.stop()
		}
	})
	if err := tp.legitGet(); err != nil {
		t.Fatalf("legitimate client before the floods: %v", err)
	}
	rss0, _, _ := d.rss()
	t.Logf("at rest: RSS %d KiB, the cgroup's usage %d KiB", rss0, cg.usage()>>10)
	dur := time.Duration(envInt("E2E_CHURN_SECONDS", 20)) * time.Second
	took := map[string]time.Duration{}
	for _, f := range []struct {
		name  string
		flood func(ctx context.Context) int
	}{
		{"dns", func(ctx context.Context) int { return churnDNS(ctx, tp, srcs, 100_000) }},
		{"tls", func(ctx context.Context) int {
			return churnTCP(ctx, tp, trackerIP+":443", 200_000, func(i int) []byte {
				return buildHello(helloSpec{sni: [][]string{{churnName("tls", i)}}})
			})
		}},
		{"http", func(ctx context.Context) int {
			frag := strings.Repeat("f", 60<<10)
			return churnTCP(ctx, tp, trackerIP+":80", 50_000, func(i int) []byte {
				return []byte("GET /p#" + frag + " HTTP/1.1\r\nHost: " + churnName("http", i) + "\r\n\r\n")
			})
		}},
	} {
		logged := len(d.logs())
		ctx, cancel := context.WithTimeout(context.Background(), dur)
		start := time.Now()
		sent := f.flood(ctx)
		took[f.name] = time.Since(start)
		cancel()
		// Until the event log's written count holds still (10 s at
		// most), or egressd died.
		for last, still, i := -1.0, 0, 0; i < 100 && still < 10; i++ {
			time.Sleep(100 * time.Millisecond)
			n, ok := metricIfUp(d, "egress_audit_events_written_total")
			if !ok {
				break
			}
			if n == last {
				still++
			} else {
				still, last = 0, n
			}
		}
		if !d.alive() {
			st := d.proc.Cmd.ProcessState
			t.Fatalf("%s churn: %d attempts in %v; egressd died: %v (the cgroup's peak %d KiB)\n%s", f.name, sent, took[f.name].Round(time.Millisecond), st, cg.peak()>>10, d.logs())
		}
		rss, hwm, _ := d.rss()
		anon := smapsRollup(t, d.proc.Cmd.Process.Pid)["Anonymous"]
		live, gcs := liveHeapMB(d.logs()[logged:])
		t.Logf("%s churn: %d attempts in %v; live heap %d MB at the most (%d collections); RSS %d KiB (peak %d, anonymous %d), the cgroup's usage %d KiB (peak %d); events summarized %v, shed %v",
			f.name, sent, took[f.name].Round(time.Millisecond), live, gcs, rss, hwm, anon, cg.usage()>>10, cg.peak()>>10,
			d.metric("egress_audit_events_summarized_total"), d.metric("egress_audit_events_shed_total"))
		if err := tp.legitGet(); err != nil {
			t.Errorf("%s churn: legitimate client after the flood: %v", f.name, err)
		}
		// What the collector found live: every table that grows with
		// new names is bounded (measured 17, 38–44 and 53–56 MB at most
		// after the three floods); the room is for a slower box's
		// longer queues. Before session 23 the detail budget alone
		// could hold 226 MiB, and egressd died in the http flood.
		if gcs == 0 || live > maxChurnLiveMB {
			t.Errorf("%s churn: live heap %d MB at the most (%d collections), want at most %d MB", f.name, live, gcs, maxChurnLiveMB)
		}
	}
	d.stop()
	for _, name := range []string{"dns", "tls", "http"} {
		lines, size, summaries := floodLines(t, d.stateDir, name+".churn.example")
		secs := took[name].Seconds()
		t.Logf("%s churn: the event log wrote %d lines (%d summaries), %d bytes: %.0f lines/s, %.0f bytes/s, %.2f GB an hour",
			name, lines, summaries, size, float64(lines)/secs, float64(size)/secs, float64(size)/secs*3600/1e9)
	}
}

// maxChurnLiveMB bounds the live heap TestMemoryMaxUnderChurn allows,
// under the runtime's soft limit (112 MiB under the test's 128 MiB).
const maxChurnLiveMB = 88

// churnName is the i-th name of a churn flood: a new one each time, 220
// bytes, under churn.example (which no rule allows).
func churnName(kind string, i int) string {
	label := fmt.Sprintf("c%08d", i) + strings.Repeat("x", 54)
	return label + "." + strings.Repeat("y", 63) + "." + strings.Repeat("z", 63) + "." + kind + ".churn.example"
}

// churnDNS sends A queries for a new churnName each from the LAN
// namespace's addresses srcs in turn (one socket each), up to 5,000 a
// second, until n or ctx is done; it returns how many it sent.
func churnDNS(ctx context.Context, tp *topo, srcs []string, n int) int {
	to := &net.UDPAddr{IP: net.ParseIP(gwLAN4), Port: 53}
	var pcs []net.PacketConn
	for _, s := range srcs {
		var pc net.PacketConn
		if err := tp.lan.Do(func() (err error) { pc, err = net.ListenPacket("udp", net.JoinHostPort(s, "0")); return }); err == nil {
			defer pc.Close()
			pcs = append(pcs, pc)
		}
	}
	if len(pcs) == 0 {
		return 0
	}
	m := new(dns.Msg)
	sent := 0
	start := time.Now()
	for i := 0; i < n && ctx.Err() == nil; i++ {
		m.SetQuestion(churnName("dns", i)+".", dns.TypeA)
		m.Id = uint16(i)
		b, _ := m.Pack()
		if _, err := pcs[i%len(pcs)].WriteTo(b, to); err == nil {
			sent++
		} else if errors.Is(err, syscall.ENOBUFS) {
			time.Sleep(time.Millisecond)
		}
		if i%50 == 49 { // 5,000 a second
			time.Sleep(time.Until(start.Add(time.Duration(i+1) * time.Second / 5000)))
		}
	}
	return sent
}

// churnTCP connects to addr from the LAN client with 4 workers, each
// connection sending payload(i), a new i each, and reading until the
// proxy closes it (2 s at most), until n connections or ctx is done; it
// returns how many it opened.
func churnTCP(ctx context.Context, tp *topo, addr string, n int, payload func(int) []byte) int {
	var next, opened atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for ctx.Err() == nil {
				i := int(next.Add(1))
				if i > n {
					return
				}
				c, err := tp.lan.DialContext(ctx, "tcp", addr)
				if err != nil {
					time.Sleep(time.Millisecond)
					continue
				}
				opened.Add(1)
				c.SetDeadline(time.Now().Add(2 * time.Second))
				c.Write(payload(i))
				for {
					if _, err := c.Read(buf); err != nil {
						break
					}
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	return int(opened.Load())
}

// gcLive is a gctrace line's heap sizes: at the start of the collection,
// at its end, and live (marked).
var gcLive = regexp.MustCompile(`(?m)^gc \d+ .* (\d+)->(\d+)->(\d+) MB`)

// liveHeapMB is the largest live heap the gctrace lines in logs give,
// and how many there are.
func liveHeapMB(logs string) (most, n int) {
	for _, m := range gcLive.FindAllStringSubmatch(logs, -1) {
		v, _ := strconv.Atoi(m[3])
		most, n = max(most, v), n+1
	}
	return most, n
}
