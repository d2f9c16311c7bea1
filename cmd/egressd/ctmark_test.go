package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/firewall"
)

// TestCTMarkBitsDefault: the flag's default is the firewall's layout.
func TestCTMarkBitsDefault(t *testing.T) {
	if v, err := parseCTMarkBits(defaultCTMarkBits); err != nil || v != firewall.DefaultCTMarkBits {
		t.Errorf("--ct-mark-bits %s: 0x%08x, %v; want 0x%08x", defaultCTMarkBits, v, err, firewall.DefaultCTMarkBits)
	}
	for _, s := range []string{"7f000000", "0X7F000000", " 0x7f000000 "} {
		if v, err := parseCTMarkBits(s); err != nil || v != 0x7f000000 {
			t.Errorf("--ct-mark-bits %q: 0x%08x, %v", s, v, err)
		}
	}
}

// twoUDPRules writes a policy of two rules that forward (UDP).
func twoUDPRules(t *testing.T) string {
	t.Helper()
	pol := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(pol, []byte("version: 1\nmode: enforce\nrules:\n  - {name: ntp, to: [pool.ntp.test], ports: [123/udp]}\n  - {name: media, to: [198.51.100.0/24], ports: [5000/udp]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return pol
}

// TestFirewallPrintCTMarkBits: `firewall print --ct-mark-bits` places
// the marks; the default given explicitly prints the same bytes as none;
// a run of bits that is not one is a usage error naming the flag; one too
// short for the policy's rules prints the ruleset with a warning.
func TestFirewallPrintCTMarkBits(t *testing.T) {
	pol := twoUDPRules(t)
	args := []string{"firewall", "print", "--policy", pol, "--lan", "lan0", "--wan", "wan0"}
	code, def, errs := runCLI(t, args...)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errs)
	}
	code, explicit, errs := runCLI(t, append(args, "--ct-mark-bits", "0x007ff000")...)
	if code != exitOK || explicit != def {
		t.Errorf("--ct-mark-bits 0x007ff000: exit %d, %s; output differs from the default's:\n%s\n---\n%s", code, errs, explicit, def)
	}
	code, moved, errs := runCLI(t, append(args, "--ct-mark-bits", "0x7f000000")...)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if !strings.Contains(moved, "ct mark & 0x40000000 == 0x40000000 accept") || strings.Contains(moved, "0x004") {
		t.Errorf("--ct-mark-bits 0x7f000000: the marks did not move:\n%s", moved)
	}
	for _, c := range []struct{ value, want string }{
		{"0x00500000", "egressd firewall print: --ct-mark-bits: firewall: conntrack mark bits 0x00500000: not one run of contiguous bits"},
		{"0x80000000", "egressd firewall print: --ct-mark-bits: firewall: conntrack mark bits 0x80000000: one bit"},
		{"lots", `egressd firewall print: --ct-mark-bits: "lots": expected a hexadecimal run of bits`},
	} {
		code, out, errs := runCLI(t, append(args, "--ct-mark-bits", c.value)...)
		if code != exitUsage || out != "" || !strings.HasPrefix(errs, c.want) {
			t.Errorf("--ct-mark-bits %s: exit %d, stdout %q, stderr %q; want %d and %q", c.value, code, out, errs, exitUsage, c.want)
		}
	}
	if code, _, errs := runCLI(t, append(args, "--ct-mark-bits", "0x7")...); code != exitOK || errs != "" {
		t.Errorf("--ct-mark-bits 0x7 (3 tags, 2 rules): exit %d: %s", code, errs)
	}
	// Fewer tags than rules: the rules share tags, with a warning.
	code, shared, errs := runCLI(t, append(args, "--ct-mark-bits", "0x3")...)
	want := "egressd firewall print: warning: --ct-mark-bits: firewall: conntrack mark bits 0x00000003 hold 1 rule tags, and the policy has 2 rules that forward traffic"
	// The words README quotes and egressd run logs (grep finds both).
	if code != exitOK || !strings.HasPrefix(errs, want) || !strings.Contains(errs, "rules will share conntrack mark tags") ||
		!strings.Contains(shared, "ct mark & 0x00000002 == 0x00000002 accept") {
		t.Errorf("--ct-mark-bits 0x3 (1 tag, 2 rules): exit %d, stderr %q, want %d and %q; ruleset:\n%s", code, errs, exitOK, want, shared)
	}
}

// TestRunCTMarkBits: `egressd run` refuses, at start and as a usage
// error, a --ct-mark-bits that is not one run of bits, before anything
// listens; one whose tags are fewer than the policy's rules that forward
// starts, with a warning (in audit mode too: a reload to enforce installs
// the firewall).
func TestRunCTMarkBits(t *testing.T) {
	pol := twoUDPRules(t)
	base := []string{"--policy", pol, "--mode", "audit", "--lan", "lo", "--wan", "lo",
		"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9"}
	for _, c := range []struct{ value, want string }{
		{"0x00f0f000", "--ct-mark-bits: firewall: conntrack mark bits 0x00f0f000: not one run of contiguous bits"},
		{"0", `--ct-mark-bits: "0": expected a hexadecimal run of bits`},
	} {
		t.Run(c.value, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var out, errb lockedBuffer
			code := cmdRun(ctx, append(append([]string{}, base...), "--ct-mark-bits", c.value, "--state-dir", filepath.Join(t.TempDir(), "state")), &out, &errb)
			if ctx.Err() != nil || code != exitUsage || !strings.Contains(errb.String(), "egressd: "+c.want) || strings.Contains(out.String(), "listening") {
				t.Errorf("--ct-mark-bits %s: exit %d (context: %v), want %d at once with %q\nstdout:\n%s\nstderr:\n%s", c.value, code, ctx.Err(), exitUsage, c.want, out.String(), errb.String())
			}
		})
	}
	t.Run("fewer-tags-than-rules", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var out, errb lockedBuffer
		code := cmdRun(ctx, append(append([]string{}, base...), "--ct-mark-bits", "0x00003000", "--state-dir", filepath.Join(t.TempDir(), "state")), &out, &errb)
		logs := out.String() + errb.String()
		if code != exitOK || !strings.Contains(logs, "rules will share conntrack mark tags") ||
			!strings.Contains(logs, "hold 1 rule tags, and the policy has 2 rules that forward traffic") {
			t.Errorf("--ct-mark-bits 0x00003000 (1 tag, 2 rules): exit %d, want %d after a warning\n%s", code, exitOK, logs)
		}
	})
}

// TestRunCTMarkBitsInstalled: `egressd run --ct-mark-bits` installs the
// enforce ruleset with its marks in those bits (nft's own listing of the
// table), and none in the default ones.
func TestRunCTMarkBitsInstalled(t *testing.T) {
	ns, p, _ := runInNS(t, "version: 1\nmode: enforce\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n",
		"--ct-mark-bits", "0x07ff0000")
	out, _ := ns.Run("nft", "list", "chain", "inet", "egressd", "forward")
	p.Stop()
	if !strings.Contains(out, "ct mark & 0x04000000 == 0x04000000 accept") || !strings.Contains(out, "ct mark set ct mark & 0xf") ||
		strings.Contains(out, "0x00400000") || strings.Contains(out, "0xff8") {
		t.Errorf("the forward chain does not mark in 0x07ff0000:\n%s\nstderr:\n%s", out, p.Stderr)
	}
}
