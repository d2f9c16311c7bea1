package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"egressd/audit"
	"egressd/internal/testnet"
)

// TestKilledBeforeCopyPending: the state directory's copy (policy.yaml)
// is written once the firewall took the policy, so a kill -9 between an
// enforce install (or reload) and the copy leaves the copy of the policy
// before while the kernel's marks are the new one's. So the policy is
// noted (policy.pending.json, synced) before it goes in, and the next
// start reads the marks as the copy's policy's or the noted one's
// (firewall.Deps.Pending; TestRestartKilledBeforeRecord in firewall/),
// with the flags it ran with; once a copy is of the policy that went in,
// the note goes. The kill is the state directory as it was when the copy
// was about to be written. Before, nothing was noted, and the next start
// read B's marks as A's rules.
func TestKilledBeforeCopyPending(t *testing.T) {
	ns := testnet.New(t, "u3kill")
	const (
		a = "version: 1\nmode: enforce\nrules:\n  - {name: a, to: [192.0.2.1/32], ports: [9000/udp, 22/tcp]}\n"
		b = "version: 1\nmode: enforce\nrules:\n  - {name: b, to: [192.0.2.2/32], ports: [9000/udp, 22/tcp]}\n"
		c = "version: 1\nmode: enforce\nrules:\n  - {name: c, to: [192.0.2.3/32], ports: [9000/udp, 22/tcp]}\n"
		e = "version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.4/32], ports: [9000/udp, 22/tcp]}\n"
	)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	pol := filepath.Join(dir, "p.yaml")
	setPolicy := func(src string) {
		t.Helper()
		if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	start := func(src, tcpPorts string) *daemon {
		t.Helper()
		setPolicy(src)
		return enforceDaemon(t, ns, pol, state, tcpPorts)
	}
	install := func(d *daemon) { installFirewall(t, d) }
	// snapshot reads the state directory's files; restore makes the
	// directory hold those alone.
	snapshot := func() map[string][]byte {
		t.Helper()
		m := map[string][]byte{}
		ents, err := os.ReadDir(state)
		if err != nil {
			t.Fatal(err)
		}
		for _, en := range ents {
			b, err := os.ReadFile(filepath.Join(state, en.Name()))
			if err != nil {
				t.Fatal(err)
			}
			m[en.Name()] = b
		}
		return m
	}
	restore := func(m map[string][]byte) {
		t.Helper()
		if err := os.RemoveAll(state); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(state, 0o750); err != nil {
			t.Fatal(err)
		}
		for name, b := range m {
			if err := os.WriteFile(filepath.Join(state, name), b, 0o640); err != nil {
				t.Fatal(err)
			}
		}
	}
	// killBeforeCopy runs op (an install or a reload) and puts the state
	// directory back as it was when savePolicy began.
	killBeforeCopy := func(d *daemon, op func()) {
		t.Helper()
		var at map[string][]byte
		d.beforeSave = func() {
			if at == nil {
				at = snapshot()
			}
		}
		op()
		d.beforeSave = nil
		if at == nil {
			t.Fatal("savePolicy did not run")
		}
		restore(at)
	}
	names := func(d *daemon) (prev string, pending []string) {
		if d.prevPolicy != nil {
			prev = d.prevPolicy.Rules()[0].Name
		}
		for _, p := range d.prevPending {
			pending = append(pending, p.Policy.Rules()[0].Name)
		}
		return prev, pending
	}
	noPending := func(when string) {
		t.Helper()
		if _, err := os.Stat(filepath.Join(state, pendingFile)); !os.IsNotExist(err) {
			t.Errorf("%s: %s is still there (%v)", when, pendingFile, err)
		}
	}

	d1 := start(a, "443")
	install(d1)
	noPending("A installed and copied")
	if err := d1.fw.Detach(); err != nil {
		t.Fatal(err)
	}

	// B goes in with --tcp-ports all; killed before its copy.
	d2 := start(b, "all")
	killBeforeCopy(d2, func() { install(d2) })
	if err := d2.fw.Detach(); err != nil {
		t.Fatal(err)
	}
	d3 := start(c, "443")
	if prev, pending := names(d3); prev != "a" || !slices.Equal(pending, []string{"b"}) {
		t.Fatalf("after a kill between B's install and its copy, the marks are read as %q and %q, want a's and b's", prev, pending)
	}
	all, err := parseTCPPorts("all")
	if err != nil {
		t.Fatal(err)
	}
	if got := d3.prevPending[0].TCPPorts; got == nil || !slices.Equal(*got, all) {
		t.Errorf("B's --tcp-ports as noted: %v, want %v", got, all)
	}
	install(d3)
	t.Cleanup(func() { d3.fw.Close() })
	noPending("C installed and copied")

	// A reload to E, killed before its copy.
	d3.ledger = audit.NewLedger(d3.store.Load(), audit.LedgerOptions{})
	setPolicy(e)
	killBeforeCopy(d3, func() {
		if !d3.reloadPolicy() {
			t.Fatal("the reload to E failed")
		}
	})
	d4 := start(c, "443")
	if prev, pending := names(d4); prev != "c" || !slices.Equal(pending, []string{"e"}) {
		t.Errorf("after a kill between the reload's Replace and its copy, the marks are read as %q and %q, want c's and e's", prev, pending)
	}
}
