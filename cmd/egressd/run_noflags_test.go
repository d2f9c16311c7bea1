package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/testnet"
)

// TestRunNoFlags runs what README's first command runs: the real binary,
// as root, with no arguments at all, on a gateway namespace with a LAN
// link and a default route out of a WAN link. It must take the embedded
// seed profile in audit mode, find the LAN interface itself, install no
// nftables table (audit mode, no guard), serve the report on
// 127.0.0.1:9901, and `egressd report` with no flags must read it from
// there. The default state directory, /var/lib/egressd, is on a tmpfs
// of its own at /var/lib in a mount namespace, so the host's is left
// alone (and need not exist).
func TestRunNoFlags(t *testing.T) {
	ns := testnet.New(t, "runnf")
	if _, err := ns.Run("nft", "--version"); err != nil {
		t.Fatalf("nft (Debian package nftables) is not installed: %v", err)
	}
	testnet.Link(t, testnet.New(t, "runnfc"), "eth0", []string{"198.18.1.2/24"}, ns, "lan0", []string{"198.18.1.1/24"})
	testnet.Link(t, ns, "wan0", []string{"198.18.2.1/24"}, testnet.New(t, "runnfs"), "eth0", []string{"198.18.2.2/24"})
	ns.MustRun("ip", "route", "add", "default", "via", "198.18.2.2")
	bin := buildEgressd(t)
	private := func(cmd string) []string {
		return []string{"unshare", "--mount", "--propagation", "private", "sh", "-c",
			"mount -t tmpfs tmpfs /var/lib && mkdir /var/lib/egressd && exec " + cmd}
	}
	p := ns.Start(private(bin)...)
	if err := ns.WaitTCP("127.0.0.1:9901", 20*time.Second); err != nil {
		p.Stop()
		t.Fatalf("the admin address did not come up: %v\nstdout:\n%s\nstderr:\n%s", err, p.Stdout, p.Stderr)
	}
	// The start-up lines are written before the admin address opens.
	time.Sleep(200 * time.Millisecond)
	out, _ := ns.Run(bin, "report", "--json")
	metrics, merr := ns.Run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:9901/metrics")
	nft, nftErr := ns.Run("nft", "list", "table", "inet", "egressd")
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(20 * time.Second):
		p.Stop()
		t.Fatal("egressd did not stop within 20s of SIGTERM")
	}
	stdout := p.Stdout.String()
	for _, want := range []string{
		"policy profile:nirovision, 8 rules, mode audit",
		"capture: listening on lan0",
		"dns: listening on",
		"explicit on 198.18.1.1:3128",
		"admin: http://127.0.0.1:9901/",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("stdout does not say %q:\n%s\nstderr:\n%s", want, stdout, p.Stderr)
		}
	}
	if strings.Contains(stdout, "NOT RUNNING") {
		t.Errorf("a part is not running:\n%s", stdout)
	}
	if nftErr == nil {
		t.Errorf("audit mode with no flags installed a table:\n%s", nft)
	}
	// Every metric a README names is served from the start (a histogram
	// as its _bucket, _sum and _count), but those README.md's Metrics
	// table marks † (no series until their first event).
	if merr != nil {
		t.Errorf("GET /metrics: %v: %s", merr, metrics)
	}
	table := readmeMetricsTable(t)
	for _, name := range readmeMetrics(t) {
		if table[name].laterOnly {
			continue
		}
		if !regexp.MustCompile(`(?m)^` + name + `(_bucket|_sum|_count)?[ {]`).MatchString(metrics) {
			t.Errorf("/metrics has no %s, which a README names", name)
		}
	}
	// `egressd report` (no flags) reads the running daemon.
	i := strings.Index(out, "{")
	var rep audit.Report
	if i < 0 || json.Unmarshal([]byte(out[i:]), &rep) != nil || rep.Mode != "audit" || len(rep.UnusedRules) != 8 {
		t.Errorf("egressd report --json from the daemon: mode %q, %d unused rules, want audit and the seed's 8:\n%s", rep.Mode, len(rep.UnusedRules), out)
	}
}

// readmeMetrics returns the metric names README.md and the packages'
// READMEs name (whole egress_... names only, not a prefix such as
// egress_dnsfilter_).
func readmeMetrics(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob("../../*/README.md")
	files = append(files, "../../README.md")
	seen := map[string]bool{}
	var names []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range regexp.MustCompile(`\b(egress_[a-z0-9_]*[a-z0-9])\b`).FindAllStringSubmatch(string(b), -1) {
			if !seen[m[1]] {
				seen[m[1]] = true
				names = append(names, m[1])
			}
		}
	}
	if len(names) < 3 {
		t.Fatalf("the READMEs name %d metrics: %v", len(names), names)
	}
	return names
}
