package audit

import (
	"testing"
	"time"

	"egressd/policy"
)

// TestFastPathCutMovesFlow: a connection the proxy's fast path allowed
// (close fast-path: the kernel forwards it from then on) that a reload's
// sweep cuts is reported denied by capture (the firewall's cut stamped
// on capture's record of the flow, close policy-revoked): it counts as
// dropped, enforced, not under its old rule, as a spliced connection the
// proxy itself decides again does. The proxy does not follow the
// connection past its decision, so its report is not the last word.
func TestFastPathCutMovesFlow(t *testing.T) {
	c, p := flowPair()
	p.DestPort, c.DestPort = 443, 443
	p.Name, p.NameSource, p.Verdict, p.Rule, p.Reason, p.Close, p.BytesOut = "docs.example", NameSNI, policy.Allow, "web", "allowed", "fast-path", 517
	c.Name, c.NameSource, c.Verdict, c.Reason, c.Enforced, c.Close, c.BytesOut, c.BytesIn = "docs.example", NameSNI, policy.Deny, "no-rule", true, "policy-revoked", 1709, 1336
	c.Time = p.Time.Add(18 * time.Millisecond)
	final := c
	final.BytesOut, final.BytesIn, final.Duration = 1910, 1619, 0.2
	r := reportOf(p, c, final)
	if rr := ruleOf(r, "web"); rr != nil && rr.Flows != 0 {
		t.Errorf("rule web %+v: the cut flow still counts as allowed", rr)
	}
	var d *DroppedReport
	for i := range r.Dropped {
		if r.Dropped[i].Dest == "docs.example" && r.Dropped[i].Port == 443 {
			d = &r.Dropped[i]
		}
	}
	if d == nil || d.Flows != 1 || !d.Enforced || d.BytesOut != 1910 || r.Totals.Flows != 1 {
		t.Errorf("dropped %+v, totals %+v: want the cut flow dropped once, enforced, with capture's last bytes", r.Dropped, r.Totals)
	}
}
