package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"egressd/firewall"
	"egressd/internal/nfq"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestRunFastPathQueueTaken: egressd run --fast-path with the fast path's
// queue held by another socket installs without the fast path, and
// everything it says and writes is of the ruleset that went in, not of
// the one asked for: one log line says the fast path is off (not that
// line and a "part not running" one besides), /readyz names the
// fast-path part, the record says fast_path false, and the start's check
// of the conntrack mark tags counts the tag the fast path would have
// reserved as a rule's (a policy with as many forwarding rules as the
// bits hold tags fits without the fast path: no warning that rules share
// tags). Before, the tag check ran with --fast-path as asked, before the
// queue was tried, and warned of shared tags the installed ruleset does
// not have; and the fallback logged a warning and an error.
func TestRunFastPathQueueTaken(t *testing.T) {
	const bits = "0x0000f000" // the enforced bit and 3 tag bits: 7 tags, 6 with the fast path
	var src strings.Builder
	src.WriteString("version: 1\nmode: enforce\nrules:\n")
	for i := 1; i <= 7; i++ {
		fmt.Fprintf(&src, "  - {name: r%d, to: [192.0.2.%d/32], ports: [9000/udp]}\n", i, i)
	}
	// What the warning would be with the fast path on: the policy is the
	// size that tells the two apart.
	eng, err := policy.Compile("p.yaml", []byte(src.String()))
	if err != nil {
		t.Fatal(err)
	}
	markBits, _ := parseCTMarkBits(bits)
	if err := (firewall.Config{CTMarkBits: markBits, FastPath: true}).CheckTags(eng); err == nil {
		t.Fatal("7 forwarding rules fit in the tags of 0x0000f000 with the fast path: the test cannot tell the two apart")
	}
	if err := (firewall.Config{CTMarkBits: markBits}).CheckTags(eng); err != nil {
		t.Fatalf("7 forwarding rules do not fit in the tags of 0x0000f000 without the fast path: %v", err)
	}

	var holder *nfq.Conn
	ns, p, pol := runInNSAfter(t, src.String(), func(ns *testnet.NS) {
		q, err := nfq.OpenConfig(nfq.Config{Queue: firewall.DefaultFastPathQueue, NetNS: "/var/run/netns/" + ns.Name})
		if err != nil {
			t.Fatalf("holding the fast path's queue: %v", err)
		}
		holder = q
	}, "--fast-path", "--ct-mark-bits", bits)
	defer holder.Close()
	ready, _ := ns.Run("curl", "-s", "-w", "\n%{http_code}", "http://127.0.0.1:9901/readyz")
	rs, _ := ns.Run("nft", "list", "table", "inet", "egressd")
	p.Stop()
	logs := p.Stderr.String()

	if !strings.HasSuffix(strings.TrimSpace(ready), "503") || !strings.Contains(ready, "fast-path") {
		t.Errorf("/readyz: %s, want 503 naming the fast-path part", ready)
	}
	if !strings.Contains(rs, "chain forward") || strings.Contains(rs, "chain fastpath") || strings.Contains(rs, "queue") {
		t.Errorf("the ruleset, with the queue held by another socket, has the fast path or no forward chain:\n%s", rs)
	}
	var said []string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "fast path is off") || strings.Contains(l, `"part":"fast-path"`) {
			said = append(said, l)
		}
	}
	if len(said) != 1 || !strings.Contains(said[0], `"level":"WARN"`) {
		t.Errorf("%d log lines say the fast path is off, want one warning:\n%s", len(said), strings.Join(said, "\n"))
	}
	if strings.Contains(logs, "rules will share conntrack mark tags") {
		t.Errorf("a warning that rules share tags, for a ruleset installed without the fast path whose tags hold every rule:\n%s", logs)
	}
	rec, err := os.ReadFile(filepath.Join(filepath.Dir(pol), "state", runningFirewallFile))
	if err != nil || !strings.Contains(string(rec), `"fast_path":false`) {
		t.Errorf("the firewall record does not say the fast path is off: %v\n%s", err, rec)
	}
}
