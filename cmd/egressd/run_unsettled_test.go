package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"egressd/internal/testnet"
)

// TestUnsettledMarksKeepNote: an enforce start whose look at the
// connections did not go through (a conntrack dump or deletion that
// failed; here the firewall is told so) leaves flows marked with the tags
// of the policies before it, which it goes on reading as theirs
// (firewall.Firewall.since). Its copy replaces the policy before, so the
// note (policy.pending.json) stays, with that policy added, and a kill -9
// then leaves a state the next start reads as all of them. Before, the
// note went with the copy, and the next start read the old marks as the
// copy's policy's rules alone: a flow of a rule removed whose tag an
// unchanged rule drew would be kept.
func TestUnsettledMarksKeepNote(t *testing.T) {
	ns := testnet.New(t, "r1unset")
	const (
		a = "version: 1\nmode: enforce\nrules:\n  - {name: a, to: [192.0.2.1/32], ports: [9000/udp, 22/tcp]}\n"
		b = "version: 1\nmode: enforce\nrules:\n  - {name: b, to: [192.0.2.2/32], ports: [9000/udp, 22/tcp]}\n"
		c = "version: 1\nmode: enforce\nrules:\n  - {name: c, to: [192.0.2.3/32], ports: [9000/udp, 22/tcp]}\n"
	)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	pol := filepath.Join(dir, "p.yaml")
	start := func(src, tcpPorts string) *daemon {
		t.Helper()
		if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		return enforceDaemon(t, ns, pol, state, tcpPorts)
	}
	install := func(d *daemon) { installFirewall(t, d) }
	names := func(d *daemon) (prev string, pending []string) {
		if d.prevPolicy != nil {
			prev = d.prevPolicy.Rules()[0].Name
		}
		for _, p := range d.prevPending {
			pending = append(pending, p.Policy.Rules()[0].Name)
		}
		return prev, pending
	}

	d1 := start(a, "all")
	install(d1)
	if err := d1.fw.Detach(); err != nil {
		t.Fatal(err)
	}
	d2 := start(b, "443")
	d2.marksSettled = func() bool { return false }
	install(d2)
	if err := d2.fw.Detach(); err != nil {
		t.Fatal(err)
	}
	// Killed now: the next start reads the marks as B's, A's and B's.
	d3 := start(c, "443")
	if prev, pending := names(d3); prev != "b" || !slices.Equal(pending, []string{"b", "a"}) && !slices.Equal(pending, []string{"a", "b"}) {
		t.Fatalf("after a start whose look at the connections failed, the marks are read as %q and %q, want b's and a's and b's", prev, pending)
	}
	all, err := parseTCPPorts("all")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range d3.prevPending {
		if p.Policy.Rules()[0].Name == "a" && (p.TCPPorts == nil || !slices.Equal(*p.TCPPorts, all)) {
			t.Errorf("A's --tcp-ports as noted: %v, want its record's, %v", p.TCPPorts, all)
		}
	}
	install(d3)
	t.Cleanup(func() { d3.fw.Close() })
	if _, err := os.Stat(filepath.Join(state, pendingFile)); !os.IsNotExist(err) {
		t.Errorf("C installed, its look through, and copied: %s is still there (%v)", pendingFile, err)
	}
}
