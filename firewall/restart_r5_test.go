package firewall

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"egressd/policy"
	"egressd/profiles"
)

// TestRestartUnchangedPolicyKeeps: a restart with the policy unchanged
// cuts nothing: every flow a rule of the running ruleset let out, to an
// address no longer in its learned sets (an NTP server resolved a day
// ago) and none of its CIDRs, is kept under the same tag when the start
// reads the marks as the previous policy's (Deps.Previous, the state
// directory's copy, compiled from the file alone: no --mode override, no
// --nat64-prefix) and the new ruleset is that file's with this run's
// flags. A false cut here is an outage at every upgrade. Policies: the
// seed profile (its file says audit; run with --mode enforce) and the
// test site's, each with and without a NAT64 prefix. No kernel.
func TestRestartUnchangedPolicyKeeps(t *testing.T) {
	seed, err := profiles.Get("nirovision")
	if err != nil {
		t.Fatal(err)
	}
	site := sitePolicy(t)
	nat64 := []netip.Prefix{netip.MustParsePrefix("64:ff9b::/96")}
	noLive := func(string, netip.Addr) bool { return false }
	for _, tc := range []struct {
		name string
		prev *policy.Engine
	}{
		{"seed", compile(t, string(seed))},
		{"site", site},
	} {
		for _, n64 := range [][]netip.Prefix{nil, nat64} {
			eng := tc.prev.WithMode(policy.ModeEnforce).WithNAT64(n64)
			f, err := New(siteConfig, Deps{Previous: tc.prev, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				t.Fatal(err)
			}
			if len(f.since) != 1 {
				t.Fatalf("%s: %d rulesets read from Previous, want 1", tc.name, len(f.since))
			}
			rs, err := Render(siteConfig, eng)
			if err != nil {
				t.Fatal(err)
			}
			if len(rs.flows) == 0 {
				t.Fatalf("%s: no rule with a tag", tc.name)
			}
			since := append(f.since, rs)
			for _, fr := range rs.flows {
				for _, dst := range []netip.Addr{netip.MustParseAddr("192.0.2.77"), netip.MustParseAddr("2001:db8:77::1")} {
					k := flowKey{client: netip.MustParseAddr("198.18.1.5"), dst: dst, port: fr.ports[0].Lo, proto: fr.ports[0].Proto}
					if keep, tag := rs.keeps(since, fr.tag, k, noLive); !keep || tag != fr.tag {
						t.Errorf("%s (NAT64 %v): rule %s's flow to %s: keeps = %v under tag %d, want true under %d", tc.name, n64, fr.name, dst, keep, tag, fr.tag)
					}
				}
			}
		}
	}
}
