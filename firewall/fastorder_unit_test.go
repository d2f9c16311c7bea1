package firewall

import (
	"testing"
	"time"

	"egressd/policy"
)

// TestFastForwardEstablishedEarly: in the fast path's forward chain the
// established rule (connections let out) comes right after the packet-mark
// rules and the drop of a new SYN on a fast-allowed 5-tuple, before the
// pending connection's rules, so a decided connection's packets are
// accepted at the 5th rule instead of after 28; and moving it there changes
// no verdict: every rule it now precedes needs the owned bits to be a value
// whose enforced bit is clear, which no packet it accepts has.
func TestFastForwardEstablishedEarly(t *testing.T) {
	for _, cfg := range []Config{
		func() Config { c := siteConfig; c.FastPath = true; return c }(),
		func() Config { c := siteConfig; c.FastPath, c.CTMarkBits = true, 0x0000ff00; return c }(),
	} {
		rs, err := render(cfg, sitePolicy(t).WithMode(policy.ModeEnforce), time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		if err != nil {
			t.Fatal(err)
		}
		l := layoutOf(cfg.CTMarkBits)
		var fwd []Rule
		for _, c := range rs.Chains {
			if c.Name == chainForward {
				fwd = c.Rules
			}
		}
		est := -1
		for i, r := range fwd {
			if r.CTState == CTEstablished|CTRelated && r.CTMark == l.enforced && r.Verdict.Kind == Accept {
				est = i
				break
			}
		}
		if est != 4 {
			t.Fatalf("bits 0x%08x: the established rule is rule %d of forward, want 4 (after the packet marks and the SYN drop)", cfg.CTMarkBits, est)
		}
		if r := fwd[3]; r.CTMarkEq != l.fastAllowed() || !r.SYN || r.Verdict.Kind != Drop {
			t.Errorf("bits 0x%08x: rule 3 is %q, want the drop of a new SYN on a fast-allowed 5-tuple", cfg.CTMarkBits, r.Comment)
		}
		queue := -1
		for i, r := range fwd[est+1:] {
			if r.Verdict.Kind == Queue {
				queue = est + 1 + i
				break
			}
			if r.CTMarkAnd != l.owned() || r.CTMarkEq&l.enforced != 0 {
				t.Errorf("bits 0x%08x: rule %d (%q) after the established rule could match a connection let out", cfg.CTMarkBits, est+1+i, r.Comment)
			}
		}
		if queue < 0 || fwd[queue].CTMarkAnd != l.owned() || fwd[queue].CTMarkEq != l.fastPendingCT() {
			t.Fatalf("bits 0x%08x: no queue rule for the pending connection's payload after the established rule", cfg.CTMarkBits)
		}
	}
}
