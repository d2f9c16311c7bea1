package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/policy"
)

// writeEventLog writes n flow events into the event log of stateDir,
// rotating every few KiB (rotated files and a current one).
func writeEventLog(t *testing.T, stateDir string, n int) {
	t.Helper()
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: stateDir, MaxFileBytes: 16 << 10, DetailBurst: -1}, audit.NewLedger(nil, audit.LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	at := time.Now().UTC().Add(-time.Hour)
	for i := range n {
		j.Emit(audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: at.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.0.2.5"), ClientPort: uint16(10000 + i),
			Dest: netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), DestPort: 443, Proto: "tcp",
			Verdict: policy.Deny, Mode: policy.ModeEnforce})
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestRunServesWhileLogIsRead: `egressd run` serves DNS and the proxy
// while its read of the event log into the ledger has not ended (stalled
// here by a test hook), a report meanwhile says its counts are partial,
// and once the read ends the report counts the old events and those of
// the question and the connection made meanwhile, each once. Before, the
// daemon read the whole log before it started DNS and the proxy (an
// outage at every restart: nftables sends the LAN to them meanwhile).
func TestRunServesWhileLogIsRead(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	const old = 400
	writeEventLog(t, state, old)
	if files, _ := audit.LogFiles(state); len(files) < 3 {
		t.Fatalf("the old log is %d files, want rotated ones and a current one", len(files))
	}
	release, stalled := make(chan struct{}), make(chan struct{})
	loadDones := 0
	testHookJournal = func(c *audit.JournalConfig) {
		done := c.LoadDone
		c.LoadDone = func(st audit.LoadStats, took time.Duration, err error) {
			loadDones++
			close(stalled)
			<-release // the read is not over until this returns
			done(st, took, err)
		}
	}
	defer func() { testHookJournal = nil }()
	releaseOnce := func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}
	defer releaseOnce()

	var out, errb lockedBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- cmdRun(ctx, []string{"--mode", "enforce", "--lan", "lo", "--wan", "lo", "--no-firewall",
			"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "127.0.0.1:0",
			"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", state}, &out, &errb)
	}()
	defer func() {
		releaseOnce()
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Errorf("egressd run did not stop within 20s\n%s", errb.String())
		}
	}()
	want := func(re *regexp.Regexp) string {
		t.Helper()
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if m := re.FindStringSubmatch(out.String()); m != nil {
				return m[1]
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s in 15s\nstdout:\n%s\nstderr:\n%s", re, out.String(), errb.String())
			}
		}
	}
	dnsAddr := want(regexp.MustCompile(`dns: listening on (127\.0\.0\.1:\d+)`))
	proxyAddr := want(regexp.MustCompile(`explicit on (127\.0\.0\.1:\d+)`))
	adminAddr := want(regexp.MustCompile(`admin: http://(127\.0\.0\.1:\d+)/`))
	select {
	case <-stalled:
	case <-time.After(15 * time.Second):
		t.Fatal("the read of the event log did not get to its end in 15s")
	}
	if strings.Contains(out.String(), "earlier events restored") {
		t.Fatalf("the read said it ended while stalled:\n%s", out.String())
	}

	// Served while the read has not ended: one question, one connection.
	m := new(dns.Msg)
	m.SetQuestion("pool.ntp.test.", dns.TypeA)
	c := &dns.Client{Net: "udp", Timeout: 6 * time.Second}
	if _, _, err := c.Exchange(m, dnsAddr); err != nil {
		t.Fatalf("DNS during the read: %v", err)
	}
	conn, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		t.Fatalf("proxy during the read: %v", err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "CONNECT tracker.example:443 HTTP/1.1\r\nHost: tracker.example:443\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("proxy during the read: %v", err)
	}
	resp.Body.Close()
	conn.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("CONNECT to a denied name during the read: %d, want 403", resp.StatusCode)
	}

	report := func() *audit.Report {
		t.Helper()
		res, err := http.Get("http://" + adminAddr + "/report.json")
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		r, err := audit.ReadReportJSON(res.Body)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := report()
	if r.Loading == nil || r.Loading.Events != old || len(r.Notes) == 0 || !strings.Contains(r.Notes[0], "still being read") {
		t.Errorf("report during the read: loading %+v, notes %q; want it marked partial", r.Loading, r.Notes)
	}
	if r.Totals.Events != old {
		t.Errorf("report during the read counts %d events, want the %d read so far", r.Totals.Events, old)
	}

	releaseOnce()
	restored := want(regexp.MustCompile(`event log: \S+ \((\d+) earlier events restored`))
	if restored != "400" {
		t.Errorf("%s earlier events restored, want %d", restored, old)
	}
	// The report waits for the queue (capture's open flows are not in
	// enforce mode on lo; ask until the two new events are in, bounded).
	for i := 0; ; i++ {
		r = report()
		if r.Loading == nil && r.Totals.Events >= old+2 || i == 100 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r.Loading != nil || r.Totals.Events != old+2 || r.Totals.Duplicates != 0 || r.Totals.Queries != 1 || r.Totals.Flows != old+1 {
		b, _ := json.Marshal(r.Totals)
		t.Errorf("report after the read: loading %+v, totals %s; want %d old flows, 1 flow and 1 query since, each once", r.Loading, b, old)
	}
	if loadDones != 1 {
		t.Errorf("the read ended %d times", loadDones)
	}
}
