package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"egressd/internal/testnet"
)

func TestFirewallPrint(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte("version: 1\nmode: enforce\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		args   []string
		code   int
		want   []string // in stdout
		absent []string
		stderr string
	}{
		{"seed audit by default", []string{"firewall", "print"}, exitOK,
			[]string{"mode audit", "table inet egressd {"}, []string{"redirect to", " drop", "reject"}, ""},
		{"audit with the WAN guard", []string{"firewall", "print", "--mode", "audit", "--wan", "wan0", "--guard-wan"}, exitOK,
			[]string{`iifname "wan0" counter drop`, "new connections from the WAN side are dropped"}, []string{"nothing is redirected or blocked"}, ""},
		{"seed enforce", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--wan", "wan0", "--masquerade"}, exitOK,
			[]string{`iifname "lan0" meta l4proto tcp redirect to :15001`, `udp dport 53 redirect to :53`, `@dns4_ntp ip daddr != @guarded4 udp dport 123 ct mark set ct mark & 0xff`,
				`iifname "wan0" counter drop`, `oifname "wan0" masquerade`}, nil, ""},
		{"policy file, flags after", []string{"firewall", "print", "--policy", pol, "--lan", "br0", "--proxy-port", "3129", "--dns-port", "5353", "--tcp-ports", "80,443,8000-8100"}, exitOK,
			[]string{`tcp dport 8000-8100 redirect to :3129`, `udp dport 53 redirect to :5353`, "policy " + pol}, []string{"meta l4proto tcp redirect"}, ""},
		{"wan open", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--wan", "wan0", "--wan-open", "22/tcp,51820-51821/udp"}, exitOK,
			[]string{`iifname "wan0" tcp dport 22 accept`, `iifname "wan0" udp dport 51820-51821 accept`}, nil, ""},
		{"two lans", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0.10,lan0.20", "--wan", "wan0"}, exitOK,
			[]string{"\tset lans {\n\t\ttype ifname\n", `elements = { "lan0.10", "lan0.20" }`, `iifname @lans udp dport 53 redirect to :53`,
				`iifname @lans meta l4proto tcp redirect to :15001`, `iifname @lans ip daddr @dns4_ntp ip daddr != @guarded4 udp dport 123 ct mark set`,
				`iifname @lans counter drop comment "enforce: nothing else from the LAN"`, `iifname "wan0" counter drop`},
			[]string{`iifname "lan0`}, ""},
		// egressd run --fast-path's ruleset (before, print had no way
		// to show it).
		{"fast path", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--wan", "wan0", "--fast-path", "--fast-path-ports", "443,8443"}, exitOK,
			[]string{"\tchain fastpath {\n", `tcp dport 443 tcp flags syn / syn,ack xt target NFQUEUE queue 3300`, `tcp dport 8443 tcp flags syn / syn,ack xt target NFQUEUE queue 3300`,
				`comment "fast path: payload of a pending connection, to be decided"`}, nil, ""},
		{"no fast path by default", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0"}, exitOK,
			nil, []string{"fastpath", "NFQUEUE"}, ""},
		{"fast path ports without the fast path", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--fast-path-ports", "8443"}, exitUsage,
			nil, nil, "egressd firewall print: --fast-path-ports needs --fast-path"},
		{"fast path in audit mode", []string{"firewall", "print", "--mode", "audit", "--fast-path"}, exitOK,
			nil, []string{"fastpath", "NFQUEUE"}, "audit mode has no fast path"},
		{"bad fast path ports", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--fast-path", "--fast-path-ports", "all"}, exitUsage, nil, nil,
			`--fast-path-ports: egressd: "all": name the TLS ports`},
		{"fast path, too few tags", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--fast-path", "--ct-mark-bits", "0x00003000"}, exitUsage, nil, nil,
			"the fast path needs at least 3 tag bits"},
		{"lan twice", []string{"firewall", "print", "--lan", "lan0,lan1,lan0"}, exitUsage, nil, nil, `--lan: "lan0,lan1,lan0": lan0 is named twice`},
		{"empty lan", []string{"firewall", "print", "--lan", "lan0,,lan1"}, exitUsage, nil, nil, `--lan: "lan0,,lan1": an empty interface name`},
		{"trailing comma", []string{"firewall", "print", "--lan", "lan0,"}, exitUsage, nil, nil, `--lan: "lan0,": an empty interface name`},
		{"wan among lans", []string{"firewall", "print", "--mode", "enforce", "--lan", "lan0,wan0", "--wan", "wan0"}, exitUsage, nil, nil,
			`--lan: wan0 is the WAN interface (--wan)`},
		{"bad wan open", []string{"firewall", "print", "--wan-open", "22"}, exitUsage, nil, nil, "expected N/tcp"},
		// The line names the flag that is missing (before: "egressd:
		// firewall: enforce mode needs the LAN interface", no flag named).
		{"enforce needs lan", []string{"firewall", "print", "--mode", "enforce"}, exitUsage, nil, nil, "egressd firewall print: --mode enforce needs --lan IFACE"},
		{"bad mode", []string{"firewall", "print", "--mode", "loud"}, exitUsage, nil, nil, "expected audit or enforce"},
		{"bad ports", []string{"firewall", "print", "--tcp-ports", "80,x"}, exitUsage, nil, nil, `"x" is not a port`},
		{"bad port number", []string{"firewall", "print", "--proxy-port", "70000"}, exitUsage, nil, nil, "is not a port"},
		{"no subcommand", []string{"firewall"}, exitUsage, nil, nil, "usage"},
		{"unknown subcommand", []string{"firewall", "install"}, exitUsage, nil, nil, "unknown subcommand"},
		{"missing policy", []string{"firewall", "print", "--policy", filepath.Join(dir, "none.yaml")}, exitFail, nil, nil, "no such file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, out, errs := runCLI(t, c.args...)
			if code != c.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, c.code, out, errs)
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("stdout lacks %q:\n%s", w, out)
				}
			}
			for _, a := range c.absent {
				if strings.Contains(out, a) {
					t.Errorf("stdout has %q:\n%s", a, out)
				}
			}
			if c.stderr != "" && !strings.Contains(errs, c.stderr) {
				t.Errorf("stderr lacks %q:\n%s", c.stderr, errs)
			}
		})
	}
}

// TestFirewallRemove: `egressd firewall remove` deletes egressd's table in
// a namespace and leaves the operator's own alone.
func TestFirewallRemove(t *testing.T) {
	ns := testnet.New(t, "fwrm")
	if _, err := ns.Run("nft", "--version"); err != nil {
		t.Fatalf("nft (Debian package nftables) is not installed: %v", err)
	}
	ns.MustRun("nft", "add", "table", "inet", "egressd")
	ns.MustRun("nft", "add", "chain", "inet", "egressd", "forward", "{ type filter hook forward priority 0; policy accept; }")
	ns.MustRun("nft", "add", "table", "ip", "operator")
	path := "/var/run/netns/" + ns.Name
	for i := 0; i < 2; i++ { // the second time there is nothing to remove
		code, out, errs := runCLI(t, "firewall", "remove", "--netns", path)
		if code != exitOK || !strings.Contains(out, "removed table inet egressd") {
			t.Fatalf("exit %d: %s%s", code, out, errs)
		}
	}
	out := ns.MustRun("nft", "list", "ruleset")
	if strings.Contains(out, "egressd") || !strings.Contains(out, "table ip operator") {
		t.Errorf("after remove:\n%s", out)
	}
}
