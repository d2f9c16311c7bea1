//go:build egressd_e2e

package main

import (
	"context"
	"os"
	"time"

	"egressd/internal/nfq"
	"egressd/proxy"
)

// breakProxyConfigHook, when EGRESSD_TEST_BREAK_PROXY_CONFIG is set,
// gives c a negative hello timeout, which proxy.New refuses: the start
// goes on without the proxy, after the fast path's queue was opened
// (e2e/TestFastPathProxyFails). No flag of egressd leads there since
// --inspect with --state-dir "" is a usage error. Only in a build with
// the tag egressd_e2e.
func breakProxyConfigHook(c *proxy.Config) {
	if os.Getenv("EGRESSD_TEST_BREAK_PROXY_CONFIG") != "" {
		c.HelloTimeout = -1
	}
}

// breakQueueHook, when EGRESSD_TEST_BREAK_FAST_QUEUE names a file,
// breaks q's reads (nfq.Conn.Break) once the file exists: the fast
// path's queue reader fails as on a read error of its socket. It returns
// a func that stops the watch. Only in a build with the tag egressd_e2e
// (the e2e tests' binary: e2e/main_test.go); egressd's own build has
// testhook.go's, which reads no environment.
func breakQueueHook(ctx context.Context, q *nfq.Conn) func() {
	path := os.Getenv("EGRESSD_TEST_BREAK_FAST_QUEUE")
	if path == "" {
		return func() {}
	}
	ctx, stop := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if _, err := os.Stat(path); err == nil {
					q.Break()
					return
				}
			}
		}
	}()
	return stop
}
