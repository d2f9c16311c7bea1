package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// lockedBuffer is a bytes.Buffer written by the daemon's goroutines and
// read by the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRunLogComponentOnce runs `egressd run` on loopback (audit mode,
// nothing installed), asks its DNS forwarder one question, and checks that
// every JSON log line names its component at most once, and the forwarder's
// canonical line exactly once.
func TestRunLogComponentOnce(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte("version: 1\nmode: audit\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb lockedBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- cmdRun(ctx, []string{"--policy", pol, "--lan", "lo", "--wan", "lo", "--no-firewall",
			"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
			"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, &out, &errb)
	}()
	stopped := false
	stop := func() int {
		if stopped {
			return 0
		}
		stopped = true
		cancel()
		select {
		case code := <-done:
			return code
		case <-time.After(20 * time.Second):
			t.Fatalf("egressd run did not stop within 20s\n%s", errb.String())
		}
		return 0
	}
	defer stop()

	dnsRe := regexp.MustCompile(`dns: listening on (127\.0\.0\.1:\d+)`)
	var dnsAddr string
	for deadline := time.Now().Add(10 * time.Second); dnsAddr == ""; {
		if m := dnsRe.FindStringSubmatch(out.String()); m != nil {
			dnsAddr = m[1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the DNS forwarder did not start in 10s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	m := new(dns.Msg)
	m.SetQuestion("pool.ntp.test.", dns.TypeA)
	c := &dns.Client{Net: "udp", Timeout: 6 * time.Second}
	if _, _, err := c.Exchange(m, dnsAddr); err != nil {
		t.Fatalf("query: %v", err) // SERVFAIL is expected (no upstream), no answer is not
	}
	if code := stop(); code != exitOK {
		t.Fatalf("exit %d\n%s", code, errb.String())
	}

	dnsLines := 0
	for _, line := range strings.Split(strings.TrimSpace(errb.String()), "\n") {
		if n := strings.Count(line, `"component":`); n > 1 {
			t.Errorf("component %d times: %s", n, line)
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("not a JSON line: %q", line)
		}
		if rec["component"] == "dnsfilter" && rec["name"] == "pool.ntp.test" {
			dnsLines++
		}
	}
	if dnsLines != 1 {
		t.Errorf("%d canonical dnsfilter lines for the query, want 1:\n%s", dnsLines, errb.String())
	}
}
