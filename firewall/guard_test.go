package firewall

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"egressd/policy"
)

// TestEnforceAnyAddressKeepsGuardedRanges: a rule that opens every address
// (0.0.0.0/0 and ::/0, or "*") on a UDP port does not open the special
// ranges the proxy guards (THREATS.md F1, F2): cloud metadata, CGNAT
// (Alibaba metadata), Azure WireServer, and the NAT64, 6to4 and Teredo
// forms of such addresses. A CIDR rule that names the range opens it.
//
// No host has those addresses: the gateway routes them toward the server's
// link, and a counter on the gateway's way out says whether a datagram was
// forwarded. Each is forwarded in audit mode first, so a zero in enforce
// mode is the firewall's doing.
func TestEnforceAnyAddressKeepsGuardedRanges(t *testing.T) {
	testGuardedRangesKept(t, `["0.0.0.0/0", "::/0"]`)
}

// TestEnforceBroadCIDRKeepsGuardedRanges: so does a rule whose prefixes
// cover every address without a /0 (0.0.0.0/1 holds neither the metadata
// ranges nor the control address; 128.0.0.0/1 holds both), as the proxy
// keeps them closed for TCP: only a prefix inside a guarded range opens it.
func TestEnforceBroadCIDRKeepsGuardedRanges(t *testing.T) {
	testGuardedRangesKept(t, `["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]`)
}

func testGuardedRangesKept(t *testing.T, to string) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.3:9000", "[2001:db8:2::3]:9000")
	for _, r := range [][]string{
		{"ip", "route", "add", "169.254.0.0/16", "via", "198.18.2.2"},
		{"ip", "route", "add", "100.64.0.0/10", "via", "198.18.2.2"},
		{"ip", "route", "add", "168.63.129.16/32", "via", "198.18.2.2"},
		{"ip", "-6", "route", "add", "64:ff9b::/96", "via", "2001:db8:2::2"},
		{"ip", "-6", "route", "add", "2002::/16", "via", "2001:db8:2::2"},
		{"ip", "-6", "route", "add", "2001::/32", "via", "2001:db8:2::2"},
		{"ip", "-6", "route", "add", "fd00:ec2::254/128", "via", "2001:db8:2::2"},
	} {
		tp.gw.MustRun(r...)
	}
	guarded := []string{"169.254.169.254", "100.100.100.200", "168.63.129.16", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2001:0:a9fe:a9fe::1", "fd00:ec2::254"}
	named := "169.254.170.2" // a rule names 169.254.170.2/32 (ECS task metadata, say)
	var rules string
	for i, a := range append(guarded, named) {
		fam := "ip"
		if regexp.MustCompile(`:`).MatchString(a) {
			fam = "ip6"
		}
		rules += fmt.Sprintf("\t\t%s daddr %s udp dport 9000 counter comment \"c%d\"\n", fam, a, i)
	}
	tp.gw.MustRun("nft", "-f", writeTemp(t, "table inet h4count {\n\tchain out {\n\t\ttype filter hook postrouting priority 0; policy accept;\n"+rules+"\t}\n}\n"))
	counts := func() []int {
		out := tp.gw.MustRun("nft", "list", "table", "inet", "h4count")
		n := make([]int, len(guarded)+1)
		for _, m := range regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "c(\d+)"`).FindAllStringSubmatch(out, -1) {
			i, _ := strconv.Atoi(m[2])
			n[i], _ = strconv.Atoi(m[1])
		}
		return n
	}
	send := func() {
		for _, a := range append(guarded, named) {
			host := a
			if regexp.MustCompile(`:`).MatchString(a) {
				host = "[" + a + "]"
			}
			// No answer comes: only the counters tell.
			udpAsk(tp.client, host+":9000", 50*time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
	}
	pol := `
version: 1
mode: enforce
rules:
  - name: any-9000
    to: ` + to + `
    ports: [9000/udp]
  - name: ecs-metadata
    to: [169.254.170.2/32]
    ports: [9000/udp]
`
	eng := compile(t, pol)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(eng.WithMode(policy.ModeAudit)); err != nil {
		t.Fatal(err)
	}
	send()
	base := counts()
	for i, a := range append(guarded, named) {
		if base[i] == 0 {
			t.Fatalf("audit mode: a datagram to %s was not forwarded: the test would prove nothing", a)
		}
	}
	if err := fw.Replace(eng); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"198.18.2.3:9000", "[2001:db8:2::3]:9000"} {
		if got, err := udpAsk(tp.client, dst, 3*time.Second); err != nil {
			t.Errorf("control: %s under the any-address rule: %q %v", dst, got, err)
		}
	}
	send()
	now := counts()
	for i, a := range guarded {
		if now[i] != base[i] {
			t.Errorf("enforce: %d datagrams to %s forwarded under %s", now[i]-base[i], a, to)
		}
	}
	if now[len(guarded)] == base[len(guarded)] {
		t.Errorf("enforce: %s, named by a CIDR rule, not forwarded", named)
	}
}

// writeTemp writes s to a file in the test's temporary directory.
func writeTemp(t *testing.T, s string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
