package firewall

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"egressd/policy"
)

// TestFlowRuleTags: every rule with accept rules in forward gets a tag
// in CTMarkTag, distinct while there are fewer rules than tags, the same
// for the same rule in another ruleset, and another when its content
// changes.
func TestFlowRuleTags(t *testing.T) {
	var b strings.Builder
	b.WriteString("version: 1\nmode: enforce\nrules:\n")
	for i := range 1100 {
		fmt.Fprintf(&b, "  - {name: r%d, to: [198.51.100.%d], ports: [%d/udp]}\n", i, i%256, 1000+i)
	}
	rs, err := Render(siteConfig, compile(t, b.String()))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint32]bool{}
	for i, fr := range rs.flows {
		if fr.tag == 0 || fr.tag > CTMarkTag>>ctTagShift {
			t.Fatalf("rule %s: tag %d out of range", fr.name, fr.tag)
		}
		if i < int(tagCount) && seen[fr.tag] {
			t.Fatalf("rule %s (#%d): tag %d taken", fr.name, i, fr.tag)
		}
		seen[fr.tag] = true
	}
	one := func(src string) *flowRule {
		rs, err := Render(siteConfig, compile(t, "version: 1\nmode: enforce\nrules:\n"+src))
		if err != nil {
			t.Fatal(err)
		}
		return rs.flows[0]
	}
	a := one("  - {name: a, to: [ntp.test], ports: [123/udp], why: one}\n")
	if b := one("  - {name: a, to: [ntp.test], ports: [123/udp], why: two}\n"); b.fp != a.fp || b.tag != a.tag {
		t.Error("a rule's reason changed its fingerprint")
	}
	if b := one("  - {name: a, to: [ntp.test], ports: [123/udp, 124/udp]}\n"); b.fp == a.fp {
		t.Error("a port added kept the fingerprint")
	}
}

// TestKeeps: what a reload keeps, rule by rule, without the kernel.
func TestKeeps(t *testing.T) {
	render := func(rules string) *Ruleset { return renderEnforce(t, rules) }
	const (
		mac   = `  - {name: mac, from: ["aa:bb:cc:dd:ee:ff"], to: [198.51.100.0/24], ports: [9/udp]}` + "\n"
		named = `  - {name: named, to: [ntp.test], ports: [123/udp]}` + "\n"
		any   = `  - {name: any, to: ["*"], ports: [7/udp]}` + "\n"
	)
	old := render(mac + named + any)
	tag := func(rs *Ruleset, name string) uint32 {
		for _, fr := range rs.flows {
			if fr.name == name {
				return fr.tag
			}
		}
		t.Fatalf("no rule %s", name)
		return 0
	}
	noLive := func(string, netip.Addr) bool { return false }
	client := netip.MustParseAddr("198.18.1.2")
	k := func(dst string, port uint16) flowKey {
		return flowKey{client: client, dst: netip.MustParseAddr(dst), port: port, proto: policy.UDP}
	}
	for _, c := range []struct {
		name     string
		new      *Ruleset
		old      *Ruleset
		rule     string // the old rule that let it out; "" for tag 0
		key      flowKey
		live     bool
		wantKeep bool
	}{
		{"tag 0", render(named), old, "", k("203.0.113.1", 5), false, true},
		{"unchanged, learned address expired", render(named + any), old, "named", k("203.0.113.1", 123), false, true},
		{"removed, learned address expired", render(mac + any), old, "named", k("203.0.113.1", 123), false, false},
		{"changed names, address still learned", render(`  - {name: named, to: [time.test], ports: [123/udp]}` + "\n"), old, "named", k("203.0.113.1", 123), true, true},
		{"MAC client, rule widened", render(`  - {name: mac, from: ["aa:bb:cc:dd:ee:ff"], to: [198.51.100.0/24], ports: [9/udp, 10/udp]}` + "\n"), old, "mac", k("198.51.100.9", 9), false, true},
		{"MAC client, clients changed", render(`  - {name: mac, from: ["aa:bb:cc:dd:ee:01"], to: [198.51.100.0/24], ports: [9/udp]}` + "\n"), old, "mac", k("198.51.100.9", 9), false, false},
		{"CIDR shrunk", render(`  - {name: mac, from: ["aa:bb:cc:dd:ee:ff"], to: [198.51.100.0/25], ports: [9/udp, 10/udp]}` + "\n"), old, "mac", k("198.51.100.200", 9), false, false},
		{"any, changed", render(`  - {name: any, to: ["*"], ports: [7/udp, 8/udp]}` + "\n"), old, "any", k("203.0.113.5", 7), false, true},
		{"any, changed, guarded destination", render(`  - {name: any, to: ["*"], ports: [7/udp, 8/udp]}` + "\n"), old, "any", k("169.254.169.254", 7), false, false},
		{"restart, same rule", render(named), nil, "named", k("203.0.113.1", 123), false, true},
		{"restart, rule gone", render(any), nil, "named", k("203.0.113.1", 123), false, false},
	} {
		var tg uint32
		if c.rule != "" {
			tg = tag(old, c.rule)
		}
		live := noLive
		if c.live {
			live = func(string, netip.Addr) bool { return true }
		}
		since := []*Ruleset{c.new}
		if c.old != nil {
			since = []*Ruleset{c.old, c.new}
		}
		if got, _ := c.new.keeps(since, defaultMark(tg), c.key, live); got != c.wantKeep {
			t.Errorf("%s: keeps = %v, want %v", c.name, got, c.wantKeep)
		}
	}
}

// TestKeepsStaleTag: a connection kept by a reload because another rule
// admits it gets that rule's tag; a later reload that removes that rule
// too decides it again, even where a new rule has the tag of the rule
// that let it out (in the same reload or a later one), and even when the
// look after the reload in between was skipped.
func TestKeepsStaleTag(t *testing.T) {
	render := func(rules string) *Ruleset { return renderEnforce(t, rules) }
	const (
		x = `  - {name: x, to: [198.51.100.0/24], ports: [9/udp]}` + "\n"
		w = `  - {name: w, to: [198.51.100.0/25], ports: [9/udp]}` + "\n"
	)
	r1, r2 := render(x+w), render(w)
	tx, tw := r1.flows[0].tag, r2.flows[0].tag
	if tw == tx {
		t.Fatal("w took x's tag: pick other names")
	}
	// A rule y, unrelated to the connection, whose tag is x's, alone and
	// beside w.
	var y string
	for i := 0; y == ""; i++ {
		if i == 50000 {
			t.Fatal("no name gives x's tag")
		}
		r := fmt.Sprintf("  - {name: y%d, to: [203.0.113.0/24], ports: [5300/udp]}\n", i)
		if render(r).flows[0].tag == tx && render(w + r).flows[1].tag == tx {
			y = r
		}
	}
	r3, r2y := render(y), render(w+y)
	noLive := func(string, netip.Addr) bool { return false }
	k := flowKey{client: netip.MustParseAddr("198.18.1.2"), dst: netip.MustParseAddr("198.51.100.9"), port: 9, proto: policy.UDP}
	for _, mid := range []*Ruleset{r2, r2y} {
		keep, tag := mid.keeps([]*Ruleset{r1, mid}, defaultMark(tx), k, noLive)
		if !keep || tag != tw {
			t.Fatalf("x removed: w still admits the connection: keeps = %v under tag %d, want true under w's %d", keep, tag, tw)
		}
		if keep, _ := r3.keeps([]*Ruleset{mid, r3}, defaultMark(tag), k, noLive); keep {
			t.Error("w removed too: kept")
		}
		// Without the new tag (the look after mid skipped): what x's tag
		// meant before mid still counts.
		if keep, _ := r3.keeps([]*Ruleset{r1, mid, r3}, defaultMark(tx), k, noLive); keep {
			t.Error("w removed, mid's look skipped: kept because y has x's tag")
		}
	}
	// The rule unchanged under another tag in the new ruleset (another
	// rule took its tag first): kept under the new one.
	if keep, tag := r1.keeps([]*Ruleset{r2, r1}, defaultMark(tw), k, noLive); !keep || tag != r1.flows[1].tag {
		t.Errorf("w unchanged: keeps = %v under tag %d, want true under %d", keep, tag, r1.flows[1].tag)
	}
}

// renderEnforce renders an enforce policy of these rules lines.
func renderEnforce(t *testing.T, rules string) *Ruleset {
	t.Helper()
	rs, err := Render(siteConfig, compile(t, "version: 1\nmode: enforce\nrules:\n"+rules))
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// TestTagsStable: the tags of fixed rules, checked in. A restart into
// another egressd (an upgrade, a rollback) reads the marks the one before
// wrote with its tag function: a tag of the same rule must come out the
// same, or the new binary decides every flow again (and cuts those to
// answers that expired, an NTP flow resolved a day ago), and a rule's tag
// that another binary gives another rule keeps that rule's flows. If this
// fails, the fingerprint or the tag assignment changed: say so in the
// README's "Upgrading and rolling back", or keep the function.
func TestTagsStable(t *testing.T) {
	rs := renderEnforce(t, `  - {name: ntp, to: [time.google.com, "*.pool.ntp.org"], ports: [123/udp]}
  - {name: vpn, from: [198.18.1.0/24, "aa:bb:cc:dd:ee:ff"], to: [198.51.100.0/24, "2001:db8::/32"], ports: [1194/udp, 51820/udp]}
  - {name: any, to: ["*"], ports: [7/udp]}
  - {name: intake, to: [agent-intake.logs.datadoghq.com], ports: [10516/tcp]}
  - {name: docs, to: [notion.so/nirovision/*], ports: [443/tcp, 8443/udp]}
`)
	// intake has none: its TCP port goes to the proxy (siteConfig).
	want := map[string][2]uint64{
		"ntp":  {0xf2b7bc2aa42bee51, 0xb4},
		"vpn":  {0xdcbc093c649431c5, 0x153},
		"any":  {0x4fb106e7207997cf, 0xd2},
		"docs": {0x281d2bacac2243d9, 0x115},
	}
	got := map[string][2]uint64{}
	for _, fr := range rs.flows {
		got[fr.name] = [2]uint64{fr.fp, uint64(fr.tag)}
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("rule %s: fingerprint %#x tag %d, want %#x %d", name, got[name][0], got[name][1], w[0], w[1])
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d rules with tags, want %d", len(got), len(want))
	}
}
