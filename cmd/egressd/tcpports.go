package main

import (
	"flag"
	"fmt"
	"io"

	"egressd/policy"
)

// tcpPortsUsage is --tcp-ports' help.
const tcpPortsUsage = `TCP ports redirected to the proxy in enforce mode: "all" or a list such as 80,443,5228-5230 (the ports of host/path rules are always redirected)`

// tcpPortsFlag adds egressd run's --tcp-ports to fs, into s: run,
// firewall print and audit take it alike.
func tcpPortsFlag(fs *flag.FlagSet, s *string) {
	fs.StringVar(s, "tcp-ports", "all", tcpPortsUsage)
}

// tcpPortsList parses --tcp-ports as egressd run validates it
// (parseTCPPorts; nil: every port). On an error it tells stderr, for the
// command cmd, and reports false: a usage error.
func tcpPortsList(cmd, s string, stderr io.Writer) ([]policy.PortRange, bool) {
	ports, err := parseTCPPorts(s)
	if err != nil {
		fmt.Fprintf(stderr, "egressd %s: --tcp-ports: %v\n", cmd, err)
		return nil, false
	}
	return ports, true
}
