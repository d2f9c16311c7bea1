package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/dnsfilter"
	"egressd/policy"
)

// roStateDir mounts a tmpfs on a new directory, fills it with fill,
// and remounts it read-only (a card the kernel remounted read-only
// after I/O errors); writable remounts it read-write. The mount goes at
// cleanup.
func roStateDir(t *testing.T, fill func(dir string)) (dir string, writable func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("a tmpfs mount needs root")
	}
	dir = t.TempDir()
	mount := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
	mount("-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs", dir)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	fill(dir)
	mount("-o", "remount,ro", dir)
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); err == nil {
		t.Fatal("the tmpfs is writable after remount,ro")
	}
	return dir, func() { mount("-o", "remount,rw", dir) }
}

// TestLearnedReadOnlyStateDir: the learned-address table on a state
// directory read-only at the start. The start restores the table's file
// (reading works), says once that the table cannot be written (the
// start's probe), and the periodic saves that fail while it stays so say
// nothing more; nothing is written. Once the directory is writable the
// next save writes the table, with what was learned meanwhile, and says
// so once.
func TestLearnedReadOnlyStateDir(t *testing.T) {
	a := netip.MustParseAddr
	exp := time.Now().Add(time.Hour)
	first := dnsfilter.Learned{Client: a("192.0.2.10"), Name: "time.example.com", Addr: a("203.0.113.7"), Rule: "time", Expires: exp}
	later := dnsfilter.Learned{Client: a("192.0.2.10"), Name: "time.example.com", Addr: a("203.0.113.8"), Rule: "time", Expires: exp}
	var fileBefore []byte
	dir, writable := roStateDir(t, func(dir string) {
		old := dnsfilter.NewTable(0)
		old.Learn(first)
		if err := newLearnedStore(dir, old, slog.New(slog.DiscardHandler)).flush(learnedStopWait); err != nil {
			t.Fatal(err)
		}
		fileBefore, _ = os.ReadFile(filepath.Join(dir, learnedFileName))
	})
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n"+
		"  - {name: time, to: [time.example.com], ports: [123/udp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	var logs, out bytes.Buffer
	d := &daemon{cfg: runConfig{stateDir: dir}, log: slog.New(slog.NewTextHandler(&logs, nil)), out: &out,
		store: policy.NewStore(eng), degraded: map[string]string{}}
	tb := dnsfilter.NewTable(0)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	d.restoreLearned(ctx, &wg, tb, dnsfilter.Config{})
	cancel()
	wg.Wait()
	if tb.Len() != 1 {
		t.Errorf("restored %d items from the read-only directory, want 1\n%s", tb.Len(), out.String())
	}
	if !strings.Contains(out.String(), "warning: learned addresses:") || !strings.Contains(out.String(), "read-only file system") {
		t.Errorf("the start does not say the table cannot be written:\n%s", out.String())
	}
	s := d.learned
	// A clock past the write budget's spacing: each tick may write.
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); now = now.Add(time.Minute); return now }
	tb.Learn(later)
	for i := range 3 {
		if err := s.tick(); err == nil {
			t.Fatalf("save %d on the read-only directory worked", i)
		}
	}
	if n := strings.Count(logs.String(), "cannot write the table"); n != 1 {
		t.Errorf("%d lines say the table cannot be written (the start's and 3 saves), want 1:\n%s", n, logs.String())
	}
	// The start's line is the saves' line: the same component.
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "cannot write the table") && !strings.Contains(line, "component=dns") {
			t.Errorf("the line lacks component=dns, which the saves' line has: %s", line)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dir, learnedFileName)); !bytes.Equal(b, fileBefore) {
		t.Errorf("the table's file changed on the read-only directory")
	}

	writable()
	if err := s.tick(); err != nil {
		t.Fatalf("save once the directory is writable: %v", err)
	}
	if n := strings.Count(logs.String(), "writing the table to the state directory again"); n != 1 {
		t.Errorf("%d lines say the table is written again, want 1:\n%s", n, logs.String())
	}
	tb2 := dnsfilter.NewTable(0)
	if n, _, err := newLearnedStore(dir, tb2, slog.New(slog.DiscardHandler)).load(); n != 2 || err != nil {
		t.Errorf("the file once writable: %d items, %v; want the restored one and the one learned since", n, err)
	}
}

// TestPolicyCopyReadOnlyStateDir: the policy's copy (policy.yaml,
// policy.source) on a state directory read-only at the start: the start
// says once it cannot keep the copy and goes on; the directory is left
// as it was (the earlier run's copy, which `egressd report --state-dir`
// reads); the next save (a reload) once it is writable writes the
// running policy's copy.
func TestPolicyCopyReadOnlyStateDir(t *testing.T) {
	oldSrc := []byte("version: 1\nmode: audit\nrules:\n  - {name: old, to: [old.example.com], ports: [443/tcp]}\n")
	newSrc := []byte("version: 1\nmode: audit\nrules:\n  - {name: new, to: [new.example.com], ports: [443/tcp]}\n")
	dir, writable := roStateDir(t, func(dir string) {
		if err := os.WriteFile(filepath.Join(dir, runningPolicyFile), oldSrc, 0o640); err != nil {
			t.Fatal(err)
		}
	})
	var logs bytes.Buffer
	d := &daemon{cfg: runConfig{stateDir: dir}, log: slog.New(slog.NewTextHandler(&logs, nil)), out: io.Discard,
		src: newSrc, source: "/etc/egressd/policy.yaml", degraded: map[string]string{}}
	d.savePolicy(false)
	if n := strings.Count(logs.String(), "cannot keep a copy of the policy"); n != 1 || !strings.Contains(logs.String(), "read-only file system") {
		t.Errorf("%d lines say the copy cannot be kept (want 1, with the errno):\n%s", n, logs.String())
	}
	if b, _ := os.ReadFile(filepath.Join(dir, runningPolicyFile)); !bytes.Equal(b, oldSrc) {
		t.Errorf("the copy on the read-only directory: %q, want the earlier run's", b)
	}
	writable()
	logs.Reset()
	d.savePolicy(false)
	if strings.Contains(logs.String(), "cannot keep") {
		t.Errorf("the save once writable failed:\n%s", logs.String())
	}
	if b, _ := os.ReadFile(filepath.Join(dir, runningPolicyFile)); !bytes.Equal(b, newSrc) {
		t.Errorf("the copy once writable: %q, want the running policy", b)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, runningSourceFile)); string(b) != "/etc/egressd/policy.yaml\n" {
		t.Errorf("%s once writable: %q", runningSourceFile, b)
	}
}

// TestRunReadOnlyStateDir: `egressd run` (in enforce mode, --inspect,
// no firewall) on a state directory read-only at the start that holds
// an earlier run's event log and no CA: it starts and serves (DNS
// answers, the proxy refuses a denied CONNECT), says what it cannot
// write (the event log, the learned-address table, the CA), /readyz is
// 503 naming the event log and the errno, /healthz 200, the live report
// counts the earlier events and the new ones; nothing in the directory
// changes. Once the directory is writable the event log is written again
// (after the earlier events) and /readyz is 200.
func TestRunReadOnlyStateDir(t *testing.T) {
	const old = 50
	dir, writable := roStateDir(t, func(dir string) { writeEventLog(t, dir, old) })
	logBefore, err := os.ReadFile(filepath.Join(dir, audit.CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	var out, errb lockedBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- cmdRun(ctx, []string{"--mode", "enforce", "--lan", "lo", "--wan", "lo", "--no-firewall", "--inspect",
			"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "127.0.0.1:0",
			"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", dir}, &out, &errb)
	}()
	defer func() {
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
			if m := re.FindStringSubmatch(out.String() + errb.String()); m != nil {
				return m[len(m)-1]
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s in 15s\nstdout:\n%s\nstderr:\n%s", re, out.String(), errb.String())
			}
		}
	}
	dnsAddr := want(regexp.MustCompile(`dns: listening on (127\.0\.0\.1:\d+)`))
	proxyAddr := want(regexp.MustCompile(`explicit on (127\.0\.0\.1:\d+)`))
	adminAddr := want(regexp.MustCompile(`admin: http://(127\.0\.0\.1:\d+)/`))
	want(regexp.MustCompile(`WARNING: audit: write event log: open \S+events\.ndjson: read-only file system`))
	want(regexp.MustCompile(`warning: learned addresses: .*read-only file system`))
	want(regexp.MustCompile(`inspection CA cannot be loaded.*read-only file system`))
	want(regexp.MustCompile(`event log: \S+ \((\d+) earlier events restored`))

	get := func(path string) (int, string) {
		t.Helper()
		res, err := http.Get("http://" + adminAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	traffic := func(when string) {
		t.Helper()
		m := new(dns.Msg)
		m.SetQuestion("pool.ntp.test.", dns.TypeA)
		c := &dns.Client{Net: "udp", Timeout: 6 * time.Second}
		if _, _, err := c.Exchange(m, dnsAddr); err != nil {
			t.Errorf("DNS %s: %v", when, err)
		}
		conn, err := net.Dial("tcp", proxyAddr)
		if err != nil {
			t.Fatalf("proxy %s: %v", when, err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(conn, "CONNECT tracker.example:443 HTTP/1.1\r\nHost: tracker.example:443\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatalf("proxy %s: %v", when, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("CONNECT to a denied name %s: %d, want 403", when, resp.StatusCode)
		}
	}
	traffic("on the read-only directory")
	var code int
	var body string
	for i := 0; i < 100; i++ {
		if code, body = get("/readyz"); code == 503 && strings.Contains(body, "event log write failing") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code != 503 || !strings.Contains(body, "event log write failing") || !strings.Contains(body, "read-only file system") {
		t.Errorf("/readyz on the read-only directory: %d %q", code, body)
	}
	if code, body := get("/healthz"); code != 200 {
		t.Errorf("/healthz on the read-only directory: %d %q", code, body)
	}
	var r *audit.Report
	for i := 0; i < 100; i++ {
		_, b := get("/report.json")
		if r, err = audit.ReadReportJSON(strings.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		if r.Loading == nil && r.Totals.Events >= old+2 && r.UnwrittenEvents >= 2 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r.Loading != nil || r.Totals.Events != old+2 || r.UnwrittenEvents != 2 {
		t.Errorf("report on the read-only directory: loading %+v, %d events, %d unwritten; want %d earlier and 2 new, unwritten", r.Loading, r.Totals.Events, r.UnwrittenEvents, old)
	}
	if ents, _ := os.ReadDir(dir); len(ents) == 0 {
		t.Error("the directory is empty")
	} else if b, _ := os.ReadFile(filepath.Join(dir, audit.CurrentLog)); !bytes.Equal(b, logBefore) {
		t.Error("the event log changed on the read-only directory")
	}

	// One line each, not one per flush or save.
	for _, line := range []string{"event log write failed", "cannot write the table", "inspection CA cannot be loaded"} {
		if n := strings.Count(errb.String(), line); n != 1 {
			t.Errorf("%d log lines %q, want 1:\n%s", n, line, errb.String())
		}
	}

	writable()
	for i := 0; i < 100; i++ {
		traffic("once writable")
		if code, body = get("/readyz"); code == 200 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code != 200 {
		t.Errorf("/readyz once writable: %d %q", code, body)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, audit.CurrentLog)); !bytes.HasPrefix(b, logBefore) || len(b) == len(logBefore) {
		t.Errorf("the event log once writable: %d bytes (was %d), want the earlier events and new ones after them", len(b), len(logBefore))
	}
}
