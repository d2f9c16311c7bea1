package firewall

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"egressd/policy"
)

// TestCheckCTMarkBits: the run of bits must be contiguous and hold the
// enforced bit and at least one tag bit; zero is the default.
func TestCheckCTMarkBits(t *testing.T) {
	for _, c := range []struct {
		bits uint32
		ok   bool
	}{
		{0, true}, {DefaultCTMarkBits, true}, {0x7f000000, true}, {0x00000003, true}, {0xc0000000, true}, {0xffffffff, true},
		{0x00500000, false}, {0x007ff001, false}, {0x80000000, false}, {0x00000001, false}, {0x00f00f00, false},
	} {
		err := CheckCTMarkBits(c.bits)
		if (err == nil) != c.ok {
			t.Errorf("0x%08x: %v, want ok %v", c.bits, err, c.ok)
		}
		if err != nil && !strings.HasPrefix(err.Error(), "firewall: conntrack mark bits ") {
			t.Errorf("0x%08x: error %q without its prefix", c.bits, err)
		}
		verr := Config{CTMarkBits: c.bits}.Validate(policy.ModeAudit)
		if (verr == nil) != c.ok {
			t.Errorf("0x%08x: Validate: %v, want ok %v", c.bits, verr, c.ok)
		}
	}
	for _, c := range []struct {
		bits                 uint32
		enforced, tag, count uint32
	}{
		{0, CTMarkEnforced, CTMarkTag, 1023},
		{DefaultCTMarkBits, CTMarkEnforced, CTMarkTag, 1023},
		{0x7f000000, 0x40000000, 0x3f000000, 63},
		{0x00000003, 0x00000002, 0x00000001, 1},
		{0xffffffff, 0x80000000, 0x7fffffff, 0x7fffffff},
	} {
		l := layoutOf(c.bits)
		if l.enforced != c.enforced || l.tag != c.tag || l.count != c.count || l.owned() != l.enforced|l.tag {
			t.Errorf("0x%08x: layout %+v, want enforced 0x%08x tag 0x%08x count %d", c.bits, l, c.enforced, c.tag, c.count)
		}
		if got := l.tagOf(l.marked(c.count) | 0x5a5a5a5a&^l.owned()); got != c.count {
			t.Errorf("0x%08x: the highest tag reads back as %d", c.bits, got)
		}
	}
}

// TestRenderCTMarkBits: the default run given explicitly renders the
// same table as none; another run moves every mark match and write, and
// only them.
func TestRenderCTMarkBits(t *testing.T) {
	eng := sitePolicy(t)
	def, err := Render(siteConfig, eng)
	if err != nil {
		t.Fatal(err)
	}
	cfg := siteConfig
	cfg.CTMarkBits = DefaultCTMarkBits
	explicit, err := Render(cfg, eng)
	if err != nil {
		t.Fatal(err)
	}
	if def.String() != explicit.String() {
		t.Error("the default bits given explicitly render another table")
	}
	cfg.CTMarkBits = 0x7f000000
	moved, err := Render(cfg, eng)
	if err != nil {
		t.Fatal(err)
	}
	text := moved.String()
	if strings.Contains(text, "0x004") || strings.Contains(text, "0xff80") {
		t.Errorf("the default bits are still in the table:\n%s", text)
	}
	if !strings.Contains(text, "ct mark & 0x40000000 == 0x40000000 accept") {
		t.Errorf("no established rule on the moved enforced bit:\n%s", text)
	}
	for _, fr := range moved.flows {
		if fr.tag == 0 || fr.tag > 63 {
			t.Errorf("rule %s: tag %d outside 1..63", fr.name, fr.tag)
		}
		v := 0x40000000 | fr.tag<<24
		want := fmt.Sprintf("ct mark set ct mark & 0x%08x | 0x%08x accept comment \"rule %s\"", 0x80ffffff|v, v, fr.name)
		if !strings.Contains(text, want) {
			t.Errorf("rule %s: no %q in\n%s", fr.name, want, text)
		}
	}
	// Same lines otherwise: only the mark values differ.
	strip := func(s string) string {
		var out []string
		for _, l := range strings.Split(s, "\n") {
			if i := strings.Index(l, "ct mark"); i >= 0 {
				l = l[:i]
			}
			out = append(out, l)
		}
		return strings.Join(out, "\n")
	}
	if strip(text) != strip(def.String()) {
		t.Error("moving the mark bits changed more than the mark values")
	}
}

// TestCheckTags: a run of bits with fewer tags than the policy's rules
// that forward is refused; rules that do not forward (TCP through the
// proxy, expired ones) need none.
func TestCheckTags(t *testing.T) {
	rules := func(n int) *policy.Engine {
		var b strings.Builder
		b.WriteString("version: 1\nmode: enforce\nrules:\n")
		for i := range n {
			fmt.Fprintf(&b, "  - {name: r%d, to: [198.51.100.%d], ports: [%d/udp]}\n", i, i, 1000+i)
		}
		b.WriteString("  - {name: web, to: [example.test], ports: [443/tcp]}\n")
		b.WriteString("  - {name: old, to: [198.51.100.200], ports: [9/udp], expires: 2020-01-01}\n")
		return compile(t, b.String())
	}
	cfg := siteConfig
	cfg.CTMarkBits = 0x00007000 // 3 tags
	if err := cfg.CheckTags(rules(3)); err != nil {
		t.Errorf("3 rules, 3 tags: %v", err)
	}
	err := cfg.CheckTags(rules(4))
	if err == nil || !strings.Contains(err.Error(), "hold 3 rule tags, and the policy has 4 rules") {
		t.Errorf("4 rules, 3 tags: %v", err)
	}
	cfg.TCPPorts = []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}} // web forwards 443 now
	if err := cfg.CheckTags(rules(3)); err == nil {
		t.Error("3 rules and web forwarding, 3 tags: no error")
	}
	if err := (Config{CTMarkBits: 0x00500000}).CheckTags(rules(1)); err == nil {
		t.Error("bits not contiguous: no error")
	}
	if err := siteConfig.CheckTags(rules(200)); err != nil {
		t.Errorf("default bits: %v", err)
	}
}

// TestNarrowTagsShared: with fewer tags than rules (Config.CheckTags),
// rules share tags, every tag in range, and a
// reload still cuts what it no longer allows and keeps what it does.
func TestNarrowTagsShared(t *testing.T) {
	cfg := siteConfig
	cfg.CTMarkBits = 0x00003000 // one tag
	render := func(rules string) *Ruleset {
		rs, err := Render(cfg, compile(t, "version: 1\nmode: enforce\nrules:\n"+rules))
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	const (
		a = "  - {name: a, to: [198.51.100.0/25], ports: [9/udp]}\n"
		b = "  - {name: b, to: [198.51.100.128/25], ports: [9/udp]}\n"
		c = "  - {name: c, to: [203.0.113.0/24], ports: [9/udp]}\n"
	)
	r1 := render(a + b + c)
	for _, fr := range r1.flows {
		if fr.tag != 1 {
			t.Fatalf("rule %s: tag %d, want the only one, 1", fr.name, fr.tag)
		}
	}
	noLive := func(string, netip.Addr) bool { return false }
	k := func(dst string) flowKey {
		return flowKey{client: netip.MustParseAddr("198.18.1.2"), dst: netip.MustParseAddr(dst), port: 9, proto: policy.UDP}
	}
	r2 := render(b + c) // a removed
	for _, x := range []struct {
		dst  string
		keep bool
	}{{"198.51.100.9", false}, {"198.51.100.200", true}, {"203.0.113.9", true}} {
		if keep, tag := r2.keeps([]*Ruleset{r1, r2}, r2.mark.marked(1), k(x.dst), noLive); keep != x.keep || (keep && tag != 1) {
			t.Errorf("a removed, flow to %s: keeps = %v under tag %d, want %v", x.dst, keep, tag, x.keep)
		}
	}
	// Nothing changed: kept without a look at the addresses.
	if again := render(a + b + c); !keepsOf(again, []*Ruleset{r1, again}, k("192.0.2.1"), noLive) {
		t.Error("unchanged rules sharing a tag: a flow of theirs cut")
	}
}

func keepsOf(rs *Ruleset, since []*Ruleset, k flowKey, live func(string, netip.Addr) bool) bool {
	keep, _ := rs.keeps(since, rs.mark.marked(1), k, live)
	return keep
}

// defaultMark is the conntrack mark of a connection let out under tag in
// the default layout.
func defaultMark(tag uint32) uint32 { return layoutOf(0).marked(tag) }
