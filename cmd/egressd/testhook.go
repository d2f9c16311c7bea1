//go:build !egressd_e2e

package main

import (
	"context"

	"egressd/internal/nfq"
	"egressd/proxy"
)

// breakQueueHook is the e2e tests' way to fail the fast path's queue
// reader (testhook_e2e.go, built only with the tag egressd_e2e): in
// egressd's own build it does nothing and reads no environment.
func breakQueueHook(context.Context, *nfq.Conn) func() { return func() {} }

// breakProxyConfigHook is the e2e tests' way to have proxy.New refuse
// its configuration at start (testhook_e2e.go): here it does nothing.
func breakProxyConfigHook(*proxy.Config) {}
