package firewall

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func sitePolicy(t testing.TB) *policy.Engine {
	t.Helper()
	src, err := os.ReadFile("testdata/site.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return compile(t, string(src))
}

var siteConfig = Config{LANs: []string{"lan0"}, WAN: "wan0", ProxyPort: 15001, DNSPort: 5353}

// TestGolden renders testdata/site.yaml in each configuration and compares
// with the golden files (go test -run TestGolden -update rewrites them).
func TestGolden(t *testing.T) {
	eng := sitePolicy(t)
	tcp := []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}, {Lo: 443, Hi: 443, Proto: policy.TCP}}
	cases := []struct {
		name string
		cfg  Config
		mode policy.Mode
	}{
		{"enforce", siteConfig, policy.ModeEnforce},
		{"enforce-tcp-ports", func() Config { c := siteConfig; c.TCPPorts = tcp; c.ProxyPort6 = 15002; c.Masquerade = true; return c }(), policy.ModeEnforce},
		{"audit", siteConfig, policy.ModeAudit},
		{"audit-guard-masquerade", func() Config { c := siteConfig; c.GuardWAN, c.Masquerade = true, true; return c }(), policy.ModeAudit},
		{"enforce-two-lans", func() Config { c := siteConfig; c.LANs = []string{"lan0.10", "lan0.20"}; return c }(), policy.ModeEnforce},
		{"enforce-fast-path", func() Config { c := siteConfig; c.FastPath = true; return c }(), policy.ModeEnforce},
		{"enforce-fast-path-tcp-ports", func() Config { c := siteConfig; c.FastPath, c.TCPPorts = true, tcp; return c }(), policy.ModeEnforce},
		// Audit mode has no fast path: the same table as without it.
		{"audit", func() Config { c := siteConfig; c.FastPath = true; return c }(), policy.ModeAudit},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rs, err := render(c.cfg, eng.WithMode(c.mode), time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
			if err != nil {
				t.Fatal(err)
			}
			got := rs.String()
			path := filepath.Join("testdata", c.name+".nft")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("%s (-want +got):\n%s", path, diff)
			}
		})
	}
}

// TestAuditBlocksNothing is the audit promise in the rendered form: no
// rule of an audit ruleset redirects, drops or rejects anything from the
// LAN, whatever the configuration.
func TestAuditBlocksNothing(t *testing.T) {
	eng := sitePolicy(t).WithMode(policy.ModeAudit)
	for _, cfg := range []Config{{}, siteConfig, {WAN: "wan0", GuardWAN: true, Masquerade: true}, {LANs: []string{"lan0"}, WAN: "wan0", GuardWAN: true},
		{LANs: []string{"lan0", "lan1"}, WAN: "wan0", GuardWAN: true, Masquerade: true}} {
		rs, err := Render(cfg, eng)
		if err != nil {
			t.Fatal(err)
		}
		if len(rs.Sets) != 0 {
			t.Errorf("%+v: audit ruleset has sets", cfg)
		}
		for _, c := range rs.Chains {
			for _, r := range c.Rules {
				switch r.Verdict.Kind {
				case Redirect, Reject, RejectTCPReset:
					t.Errorf("%+v: audit rule %q", cfg, r)
				case Drop:
					if r.IIf != cfg.WAN || !cfg.GuardWAN {
						t.Errorf("%+v: audit drops %q", cfg, r)
					}
				}
			}
		}
		if len(cfg.LANs) == 0 && cfg.WAN == "" && len(rs.Chains) != 0 {
			t.Errorf("default audit ruleset has chains:\n%s", rs)
		}
	}
}

func TestRenderEnforce(t *testing.T) {
	rs, err := Render(siteConfig, sitePolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	text := rs.String()
	containsAll(t, text,
		`iifname "lan0" udp dport 53 redirect to :5353`,
		`iifname "lan0" tcp dport 53 redirect to :5353`,
		`iifname "lan0" meta l4proto tcp redirect to :15001`,
		`iifname "lan0" ip daddr @dns4_ntp ip daddr != @guarded4 udp dport 123 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip6 daddr @dns6_ntp ip6 daddr != @guarded6 udp dport 123 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip daddr @dns4_quic ip daddr != @guarded4 udp dport 443 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip daddr != @guarded4 udp dport 9 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip6 daddr != @guarded6 udp dport 9 ct mark set ct mark & 0xff`,
		`iifname "wan0" counter drop`,
		`ct state established,related ct mark & 0x00400000 == 0x00400000 accept`,
		`iifname "lan0" udp dport 443 counter reject`,
		`iifname "lan0" counter drop comment "enforce: nothing else from the LAN"`,
		`elements = { 198.51.100.7, 203.0.113.0/24 }`,
	)
	// TCP rules are the proxy's business when every port is redirected:
	// no TCP accepts in forward.
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			if c.Name == chainForward && r.Proto == policy.TCP && r.Verdict.Kind == Accept {
				t.Errorf("forward accepts TCP: %q", r)
			}
		}
	}
	// The QUIC allowance comes before the QUIC reject.
	if strings.Index(text, "@dns4_quic ip daddr != @guarded4 udp dport 443 ct mark set") > strings.Index(text, "udp dport 443 counter reject") {
		t.Error("QUIC reject before the rule that allows it")
	}
	for rule, want := range map[string]bool{"ntp": true, "media": true, "quic": true, "web": false, "dns": false, "nx": false, "anything": false} {
		if _, _, ok := rs.LearnedSets(rule); ok != want {
			t.Errorf("LearnedSets(%s) = %v, want %v", rule, ok, want)
		}
	}
}

// TestRenderSeveralLANs: with two LAN interfaces every rule that matched
// the one LAN matches both, in one rule (iifname @lans, a set of the
// names): DNS and TCP are redirected from each, the policy's accepts and
// the final drop apply to each, and the chains have as many rules as with
// one LAN. Traffic from one LAN interface to the other is LAN traffic:
// judged by the same rules (nothing lets it through before them).
func TestRenderSeveralLANs(t *testing.T) {
	one, err := Render(siteConfig, sitePolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg := siteConfig
	cfg.LANs = []string{"lan0.20", "lan0.10", "cams"}
	two, err := Render(cfg, sitePolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	text := two.String()
	containsAll(t, text,
		"\tset lans {\n\t\ttype ifname\n\t\tcomment \"the LAN interfaces\"\n\t\telements = { \"cams\", \"lan0.10\", \"lan0.20\" }\n\t}\n",
		`iifname @lans udp dport 53 redirect to :5353`,
		`iifname @lans tcp dport 53 redirect to :5353`,
		`iifname @lans fib daddr type local return`,
		`iifname @lans meta l4proto tcp redirect to :15001`,
		`iifname @lans ip daddr @dns4_ntp ip daddr != @guarded4 udp dport 123 ct mark set`,
		`iifname @lans udp dport 443 counter reject`,
		`iifname @lans counter drop comment "enforce: nothing else from the LAN"`,
		`iifname "wan0" counter drop`,
		`oifname "wan0" counter drop comment "enforce: nothing else out to the WAN side"`,
	)
	if s := two.Set(setLANs); s == nil || s.Kind != SetIfnames || !slices.Equal(s.Names, cfg.LANs) {
		t.Errorf("set %s: %+v, want the LANs %q", setLANs, s, cfg.LANs)
	}
	if len(two.Sets) != len(one.Sets)+1 {
		t.Errorf("%d sets with two LANs, %d with one: want one more, the LANs'", len(two.Sets), len(one.Sets))
	}
	for i, c := range two.Chains {
		if len(c.Rules) != len(one.Chains[i].Rules) {
			t.Errorf("chain %s: %d rules with two LANs, %d with one", c.Name, len(c.Rules), len(one.Chains[i].Rules))
			continue
		}
		for j, r := range c.Rules {
			was := one.Chains[i].Rules[j]
			if was.IIf == "lan0" {
				was.IIf, was.IIfSet = "", setLANs
			}
			if r.IIf != was.IIf || r.IIfSet != was.IIfSet {
				t.Errorf("chain %s: %q; with one LAN %q", c.Name, r, one.Chains[i].Rules[j])
			}
		}
	}
	// Nothing accepts between the LAN interfaces before the policy's
	// rules: the only accept that names no interface and no state is the
	// last, for traffic that came in on neither a LAN nor the WAN.
	for _, c := range two.Chains {
		if c.Name != chainForward {
			continue
		}
		for j, r := range c.Rules {
			if r.Verdict.Kind == Accept && r.IIf == "" && r.IIfSet == "" && r.CTState == 0 && j != len(c.Rules)-1 {
				t.Errorf("forward accepts %q before the LAN's drop", r)
			}
		}
	}
	// In audit mode the LANs are in no rule: no set either.
	audit, err := Render(cfg, sitePolicy(t).WithMode(policy.ModeAudit))
	if err != nil {
		t.Fatal(err)
	}
	if len(audit.Sets) != 0 {
		t.Errorf("audit ruleset with two LANs has sets:\n%s", audit)
	}
}

// TestNftOrder: the LAN set's names print in the order nft lists them
// (their NUL-padded key as a little-endian number), so that `firewall
// print` shows what `nft list table` shows.
func TestNftOrder(t *testing.T) {
	got := nftOrder([]string{"zz9", "lan1", "eth1.20", "lan0.10", "a", "lan0"})
	want := []string{"a", "zz9", "lan0", "lan1", "lan0.10", "eth1.20"} // as nft 1.0.6 listed them
	if !slices.Equal(got, want) {
		t.Errorf("nftOrder = %q, want %q", got, want)
	}
}

func TestRenderTCPPorts(t *testing.T) {
	cfg := siteConfig
	cfg.TCPPorts = []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
	rs, err := Render(cfg, sitePolicy(t))
	if err != nil {
		t.Fatal(err)
	}
	text := rs.String()
	containsAll(t, text,
		`iifname "lan0" tcp dport 443 redirect to :15001`,
		`iifname "lan0" ip daddr @net4_nx tcp dport 7001 ct mark set ct mark & 0xff`,
		// "private" holds fc00::/7, broader than AWS IMDSv6 (fd00:ec2::254).
		`iifname "lan0" ip6 daddr @wide6_nx ip6 daddr != @guarded6 tcp dport 5000 ct mark set ct mark & 0xff`,
		`elements = { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 }`,
		`iifname "lan0" tcp dport 853 counter reject with tcp reset`,
	)
	if strings.Contains(text, "meta l4proto tcp redirect") {
		t.Error("every TCP port redirected despite TCPPorts")
	}
}

func TestRenderExpiry(t *testing.T) {
	eng := compile(t, `
version: 1
mode: enforce
rules:
  - name: old
    to: [198.51.100.1]
    ports: [1000/udp]
    expires: 2025-06-30
  - name: soon
    to: [198.51.100.2]
    ports: [1001/udp]
    expires: 2026-03-01
  - name: later
    to: [198.51.100.3]
    ports: [1002/udp]
    expires: 2027-01-01
`)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rs, err := render(siteConfig, eng, now)
	if err != nil {
		t.Fatal(err)
	}
	text := rs.String()
	if strings.Contains(text, "rule old") || !strings.Contains(text, "rule soon") || !strings.Contains(text, "rule later") {
		t.Errorf("expired rule rendered, or live one missing:\n%s", text)
	}
	if want := eng.Rules()[1].Expires; !rs.NextExpiry.Equal(want) {
		t.Errorf("NextExpiry = %v, want %v", rs.NextExpiry, want)
	}
}

func TestConfigValidate(t *testing.T) {
	cases := []struct {
		name string
		cfg  Config
		mode policy.Mode
		want []string // substrings of the error; none: valid
	}{
		{"audit zero", Config{}, policy.ModeAudit, nil},
		{"enforce ok", siteConfig, policy.ModeEnforce, nil},
		{"enforce empty", Config{}, policy.ModeEnforce, []string{"LAN interface", "proxy's port"}},
		{"masquerade without wan", Config{Masquerade: true}, policy.ModeAudit, []string{"masquerade needs the WAN"}},
		{"same iface", Config{LANs: []string{"eth0"}, WAN: "eth0"}, policy.ModeAudit, []string{"both"}},
		{"long name", Config{LANs: []string{"abcdefghijklmnop"}}, policy.ModeAudit, []string{"longer than 15"}},
		{"two lans", Config{LANs: []string{"eth1.10", "eth1.20"}, WAN: "eth0", ProxyPort: 1}, policy.ModeEnforce, nil},
		{"wan among lans", Config{LANs: []string{"eth1", "eth0"}, WAN: "eth0"}, policy.ModeAudit, []string{`the LAN and WAN interfaces are both "eth0"`}},
		{"lan twice", Config{LANs: []string{"eth1", "eth2", "eth1"}}, policy.ModeAudit, []string{`LAN interface "eth1" is named twice`}},
		{"empty lan", Config{LANs: []string{"eth1", ""}}, policy.ModeAudit, []string{"LAN interface: an empty name"}},
		{"second lan bad", Config{LANs: []string{"eth1", "a b"}}, policy.ModeAudit, []string{"LAN interface", "not a valid interface"}},
		{"bad name", Config{WAN: "a/b"}, policy.ModeAudit, []string{"not a valid interface"}},
		{"udp port range", Config{TCPPorts: []policy.PortRange{{Lo: 1, Hi: 2, Proto: policy.UDP}}}, policy.ModeAudit, []string{"expected TCP"}},
		{"backwards", Config{TCPPorts: []policy.PortRange{{Lo: 9, Hi: 2, Proto: policy.TCP}}}, policy.ModeAudit, []string{"expected TCP"}},
		{"mode", Config{}, "loud", []string{"unknown mode"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.cfg.Validate(c.mode)
			if len(c.want) == 0 {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want %q", c.want)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if !strings.HasPrefix(err.Error(), "firewall: ") {
				t.Errorf("error %q has no package prefix", err)
			}
		})
	}
	if _, err := Render(Config{}, nil); err == nil {
		t.Error("Render(nil engine) succeeded")
	}
}

func TestMergePrefixes(t *testing.T) {
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	cases := []struct {
		in   []netip.Prefix
		want []string
	}{
		{pp("203.0.113.0/25", "203.0.113.128/25"), []string{"203.0.113.0/24"}},
		{pp("10.0.0.0/8", "10.1.0.0/16", "10.2.3.4/32"), []string{"10.0.0.0/8"}},
		{pp("198.51.100.7/32", "198.51.100.9/32", "198.51.100.8/32"), []string{"198.51.100.7-198.51.100.9"}},
		{pp("255.255.255.255/32", "255.255.255.0/24"), []string{"255.255.255.0/24"}},
		{pp("2001:db8::/33", "2001:db8:8000::/33"), []string{"2001:db8::/32"}},
		{pp("192.0.2.1/32"), []string{"192.0.2.1"}},
		{nil, nil},
	}
	for _, c := range cases {
		var got []string
		for _, r := range mergePrefixes(c.in) {
			got = append(got, rangeString(r))
		}
		if diff := cmp.Diff(c.want, got); diff != "" {
			t.Errorf("%v (-want +got):\n%s", c.in, diff)
		}
	}
}

// TestLearnBookkeeping checks Learn's decisions without a kernel: the
// ruleset is rendered in audit mode, where Learn only remembers.
func TestLearnBookkeeping(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fw, err := New(Config{MaxLearned: 2, MinTTL: 10 * time.Second}, Deps{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	a1, a2, a3 := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("198.51.100.3")
	// Nothing installed: ignored.
	if err := fw.Learn("ntp", a1, time.Minute); err != nil || len(fw.learned) != 0 {
		t.Fatalf("learn before install: %v, %v", err, fw.learned)
	}
	rs, err := render(Config{}, sitePolicy(t).WithMode(policy.ModeAudit), now)
	if err != nil {
		t.Fatal(err)
	}
	fw.rs = rs
	if err := fw.Learn("web", a1, time.Minute); err != nil || len(fw.learned) != 0 {
		t.Fatalf("rule without UDP ports: %v, %v", err, fw.learned)
	}
	if err := fw.Learn("nope", a1, time.Minute); err != nil || len(fw.learned) != 0 {
		t.Fatalf("unknown rule: %v, %v", err, fw.learned)
	}
	if err := fw.Learn("ntp", netip.MustParseAddr("::ffff:198.51.100.1"), time.Second); err != nil {
		t.Fatal(err)
	}
	if got := fw.learned["dns4_ntp"][a1].exp; !got.Equal(now.Add(10 * time.Second)) {
		t.Errorf("mapped address, ttl under MinTTL: expiry %v, want %v", got, now.Add(10*time.Second))
	}
	if err := fw.Learn("ntp", a2, 100*24*time.Hour); err != nil {
		t.Fatal(err)
	}
	if got := fw.learned["dns4_ntp"][a2].exp; !got.Equal(now.Add(MaxTTL)) {
		t.Errorf("ttl over MaxTTL: expiry %v", got)
	}
	if err := fw.Learn("ntp", a3, time.Minute); !errors.Is(err, ErrSetFull) {
		t.Errorf("third address in a set of 2: %v, want ErrSetFull", err)
	}
	// Once the first has expired there is room.
	now = now.Add(11 * time.Second)
	if err := fw.Learn("ntp", a3, time.Minute); err != nil {
		t.Errorf("after an expiry: %v", err)
	}
	if err := fw.Learn("ntp", netip.MustParseAddr("2001:db8::1"), time.Minute); err != nil || len(fw.learned["dns6_ntp"]) != 1 {
		t.Errorf("IPv6: %v, %v", err, fw.learned["dns6_ntp"])
	}
	if err := fw.Learn("ntp", netip.Addr{}, time.Minute); err == nil {
		t.Error("invalid address accepted")
	}
}

// TestRenderNoForwardedDNS: port 53 never gets a forward accept in enforce
// mode, not even inside a range: every new LAN connection to it is
// redirected to the forwarder, so such an accept could only pass a
// connection from before enforcement (a DNS tunnel to the client's own
// server).
func TestRenderNoForwardedDNS(t *testing.T) {
	eng, err := policy.Compile("dns.yaml", []byte(`version: 1
mode: enforce
rules:
  - name: dns
    to: ["0.0.0.0/0", "::/0"]
    ports: [53/udp, 53/tcp]
  - name: wide
    to: [203.0.113.0/24]
    ports: [any, 50-53/udp, 53-60/udp]
`))
	if err != nil {
		t.Fatal(err)
	}
	cfg := siteConfig
	cfg.TCPPorts = []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
	rs, err := Render(cfg, eng)
	if err != nil {
		t.Fatal(err)
	}
	text := rs.String()
	containsAll(t, text, "udp dport 1-52 ", "udp dport 54-65535 ", "tcp dport 1-52 ", "tcp dport 54-65535 ", "udp dport 50-52 ", "udp dport 54-60 ")
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			if c.Name == chainForward && r.Verdict.Kind == Accept && r.Proto != 0 && (r.Ports.Lo == 0 || r.Ports.Lo <= 53 && 53 <= r.Ports.Hi) {
				t.Errorf("forward accepts port 53: %q", r)
			}
		}
	}
}

// TestRenderTCPPortsPathRules: with TCPPorts set, the TCP ports of a rule
// with a host/path target are redirected to the proxy too. Only the proxy
// reads a request's path; forwarded by the rule's learned addresses, a
// plain HTTP request to notion.so:8080 would go out whatever its path
// (THREATS.md C6). Other rules' ports stay forwarded by address.
func TestRenderTCPPortsPathRules(t *testing.T) {
	eng := compile(t, `
version: 1
mode: enforce
rules:
  - name: docs
    to: ["notion.so/vendor/*", "docs.example.test"]
    ports: [443/tcp, 8080/tcp, 9000-9001/tcp]
  - name: plain
    to: [plain.example.test]
    ports: [7000/tcp]
`)
	cfg := siteConfig
	cfg.TCPPorts = []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}
	rs, err := Render(cfg, eng)
	if err != nil {
		t.Fatal(err)
	}
	text := rs.String()
	containsAll(t, text,
		`iifname "lan0" tcp dport 443 redirect to :15001`,
		`iifname "lan0" tcp dport 8080 redirect to :15001`,
		`iifname "lan0" tcp dport 9000-9001 redirect to :15001`,
	)
	if strings.Count(text, "tcp dport 443 redirect") != 1 {
		t.Errorf("443 redirected more than once:\n%s", text)
	}
	if strings.Contains(text, "tcp dport 7000 redirect") {
		t.Errorf("a port of a rule without host/path targets is redirected:\n%s", text)
	}
}

// TestRenderBroadCIDRKeepsGuardedRanges: a CIDR rule broader than a
// guarded range (0.0.0.0/1 holds loopback and link-local, 96.0.0.0/3 holds
// CGNAT, ::/1 holds the NAT64, 6to4 and Teredo ranges) opens forwarded UDP
// to all of its addresses but the guarded ones, as the proxy does for TCP
// (proxy/guard.go: a rule opens a guarded address only with a prefix at
// least as specific as its range). A prefix inside a guarded range, in the
// same rule, still opens it; a prefix that holds none is not narrowed.
func TestRenderBroadCIDRKeepsGuardedRanges(t *testing.T) {
	eng := compile(t, `
version: 1
mode: enforce
rules:
  - name: broad
    to: [0.0.0.0/1, 96.0.0.0/3, 10.0.0.0/8, 127.0.0.1/32, "::/1", "2001:db8::/32"]
    ports: [9/udp]
`)
	rs, err := Render(siteConfig, eng)
	if err != nil {
		t.Fatal(err)
	}
	text := rs.String()
	containsAll(t, text,
		`iifname "lan0" ip daddr @net4_broad udp dport 9 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip daddr @wide4_broad ip daddr != @guarded4 udp dport 9 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip6 daddr @net6_broad udp dport 9 ct mark set ct mark & 0xff`,
		`iifname "lan0" ip6 daddr @wide6_broad ip6 daddr != @guarded6 udp dport 9 ct mark set ct mark & 0xff`,
	)
	sets := map[string][]netip.Prefix{}
	for _, s := range rs.Sets {
		sets[s.Name] = s.Prefixes
	}
	for name, want := range map[string]string{
		"net4_broad":  "[10.0.0.0/8 127.0.0.1/32]",
		"wide4_broad": "[0.0.0.0/1 96.0.0.0/3]",
		"net6_broad":  "[2001:db8::/32]",
		"wide6_broad": "[::/1]",
	} {
		if got := fmt.Sprint(sets[name]); got != want {
			t.Errorf("set %s: %s, want %s", name, got, want)
		}
	}
	// Every address of a broad prefix is forwarded exactly when the
	// proxy's rule opens it.
	for _, c := range []struct {
		addr string
		open bool
	}{
		{"127.0.0.1", true}, {"127.0.0.2", false}, {"100.100.100.200", false}, {"100.63.0.1", true},
		{"0.1.2.3", false}, {"1.1.1.1", true}, {"10.1.1.1", true}, {"169.254.169.254", false}, {"128.0.0.1", false},
		{"2001:0:a9fe:a9fe::1", false}, {"2001:db8::1", true}, {"64:ff9b::a9fe:a9fe", false}, {"::1", false}, {"1000::1", true},
	} {
		a := netip.MustParseAddr(c.addr)
		if got := forwardedByBroad(rs, a); got != c.open {
			t.Errorf("%s: forwarded %v, want %v", c.addr, got, c.open)
		}
	}
}

// forwardedByBroad evaluates the rule "broad"'s accept rules on a.
func forwardedByBroad(rs *Ruleset, a netip.Addr) bool {
	in := func(name string) bool {
		for _, s := range rs.Sets {
			if s.Name == name {
				for _, p := range s.Prefixes {
					if p.Contains(a) {
						return true
					}
				}
			}
		}
		return false
	}
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			if r.Comment != "rule broad" || r.Verdict.Kind != Accept || (r.Family == IPv4) != a.Is4() {
				continue
			}
			if r.DstSet != "" && !in(r.DstSet) || r.DstNotSet != "" && in(r.DstNotSet) {
				continue
			}
			return true
		}
	}
	return false
}

// containsAll fails t for each of want that text does not hold.
func containsAll(t *testing.T, text string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("missing %q in\n%s", w, text)
		}
	}
}
