package main

import (
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	"egressd/audit"
)

// Following the gateway's addresses.
//
// The proxies' guard against dialling the gateway itself and capture's
// record of the gateway's own traffic need the gateway's addresses, and
// those change while egressd runs: a PPPoE or DHCP WAN reconnects with
// another address, an ISP rotates the delegated IPv6 prefix, an operator
// adds one. watchLinks wakes on netlink address notices too
// (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR) and every linkRecheck; the
// addrFollower check reads the addresses again and hands a changed list
// to the proxy and capture (Proxy.SetOwnAddrs, Capture.SetOwnAddrs), with
// one log line naming what changed. The explicit proxy's listeners on the
// LAN interfaces' addresses follow on the same wake-ups (followExplicit).

// addrFollower holds the gateway's addresses as last read and hands each
// changed list to its users.
type addrFollower struct {
	read  func() ([]netip.Addr, error)
	users []func([]netip.Addr)
	log   *slog.Logger

	last   []netip.Addr // sorted, unmapped, no duplicates; nil before the first read
	failed bool         // the last read failed (logged once)
}

// check reads the addresses and, when they are not those of the last
// read, hands them to the users. The first read is handed over without a
// log line (the users read theirs at start); a change is logged as
// "+ADDR" for each address gained and "-ADDR" for each lost. A failed
// read keeps the last list.
func (f *addrFollower) check() {
	addrs, err := f.read()
	if err != nil {
		if !f.failed {
			f.log.Warn("addresses: cannot list the gateway's own addresses: the proxies and capture keep the last list", audit.LogError, err.Error())
		}
		f.failed = true
		return
	}
	if f.failed {
		f.log.Info("addresses: the gateway's own addresses can be listed again")
		f.failed = false
	}
	addrs = normAddrs(addrs)
	if f.last != nil && slices.Equal(addrs, f.last) {
		return
	}
	first := f.last == nil
	change := addrChange(f.last, addrs)
	f.last = addrs
	for _, u := range f.users {
		u(slices.Clone(addrs))
	}
	if !first {
		f.log.Info("addresses: the gateway's own addresses changed", "change", change, "addresses", len(addrs))
	}
}

// normAddrs returns addrs unmapped, sorted, without duplicates (a new slice).
func normAddrs(addrs []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.Unmap())
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(out)
}

// addrChange says what changed from old to now (both sorted): "+ADDR" for
// each address gained, "-ADDR" for each lost, space-separated.
func addrChange(old, now []netip.Addr) string {
	var b []string
	for _, a := range now {
		if _, ok := slices.BinarySearchFunc(old, a, netip.Addr.Compare); !ok {
			b = append(b, "+"+a.String())
		}
	}
	for _, a := range old {
		if _, ok := slices.BinarySearchFunc(now, a, netip.Addr.Compare); !ok {
			b = append(b, "-"+a.String())
		}
	}
	return strings.Join(b, " ")
}

// explicitListenAddrs returns the explicit proxy's listen addresses when
// --explicit-proxy-listen is not given: port 3128 of each address of
// each LAN interface a client can use (addrs: explicitIfAddrs; a LAN
// interface that is the WAN's, or has none, has no listener), once each,
// or 127.0.0.1:3128 when none has one.
func explicitListenAddrs(lans []string, wan string, addrs func(string) []netip.Addr) []string {
	var out []string
	for _, lan := range lans {
		if lan == wan {
			continue
		}
		for _, a := range addrs(lan) {
			if ap := netip.AddrPortFrom(a, 3128).String(); a.IsValid() && !slices.Contains(out, ap) {
				out = append(out, ap)
			}
		}
	}
	if len(out) == 0 {
		return []string{"127.0.0.1:3128"}
	}
	return out
}

// explicitDownWhy is the reason /readyz gives for explicit listeners whose
// accept failed, closed until the proxy opens them again (down:
// Proxy.ExplicitDown, "ADDR: error" each).
func explicitDownWhy(down []error) string {
	msg := make([]string, len(down))
	for i, err := range down {
		msg[i] = err.Error()
	}
	return "accept failed, listener closed and opened again after a wait: " + strings.Join(msg, "; ")
}
