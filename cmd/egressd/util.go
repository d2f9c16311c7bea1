package main

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"egressd/policy"
)

type flagT = flag.Flag

// parsePortFlag parses "443/tcp" (a single port; "443" means 443/tcp) or
// "icmp" (ICMP echo, port 0).
func parsePortFlag(s string) (policy.PortRange, error) {
	if s == "icmp" {
		return policy.PortRange{Proto: policy.ICMP}, nil
	}
	num, proto, ok := strings.Cut(s, "/")
	pr := policy.TCP
	if ok {
		p, ok := policy.ParseProto(proto)
		if !ok {
			return policy.PortRange{}, fmt.Errorf("--port %q: protocol must be tcp or udp (or --port icmp, with no port, for ICMP echo)", s)
		}
		pr = p
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 1 || n > 65535 {
		return policy.PortRange{}, fmt.Errorf("--port %q: expected N/tcp or N/udp with N from 1 to 65535, or icmp", s)
	}
	return policy.PortRange{Lo: uint16(n), Hi: uint16(n), Proto: pr}, nil
}

func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, fmt.Errorf("%q is not an IP address", s)
	}
	return a.Unmap(), nil
}

func parseMAC(s string) (net.HardwareAddr, error) {
	m, err := net.ParseMAC(s)
	if err != nil || len(m) != 6 {
		return nil, fmt.Errorf("%q is not a MAC address", s)
	}
	return m, nil
}
