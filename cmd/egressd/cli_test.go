package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// flagCommands are the commands with flags, as `egressd CMD -h` takes them.
var flagCommands = [][]string{
	{"run"}, {"policy", "check"}, {"policy", "explain"}, {"audit"}, {"report"},
	{"firewall", "print"}, {"firewall", "remove"}, {"ca", "export"}, {"proxy-users", "hash"},
}

// helpFlags runs `egressd CMD -h` and returns the flags it lists.
func helpFlags(t *testing.T, cmd []string) []string {
	t.Helper()
	code, out, stderr := runCLI(t, append(slices.Clone(cmd), "-h")...)
	if code != exitOK {
		t.Fatalf("egressd %s -h: exit %d: %s", strings.Join(cmd, " "), code, stderr)
	}
	var flags []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(out+stderr, -1) {
		flags = append(flags, m[1])
	}
	if len(flags) == 0 {
		t.Fatalf("egressd %s -h lists no flags:\n%s%s", strings.Join(cmd, " "), out, stderr)
	}
	sort.Strings(flags)
	return flags
}

// readmeUsage returns, per command ("run", "policy check", ...), the
// flags README.md's usage block gives it (a line starting with "egressd"
// and the indented lines that continue it).
func readmeUsage(t *testing.T) map[string][]string {
	t.Helper()
	block := readmeUsageBlock(t)
	usage := map[string][]string{}
	cmd := ""
	flagRE := regexp.MustCompile(`(?:^|[\s\[|])--?([a-z][a-z0-9-]*)`)
	for _, line := range strings.Split(block, "\n") {
		if rest, ok := strings.CutPrefix(line, "egressd "); ok {
			var words []string
			for _, w := range strings.Fields(rest) {
				if !regexp.MustCompile(`^[a-z][a-z-]*$`).MatchString(w) { // proxy-users
					break
				}
				words = append(words, w)
			}
			cmd = strings.Join(words, " ")
		} else if !strings.HasPrefix(line, " ") {
			cmd = ""
		}
		if cmd == "" {
			continue
		}
		code, _, _ := strings.Cut(line, "#") // comments are prose
		for _, m := range flagRE.FindAllStringSubmatch(code, -1) {
			if !slices.Contains(usage[cmd], m[1]) {
				usage[cmd] = append(usage[cmd], m[1])
			}
		}
		if _, ok := usage[cmd]; !ok {
			usage[cmd] = nil
		}
	}
	return usage
}

// safeRun returns args with, for `egressd run`, flags that keep it on
// loopback, off nftables and in a temporary state directory, and runs it
// for at most 10 s: a test that expects run to refuse its arguments must
// not start a gateway in the host's namespace if it does not.
func safeRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	if len(args) > 0 && args[0] == "run" {
		args = append(slices.Clone(args), "--no-firewall", "--lan", "lo", "--wan", "lo", "--dns-listen", "127.0.0.1:0",
			"--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off", "--admin", "127.0.0.1:0",
			"--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(t.TempDir(), "state"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out, errb lockedBuffer
	code := run(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

// TestUsageMatchesREADME: every flag `egressd CMD -h` prints is in
// README.md's usage block, and every flag the block names exists.
// Before, policy check's -q, audit's --mode and --no-progress, report's
// --policy, most of firewall print's flags, firewall remove's --netns and
// ca export's --state-dir were missing from the README.
func TestUsageMatchesREADME(t *testing.T) {
	usage := readmeUsage(t)
	for _, cmd := range flagCommands {
		name := strings.Join(cmd, " ")
		have := helpFlags(t, cmd)
		doc, ok := usage[name]
		if !ok {
			t.Errorf("README.md's usage block has no line for egressd %s", name)
			continue
		}
		for _, f := range have {
			if !slices.Contains(doc, f) {
				t.Errorf("egressd %s -h lists --%s; README.md's usage block does not", name, f)
			}
		}
		for _, f := range doc {
			if !slices.Contains(have, f) {
				t.Errorf("README.md's usage block gives egressd %s --%s; the command has no such flag", name, f)
			}
		}
	}
}

// TestUsageLines: `egressd -h` gives each command a usage line; every flag
// it names exists, and it names every flag unless it ends the list with
// "...". Before, it left out policy explain's --mac and audit's
// --no-progress.
func TestUsageLines(t *testing.T) {
	flagRE := regexp.MustCompile(`(?:^|[\s\[|])--?([a-z][a-z0-9-]*)`)
	have := map[string][]string{}
	for _, cmd := range flagCommands {
		have[cmd[0]] = append(have[cmd[0]], helpFlags(t, cmd)...)
	}
	for top, flags := range have {
		u := commands[top].usage
		var named []string
		for _, m := range flagRE.FindAllStringSubmatch(u, -1) {
			named = append(named, m[1])
			if !slices.Contains(flags, m[1]) {
				t.Errorf("egressd -h: %q names --%s, which egressd %s has not", u, m[1], top)
			}
		}
		if strings.Contains(u, "...") {
			continue
		}
		for _, f := range flags {
			if !slices.Contains(named, f) {
				t.Errorf("egressd -h: %q does not name --%s", u, f)
			}
		}
	}
}

// TestFlagErrors: a flag error is one line naming the command, exit 2,
// never the flag package's bare message followed by every flag; -h
// exits 0 for every command, profiles included.
func TestFlagErrors(t *testing.T) {
	for _, cmd := range flagCommands {
		name := strings.Join(cmd, " ")
		code, out, stderr := safeRun(t, append(slices.Clone(cmd), "--no-such-flag")...)
		want := "egressd " + name + ": flag provided but not defined: -no-such-flag"
		if code != exitUsage || !strings.HasPrefix(stderr, want) || strings.Count(stderr, "\n") != 1 || out != "" {
			t.Errorf("egressd %s --no-such-flag: exit %d, stderr %q; want exit %d and one line starting %q", name, code, stderr, exitUsage, want)
		}
	}
	code, _, stderr := runCLI(t, "policy", "explain", "profile:nirovision", "--to", "a.test", "--json=maybe")
	if code != exitUsage || !strings.HasPrefix(stderr, "egressd policy explain: invalid boolean value") {
		t.Errorf("--json=maybe: exit %d, %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "report", "--since", "yesterday")
	if want := "egressd report: --since: \"yesterday\": expected a duration such as 24h or 7d, or an RFC 3339 time\n"; code != exitUsage || stderr != want {
		t.Errorf("--since yesterday: exit %d, %q; want %d, %q", code, stderr, exitUsage, want)
	}
	// A policy that cannot be read: one prefixed line, exit 1, whichever
	// command reads it.
	missing := filepath.Join(t.TempDir(), "none.yaml")
	for _, args := range [][]string{
		{"policy", "check", missing}, {"policy", "explain", missing, "--to", "a.test"}, {"firewall", "print", "--policy", missing},
		{"audit", "--policy", missing, "x.pcap"}, {"run", "--policy", missing},
	} {
		code, _, stderr := safeRun(t, args...)
		if want := "egressd: policy: open " + missing + ": no such file or directory\n"; code != exitFail || stderr != want {
			t.Errorf("egressd %s: exit %d, %q; want %d, %q", strings.Join(args, " "), code, stderr, exitFail, want)
		}
	}
	// --policy FILE | --profile NAME: both is a usage error, not the
	// profile silently ignored.
	pol := filepath.Join(t.TempDir(), "p.yaml")
	os.WriteFile(pol, []byte("rules: []\n"), 0o644)
	for _, cmd := range [][]string{{"run"}, {"firewall", "print"}} {
		args := append(slices.Clone(cmd), "--policy", pol, "--profile", "nirovision")
		code, out, stderr := safeRun(t, args...)
		if want := "egressd " + strings.Join(cmd, " ") + ": --policy and --profile exclude each other\n"; code != exitUsage || stderr != want || out != "" {
			t.Errorf("egressd %s: exit %d, %q %q; want %d, %q", strings.Join(args, " "), code, out, stderr, exitUsage, want)
		}
	}
	// policy explain says what is missing before the usage line.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"policy", "explain", "profile:nirovision"}, "egressd policy explain: --to DEST is required\n"},
		{[]string{"policy", "explain", "profile:nirovision", "--to", ""}, "egressd policy explain: --to DEST is required\n"},
		{[]string{"policy", "explain", "--to", "a.test"}, "egressd policy explain: no policy FILE given\n"},
		{[]string{"policy", "explain", "profile:nirovision", "a.test"}, "egressd policy explain: one policy FILE, not 2 arguments"},
	} {
		code, _, stderr := runCLI(t, c.args...)
		if code != exitUsage || !strings.HasPrefix(stderr, c.want) || !strings.Contains(stderr, "usage: egressd policy explain FILE --to DEST") {
			t.Errorf("egressd %s: exit %d, %q; want %d, %q and the usage", strings.Join(c.args, " "), code, stderr, exitUsage, c.want)
		}
	}
	for _, args := range [][]string{{"profiles", "-h"}, {"profiles", "show", "-h"}, {"profiles", "--help"}} {
		if code, out, stderr := runCLI(t, args...); code != exitOK || !strings.Contains(out, "usage: egressd profiles") {
			t.Errorf("egressd %s: exit %d, %q %q; want the usage and exit 0", strings.Join(args, " "), code, out, stderr)
		}
	}
}

// TestBadPolicyEveryCommand: a policy with a YAML syntax error or an
// unknown key is refused by every command that reads one, with exit 1 and
// the problem at file:line:column, never a
// panic.
func TestBadPolicyEveryCommand(t *testing.T) {
	dir := t.TempDir()
	broken := filepath.Join(dir, "broken.yaml")
	os.WriteFile(broken, []byte("version: 1\nrules:\n  - name: a\n    to: [x.test\n"), 0o644)
	unknown := filepath.Join(dir, "unknown.yaml")
	os.WriteFile(unknown, []byte("version: 1\nrules:\n  - name: a\n    to: [x.test]\n    ports: [443/tcp]\n    bogus: 1\n"), 0o644)
	for file, want := range map[string]string{
		broken:  broken + ":4:9: YAML syntax: did not find expected ',' or ']'",
		unknown: unknown + `:6:5: rule: unknown key "bogus" (expected one of name, why, from, to, ports, expires)`,
	} {
		for _, args := range [][]string{
			{"policy", "check", file}, {"policy", "explain", file, "--to", "x.test"}, {"audit", "--policy", file, "x.pcap"},
			{"firewall", "print", "--policy", file}, {"report", "--policy", file, "--state-dir", dir}, {"run", "--policy", file},
		} {
			code, _, stderr := safeRun(t, args...)
			if code != exitFail || !strings.Contains(stderr, want) || strings.Contains(stderr, "panic") || strings.Contains(stderr, "goroutine") {
				t.Errorf("egressd %s: exit %d, stderr %q; want %d and %q", strings.Join(args, " "), code, stderr, exitFail, want)
			}
		}
	}
}

// TestUsageBareCommand: README.md's usage block says that egressd with no
// arguments is egressd run with no flags (cli.go's run; TestRunNoFlags
// runs it), as a line of its own after run's.
func TestUsageBareCommand(t *testing.T) {
	block := readmeUsageBlock(t)
	for _, line := range strings.Split(block, "\n") {
		if rest, ok := strings.CutPrefix(line, "egressd "); ok && strings.HasPrefix(strings.TrimSpace(rest), "# no arguments: egressd run") {
			return
		}
	}
	t.Errorf("README.md's usage block has no line saying egressd with no arguments is egressd run:\n%s", block)
}

// readmeUsageBlock is README.md's usage block, the code block that starts
// with egressd run.
func readmeUsageBlock(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "```sh\negressd run ")
	if i < 0 {
		t.Fatal("README.md has no usage block starting with egressd run")
	}
	block, _, _ := strings.Cut(s[i+len("```sh\n"):], "```")
	return block
}
