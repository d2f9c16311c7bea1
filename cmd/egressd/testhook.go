//go:build !egressd_e2e

package main

import (
	"context"

	"egressd/internal/nfq"
)

// breakQueueHook is the e2e tests' way to fail the fast path's queue
// reader (testhook_e2e.go, built only with the tag egressd_e2e): in
// egressd's own build it does nothing and reads no environment.
func breakQueueHook(context.Context, *nfq.Conn) func() { return func() {} }
