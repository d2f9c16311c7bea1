package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestRunReloadToEnforce follows the README's rollout: egressd runs in
// audit mode (nothing installed), the operator sets mode: enforce in the
// policy and reloads (SIGHUP). The reload must install the enforce
// ruleset; it used to only log that a restart was needed, leaving the
// gateway open while the policy said enforce. The daemon runs in a
// namespace of its own (runInNS).
func TestRunReloadToEnforce(t *testing.T) {
	const rules = "rules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n"
	ns, p, pol := runInNS(t, "version: 1\nmode: audit\n"+rules)
	if out, err := ns.Run("nft", "list", "table", "inet", "egressd"); err == nil {
		t.Fatalf("audit mode installed a table:\n%s", out)
	}

	if err := os.WriteFile(pol, []byte("version: 1\nmode: enforce\n"+rules), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var out string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if out, _ = ns.Run("nft", "list", "table", "inet", "egressd"); strings.Contains(out, "redirect to :15001") {
			break
		}
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(20 * time.Second):
		p.Stop()
		t.Fatal("egressd run did not stop within 20s of SIGTERM")
	}
	if !strings.Contains(out, "redirect to :15001") || !strings.Contains(out, `iifname "lan0" counter packets 0 bytes 0 drop`) {
		t.Errorf("10s after the reload to enforce, the table is not the enforce ruleset:\n%s\nstdout:\n%s\nstderr:\n%s", out, p.Stdout, p.Stderr)
	}
}

// TestRunRejectsBadTCPPorts: a malformed --tcp-ports stops `egressd run`
// at start with an error naming the flag, in audit mode too. It used to be
// read only when the firewall was installed, so an audit run took it
// without a word and the switch to enforce then failed to install the
// firewall.
func TestRunRejectsBadTCPPorts(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out, errb lockedBuffer
	code := cmdRun(ctx, []string{"--profile", "nirovision", "--mode", "audit", "--lan", "lo", "--wan", "lo", "--no-firewall",
		"--tcp-ports", "80,https", "--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, &out, &errb)
	if ctx.Err() != nil || code != exitUsage || !strings.Contains(errb.String(), `--tcp-ports: "https" is not a port`) {
		t.Errorf("exit %d (context: %v), want %d at once naming --tcp-ports\nstdout:\n%s\nstderr:\n%s", code, ctx.Err(), exitUsage, out.String(), errb.String())
	}
}

// runInNS starts `egressd run` with the policy src in a namespace of its
// own, its LAN (lan0) a veth link to a client's namespace, its WAN (wan0)
// one to a server's, with args added to the command line, and waits for
// the admin address (127.0.0.1:9901 in the namespace). It returns the
// namespace, the process and the policy file's path.
func runInNS(t *testing.T, src string, args ...string) (*testnet.NS, *testnet.Proc, string) {
	t.Helper()
	return runInNSAfter(t, src, nil, args...)
}

// runInNSAfter is runInNS calling before, when not nil, with the
// namespace once it is made, before egressd starts in it.
func runInNSAfter(t *testing.T, src string, before func(*testnet.NS), args ...string) (*testnet.NS, *testnet.Proc, string) {
	t.Helper()
	ns := testnet.New(t, "run")
	if _, err := ns.Run("nft", "--version"); err != nil {
		t.Fatalf("nft (Debian package nftables) is not installed: %v", err)
	}
	if before != nil {
		before(ns)
	}
	testnet.Link(t, testnet.New(t, "runc"), "eth0", []string{"198.18.1.2/24"}, ns, "lan0", []string{"198.18.1.1/24"})
	testnet.Link(t, ns, "wan0", []string{"198.18.2.1/24"}, testnet.New(t, "runs"), "eth0", []string{"198.18.2.2/24"})
	dir := t.TempDir()
	bin := filepath.Join(dir, "egressd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v: %s", err, out)
	}
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	p := ns.Start(append([]string{bin, "run", "--policy", pol, "--lan", "lan0", "--wan", "wan0", "--state-dir", filepath.Join(dir, "state"),
		"--admin", "127.0.0.1:9901", "--proxy-listen", "[::]:15001", "--explicit-proxy-listen", "off",
		"--dns-listen", ":5353", "--upstream-dns", "127.0.0.1:9"}, args...)...)
	if err := ns.WaitTCP("127.0.0.1:9901", 20*time.Second); err != nil {
		p.Stop()
		t.Fatalf("the admin address did not come up: %v\nstdout:\n%s\nstderr:\n%s", err, p.Stdout, p.Stderr)
	}
	return ns, p, pol
}

// TestRunWANOpen: --wan-open keeps ports of the gateway reachable from the
// WAN side under the enforce mode's inbound guard, as `egressd firewall
// print --wan-open` shows; run had no such flag, so a gateway managed over
// its WAN link lost its SSH when it enforced.
func TestRunWANOpen(t *testing.T) {
	ns, p, _ := runInNS(t, "version: 1\nmode: enforce\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n",
		"--wan-open", "22/tcp,51820/udp")
	out, _ := ns.Run("nft", "list", "chain", "inet", "egressd", "input")
	p.Stop()
	for _, want := range []string{`iifname "wan0" tcp dport 22 accept`, `iifname "wan0" udp dport 51820 accept`} {
		if !strings.Contains(out, want) {
			t.Errorf("the input chain lacks %q:\n%s\nstderr:\n%s", want, out, p.Stderr)
		}
	}
}

// TestRunFlagValues: a malformed flag value stops `egressd run` at start,
// as a usage error (exit 2) naming the flag, before anything listens.
// Before, a mistyped --dns-deny, --upstream-dns or listen address left
// that part not running and the rest up (in enforce mode the LAN's DNS,
// redirected to a forwarder that was not there, was gone), and --mode
// and --log-level exited 1 where every other command exits 2. The
// documented --dns-deny NULL was itself refused: dnsfilter spells it null.
// Subtest --inspect: --inspect with --state-dir "" (no place for the
// inspection CA); before, it started and ran without the proxy, whose
// New refused the configuration (and the fast path fell back).
func TestRunFlagValues(t *testing.T) {
	base := []string{"--profile", "nirovision", "--mode", "audit", "--lan", "lo", "--wan", "lo", "--no-firewall",
		"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9"}
	for _, c := range []struct{ flag, value, want string }{
		{"--dns-deny", "WHAT", `--dns-deny: dnsfilter: deny answer "WHAT"`},
		{"--upstream-dns", "bogus", `--upstream-dns: dnsfilter: upstream "bogus"`},
		{"--dns-listen", "bogus", `--dns-listen: dnsfilter: listen address "bogus"`},
		{"--proxy-listen", "bogus", `--proxy-listen: "bogus": expected HOST:PORT`},
		{"--explicit-proxy-listen", "127.0.0.1:99999", `--explicit-proxy-listen: "127.0.0.1:99999": expected HOST:PORT`},
		{"--admin", "localhost", `--admin: "localhost": expected HOST:PORT`},
		{"--admin-hosts", "gw.example.lan:9901", `--admin-hosts: admin: host "gw.example.lan:9901": expected a name`},
		{"--mode", "loud", `--mode "loud": expected audit or enforce`},
		{"--log-level", "loud", `--log-level "loud": expected debug`},
		{"--log-format", "xml", `--log-format "xml": expected json or text`},
	} {
		t.Run(c.flag, func(t *testing.T) {
			refusedAtStart(t, append(append([]string{}, base...), c.flag, c.value, "--state-dir", filepath.Join(t.TempDir(), "state")), c.want)
		})
	}
	t.Run("--inspect", func(t *testing.T) {
		refusedAtStart(t, append(append([]string{}, base...), "--inspect", "--state-dir", ""),
			`--inspect: egressd: inspection needs a state directory for its CA, not --state-dir ""`)
	})
	// Every documented --dns-deny value, in any case, starts DNS.
	for _, v := range []string{"REFUSED", "nxdomain", "NULL", "null"} {
		t.Run("dns-deny-"+v, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			var out, errb lockedBuffer
			done := make(chan int, 1)
			go func() {
				done <- cmdRun(ctx, append(append([]string{}, base...), "--dns-deny", v, "--state-dir", filepath.Join(t.TempDir(), "state")), &out, &errb)
			}()
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "admin: http://"); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					break
				}
			}
			cancel()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("egressd run did not stop within 20s")
			}
			if !strings.Contains(out.String(), "dns: listening on 127.0.0.1:") || strings.Contains(out.String(), "NOT RUNNING: dns") {
				t.Errorf("--dns-deny %s: DNS not running\nstdout:\n%s\nstderr:\n%s", v, out.String(), errb.String())
			}
		})
	}
}

// refusedAtStart fails t unless `egressd run` with args exits at once
// with a usage error (exit 2) saying want, before anything listens.
func refusedAtStart(t *testing.T, args []string, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out, errb lockedBuffer
	code := cmdRun(ctx, args, &out, &errb)
	if ctx.Err() != nil || code != exitUsage || !strings.Contains(errb.String(), "egressd: "+want) || strings.Contains(out.String(), "listening") {
		t.Errorf("%q: exit %d (context: %v), want %d at once with %q\nstdout:\n%s\nstderr:\n%s", args, code, ctx.Err(), exitUsage, want, out.String(), errb.String())
	}
}

// TestRunInstallLineShowsTheRuleset: the start-up line of an installed
// firewall names a command that shows the ruleset installed. It named
// `egressd firewall print`, which an operator types as given: without
// run's policy and flags it prints the embedded profile's audit ruleset
// (an empty table), not the enforce ruleset in the kernel.
func TestRunInstallLineShowsTheRuleset(t *testing.T) {
	ns, p, _ := runInNS(t, "version: 1\nmode: enforce\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n")
	bin := p.Cmd.Args[4] // ip netns exec NAME BIN run ...
	var line string
	for deadline := time.Now().Add(10 * time.Second); line == "" && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		for _, l := range strings.Split(p.StdoutSoFar(), "\n") {
			if strings.HasPrefix(l, "firewall: installed") {
				line = l
			}
		}
	}
	_, cmdText, ok := strings.Cut(line, "`")
	cmdText, _, ok2 := strings.Cut(cmdText, "`")
	if !ok || !ok2 {
		p.Stop()
		t.Fatalf("no command in backticks on the line %q\nstdout:\n%s", line, p.Stdout)
	}
	args := strings.Fields(cmdText)
	if args[0] == "egressd" {
		args[0] = bin
	}
	out, err := ns.Run(args...)
	p.Stop()
	if err != nil || !strings.Contains(out, "redirect to :15001") || !strings.Contains(out, `iifname "lan0" counter packets 0 bytes 0 drop`) {
		t.Errorf("%q (from the line %q) does not show the enforce ruleset installed: %v\n%s", cmdText, line, err, out)
	}
}
