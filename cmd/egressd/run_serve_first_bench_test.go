package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
	"egressd/policy"
)

var bigLogOnce sync.Once
var bigLogDir string

// bigLog is a state directory whose event log is 2 compressed rotated
// files of 64 MiB and a current one: denied TLS connections to churning
// random names (the session 23 case), as egressd writes them.
func bigLog(b *testing.B) string {
	bigLogOnce.Do(func() {
		dir, err := os.MkdirTemp("", "s2-biglog")
		if err != nil {
			b.Fatal(err)
		}
		j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, DetailBurst: -1, Compress: true}, audit.NewLedger(nil, audit.LedgerOptions{}))
		if err != nil {
			b.Fatal(err)
		}
		go j.Run(context.Background())
		r := rand.New(rand.NewPCG(7, 8))
		const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
		at := time.Now().UTC().Add(-24 * time.Hour)
		for i := 0; i < 2_000_000; i++ {
			label := make([]byte, 8+r.IntN(9))
			for k := range label {
				label[k] = letters[r.IntN(len(letters))]
			}
			j.Emit(audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: at.Add(time.Duration(i) * 200 * time.Microsecond),
				Client: netip.AddrFrom4([4]byte{192, 168, 10, byte(20 + r.IntN(4))}), ClientPort: uint16(32768 + r.IntN(28000)),
				Dest: netip.AddrFrom4([4]byte{198, 18, byte(r.IntN(256)), byte(r.IntN(256))}), DestPort: 443, Proto: "tcp",
				Name: string(label) + ".cdn.example.net", NameSource: audit.NameSNI,
				Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule, Enforced: true,
				BytesOut: uint64(517 + r.IntN(200)), Close: "denied"})
			if i%2000 == 0 {
				j.Sync(10 * time.Second)
				if files, _ := audit.LogFiles(dir); len(files) > 2 {
					break
				}
			}
		}
		j.Close()
		bigLogDir = dir
	})
	if files, _ := audit.LogFiles(bigLogDir); len(files) <= 2 {
		b.Skip("no big log")
	}
	return bigLogDir
}

// BenchmarkStartToFirstDNS is the time from `egressd run`'s start to its
// first DNS answer with a big event log (bigLog): read-first is the
// read before serving (as before session 25), serve-first the read in the
// background. Run it in a network namespace of its own:
//
//	ip netns add s2b; ip netns exec s2b ip link set lo up
//	ip netns exec s2b go test ./cmd/egressd/ -run '^$' -bench StartToFirstDNS -benchtime 3x
//	ip netns del s2b
func BenchmarkStartToFirstDNS(b *testing.B) {
	logDir := bigLog(b)
	for _, bg := range []bool{false, true} {
		name := "read-first"
		if bg {
			name = "serve-first"
		}
		b.Run(name, func(b *testing.B) {
			testHookJournal = func(c *audit.JournalConfig) { c.Background = bg }
			defer func() { testHookJournal = nil }()
			var total time.Duration
			for i := range b.N {
				state := filepath.Join(b.TempDir(), fmt.Sprint(i))
				if err := os.CopyFS(state, os.DirFS(logDir)); err != nil {
					b.Fatal(err)
				}
				total += startToFirstDNS(b, state, bg)
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms-to-dns")
		})
	}
}

// startToFirstDNS starts egressd run on state and returns the time until
// its DNS forwarder answered (SERVFAIL: no upstream), then stops it, with
// bg once the background read of the log ended.
func startToFirstDNS(b *testing.B, state string, bg bool) time.Duration {
	var out, errb lockedBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	start := time.Now()
	go func() {
		done <- cmdRun(ctx, []string{"--mode", "enforce", "--lan", "lo", "--wan", "lo", "--no-firewall",
			"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
			"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", state}, &out, &errb)
	}()
	defer func() {
		// Stop once the read ended: a stop during it would cut it short.
		for i := 0; bg && i < 1200 && !regexp.MustCompile(`earlier events restored`).MatchString(out.String()); i++ {
			time.Sleep(50 * time.Millisecond)
		}
		cancel()
		<-done
	}()
	re := regexp.MustCompile(`dns: listening on (127\.0\.0\.1:\d+)`)
	var addr string
	for deadline := time.Now().Add(60 * time.Second); addr == ""; time.Sleep(time.Millisecond) {
		if m := re.FindStringSubmatch(out.String()); m != nil {
			addr = m[1]
		}
		if time.Now().After(deadline) {
			b.Fatalf("no DNS in 60s\n%s\n%s", out.String(), errb.String())
		}
	}
	m := new(dns.Msg)
	m.SetQuestion("pool.ntp.test.", dns.TypeA)
	c := &dns.Client{Net: "udp", Timeout: 5 * time.Second}
	if _, _, err := c.Exchange(m, addr); err != nil {
		b.Fatalf("DNS: %v", err)
	}
	return time.Since(start)
}
