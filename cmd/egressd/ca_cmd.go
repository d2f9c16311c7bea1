package main

import (
	"context"
	"fmt"
	"io"

	"egressd/proxy"
)

func init() {
	commands["ca"] = command{"ca export [--state-dir DIR]",
		"print the inspection CA certificate (PEM) for clients to trust; generated on first use", cmdCA}
}

// cmdCA prints the certificate of the CA the proxy signs inspected
// connections with, creating the CA in the state directory when it does
// not exist yet (the same files the proxy loads).
func cmdCA(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("ca export", stderr)
	stateDir := fs.String("state-dir", defaultStateDir, "the daemon's state directory, where the CA lives")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 1 || pos[0] != "export" {
		fmt.Fprintln(stderr, "usage: egressd "+commands["ca"].usage)
		return exitUsage
	}
	_, certPEM, err := proxy.LoadOrCreateCA(*stateDir)
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	stdout.Write(certPEM)
	return exitOK
}
