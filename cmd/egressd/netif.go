package main

import (
	"net"
	"net/netip"
	"os"
	"strings"
)

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
// first global IPv6 one), or the zero Addr.
func interfaceAddr(name string) netip.Addr {
	if name == "" {
		return netip.Addr{}
	}
	i, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}
	}
	addrs, _ := i.Addrs()
	var v6 netip.Addr
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		if p.Addr().Is4() {
			return p.Addr()
		}
		if !v6.IsValid() && p.Addr().IsGlobalUnicast() {
			v6 = p.Addr()
		}
	}
	return v6
}
