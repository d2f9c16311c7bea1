package main

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestStartCopyOnlyOnceInstalled: the state directory's copy of the
// policy (policy.yaml) is what the next start reads the conntrack marks
// as (firewall.Deps.Previous), so a start in enforce mode writes it only
// once the firewall took the policy, with the --tcp-ports the ruleset was
// rendered with beside it. Before, newDaemon wrote it before anything was
// installed: a start whose install failed left the copy saying B while
// the kernel's marks were still A's, and the next start read them as B's
// rules. nftables refuses the install for real: it runs on a thread
// without CAP_NET_ADMIN, in a namespace of the test's.
func TestStartCopyOnlyOnceInstalled(t *testing.T) {
	ns := testnet.New(t, "copy")
	const (
		a = "version: 1\nmode: enforce\nrules:\n  - {name: a, to: [192.0.2.1/32], ports: [9000/udp, 22/tcp]}\n"
		b = "version: 1\nmode: enforce\nrules:\n  - {name: b, to: [192.0.2.2/32], ports: [9000/udp, 22/tcp]}\n"
	)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o750); err != nil {
		t.Fatal(err)
	}
	copyFile := filepath.Join(state, runningPolicyFile)
	if err := os.WriteFile(copyFile, []byte(a), 0o640); err != nil {
		t.Fatal(err)
	}
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte(b), 0o644); err != nil {
		t.Fatal(err)
	}
	start := func(tcpPorts string) *daemon { return enforceDaemon(t, ns, pol, state, tcpPorts) }
	copyIs := func(when, want string) {
		t.Helper()
		if got, err := os.ReadFile(copyFile); err != nil || string(got) != want {
			t.Errorf("%s: the copy (%v):\n%s\nwant:\n%s", when, err, got, want)
		}
	}

	d := start("443")
	if d.prevPolicy == nil || d.prevPolicy.Rules()[0].Name != "a" {
		t.Fatalf("the previous policy read at start is not the copy's: %v", d.prevPolicy)
	}
	copyIs("started, nothing installed yet", a)
	var err error
	testnet.WithoutNetAdmin(t, func() { err = d.startFirewall([]string{"lan0"}, "wan0", &firewallGate{}) })
	if err == nil {
		t.Fatal("the install without CAP_NET_ADMIN did not fail")
	}
	copyIs("the install failed", a)
	installFirewall(t, d)
	t.Cleanup(func() { d.fw.Close() })
	copyIs("installed", b)

	// The next start, with --tcp-ports changed, reads the marks as B's
	// rules rendered with the ports B's ruleset had.
	d2 := start("all")
	if d2.prevPolicy == nil || d2.prevPolicy.Rules()[0].Name != "b" {
		t.Fatalf("the previous policy read at the next start is not B: %v", d2.prevPolicy)
	}
	want := []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
	if d2.prevTCPPorts == nil || !slices.Equal(*d2.prevTCPPorts, want) {
		t.Errorf("the --tcp-ports recorded for the previous policy: %v, want %v", d2.prevTCPPorts, want)
	}
}

// enforceDaemon is newDaemon for the enforce restart tests: egressd run
// with the policy file pol, lan0 and wan0, the state directory state and
// --tcp-ports tcpPorts, its firewall in the namespace ns.
func enforceDaemon(t *testing.T, ns *testnet.NS, pol, state, tcpPorts string) *daemon {
	t.Helper()
	var cfg runConfig
	fs := newFlags("run", io.Discard)
	cfg.flags(fs)
	if _, err := parseArgs(fs, []string{"--policy", pol, "--lan", "lan0", "--wan", "wan0", "--state-dir", state, "--tcp-ports", tcpPorts}); err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d.fwNetNS = "/var/run/netns/" + ns.Name
	return d
}

// installFirewall starts d's firewall on lan0 and wan0.
func installFirewall(t *testing.T, d *daemon) {
	t.Helper()
	if err := d.startFirewall([]string{"lan0"}, "wan0", &firewallGate{}); err != nil {
		t.Fatal(err)
	}
}
