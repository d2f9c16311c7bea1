package firewall

import (
	"fmt"
	"testing"
)

// TestRestartCTMarkBitsOverlap: --ct-mark-bits 0x00fff000, then the
// default 0x007ff000, which overlaps it: the old enforced bit is above the
// new run, and a's old tag (bit 10 set, the low ten named's new tag) reads
// at the new bits as enforced and tagged as named. Read at the new bits
// alone, a's flow (a rule removed) would be kept as named's; read also at
// the old bits (Deps.PreviousCTMarkBits), the tag means a there and named
// here, and a's flow is decided again and cut. named's own flow (its
// learned address no longer known) is kept and marked again at the new
// bits, and passes.
func TestRestartCTMarkBitsOverlap(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000")
	const oldBits = 0x00fff000
	const named = "  - {name: named, to: [ntp.test], ports: [9000/udp]}\n"
	fw := tp.firewall(t, Config{CTMarkBits: oldBits})
	oldCfg, newCfg := fw.cfg, fw.cfg
	newCfg.CTMarkBits = 0
	now, err := Render(newCfg, enforceRules(t, named))
	if err != nil {
		t.Fatal(err)
	}
	a := tagTwin(t, oldCfg, named, 0x400|now.flows[0].tag, func(i int) string {
		return fmt.Sprintf("  - {name: a%d, to: [198.18.2.2/32], ports: [9000/udp]}\n", i)
	})
	before := enforceRules(t, named, a)
	if rs, err := Render(oldCfg, before); err != nil {
		t.Fatal(err)
	} else if m := rs.mark.marked(rs.flows[1].tag); m&CTMarkEnforced == 0 || m&CTMarkTag>>ctTagShift != now.flows[0].tag {
		t.Fatalf("a's old mark %#x does not read as named's at the default bits", m)
	}
	restartAtDefaultBits(t, tp, fw, before, enforceRules(t, named), oldBits, "overlapping")
}
