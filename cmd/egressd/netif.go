package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"egressd/firewall"
	"egressd/internal/netutil"
	"egressd/policy"
)

// parseLANs parses --lan: one interface, or a comma-separated list of
// them (VLANs kept apart, eth1.10,eth1.20), each one LAN; nil when none
// is given (the default). An empty item, a name given twice or one the
// kernel would refuse is an error.
func parseLANs(s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		switch {
		case f == "":
			return nil, fmt.Errorf("%q: an empty interface name (a comma too many)", s)
		case slices.Contains(out, f):
			return nil, fmt.Errorf("%q: %s is named twice", s, f)
		}
		out = append(out, f)
	}
	if err := (firewall.Config{LANs: out}).Validate(policy.ModeAudit); err != nil {
		return nil, fmt.Errorf("%q: %w", s, err)
	}
	return out, nil
}

// lansNameWAN refuses the WAN interface in a list of several LANs (how
// says where the WAN's name comes from). One LAN that is the WAN
// interface is the one-armed box (capture sees the box's own traffic):
// allowed, as before there were several.
func lansNameWAN(lans []string, wan, how string) error {
	if len(lans) > 1 && wan != "" && slices.Contains(lans, wan) {
		return fmt.Errorf("%s is the WAN interface%s: one of several LAN interfaces cannot be it (one interface for both is --lan %s alone)", wan, how, wan)
	}
	return nil
}

// defaultRouteInterface returns the interface of the IPv4 default route, or
// of the IPv6 one, or "" when there is none.
func defaultRouteInterface() string {
	if b, err := os.ReadFile("/proc/net/route"); err == nil {
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) > 2 && f[1] == "00000000" && f[7] == "00000000" {
				return f[0]
			}
		}
	}
	if b, err := os.ReadFile("/proc/net/ipv6_route"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) == 10 && f[0] == strings.Repeat("0", 32) && f[1] == "00" && f[9] != "lo" {
				return f[9]
			}
		}
	}
	return ""
}

// guessLAN picks the LAN interface when none is given: the only up,
// non-loopback interface other than the WAN one; else the WAN interface
// itself (a one-armed box: capture then sees the box's own traffic).
// Several LAN interfaces are never guessed: --lan names them.
func guessLAN(wan string) string {
	ifs, err := net.Interfaces()
	if err != nil {
		return wan
	}
	var cands []string
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback != 0 || i.Flags&net.FlagUp == 0 || i.Name == wan {
			continue
		}
		cands = append(cands, i.Name)
	}
	if len(cands) == 1 {
		return cands[0]
	}
	return wan
}

// interfaceAddr returns the first IPv4 address of an interface (else the
// first global IPv6 one), or the zero Addr. An IPv6 address still in
// duplicate address detection, or that failed it, is not one
// (netutil.InterfaceAddrs): nothing can listen on it.
func interfaceAddr(name string) netip.Addr {
	if name == "" {
		return netip.Addr{}
	}
	i, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}
	}
	addrs, _ := netutil.InterfaceAddrs(i.Index)
	var v6 netip.Addr
	for _, a := range addrs {
		if a.Is4() {
			return a
		}
		if !v6.IsValid() && a.IsGlobalUnicast() {
			v6 = a
		}
	}
	return v6
}
