package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"

	"egressd/policy"
)

// nat64Flag adds egressd run's --nat64-prefix to fs, into s: run, audit,
// firewall print and policy explain take it alike.
func nat64Flag(fs *flag.FlagSet, s *string) {
	fs.StringVar(s, "nat64-prefix", "", nat64Usage)
}

// nat64Prefixes parses --nat64-prefix as egressd run validates it
// (policy.ParseNAT64). On an error it tells stderr, for the command cmd,
// and reports false: a usage error.
func nat64Prefixes(cmd, s string, stderr io.Writer) ([]netip.Prefix, bool) {
	nat, err := policy.ParseNAT64(s)
	if err != nil {
		fmt.Fprintf(stderr, "egressd %s: --nat64-prefix: %v\n", cmd, err)
		return nil, false
	}
	return nat, true
}
