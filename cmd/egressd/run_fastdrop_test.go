package main

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/firewall"
	"egressd/internal/testnet"
	"egressd/proxy"
)

// TestFastPathDropRefusedRetried: the fast path's queue reader failed
// and nftables refuses the ruleset without it (here for real: the try
// runs on a thread without CAP_NET_ADMIN). The ruleset in the kernel
// queues new connections to the fast ports to no one, so egressd says
// so (an error line, the part not running) and tries again on the main
// loop (fastRetry) until it goes in: then no rule queues, the record
// says fast_path false, and a line says the ruleset without it is in.
// Before, nothing tried again: the ruleset queued to no one until an
// operator's reload. Subtest rerendered: the firewall put the ruleset
// without it in on its own before the try (its re-render at an expiry,
// which renders without the fast path once it is dropped; here a
// Replace of the same policy): the try again finds it in and the record
// says so (before this commit's second fix, the record went on saying
// fast_path true).
func TestFastPathDropRefusedRetried(t *testing.T) {
	for _, rerendered := range []bool{false, true} {
		name := "retried"
		if rerendered {
			name = "rerendered"
		}
		t.Run(name, func(t *testing.T) { testFastPathDropRefusedRetried(t, rerendered) })
	}
}

func testFastPathDropRefusedRetried(t *testing.T, rerendered bool) {
	ns := testnet.New(t, "fdrp")
	const src = "version: 1\nmode: enforce\nrules:\n  - name: web\n    to: [192.0.2.1/32]\n    ports: [443/tcp]\n"
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	d, eng := firewallDaemon(t, ns, src, firewall.Config{FastPath: true}, firewall.Deps{Logger: log})
	fw := d.fw
	if rs := ns.MustRun("nft", "list", "table", "inet", "egressd"); !strings.Contains(rs, "chain fastpath") {
		t.Fatalf("the ruleset installed with the fast path does not queue:\n%s", rs)
	}

	testnet.WithoutNetAdmin(t, func() {
		d.fastPathFailed(&proxy.QueueError{Err: errors.New("nfq: read: broken"), Pending: 2})
	})
	if rs := ns.MustRun("nft", "list", "table", "inet", "egressd"); !strings.Contains(rs, "chain fastpath") {
		t.Fatalf("the refused ruleset went in:\n%s", rs)
	}
	if why := d.degradedParts()["fast-path"]; !strings.Contains(why, "refused") {
		t.Errorf("the fast-path part's reason after the refusal: %q, want it to say nftables refused the ruleset", why)
	}
	if !strings.Contains(logs.String(), `"level":"ERROR"`) || !strings.Contains(logs.String(), `"pending_lost":2`) {
		t.Errorf("no error line with pending_lost after the refusal:\n%s", logs.String())
	}

	if rec, err := os.ReadFile(filepath.Join(d.cfg.stateDir, runningFirewallFile)); err != nil || !strings.Contains(string(rec), `"fast_path":true`) {
		t.Errorf("the record after the refusal does not say the fast path is on (as in the kernel): %v\n%s", err, rec)
	}
	if rerendered {
		if err := fw.Replace(eng); err != nil {
			t.Fatal(err)
		}
	}

	// The main loop's next try (run's select), with CAP_NET_ADMIN.
	if d.fastRetry == nil {
		t.Fatal("no try again is due after nftables refused the ruleset without the fast path: it queues to no one until a reload")
	}
	select {
	case <-d.fastRetry:
	case <-time.After(10 * time.Second):
		t.Fatal("the try again is not due within 10 s")
	}
	d.dropFastPath()
	if rs := ns.MustRun("nft", "list", "table", "inet", "egressd"); strings.Contains(rs, "queue") || strings.Contains(rs, "chain fastpath") {
		t.Errorf("after the try again, the ruleset still has the fast path:\n%s", rs)
	}
	if d.fastRetry != nil {
		t.Error("another try is due once the ruleset went in")
	}
	if why := d.degradedParts()["fast-path"]; why == "" || strings.Contains(why, "refused") {
		t.Errorf("the fast-path part's reason once the ruleset went in: %q", why)
	}
	if rec, err := os.ReadFile(filepath.Join(d.cfg.stateDir, runningFirewallFile)); err != nil || !strings.Contains(string(rec), `"fast_path":false`) {
		t.Errorf("the record does not say the fast path is off: %v\n%s", err, rec)
	}
	if !strings.Contains(logs.String(), "the ruleset without it is in") {
		t.Errorf("no line says the ruleset without the fast path went in:\n%s", logs.String())
	}
}
