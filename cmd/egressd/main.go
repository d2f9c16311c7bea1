// Command egressd turns a Linux box into an egress gateway that lets out only
// what a policy allows. main stays thin: everything happens in run, which
// takes its arguments and writers so that tests can call it.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
