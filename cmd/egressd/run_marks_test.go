package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"egressd/policy"
)

// TestAuditStartKeepsMarksPolicy: the conntrack marks of the flows an
// enforce run let out outlive it (removing the table, or installing a
// ruleset that marks nothing, leaves them in the conntrack entries), so
// the policy the next enforce start reads them as must stay that enforce
// run's, with its --tcp-ports, through starts and reloads that install no
// enforce ruleset: an audit-mode start (it removed the table), a
// --no-firewall start, an audit-mode start with --masquerade (an audit
// ruleset). The report's copy (policy.yaml) is the running policy's.
// Before, each wrote its own policy as the copy, so the next enforce start
// read the enforce run's tags as the audit policy's rules (a rule of it
// that drew a tag keeps or cuts another rule's flows:
// TestRestartStaleTags in firewall/), with this run's --tcp-ports.
func TestAuditStartKeepsMarksPolicy(t *testing.T) {
	const (
		e = "version: 1\nmode: enforce\nrules:\n  - {name: e, to: [192.0.2.1/32], ports: [9000/udp, 22/tcp]}\n"
		a = "version: 1\nmode: audit\nrules:\n  - {name: a, to: [192.0.2.2/32], ports: [9000/udp, 22/tcp]}\n"
	)
	for _, tc := range []struct {
		name      string
		flags     []string
		installed bool // what savePolicy is told, as run and startFirewall tell it
	}{
		{"audit start", nil, false},
		{"no-firewall start", []string{"--no-firewall"}, false},
		{"audit start with an audit ruleset", []string{"--masquerade"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			state := filepath.Join(dir, "state")
			start := func(src, tcpPorts string, extra ...string) *daemon {
				t.Helper()
				return startRecorded(t, state, src, append([]string{"--tcp-ports", tcpPorts}, extra...)...)
			}
			// The enforce run: its ruleset went in.
			start(e, "443").savePolicy(true)
			// The run that installs no enforce ruleset, twice (a restart of
			// it, or a reload: the second must not take the first's copy
			// for the marks' policy either).
			for range 2 {
				start(a, "all", tc.flags...).savePolicy(tc.installed)
			}
			if got, err := os.ReadFile(filepath.Join(state, runningPolicyFile)); err != nil || string(got) != a {
				t.Errorf("the report's copy (%v):\n%s\nwant the running policy's:\n%s", err, got, a)
			}
			d := start(e, "all")
			if d.prevPolicy == nil || d.prevPolicy.Rules()[0].Name != "e" {
				var got any
				if d.prevPolicy != nil {
					got = d.prevPolicy.Rules()[0].Name
				}
				t.Fatalf("the next enforce start reads the marks as the rules of %v, want the enforce run's (e)", got)
			}
			want := []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
			if d.prevTCPPorts == nil || !slices.Equal(*d.prevTCPPorts, want) {
				t.Errorf("the --tcp-ports of the marks' policy: %v, want %v", d.prevTCPPorts, want)
			}
		})
	}
}
