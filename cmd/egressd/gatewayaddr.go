package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"
)

// gatewayAddrUsage is audit's --gateway-addr help.
const gatewayAddrUsage = "the gateway's own addresses, each an `ADDR`, comma-separated or the flag repeated, such as 192.0.2.1,2001:db8::1 (egressd run reads them from its interfaces): flows to or from one are the gateway's own traffic, not egress, as live capture counts them"

// listFlag is a flag that may be repeated: each value is kept, and
// String gives them comma-joined, as one comma-separated value would be.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	*l = append(*l, s)
	return nil
}

// gatewayAddrFlag adds --gateway-addr to fs, into l.
func gatewayAddrFlag(fs *flag.FlagSet, l *listFlag) {
	fs.Var(l, "gateway-addr", gatewayAddrUsage)
}

// gatewayAddrs parses --gateway-addr: IP addresses (an IPv6 zone is
// dropped, an IPv4-mapped one unmapped), not prefixes. On an error it
// tells stderr, for the command cmd, and reports false: a usage error.
// Nil: none given.
func gatewayAddrs(cmd string, l listFlag, stderr io.Writer) ([]netip.Addr, bool) {
	var out []netip.Addr
	for _, f := range splitList(l.String()) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			why := err.Error()
			if strings.Contains(f, "/") {
				why = fmt.Sprintf("%q is a prefix: give the gateway's addresses, such as 192.0.2.1", f)
			}
			fmt.Fprintf(stderr, "egressd %s: --gateway-addr: %s\n", cmd, why)
			return nil, false
		}
		out = append(out, a.WithZone("").Unmap())
	}
	return out, true
}
