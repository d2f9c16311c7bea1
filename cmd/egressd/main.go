// Command egressd turns a Linux box into an egress gateway that lets out only
// what a policy allows. main stays thin: everything happens in run, which
// takes its arguments and writers so that tests can call it.
package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"egressd/audit"
	"egressd/internal/sysmon"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] == "run" {
		// The daemon runs with Go's sysmon kept out of deep sleep
		// (package sysmon says why); this returns only if it did not
		// execute the binary again.
		if err := sysmon.Reexec(); err != nil {
			slog.Warn("egressd: sysmon left as it is", audit.LogError, err.Error())
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
