package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// guardPolicy opens the guarded ranges (THREATS.md F1, F2) every way a
// rule can hold them: "*", the /0s, wide prefixes, and CIDR rules inside
// a guarded range, which alone open it.
const guardPolicy = `rules:
  - {name: any, to: ["*"], ports: [443/tcp]}
  - {name: v4all, to: ["0.0.0.0/0"], ports: [444/tcp, 444/udp]}
  - {name: v6all, to: ["::/0"], ports: [445/tcp]}
  - {name: wide, to: ["128.0.0.0/1", "64.0.0.0/2"], ports: [446/tcp]}
  - {name: metadata, to: ["169.254.169.254/32", "100.64.0.0/10"], ports: [447/tcp]}
  - {name: local-nat64, to: ["64:ff9b:1::/48"], ports: [448/tcp]}
`

// guardExplained is the JSON of `policy explain --json`, the fields the
// guard tests read.
type guardExplained struct {
	Verdict, Rule, Reason, Mode string
	SpecialRange                string `json:"special_range"`
	AllowedBy                   string `json:"allowed_by"`
	// Guard is the guard that refused it, if one did; Explicit and
	// Transparent what each proxy does with a TCP address
	// (TestExplainAgreesWithProxy).
	Guard                 string
	Explicit, Transparent *proxyExplained
	Warnings              []string
}

// proxyExplained is one proxy's decision in `policy explain --json`.
type proxyExplained struct {
	Verdict, Rule, Reason, Mode, Guard string
	SpecialRange                       string `json:"special_range"`
}

// explainJSON runs `egressd policy explain ARGS --json` and decodes it.
func explainJSON(t *testing.T, args ...string) guardExplained {
	t.Helper()
	args = append(append([]string{"policy", "explain"}, args...), "--json")
	code, out, stderr := runCLI(t, args...)
	if code != exitOK {
		t.Fatalf("%v: exit %d: %s", args, code, stderr)
	}
	var ex guardExplained
	if err := json.Unmarshal([]byte(out), &ex); err != nil {
		t.Fatalf("%v: %v: %q", args, err, out)
	}
	return ex
}

// TestExplainSpecialRange: explain says what the proxy and the firewall
// do with a destination in a guarded range: a rule that holds it without
// naming it from inside (policy.Engine.GuardRefuses, the proxy's guard)
// leaves it refused, special-range, and the JSON names the range and the
// rule that would have allowed it; a CIDR rule inside the range opens it.
// Loopback and the unspecified address, the gateway itself, are the
// proxy's special-range whatever the rules say (enforced in audit mode
// too); UDP to loopback is dropped by the firewall's antispoof chain
// (TestExplainLoopbackNamed). Before, explain printed ALLOW for each.
func TestExplainSpecialRange(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte("mode: enforce\n"+guardPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	audit := filepath.Join(dir, "audit.yaml")
	if err := os.WriteFile(audit, []byte("mode: audit\n"+guardPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	const (
		nat   = "64:ff9b::/96"
		local = "64:ff9b:1::/96"
	)
	cases := []struct {
		file, to, port, nat string
		verdict, reason     string
		rule                string // the allowing rule, or the guard's overridden one
		rng                 string // special_range
		mode                string
	}{
		// Metadata under "*", the /0, a wide prefix, a URL; TCP and UDP.
		{pol, "169.254.169.254", "443/tcp", "", "deny", "special-range", "any", "169.254.0.0/16", "enforce"},
		{pol, "https://169.254.169.254/latest/meta-data", "", "", "deny", "special-range", "any", "169.254.0.0/16", "enforce"},
		{pol, "169.254.169.254", "444/tcp", "", "deny", "special-range", "v4all", "169.254.0.0/16", "enforce"},
		{pol, "169.254.169.254", "444/udp", "", "deny", "special-range", "v4all", "169.254.0.0/16", "enforce"},
		{pol, "169.254.169.254", "446/tcp", "", "deny", "special-range", "wide", "169.254.0.0/16", "enforce"},
		// A CIDR rule inside the range opens what it holds, only that.
		{pol, "169.254.169.254", "447/tcp", "", "allow", "", "metadata", "", "enforce"},
		{pol, "169.254.169.253", "447/tcp", "", "deny", "port-not-allowed", "", "", "enforce"},
		// CGNAT, Alibaba's metadata.
		{pol, "100.100.100.200", "446/tcp", "", "deny", "special-range", "wide", "100.64.0.0/10", "enforce"},
		{pol, "100.100.100.200", "447/tcp", "", "allow", "", "metadata", "", "enforce"},
		// Loopback and unspecified: the gateway itself, refused by the
		// proxy whatever the rules say (enforce, in audit mode too).
		{pol, "127.0.0.1", "443/tcp", "", "deny", "special-range", "any", "127.0.0.0/8", "enforce"},
		{pol, "127.0.0.1", "449/tcp", "", "deny", "special-range", "", "127.0.0.0/8", "enforce"},
		{pol, "127.0.0.1", "449/udp", "", "deny", "special-range", "", "127.0.0.0/8", "enforce"},
		{pol, "::1", "445/tcp", "", "deny", "special-range", "v6all", "::1/128", "enforce"},
		{pol, "0.0.0.0", "444/tcp", "", "deny", "special-range", "v4all", "0.0.0.0/8", "enforce"},
		{audit, "127.0.0.1", "443/tcp", "", "deny", "special-range", "any", "127.0.0.0/8", "enforce"},
		{audit, "169.254.169.254", "443/tcp", "", "deny", "special-range", "any", "169.254.0.0/16", "audit"},
		// IPv4-mapped, 6to4, NAT64 forms of metadata.
		{pol, "::ffff:169.254.169.254", "444/tcp", "", "deny", "special-range", "v4all", "169.254.0.0/16", "enforce"},
		{pol, "::ffff:169.254.169.254", "447/tcp", "", "allow", "", "metadata", "", "enforce"},
		{pol, "2002:a9fe:a9fe::1", "445/tcp", "", "deny", "special-range", "v6all", "2002::/16", "enforce"},
		{pol, "64:ff9b::a9fe:a9fe", "445/tcp", "", "deny", "special-range", "v6all", "64:ff9b::/96", "enforce"},
		{pol, "64:ff9b::a9fe:a9fe", "444/tcp", nat, "deny", "special-range", "v4all", "64:ff9b::a9fe:0/112", "enforce"},
		{pol, "64:ff9b::a9fe:a9fe", "443/tcp", nat, "deny", "special-range", "any", "64:ff9b::a9fe:0/112", "enforce"},
		{pol, "64:ff9b::a9fe:a9fe", "447/tcp", nat, "allow", "", "metadata", "", "enforce"},
		{pol, "64:ff9b::a00:1", "444/tcp", nat, "deny", "special-range", "v4all", "64:ff9b::a00:0/104", "enforce"},
		{pol, "64:ff9b::c633:640a", "444/tcp", nat, "allow", "", "v4all", "", "enforce"},
		// The local-use /48: a rule naming it opens it, but not the rest
		// of it around a NAT64 prefix inside it (the firewall's forward
		// chain excludes the NAT64 forms it holds).
		{pol, "64:ff9b:1:1::10", "448/tcp", "", "allow", "", "local-nat64", "", "enforce"},
		{pol, "64:ff9b:1:1::10", "448/tcp", local, "deny", "special-range", "local-nat64", "64:ff9b:1::/48", "enforce"},
		{pol, "64:ff9b:1:1::10", "445/tcp", "", "deny", "special-range", "v6all", "64:ff9b:1::/48", "enforce"},
		// Unguarded addresses are the rules'.
		{pol, "198.51.100.10", "444/tcp", "", "allow", "", "v4all", "", "enforce"},
		{pol, "2001:db8::10", "445/tcp", "", "allow", "", "v6all", "", "enforce"},
		{pol, "::ffff:198.51.100.10", "444/tcp", "", "allow", "", "v4all", "", "enforce"},
		// DNS is the forwarder's, whatever its destination.
		{pol, "169.254.169.254", "53/udp", "", "deny", "port-not-allowed", "", "", "enforce"},
	}
	for _, c := range cases {
		args := []string{c.file, "--to", c.to}
		if c.port != "" {
			args = append(args, "--port", c.port)
		}
		if c.nat != "" {
			args = append(args, "--nat64-prefix", c.nat)
		}
		ex := explainJSON(t, args...)
		name := c.to + " " + c.port + " nat64 " + c.nat + " " + filepath.Base(c.file)
		if ex.Verdict != c.verdict || (c.verdict == "deny" && ex.Reason != c.reason) || ex.SpecialRange != c.rng || ex.Mode != c.mode {
			t.Errorf("%s: %s %s range %q mode %s, want %s %s range %q mode %s", name, ex.Verdict, ex.Reason, ex.SpecialRange, ex.Mode, c.verdict, c.reason, c.rng, c.mode)
		}
		switch {
		case c.verdict == "allow" && ex.Rule != c.rule:
			t.Errorf("%s: rule %q, want %q", name, ex.Rule, c.rule)
		case c.reason == "special-range" && (ex.Rule != "" || ex.AllowedBy != c.rule):
			t.Errorf("%s: rule %q allowed_by %q, want no rule, allowed_by %q", name, ex.Rule, ex.AllowedBy, c.rule)
		}
		if c.reason == "special-range" {
			// The gateway itself (loopback, unspecified) no rule opens.
			w := strings.Join(ex.Warnings, "\n")
			self := strings.HasPrefix(c.to, "127.") || c.to == "::1" || c.to == "0.0.0.0"
			// What opens it: a CIDR rule inside the range, for the gateway
			// itself only on TCP, the proxy's (TestExplainLoopbackNamed).
			opens := !self || strings.HasSuffix(c.port, "/tcp")
			if !strings.Contains(w, c.rng) || self != strings.Contains(w, "gateway itself") || opens != strings.Contains(w, "CIDR rule") {
				t.Errorf("%s: notes %q, want the range and what opens it (the gateway itself: TCP's proxy only)", name, ex.Warnings)
			}
		}
	}

	// The text says it as plainly: DENY, the reason with the range, the
	// rule that holds the address, and what would open it.
	code, out, stderr := runCLI(t, "policy", "explain", pol, "--to", "169.254.169.254", "--port", "444/tcp")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{
		"DENY 169.254.169.254 on 444/tcp\n",
		"  reason: special-range (169.254.0.0/16)\n",
		"rule v4all allows 169.254.169.254",
		"a CIDR rule inside 169.254.0.0/16",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("text lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "ALLOW") {
		t.Errorf("text says ALLOW:\n%s", out)
	}
}

// TestExplainMappedLiteral: an IPv4-mapped literal is what an explicit
// CONNECT [::ffff:198.51.100.10]:443 or an absolute URL asks the proxy
// for (a transparent flow's destination is never mapped), and the proxy
// guards it as written (decideTarget): any IPv4 CIDR rule holding the
// address opens it, "0.0.0.0/0" too, but "*" does not
// (policy/TestCIDRNamesMapped, proxy: 403 special-range). Explain
// unmapped the literal first and printed ALLOW under "*"; the range it
// names is the mapped one, not the guard's 0.0.0.0/0 placeholder, and
// its note says what does open it.
func TestExplainMappedLiteral(t *testing.T) {
	pol := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(pol, []byte("mode: enforce\n"+guardPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		to, port        string
		verdict, reason string
		rule, rng       string
	}{
		{"[::ffff:198.51.100.10]:443", "", "deny", "special-range", "any", "::ffff:0.0.0.0/96"},
		{"https://[::ffff:198.51.100.10]/x", "", "deny", "special-range", "any", "::ffff:0.0.0.0/96"},
		{"::ffff:198.51.100.10", "444/tcp", "allow", "", "v4all", ""},
		{"::ffff:198.51.100.10", "446/tcp", "allow", "", "wide", ""},
		// The address itself, as a transparent flow carries it.
		{"198.51.100.10", "443/tcp", "allow", "", "any", ""},
		// A guarded address's mapped form is its range's, as before.
		{"::ffff:169.254.169.254", "443/tcp", "deny", "special-range", "any", "169.254.0.0/16"},
	} {
		args := []string{pol, "--to", c.to}
		if c.port != "" {
			args = append(args, "--port", c.port)
		}
		ex := explainJSON(t, args...)
		rule := ex.Rule
		if c.verdict == "deny" {
			rule = ex.AllowedBy
		}
		if ex.Verdict != c.verdict || (c.verdict == "deny" && ex.Reason != c.reason) || ex.SpecialRange != c.rng || rule != c.rule {
			t.Errorf("%s %s: %s %s rule %q range %q, want %s %s rule %q range %q", c.to, c.port, ex.Verdict, ex.Reason, rule, ex.SpecialRange, c.verdict, c.reason, c.rule, c.rng)
		}
		if c.rng == "::ffff:0.0.0.0/96" {
			w := strings.Join(ex.Warnings, "\n")
			if !strings.Contains(w, "0.0.0.0/0 does") || strings.Contains(w, "a /0 or a broader prefix do not") {
				t.Errorf("%s: notes %q, want what opens the mapped form (an IPv4 CIDR rule holding 198.51.100.10)", c.to, ex.Warnings)
			}
		}
	}
}

// TestExplainLoopbackNamed: the gateway's loopback is no destination
// from the LAN whatever the rules say, a CIDR rule naming 127.0.0.1 too:
// the firewall's antispoof chain drops every packet from the LAN to
// 127.0.0.0/8 in enforce mode, before the proxy, the forwarder or the
// forward chain (Linux drops it as a martian anyway unless
// route_localnet=1), and the proxy refuses a request for it (the explicit
// proxy, in audit mode too). Explain printed ALLOW for TCP, UDP and ICMP
// under such a rule, and its note said a CIDR rule inside 127.0.0.0/8
// would open it (e2e/TestExplainMatchesDaemon).
func TestExplainLoopbackNamed(t *testing.T) {
	const loop = `rules:
  - {name: loop, to: ["127.0.0.1/32"], ports: [9902/tcp, 7780/udp, 53/udp, icmp]}
  - {name: wide, to: ["0.0.0.0/0"], ports: [7777/udp]}
`
	dir := t.TempDir()
	for _, mode := range []string{"enforce", "audit"} {
		pol := filepath.Join(dir, mode+".yaml")
		if err := os.WriteFile(pol, []byte("mode: "+mode+"\n"+loop), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct{ to, port, allowedBy, mode string }{
			{"127.0.0.1", "9902/tcp", "loop", "enforce"},
			{"127.0.0.1", "7780/udp", "loop", mode},
			{"127.0.0.1", "icmp", "loop", mode},
			{"127.0.0.1", "7777/udp", "wide", mode},
			{"127.0.0.1", "53/udp", "loop", mode},
			{"127.0.0.2", "7780/udp", "", mode},
		} {
			ex := explainJSON(t, pol, "--to", c.to, "--port", c.port)
			name := mode + " " + c.to + " " + c.port
			if ex.Verdict != "deny" || ex.Reason != "special-range" || ex.SpecialRange != "127.0.0.0/8" || ex.Rule != "" || ex.AllowedBy != c.allowedBy || ex.Mode != c.mode {
				t.Errorf("%s: %s %s range %q rule %q allowed_by %q mode %s, want deny special-range 127.0.0.0/8, allowed_by %q, mode %s",
					name, ex.Verdict, ex.Reason, ex.SpecialRange, ex.Rule, ex.AllowedBy, ex.Mode, c.allowedBy, c.mode)
			}
			// No rule opens it to a client's own connection; the explicit
			// proxy, asked for it, takes it under the rule naming it.
			w := strings.Join(ex.Warnings, "\n")
			explicit := c.port == "9902/tcp"
			if !strings.Contains(w, "no rule opens") || explicit != strings.Contains(w, "the explicit proxy allows it") || !strings.HasSuffix(c.port, "/tcp") && strings.Contains(w, "CIDR rule") {
				t.Errorf("%s: notes %q, want the gateway itself, which no rule opens (the explicit proxy allows it: %v)", name, ex.Warnings, explicit)
			}
		}
	}
}

// TestExplainNameUnderCIDR: explain decides a name by the rules that name
// it; it does not know the addresses DNS will answer for it, which a CIDR
// rule may allow (the proxy decides by the address first). Where a CIDR
// rule applies to the port, a note says so and to ask about the address
// (e2e/TestExplainMatchesDaemon: notion.so on 8443 under 0.0.0.0/0).
func TestExplainNameUnderCIDR(t *testing.T) {
	pol := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(pol, []byte(`rules:
  - {name: docs, to: [notion.so], ports: [443/tcp]}
  - {name: wide, to: ["0.0.0.0/0"], ports: [8443/tcp]}
  - {name: ntp, to: ["198.51.100.200/30"], ports: [123/udp]}
  - {name: loop, to: ["127.0.0.1/32", "::1/128"], ports: [9902/tcp]}
  - {name: loopwide, to: ["127.0.0.1/32", "198.51.100.0/24"], ports: [9903/tcp]}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ to, port, verdict, cidr string }{
		{"notion.so", "8443/tcp", "deny", "wide"},
		{"time.example", "123/udp", "deny", "ntp"},
		{"notion.so", "443/tcp", "allow", ""},
		{"notion.so", "8444/tcp", "deny", ""},
		{"198.51.100.9", "8443/tcp", "allow", ""},
		// Loopback no rule opens from the LAN: a rule naming only it
		// allows no address of a name's (policy.LANLoopback).
		{"notion.so", "9902/tcp", "deny", ""},
		{"notion.so", "9903/tcp", "deny", "loopwide"},
	} {
		ex := explainJSON(t, pol, "--to", c.to, "--port", c.port)
		w := strings.Join(ex.Warnings, "\n")
		noted := strings.Contains(w, "does not know the addresses")
		if ex.Verdict != c.verdict || noted != (c.cidr != "") || c.cidr != "" && !strings.Contains(w, "rule "+c.cidr+" ") || strings.Contains(w, "127.0.0.1/32") {
			t.Errorf("%s %s: %s, notes %q; want %s, a note naming rule %q: %v", c.to, c.port, ex.Verdict, ex.Warnings, c.verdict, c.cidr, c.cidr != "")
		}
	}
}
