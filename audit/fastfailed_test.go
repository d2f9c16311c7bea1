package audit

import "testing"

// TestFastPathFailedWhy: --suggest says why a connection refused
// fast-path-failed (pending when the fast path's queue reader failed)
// gets no rule, as it does for shutdown, not the words for a reason it
// does not know.
func TestFastPathFailedWhy(t *testing.T) {
	if why := unsuggestedWhy("fast-path-failed"); why == unsuggestedWhy("no-such-reason") {
		t.Errorf("no word on why fast-path-failed gets no rule: %q", why)
	}
}
