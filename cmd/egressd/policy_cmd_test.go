package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/internal/httpwire"
	"egressd/policy"
)

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

// TestSeedProfileExplain checks that the embedded profile answers every line
// of the vendor page (../shared/seed/firewall-exceptions.txt) as the page
// means it, through the real command line.
func TestSeedProfileExplain(t *testing.T) {
	cases := []struct {
		to, port, from string
		verdict, rule  string
	}{
		// [443 TCP] + the five domain globs.
		{"api.nirovision.com", "", "", "allow", "vendor-cloud"},
		{"a.b.nirovision.com", "443/tcp", "", "allow", "vendor-cloud"},
		{"nirovision.com", "", "", "deny", ""},
		{"cloud.balena-cloud.com", "", "", "allow", "vendor-cloud"},
		{"production.cloudflare.docker.com", "", "", "allow", "vendor-cloud"},
		{"registry-1.docker.io", "", "", "allow", "vendor-cloud"},
		{"docker.io.evil.net", "", "", "deny", ""},
		{"evildocker.io", "", "", "deny", ""},
		{"intake.agent.datadoghq.com", "", "", "allow", "vendor-cloud"},
		{"app.datadoghq.com", "", "", "deny", ""},
		{"api.nirovision.com", "80/tcp", "", "deny", ""},
		// notion.so/nirovision/*: host level without inspection, path with.
		{"https://notion.so/nirovision/setup", "", "", "allow", "vendor-docs"},
		{"http://notion.so/other/page", "80/tcp", "", "deny", ""},
		{"notion.so", "", "", "allow", "vendor-docs"},
		{"www.notion.so", "", "", "deny", ""},
		// [10516 TCP] health and logging.
		{"agent-intake.logs.datadoghq.com", "10516/tcp", "", "allow", "health-logging"},
		{"health.nirovision.com", "10516/tcp", "", "allow", "health-logging"},
		{"evil.example", "10516/tcp", "", "deny", ""},
		// [123 UDP] NTP.
		{"0.pool.ntp.org", "123/udp", "", "allow", "ntp"},
		{"time.apple.com", "123/udp", "", "allow", "ntp"},
		{"0.pool.ntp.org", "123/tcp", "", "deny", ""},
		{"203.0.113.5", "123/udp", "", "deny", ""},
		// [53 UDP] DNS.
		{"198.51.100.53", "53/udp", "", "allow", "dns"},
		{"2001:db8::53", "53/udp", "", "allow", "dns"},
		{"198.51.100.53", "853/tcp", "", "deny", ""},
		// Nx Witness 7001 and 5000 toward the site's private ranges.
		{"192.168.1.20", "7001/tcp", "192.168.1.10", "allow", "nx-witness"},
		{"10.0.0.5", "5000/tcp", "", "allow", "nx-witness"},
		{"198.51.100.5", "7001/tcp", "", "deny", ""},
		{"169.254.169.254", "5000/tcp", "", "deny", ""},
		// Apple MDM: 17.0.0.0/8 on 5223, 443, 2197, and the push names.
		{"17.1.2.3", "5223/tcp", "", "allow", "apple-mdm"},
		{"17.1.2.3", "5224/tcp", "", "deny", ""},
		{"17.1.2.3", "443/tcp", "", "allow", "apple-mdm"},
		{"17.1.2.3", "2197/tcp", "", "allow", "apple-mdm"},
		{"::ffff:17.1.2.3", "5223/tcp", "", "allow", "apple-mdm"},
		{"18.1.2.3", "5223/tcp", "", "deny", ""},
		{"1-courier.push.apple.com", "5223/tcp", "", "allow", "apple-mdm"},
		// Android MDM: 443 and 5228-5230 plus the FCM names.
		{"mtalk.google.com", "5228/tcp", "", "allow", "android-mdm"},
		{"alt4-mtalk.google.com", "5230/tcp", "", "allow", "android-mdm"},
		{"mtalk.google.com", "5231/tcp", "", "deny", ""},
		{"fcm.googleapis.com", "443/tcp", "", "allow", "android-mdm"},
		{"www.google.com", "443/tcp", "", "deny", ""},
	}
	for _, c := range cases {
		args := []string{"policy", "explain", "profile:nirovision", "--to", c.to, "--json"}
		if c.port != "" {
			args = append(args, "--port", c.port)
		}
		if c.from != "" {
			args = append(args, "--from", c.from)
		}
		code, out, stderr := runCLI(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
		var ex struct{ Verdict, Rule, Reason string }
		if err := json.Unmarshal([]byte(out), &ex); err != nil {
			t.Fatalf("%v: %v: %q", args, err, out)
		}
		if ex.Verdict != c.verdict || (c.verdict == "allow" && ex.Rule != c.rule) {
			t.Errorf("%s %s: %s by %q (%s), want %s by %q", c.to, c.port, ex.Verdict, ex.Rule, ex.Reason, c.verdict, c.rule)
		}
	}
}

// TestExplainPathOverHTTPS: a path a host/path rule refuses is refused
// where the path is seen; over HTTPS without inspection the proxy allows
// the host, and explain says so beside the verdict.
func TestExplainPathOverHTTPS(t *testing.T) {
	const note = "on HTTPS without --inspect the path is not seen: the proxy allows notion.so as a whole (rule vendor-docs)"
	for _, c := range []struct {
		to       string
		wantNote bool
	}{
		{"https://notion.so/other", true},
		{"notion.so/other", true},
		{"http://notion.so/other", false},
		{"https://notion.so/nirovision/x", false}, // allowed: nothing to add
	} {
		code, out, stderr := runCLI(t, "policy", "explain", "profile:nirovision", "--to", c.to)
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", c.to, code, stderr)
		}
		if got := strings.Contains(out, note); got != c.wantNote {
			t.Errorf("%s: note present %v, want %v:\n%s", c.to, got, c.wantNote, out)
		}
		code, out, _ = runCLI(t, "policy", "explain", "profile:nirovision", "--to", c.to, "--json")
		var ex struct{ Warnings []string }
		if err := json.Unmarshal([]byte(out), &ex); code != 0 || err != nil {
			t.Fatalf("%s --json: exit %d, %v", c.to, code, err)
		}
		if got := len(ex.Warnings) > 0 && strings.Contains(strings.Join(ex.Warnings, "\n"), note); got != c.wantNote {
			t.Errorf("%s --json: warnings %q, want the note: %v", c.to, ex.Warnings, c.wantNote)
		}
	}
}

// TestExplainPrivateRelay: iCloud Private Relay's ingress at an address
// apple-mdm's 17.0.0.0/8 holds is denied (private-relay), does not
// resolve, and explain says why and how a rule would allow it; the address
// alone is still apple-mdm's.
func TestExplainPrivateRelay(t *testing.T) {
	for _, to := range []string{"mask-h2.icloud.com", "https://mask.icloud.com/"} {
		code, out, stderr := runCLI(t, "policy", "explain", "profile:nirovision", "--to", to, "--json")
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", to, code, stderr)
		}
		var ex struct {
			Verdict, Reason, DNS string
			Warnings             []string
		}
		if err := json.Unmarshal([]byte(out), &ex); err != nil {
			t.Fatalf("%s: %v: %q", to, err, out)
		}
		if ex.Verdict != "deny" || ex.Reason != "private-relay" || ex.DNS != "deny" {
			t.Errorf("%s: %+v, want deny private-relay, not resolved", to, ex)
		}
		if w := strings.Join(ex.Warnings, "\n"); !strings.Contains(w, "Private Relay") || !strings.Contains(w, "NXDOMAIN") || !strings.Contains(w, "exactly") {
			t.Errorf("%s: notes %q, want why and how to allow it", to, ex.Warnings)
		}
	}
	code, out, _ := runCLI(t, "policy", "explain", "profile:nirovision", "--to", "17.253.1.2")
	if code != 0 || !strings.Contains(out, "ALLOW") || !strings.Contains(out, "apple-mdm") {
		t.Errorf("17.253.1.2 without a name: %s", out)
	}
}

func TestPolicyCheckExitCodes(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("rules:\n  - {name: a, to: [\"*\"], ports: [53/udp]}\n"), 0o644)
	os.WriteFile(bad, []byte("rules:\n  - {name: a, to: [a.test], ports: [70000/tcp]}\n  - {name: a, to: [b.test], ports: [443/sctp]}\n"), 0o644)

	code, out, stderr := runCLI(t, "policy", "check", good)
	if code != 0 || !strings.Contains(out, "valid") || !strings.Contains(stderr, "resolve every name") {
		t.Errorf("good policy: exit %d, out %q, stderr %q", code, out, stderr)
	}
	code, _, stderr = runCLI(t, "policy", "check", bad)
	if code != 1 {
		t.Errorf("bad policy: exit %d", code)
	}
	for _, want := range []string{"bad.yaml:2:", "70000", "bad.yaml:3:", "sctp", "duplicate rule name"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("bad policy errors lack %q:\n%s", want, stderr)
		}
	}
	if code, _, _ := runCLI(t, "policy", "check", filepath.Join(dir, "missing.yaml")); code != 1 {
		t.Errorf("missing file: exit %d", code)
	}
	if code, _, _ := runCLI(t, "policy", "check"); code != 2 {
		t.Errorf("no file: exit %d", code)
	}
	if code, _, _ := runCLI(t, "policy", "check", "profile:nirovision"); code != 0 {
		t.Errorf("seed profile: exit %d", code)
	}
	// Flags after positional arguments.
	if code, out, _ := runCLI(t, "policy", "explain", "--json", "profile:nirovision", "--to", "17.1.2.3", "--port", "5223/tcp"); code != 0 || !strings.Contains(out, `"verdict":"allow"`) {
		t.Errorf("explain with flags around the file: %d %q", code, out)
	}
	if code, _, _ := runCLI(t, "policy", "explain", "profile:nirovision", "--to", "[example.com]"); code != 2 {
		t.Errorf("bad --to: exit %d", code)
	}
}

func TestProfilesCommand(t *testing.T) {
	code, out, _ := runCLI(t, "profiles")
	if code != 0 || !strings.Contains(out, "nirovision (default)") {
		t.Fatalf("profiles: %d %q", code, out)
	}
	code, out, _ = runCLI(t, "profiles", "show", "nirovision")
	if code != 0 || !strings.Contains(out, "*.docker.com") {
		t.Fatalf("profiles show: %d", code)
	}
	if code, _, _ := runCLI(t, "profiles", "show", "nope"); code != 1 {
		t.Fatalf("unknown profile: exit %d", code)
	}
	if code, out, _ := runCLI(t, "version"); code != 0 || !strings.HasPrefix(out, "egressd ") {
		t.Fatalf("version: %d %q", code, out)
	}
	// A malformed command line exits 2, as for every command (README);
	// before, version ignored its arguments and exited 0.
	for _, args := range [][]string{{"version", "--bogus"}, {"version", "extra"}} {
		if code, out, stderr := runCLI(t, args...); code != exitUsage || out != "" || !strings.Contains(stderr, "usage: egressd version") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want %d and the usage line", args, code, out, stderr, exitUsage)
		}
	}
}

// TestPolicyCheckQuiet: -q prints nothing for a valid policy, warnings
// included (README: "-q: silent when valid"; the unit's ExecStartPre runs it,
// and egressd run logs the warnings itself), and still prints every problem
// of an invalid one. The usage line names -q.
func TestPolicyCheckQuiet(t *testing.T) {
	dir := t.TempDir()
	warn := filepath.Join(dir, "warn.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(warn, []byte("rules:\n  - {name: a, to: [\"*\"], ports: [53/udp]}\n"), 0o644)
	os.WriteFile(bad, []byte("rules:\n  - {name: a, to: [a.test], ports: [70000/tcp]}\n"), 0o644)

	for _, file := range []string{warn, "profile:nirovision"} {
		code, out, stderr := runCLI(t, "policy", "check", "-q", file)
		if code != 0 || out != "" || stderr != "" {
			t.Errorf("policy check -q %s: exit %d, stdout %q, stderr %q; want 0 and nothing", file, code, out, stderr)
		}
	}
	code, _, stderr := runCLI(t, "policy", "check", "-q", bad)
	if code != 1 || !strings.Contains(stderr, "bad.yaml:2:") {
		t.Errorf("policy check -q of an invalid policy: exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "policy", "check", "-q")
	if code != 2 || !strings.Contains(stderr, "policy check [-q] FILE") {
		t.Errorf("policy check -q without a file: exit %d, stderr %q", code, stderr)
	}
}

// TestExplainRuleWithoutWhy: an allowing rule's why line is printed when
// the rule has one, and left out, not printed empty, when it has none.
func TestExplainRuleWithoutWhy(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	os.WriteFile(pol, []byte("rules:\n  - {name: bare, to: [a.test], ports: [443/tcp]}\n  - {name: told, to: [b.test], ports: [443/tcp], why: vendor portal}\n"), 0o644)
	for to, want := range map[string]string{"a.test": "", "b.test": "  why:    vendor portal\n"} {
		code, out, stderr := runCLI(t, "policy", "explain", pol, "--to", to)
		if code != exitOK {
			t.Fatalf("%s: exit %d: %s", to, code, stderr)
		}
		got := ""
		for _, l := range strings.SplitAfter(out, "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "why:") {
				got += l
			}
		}
		if got != want {
			t.Errorf("%s: why lines %q, want %q\n%s", to, got, want, out)
		}
	}
}

// TestExplainICMP: --port icmp asks about ICMP echo, which only a rule
// listing icmp allows ("any" is TCP and UDP); icmp takes no port.
func TestExplainICMP(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	os.WriteFile(pol, []byte("rules:\n  - {name: web, to: [\"0.0.0.0/0\"], ports: [any]}\n  - {name: monitoring, to: [198.51.100.0/24, status.vendor.example], ports: [icmp]}\n"), 0o644)
	for _, c := range []struct{ to, want string }{
		{"198.51.100.7", "ALLOW 198.51.100.7 on icmp\n  rule:   monitoring\n"},
		{"status.vendor.example", "ALLOW status.vendor.example on icmp\n  rule:   monitoring\n"},
		{"192.0.2.1", "DENY 192.0.2.1 on icmp\n  reason: no-rule\n"},
	} {
		code, out, stderr := runCLI(t, "policy", "explain", pol, "--to", c.to, "--port", "icmp")
		if code != exitOK || !strings.HasPrefix(out, c.want) {
			t.Errorf("%s: exit %d, %q %s, want it to start %q", c.to, code, out, stderr, c.want)
		}
	}
	code, out, _ := runCLI(t, "policy", "explain", pol, "--to", "198.51.100.7", "--port", "icmp", "--json")
	if code != exitOK || !strings.Contains(out, `"port":"icmp"`) || !strings.Contains(out, `"rule":"monitoring"`) {
		t.Errorf("--json: %d %q", code, out)
	}
	for _, bad := range []string{"7/icmp", "icmp/tcp"} {
		if code, _, stderr := runCLI(t, "policy", "explain", pol, "--to", "198.51.100.7", "--port", bad); code != exitUsage || !strings.Contains(stderr, "icmp") {
			t.Errorf("--port %s: exit %d %q, want a usage error naming icmp", bad, code, stderr)
		}
	}
}

// TestExplainPathForms: explain decides a URL's path as the proxy does
// (proxy.TestPathForms): the path's normal form against host/path rules,
// then path-form where the path is one an origin may read as another and
// only a host/path rule would allow it; a host-level rule that allows the
// host allows every spelling. A fragment is not sent (curl drops it).
func TestExplainPathForms(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(file, []byte(`version: 1
mode: enforce
rules:
  - name: files
    to: ["docs.paths.test/public/*", "docs.paths.test/caf%C3%A9/*", "docs.paths.test/%7euser/*"]
    ports: [80/tcp]
  - name: whole
    to: ["open.paths.test", "open.paths.test/public/*"]
    ports: [80/tcp]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	const allow, path, form, raw = "allowed", "path-not-allowed", "path-form", "http-malformed"
	for _, c := range []struct{ path, reason string }{
		{"/public/x", allow},
		{"/%70ublic/x", allow},
		{"/%70%75%62%6C%69%63/x", allow},
		{"/caf%c3%a9/x", allow},
		{"/caf\xc3\xa9/x", raw}, // raw UTF-8: the proxy refuses it in every mode
		{"/caf\xc3\xa9", raw},
		{"/%7Euser/x", allow},
		{"/%70UBLIC/x", path},
		{"/public%2fx", path},
		{"/private/x", path},
		{"/public/x#/../../private/x", allow}, // the fragment is not sent
		{"/public/./x", form},
		{"/public/x/.", form},
		{"/public/../private/x", form},
		{"/public/%2e%2e/private/x", form},
		{"/public/%2E%2E/private/x", form},
		{"/public/..%2fprivate/x", form},
		{"/public/%2f../private/x", form},
		{"/public/%252e%252e/private/x", form},
		{"/public/%u002e%u002e/private/x", form},
		{"/public/%c0%ae%c0%ae/private/x", form},
		{"/public/%e0%80%ae%e0%80%ae/private/x", form},
		{"/public/%f8%80%80%80%ae/private/x", form},
		{"/public/\xc0\xae\xc0\xae/private/x", raw}, // raw overlong dots
		{"/public/..;/private/x", form},
		{"/public/..\\private/x", form},
	} {
		for _, host := range []string{"docs.paths.test", "open.paths.test"} {
			to := "http://" + host + c.path
			want := c.reason
			if host == "open.paths.test" && want != raw {
				want = allow // a host-level rule allows every spelling
			}
			code, out, stderr := runCLI(t, "policy", "explain", file, "--to", to, "--json")
			var ex struct{ Verdict, Reason, Rule string }
			if err := json.Unmarshal([]byte(out), &ex); code != 0 || err != nil {
				t.Fatalf("%q: exit %d, %v: %s", to, code, err, stderr)
			}
			if ex.Reason != want || (ex.Verdict == "allow") != (want == allow) {
				t.Errorf("%q: %s %s (rule %q), want %s", to, ex.Verdict, ex.Reason, ex.Rule, want)
			}
			code, out, _ = runCLI(t, "policy", "explain", file, "--to", to)
			if code != 0 || (want == allow) != strings.HasPrefix(out, "ALLOW ") || want != allow && !strings.Contains(out, "reason: "+want) {
				t.Errorf("%q: exit %d, text:\n%s\nwant %s", to, code, out, want)
			}
		}
	}
}

// TestExplainRawBytes: explain decides a URL whose path has raw bytes 0x80
// and above as the proxy decides those bytes as sent (http-malformed, in
// every mode and whatever rule allows the host), and says how a client
// sends it escaped and what that would be decided.
func TestExplainRawBytes(t *testing.T) {
	file := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(file, []byte(`version: 1
mode: audit
rules:
  - name: files
    to: ["docs.paths.test/caf%C3%A9/*"]
    ports: [80/tcp]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ to, escaped, decided string }{
		{"http://docs.paths.test/caf\xc3\xa9/x", "/caf%c3%a9/x", "ALLOW (rule files)"},
		{"http://caf\xc3\xa9.paths.test/caf\xc3\xa9", "/caf%c3%a9", "DENY (no-rule)"},
		{"http://docs.paths.test/caf\xc3\xa9", "/caf%c3%a9", "DENY (path-not-allowed)"},
	} {
		code, out, stderr := runCLI(t, "policy", "explain", file, "--to", c.to)
		note := "the proxy refuses it as sent (http-malformed); a client such as curl sends the path escaped, " + c.escaped + ", which is decided " + c.decided
		if code != 0 || !strings.HasPrefix(out, "DENY ") || !strings.Contains(out, "reason: http-malformed\n") || !strings.Contains(out, note) {
			t.Errorf("%q: exit %d %s, text:\n%s\nwant DENY http-malformed and the note %q", c.to, code, stderr, out, note)
		}
		code, out, _ = runCLI(t, "policy", "explain", file, "--to", c.to, "--json")
		var ex struct {
			Verdict, Reason, Rule string
			Warnings              []string
		}
		if err := json.Unmarshal([]byte(out), &ex); code != 0 || err != nil || ex.Verdict != "deny" || ex.Reason != "http-malformed" || ex.Rule != "" ||
			!slices.ContainsFunc(ex.Warnings, func(w string) bool { return strings.Contains(w, note) }) {
			t.Errorf("%q --json: exit %d %v: %s", c.to, code, err, out)
		}
	}
}

// FuzzEscapeTarget: escapeTarget writes each byte a request target does
// not carry raw as its escape and nothing else: the result passes
// httpwire.TargetBytes, and reading its new escapes back gives the path.
func FuzzEscapeTarget(f *testing.F) {
	f.Add("/caf\xc3\xa9/x")
	f.Add("/a b\x7f%41")
	f.Fuzz(func(t *testing.T, path string) {
		out := escapeTarget(path)
		if !httpwire.TargetBytes(out) || httpwire.TargetBytes(path) != (out == path) {
			t.Fatalf("escapeTarget(%q) = %q", path, out)
		}
		var back []byte
		for i, j := 0, 0; i < len(path); i++ {
			if c := path[i]; c <= ' ' || c >= 0x7f {
				if out[j:j+3] != fmt.Sprintf("%%%02x", c) {
					t.Fatalf("escapeTarget(%q) = %q: byte %d", path, out, i)
				}
				back, j = append(back, c), j+3
			} else {
				back, j = append(back, out[j]), j+1
			}
		}
		if string(back) != path {
			t.Fatalf("escapeTarget(%q) = %q reads back as %q", path, out, back)
		}
	})
}

// TestExplainAsCurlSends: for a URL with raw bytes, explain's verdict and
// note hold to the request target curl 7.88 really sends (read on a
// loopback listener): curl escapes a path's raw bytes (in lower case) but
// sends a query's as given, which the proxy refuses (http-malformed), so
// explain must not say ALLOW for them; the note's escaped path is the path
// curl sends, up to the case of its hex digits.
func TestExplainAsCurlSends(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl is needed for this test")
	}
	file := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(file, []byte(`version: 1
mode: audit
rules:
  - name: files
    to: ["docs.paths.test/public/*", "docs.paths.test/caf%C3%A9/*"]
    ports: [80/tcp]
  - name: open
    to: ["open.paths.test"]
    ports: [80/tcp]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	targets := make(chan string, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			method, rest, _ := strings.Cut(line, " ")
			target, _, _ := strings.Cut(rest, " HTTP/1.1\r\n")
			if method != "GET" {
				target = "unread: " + line
			}
			targets <- target
			io.WriteString(c, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	for _, c := range []struct{ host, rest string }{
		{"docs.paths.test", "/caf\xc3\xa9/x"},
		{"docs.paths.test", "/public/\xc3\xa9"},
		{"docs.paths.test", "/public/x?q=caf\xc3\xa9"},
		{"docs.paths.test", "/caf\xc3\xa9/x?q=\xc3\xa9"},
		{"open.paths.test", "/x?q=caf\xc3\xa9"},
		{"open.paths.test", "/caf\xc3\xa9/%zz?q=%zz"},
		{"docs.paths.test", "/public/x#caf\xc3\xa9"},
		{"docs.paths.test", "/public/x?q=1#caf\xc3\xa9"},
	} {
		url := fmt.Sprintf("http://%s:%d%s", c.host, port, c.rest)
		out, err := exec.Command(curl, "-sS", "--max-time", "10", "-o", "/dev/null", "--resolve", fmt.Sprintf("%s:%d:127.0.0.1", c.host, port), url).CombinedOutput()
		if err != nil {
			t.Fatalf("curl %q: %v %s", url, err, out)
		}
		var sent string
		select {
		case sent = <-targets:
		case <-time.After(10 * time.Second):
			t.Fatalf("curl %q: no request", url)
		}
		code, text, stderr := runCLI(t, "policy", "explain", file, "--to", url, "--port", "80/tcp", "--json")
		var ex struct {
			Verdict, Reason string
			Warnings        []string
		}
		if err := json.Unmarshal([]byte(text), &ex); code != 0 || err != nil {
			t.Fatalf("explain %q: exit %d %v %s", url, code, err, stderr)
		}
		if !httpwire.TargetBytes(sent) {
			// The proxy refuses what curl sends.
			if ex.Verdict != "deny" || ex.Reason != "http-malformed" {
				t.Errorf("%q: curl sends %q, the proxy refuses it (http-malformed); explain says %s %s", url, sent, ex.Verdict, ex.Reason)
			}
			if p, _, _ := strings.Cut(sent, "?"); httpwire.TargetBytes(p) && !slices.ContainsFunc(ex.Warnings, func(w string) bool {
				return strings.Contains(w, "the query has raw bytes") && strings.Contains(w, "escaped, "+escapeTarget(sent)+", it is")
			}) {
				t.Errorf("%q: curl sends %q; explain's notes %q do not say its query is refused", url, sent, ex.Warnings)
			}
			continue
		}
		sentPath, _, _ := strings.Cut(sent, "?")
		given, _, _ := strings.Cut(c.rest, "#")
		if given, _, _ = strings.Cut(given, "?"); !httpwire.TargetBytes(given) {
			if !slices.ContainsFunc(ex.Warnings, func(w string) bool {
				return strings.Contains(w, "sends the path escaped, "+sentPath+", which")
			}) {
				t.Errorf("%q: curl sends %q; explain's notes %q do not name that path", url, sent, ex.Warnings)
			}
		}
	}
}

// FuzzURLQuery: urlQuery is "" or the '?' and what follows it in to, up
// to a fragment, and follows the path policy.ParseDest finds.
func FuzzURLQuery(f *testing.F) {
	f.Add("http://docs.paths.test/public/x?q=caf\xc3\xa9#f")
	f.Add("u@h?x#y?z")
	f.Add("http://[2001:db8::1]:80?q")
	f.Fuzz(func(t *testing.T, to string) {
		q := urlQuery(to)
		if q == "" {
			return
		}
		if q[0] != '?' || strings.Contains(q, "#") || !strings.Contains(to, q) {
			t.Fatalf("urlQuery(%q) = %q", to, q)
		}
		if d, err := policy.ParseDest(to); err == nil && !strings.Contains(to, d.Path+q) {
			t.Fatalf("urlQuery(%q) = %q does not follow the path %q", to, q, d.Path)
		}
	})
}
