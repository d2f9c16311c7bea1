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

// explicitIfAddrs returns the addresses of an interface a client can
// send its explicit proxy requests to: each IPv4 one and each global
// (ULA too) IPv6 one, IPv4 before IPv6, each in the kernel's order. A
// link-local address is left out (an IPv6 one needs its zone, which a
// client's HTTP_PROXY does not give), except an IPv4 one on an interface
// that has no other (a zeroconf LAN: its clients have nothing else to
// ask). An IPv6 address still in duplicate address detection, or that
// failed it, is not one (netutil.InterfaceAddrs): nothing can listen on
// it.
func explicitIfAddrs(name string) []netip.Addr {
	if name == "" {
		return nil
	}
	i, err := net.InterfaceByName(name)
	if err != nil {
		return nil
	}
	addrs, _ := netutil.InterfaceAddrs(i.Index)
	return explicitAddrsOf(addrs)
}

// explicitAddrsOf is explicitIfAddrs's choice among an interface's
// addresses.
func explicitAddrsOf(addrs []netip.Addr) []netip.Addr {
	var v4, v6, ll4 []netip.Addr
	for _, a := range addrs {
		switch {
		case a.Is4() && a.IsLinkLocalUnicast():
			ll4 = append(ll4, a)
		case a.Is4() && !a.IsLoopback() && !a.IsUnspecified():
			v4 = append(v4, a)
		case a.Is6() && a.IsGlobalUnicast():
			v6 = append(v6, a)
		}
	}
	if len(v4) == 0 && len(v6) == 0 && len(ll4) > 0 {
		return ll4[:1]
	}
	return append(v4, v6...)
}
