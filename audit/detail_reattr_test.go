package audit

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestDetailBudgetLateTwinReattributed: as TestDetailBudgetLateTwin, but
// capture knew no name for the connections (an address it saw no DNS
// answer for) and the proxy's reports name them (SNI). Live, the proxy's
// report decides where a flow counts (reattributeLocked): under the name.
// The log read back must count the same.
func TestDetailBudgetLateTwinReattributed(t *testing.T) {
	deny := policy.Decision{Verdict: policy.Deny, Mode: policy.ModeAudit, Reason: "no-rule"}
	for _, rolls := range []int{0, 1, 2} {
		r := newTwinRig(t, twinFlows{name: "tracker.example", decision: &deny})
		want, reread := r.run(t, rolls)
		if want.Totals.Flows != twinConns || want.Totals.Duplicates != twinConns {
			t.Errorf("proxy's reports %d interval(s) late: live totals %+v, want %d flows and as many duplicates", rolls, want.Totals, twinConns)
		}
		if d := cmp.Diff(want, reread); d != "" {
			t.Errorf("proxy's reports %d interval(s) late: the report read back from the log differs (-live +read):\n%s", rolls, d)
		}
	}
}
