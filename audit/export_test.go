package audit

import (
	"context"
	"testing"
)

// SetWindowEventHook sets fn, for t, as windowEventHook: the tests of
// package audit_test (which serve reports through the admin server)
// watch a window's read of the event log with it.
func SetWindowEventHook(t testing.TB, fn func(ctx context.Context, events uint64)) {
	windowEventHook = fn
	t.Cleanup(func() { windowEventHook = nil })
}

// LoadPolicy is loadPolicy, for the tests of package audit_test.
var LoadPolicy = loadPolicy
