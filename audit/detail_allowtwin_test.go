package audit

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudgetTwinAllowedByProxy: capture's reports of connections it
// judged denied (no name known) are held back; the proxy's reports of the
// same connections allow them (SNI matches a rule). Live the flows count
// as allowed; the log read back must count the same.
func TestDetailBudgetTwinAllowedByProxy(t *testing.T) {
	for _, rolls := range []int{0, 1, 2} {
		r := newTwinRig(t, twinFlows{name: "hub.docker.io"})
		if v := r.flow(0, SourceCapture); v.Verdict != policy.Deny {
			t.Fatalf("capture: %+v", v)
		}
		if v := r.flow(0, SourceProxy).Verdict; v != policy.Allow {
			t.Fatalf("proxy's report: %v, want allow", v)
		}
		want, reread := r.run(t, rolls)
		if rolls == 0 && want.Totals.Allowed != twinConns {
			t.Errorf("the proxy's reports in the interval of capture's: live totals %+v, want %d allowed", want.Totals, twinConns)
		}
		if d := cmp.Diff(want, reread); d != "" {
			t.Errorf("proxy's reports %d interval(s) late: the report read back from the log differs (-live +read):\n%s", rolls, d)
		}
	}
}
