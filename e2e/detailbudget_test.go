package e2e

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// floodSeconds is how long each flood of TestEventDetailBudget runs.
const floodSeconds = 4

// TestEventDetailBudget: one LAN client in a retry loop to a denied
// destination — DNS queries for a denied name (at the forwarder's rate
// limit), denied TLS connections as fast as the proxy closes them, or,
// in audit mode, connections capture records as would-be drops — must not
// fill the event log and the journal one event and one decision line per
// attempt. Past the per-device detail budget repeats of one shape are
// counted into a summary record, and the report counts every attempt,
// live and after a restart (from the log alone).
//
// It logs the figures README's "One noisy device" paragraph gives: the
// events and bytes a second the flood made the log write.
func TestEventDetailBudget(t *testing.T) {
	tp := newTopo(t)
	for _, c := range []struct {
		name, mode string
		needle     string // in every flood line (event and decision)
		dest       string // the report's dropped entry
		port       uint16
		proto      string
		flood      func(ctx context.Context) int
	}{
		{"dns", "enforce", trackerName, trackerName, 53, "dns", func(ctx context.Context) int { return floodDNS(ctx, tp) }},
		{"tls", "enforce", trackerName, trackerName, 443, "tcp", func(ctx context.Context) int { return floodTCP(ctx, tp, trackerIP+":443", trackerName) }},
		{"audit", "audit", udpDenyIP, udpDenyIP, 7777, "tcp", func(ctx context.Context) int { return floodTCP(ctx, tp, udpDenyIP+":7777", "") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newDaemon(t, tp, c.mode)
			d.start()
			defer d.stop()
			ctx, cancel := context.WithTimeout(context.Background(), floodSeconds*time.Second)
			start := time.Now()
			sent := c.flood(ctx)
			took := time.Since(start)
			cancel()
			settle(d)
			// The budget refills for as long as the journal takes the
			// flood's events, which on a busy box is past the flood's
			// end: the bound counts that time, not the flood's.
			busy := math.Ceil(time.Since(start).Seconds())
			count := func(r *report) uint64 {
				var n uint64
				for _, dr := range r.Dropped {
					if dr.Dest == c.dest && dr.Port == c.port && dr.Proto == c.proto {
						n += dr.Flows + dr.Queries
					}
				}
				return n
			}
			live := count(d.report())
			summarizedMetric := d.metric("egress_audit_events_summarized_total")
			quietMetric := d.metric("egress_audit_decision_lines_summarized_total")
			if live == 0 {
				t.Fatalf("the report counts none of the flood")
			}
			// Stopped, the journal has written the summaries of the
			// interval.
			d.stop()
			lines, size, summaries := floodLines(t, d.stateDir, c.needle)
			decisions := strings.Count(d.logs(), c.needle)
			secs := took.Seconds()
			t.Logf("%s: %d attempts in %.1fs; report counts %d; the event log wrote %d lines (%d bytes, %.0f lines/s, %.0f bytes/s: 1 GiB in %.1f h), %d of them summaries; %d log lines name it; %.0f events and %.0f decision lines summarized (metrics)",
				c.name, sent, secs, live, lines, size, float64(lines)/secs, float64(size)/secs, float64(1<<30)/(float64(size)/secs)/3600, summaries, decisions,
				summarizedMetric, quietMetric)
			// The budget: a burst of 100 and 1 a second
			// per device and each shape's first; the later reports of a
			// flow written so (capture's of the proxy's, capture's
			// update at close with bytes); a summary a shape an interval
			// (10 s). Without it the flood writes thousands.
			// Twice that: on a busy box a flow's three reports can fall
			// either side of the budget's refill (367 against 341
			// once). Without the budget the same floods write thousands
			// (4,087 to 19,386 in README's "One noisy device").
			limit := 2 * (3*(100+int(busy)+4) + 8 + 3*int(math.Ceil(busy/10)))
			if lines > limit {
				t.Errorf("the flood wrote %d event lines in %.1fs; the device's detail budget allows %d", lines, secs, limit)
			}
			if decisions > limit {
				t.Errorf("the flood wrote %d decision lines in %.1fs; the device's detail budget allows %d", decisions, secs, limit)
			}
			d.start()
			if after := count(d.report()); after != live {
				t.Errorf("after a restart the report counts %d of the flood, live it counted %d", after, live)
			}
		})
	}
}

// settle waits (up to 10 s) until the event log's written count holds
// still for a second: the flood's events are in the log and the ledger.
func settle(d *daemon) {
	last, still := -1.0, 0
	for i := 0; i < 100 && still < 10; i++ {
		time.Sleep(100 * time.Millisecond)
		n := d.metric("egress_audit_events_written_total")
		if n == last {
			still++
		} else {
			still, last = 0, n
		}
	}
}

// floodLines counts the event log's lines that contain needle, their
// bytes, and how many of them are summaries (a count of events).
func floodLines(t *testing.T, dir, needle string) (lines, size, summaries int) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "events*.ndjson"))
	gz, _ := filepath.Glob(filepath.Join(dir, "events-*.ndjson.gz"))
	for _, f := range append(files, gz...) {
		data, err := os.ReadFile(f)
		if err == nil && strings.HasSuffix(f, ".gz") {
			var zr *gzip.Reader
			if zr, err = gzip.NewReader(bytes.NewReader(data)); err == nil {
				data, err = io.ReadAll(zr)
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range bytes.Split(data, []byte("\n")) {
			if !bytes.Contains(l, []byte(needle)) {
				continue
			}
			lines++
			size += len(l) + 1
			var ev struct {
				Count      uint64 `json:"count"`
				Duplicates uint64 `json:"duplicates"`
			}
			if json.Unmarshal(l, &ev) == nil && ev.Count+ev.Duplicates > 0 {
				summaries++
			}
		}
	}
	return lines, size, summaries
}

// floodDNS sends A queries for the denied trackerName from the LAN
// client at up to 2,000 a second until ctx is done, each from a port of
// its own (as a stub resolver's retries come; from one socket:
// TestDNSQueriesFromOneSocket); it returns how many it sent.
func floodDNS(ctx context.Context, tp *topo) int {
	to := &net.UDPAddr{IP: net.ParseIP(gwLAN4), Port: 53}
	m := new(dns.Msg)
	m.SetQuestion(trackerName+".", dns.TypeA)
	sent := 0
	start := time.Now()
	for i := 0; i < 100_000 && ctx.Err() == nil; i++ {
		var pc net.PacketConn
		if err := tp.lan.Do(func() (err error) { pc, err = net.ListenPacket("udp", net.JoinHostPort(lanClient4, "0")); return }); err != nil {
			continue
		}
		m.Id = uint16(i)
		b, _ := m.Pack()
		if _, err := pc.WriteTo(b, to); err == nil {
			sent++
		}
		pc.Close()
		if i%20 == 19 { // 2,000 a second
			time.Sleep(time.Until(start.Add(time.Duration(i+1) * time.Millisecond / 2)))
		}
	}
	return sent
}

// floodTCP connects to addr from the LAN client with 4 workers as fast as
// each connection ends (with a ClientHello naming sni when sni is set)
// until ctx is done; it returns how many connections it opened.
func floodTCP(ctx context.Context, tp *topo, addr, sni string) int {
	var hello []byte
	if sni != "" {
		hello = buildHello(helloSpec{sni: [][]string{{sni}}})
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := 0; i < 200_000 && ctx.Err() == nil; i++ {
				c, err := tp.lan.DialContext(ctx, "tcp", addr)
				if err != nil {
					if ctx.Err() == nil {
						n.Add(1) // refused (RST): a flow all the same
						time.Sleep(time.Millisecond)
					}
					continue
				}
				n.Add(1)
				c.SetDeadline(time.Now().Add(2 * time.Second))
				if hello != nil {
					c.Write(hello)
				}
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
	return int(n.Load())
}

// TestDNSQueriesFromOneSocket: a LAN client asking the forwarder for a
// denied name again and again from one socket, each query with an ID of
// its own, and every tenth sent twice (a retransmission, its ID kept).
// The report counts each query once, retransmission or not, live and
// after a restart (past the device's detail budget, from summaries).
// Before, the ledger keyed a query by the client's port, name and type,
// so the whole flood counted as one query.
func TestDNSQueriesFromOneSocket(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	defer d.stop()
	var pc net.PacketConn
	if err := tp.lan.Do(func() (err error) { pc, err = net.ListenPacket("udp", net.JoinHostPort(lanClient4, "0")); return }); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	to := &net.UDPAddr{IP: net.ParseIP(gwLAN4), Port: 53}
	const n = 300
	answered := map[uint16]bool{}
	buf := make([]byte, 4096)
	for i := range n {
		m := new(dns.Msg)
		m.SetQuestion(trackerName+".", dns.TypeA)
		m.Id = uint16(1000 + i)
		b, _ := m.Pack()
		sends := 1
		if i%10 == 0 {
			sends = 2
		}
		for range sends {
			if _, err := pc.WriteTo(b, to); err != nil {
				t.Fatal(err)
			}
		}
		pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		for range sends {
			nr, _, err := pc.ReadFrom(buf)
			if err != nil {
				break
			}
			r := new(dns.Msg)
			if r.Unpack(buf[:nr]) == nil && r.Rcode == dns.RcodeRefused {
				answered[r.Id] = true
			}
		}
	}
	if len(answered) < n*9/10 {
		t.Fatalf("%d of %d queries answered REFUSED", len(answered), n)
	}
	count := func(r *report) uint64 {
		var q uint64
		for _, dr := range r.Dropped {
			if dr.Dest == trackerName && dr.Port == 53 && dr.Proto == "dns" {
				q += dr.Queries
			}
		}
		return q
	}
	// Wait (at most 30 s) until the report counts every answered query
	// and the event log's queue is empty: the ledger has taken each
	// query's event (past the detail budget they are summarized, not
	// written, so the written count is no sign of them).
	live := count(d.report())
	for deadline := time.Now().Add(30 * time.Second); (live < uint64(len(answered)) || d.metric("egress_audit_queue_length") != 0) && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		live = count(d.report())
	}
	if live != uint64(len(answered)) {
		t.Errorf("the report counts %d queries from one socket (waited at most 30 s), %d were answered", live, len(answered))
	}
	if d.metric("egress_audit_events_summarized_total") == 0 {
		t.Errorf("no event was held back: the device's detail budget was not reached")
	}
	d.stop()
	d.start()
	if after := count(d.report()); after != live {
		t.Errorf("after a restart the report counts %d queries from one socket, live %d", after, live)
	}
}
