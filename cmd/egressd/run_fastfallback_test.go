package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"egressd/firewall"
	"egressd/internal/nfq"
	"egressd/internal/testnet"
	"egressd/policy"
	"egressd/proxy"
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

// TestOpenFastPath: openFastPath with its queue and injector to be had
// sets the proxy's side of the fast path (marks, ports, injector) and
// leaves --fast-path on; with the injector not to be had (here: no such
// namespace; in the field, no CAP_NET_RAW) it turns the fast path off,
// leaves the proxy without marks, ports or injector, and its one line
// names what could not be opened: the injector, not the queue. Before,
// the line said "its queue cannot be opened" whichever failed.
func TestOpenFastPath(t *testing.T) {
	open := func(t *testing.T, netns string) (*daemon, *nfq.Conn, proxy.Config, proxy.Deps, string) {
		t.Helper()
		var logs lockedBuffer
		d := &daemon{cfg: runConfig{fastPath: true, fastPorts: "443,8443", ctMarkBits: defaultCTMarkBits}, fwNetNS: netns,
			log: slog.New(slog.NewJSONHandler(&logs, nil)), degraded: map[string]string{}}
		var pcfg proxy.Config
		var pdeps proxy.Deps
		q := d.openFastPath(capabilities{true, true, true}, &pcfg, &pdeps)
		return d, q, pcfg, pdeps, logs.String()
	}
	t.Run("open", func(t *testing.T) {
		ns := testnet.New(t, "fp")
		d, q, pcfg, pdeps, logs := open(t, "/var/run/netns/"+ns.Name)
		if q == nil {
			t.Fatalf("no queue:\n%s", logs)
		}
		q.Close()
		if inj, ok := pdeps.Inject.(*nfq.Injector); !ok || inj == nil {
			t.Errorf("the proxy has no injector: %v", pdeps.Inject)
		} else {
			inj.Close()
		}
		if !d.cfg.fastPath || len(pcfg.FastPorts) != 2 || pcfg.FastMarks == (proxy.FastMarks{}) || len(d.degradedParts()) != 0 || logs != "" {
			t.Errorf("fast path %v, ports %v, marks %+v, degraded %v, logs:\n%s", d.cfg.fastPath, pcfg.FastPorts, pcfg.FastMarks, d.degradedParts(), logs)
		}
	})
	t.Run("no injector", func(t *testing.T) {
		d, q, pcfg, pdeps, logs := open(t, filepath.Join(t.TempDir(), "no-such-netns"))
		if q != nil {
			q.Close()
			t.Fatal("a queue in a namespace that does not exist")
		}
		if d.cfg.fastPath || pcfg.FastPorts != nil || pcfg.FastMarks != (proxy.FastMarks{}) || pdeps.Inject != nil || d.degradedParts()["fast-path"] == "" {
			t.Errorf("after the fallback: fast path %v, ports %v, marks %+v, injector %v, degraded %v", d.cfg.fastPath, pcfg.FastPorts, pcfg.FastMarks, pdeps.Inject, d.degradedParts())
		}
		lines := strings.Split(strings.TrimSpace(logs), "\n")
		if len(lines) != 1 || !strings.Contains(lines[0], "the fast path is off: its injector") || strings.Contains(lines[0], "queue cannot") {
			t.Errorf("the fallback's log, want one line naming the injector:\n%s", logs)
		}
	})
}

// TestFastPathFallbackRecorded: a start with --fast-path whose queue or
// injector could not be had notes and records the ruleset it put in as
// without the fast path, and the next start (the queue free again, or
// still taken) reads the marks of that run with the layout without it:
// the note of the policy going in and the record beside the copy both
// say fast_path false.
func TestFastPathFallbackRecorded(t *testing.T) {
	const e = "version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.1/32], ports: [9000/udp]}\n"
	state := filepath.Join(t.TempDir(), "state")
	d := startRecorded(t, state, e, "--fast-path")
	d.fwNetNS = filepath.Join(t.TempDir(), "no-such-netns")
	if q := d.openFastPath(capabilities{true, true, true}, &proxy.Config{}, &proxy.Deps{}); q != nil {
		q.Close()
		t.Fatal("a queue in a namespace that does not exist")
	}
	d.notePending(d.src)
	next := startRecorded(t, state, e, "--fast-path")
	if len(next.prevPending) != 1 || next.prevPending[0].FastPath == nil || *next.prevPending[0].FastPath {
		t.Errorf("the policy noted going in, after the fallback: %+v, want one with the fast path off", next.prevPending)
	}
	d.savePolicy(true)
	next = startRecorded(t, state, e, "--fast-path")
	if got := next.prevFastPath; got == nil || *got {
		t.Errorf("the run after the fallback's fast path is read as %s, want false", boolPtr(got))
	}
}
