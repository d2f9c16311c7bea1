package testnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// addrWait is how long WaitAddr, AddAddr and LinkLocal wait for an
// address to become usable.
const addrWait = 10 * time.Second

// WaitAddr waits until every address of addrs ("2001:db8:1::3" or, as
// given to ip, "2001:db8:1::3/64") is usable in the namespace: held by
// an interface, neither tentative nor failed in duplicate address
// detection, and with its local route in the local table. ip addr add
// returns before an IPv6 address is usable, nodad or not: addrconf's
// work clears the tentative flag and adds the local route later, later
// still under load or while the link has no carrier (the peer of a veth
// not up yet). Until then a bind to it fails (EADDRNOTAVAIL) and a
// packet to it is dropped before any socket sees it (Ip6InAddrErrors).
// It fails t after a timeout, saying what was missing.
func (ns *NS) WaitAddr(t testing.TB, addrs ...string) {
	t.Helper()
	for _, s := range addrs {
		a, err := parseAddr(s)
		if err != nil {
			t.Fatalf("testnet: %s: %v", ns.Name, err)
		}
		if _, err := ns.waitUsable(a, 0, addrWait); err != nil {
			t.Fatal(err)
		}
	}
}

// AddAddr adds the addresses cidrs (CIDR notation, IPv4 or IPv6) to dev
// in the namespace, IPv6 ones without duplicate address detection
// (nodad), and waits until they are usable (WaitAddr).
func (ns *NS) AddAddr(t testing.TB, dev string, cidrs ...string) {
	t.Helper()
	for _, c := range cidrs {
		if strings.Contains(c, ":") {
			ns.MustRun("ip", "-6", "addr", "add", c, "dev", dev, "nodad")
		} else {
			ns.MustRun("ip", "addr", "add", c, "dev", dev)
		}
	}
	ns.WaitAddr(t, cidrs...)
}

// LinkLocal returns the IPv6 link-local address of dev in the namespace
// once it is usable (as WaitAddr: not tentative, its local route on
// dev), and dev's index as a zone ("3"; IfIndex). The kernel makes the
// address when dev has a carrier, after the peer of a veth is up, and
// it is tentative through duplicate address detection unless that is
// off. It fails t after a timeout.
func (ns *NS) LinkLocal(t testing.TB, dev string) (netip.Addr, string) {
	t.Helper()
	zone := ns.IfIndex(t, dev)
	idx, _ := strconv.Atoi(zone)
	a, err := ns.waitUsable(netip.Addr{}, idx, addrWait)
	if err != nil {
		t.Fatal(err)
	}
	return a, zone
}

// parseAddr parses an address, or the address of a CIDR ("a/64").
func parseAddr(s string) (netip.Addr, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Addr(), err
	}
	return netip.ParseAddr(s)
}

// waitUsable polls, every 10 ms up to timeout, until addr is usable in
// ns (usable); an invalid addr asks for a link-local address of the
// interface with index ifindex, which it returns. ifindex 0 is any
// interface.
func (ns *NS) waitUsable(addr netip.Addr, ifindex int, timeout time.Duration) (netip.Addr, error) {
	what := addr.String()
	if !addr.IsValid() {
		what = "a link-local address of interface " + strconv.Itoa(ifindex)
	}
	deadline := time.Now().Add(timeout)
	for {
		var got netip.Addr
		var why error
		if err := ns.Do(func() (err error) { got, why, err = usable(addr, ifindex); return err }); err != nil {
			return netip.Addr{}, fmt.Errorf("testnet: %s: %s: %w", ns.Name, what, err)
		}
		if why == nil {
			return got, nil
		}
		if time.Now().After(deadline) {
			return netip.Addr{}, fmt.Errorf("testnet: %s: %s not usable after %s: %w", ns.Name, what, timeout, why)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// errNoAddr and the others say why an address is not usable yet.
var (
	errNoAddr     = errors.New("no such address")
	errTentative  = errors.New("tentative (duplicate address detection not done)")
	errDADFailed  = errors.New("duplicate address detection failed")
	errNoLocalRte = errors.New("no local route")
)

// usable reads, with netlink on the calling thread (in the namespace:
// run it with Do), whether addr is usable: an address of the interface
// ifindex (any for 0) without IFA_F_TENTATIVE or IFA_F_DADFAILED, with
// a route of type local to it in the local table (out of ifindex, if
// given). For an invalid addr it looks for such a link-local address
// on ifindex and returns it. why is nil when usable; err is for netlink
// failing.
func usable(addr netip.Addr, ifindex int) (got netip.Addr, why, err error) {
	family := syscall.AF_INET6
	if addr.Is4() {
		family = syscall.AF_INET
	}
	addrs, err := dumpAddrs(family)
	if err != nil {
		return netip.Addr{}, nil, err
	}
	locals, err := dumpLocalRoutes(family)
	if err != nil {
		return netip.Addr{}, nil, err
	}
	why = errNoAddr
	for _, a := range addrs {
		if ifindex != 0 && a.index != ifindex {
			continue
		}
		if addr.IsValid() && a.addr != addr || !addr.IsValid() && !a.addr.IsLinkLocalUnicast() {
			continue
		}
		switch {
		case a.flags&unix.IFA_F_DADFAILED != 0:
			why = errDADFailed
		case a.flags&unix.IFA_F_TENTATIVE != 0:
			why = errTentative
		case !hasLocalRoute(locals[a.addr], a.addr, a.index):
			why = errNoLocalRte
		default:
			return a.addr, nil, nil
		}
	}
	return netip.Addr{}, why, nil
}

// hasLocalRoute says whether oifs, the interfaces of the local routes to
// addr, have the one for addr on index: a link-local address may be on
// several interfaces, each with its own route; another address has one
// route, whichever interface the address is on.
func hasLocalRoute(oifs []int, addr netip.Addr, index int) bool {
	for _, o := range oifs {
		if o == index || !addr.IsLinkLocalUnicast() {
			return true
		}
	}
	return false
}

// ifAddr is an address of an interface, with its flags.
type ifAddr struct {
	addr  netip.Addr
	index int
	flags uint32
}

// dumpAddrs lists the addresses of family (RTM_GETADDR dump), flags and
// all. It reads them as internal/netutil's ifaceAddrs does, which leaves
// the flagged ones out; testnet cannot import netutil, whose tests
// import testnet.
func dumpAddrs(family int) ([]ifAddr, error) {
	msgs, err := dump(syscall.RTM_GETADDR, family)
	if err != nil {
		return nil, err
	}
	var out []ifAddr
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWADDR || len(m.Data) < unix.SizeofIfAddrmsg || int(m.Data[0]) != family {
			continue
		}
		// struct ifaddrmsg: family, prefixlen, flags, scope (a byte
		// each), index (u32).
		a := ifAddr{index: int(binary.NativeEndian.Uint32(m.Data[4:8])), flags: uint32(m.Data[2])}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, fmt.Errorf("addresses: %w", err)
		}
		var address, local []byte
		for _, at := range attrs {
			switch at.Attr.Type {
			case unix.IFA_ADDRESS:
				address = at.Value
			case unix.IFA_LOCAL:
				local = at.Value
			case unix.IFA_FLAGS: // all the flags; the header has the low 8
				if len(at.Value) >= 4 {
					a.flags = binary.NativeEndian.Uint32(at.Value)
				}
			}
		}
		if local != nil {
			address = local // IFA_ADDRESS is the peer's on a point-to-point link
		}
		var ok bool
		if a.addr, ok = netip.AddrFromSlice(address); ok {
			out = append(out, a)
		}
	}
	return out, nil
}

// dumpLocalRoutes returns the routes of type local in the local table
// of family (RTM_GETROUTE dump): the interfaces of each address's.
func dumpLocalRoutes(family int) (map[netip.Addr][]int, error) {
	msgs, err := dump(syscall.RTM_GETROUTE, family)
	if err != nil {
		return nil, err
	}
	out := map[netip.Addr][]int{}
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWROUTE || len(m.Data) < unix.SizeofRtMsg || int(m.Data[0]) != family {
			continue
		}
		// struct rtmsg: family, dst_len, src_len, tos, table,
		// protocol, scope, type (a byte each), flags (u32).
		dstLen, table, typ := int(m.Data[1]), uint32(m.Data[4]), m.Data[7]
		if typ != unix.RTN_LOCAL {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, fmt.Errorf("routes: %w", err)
		}
		var dst netip.Addr
		oif := 0
		for _, at := range attrs {
			switch at.Attr.Type {
			case unix.RTA_TABLE: // the table's full number; the header has the low 8 bits
				if len(at.Value) >= 4 {
					table = binary.NativeEndian.Uint32(at.Value)
				}
			case unix.RTA_DST:
				dst, _ = netip.AddrFromSlice(at.Value)
			case unix.RTA_OIF:
				if len(at.Value) >= 4 {
					oif = int(binary.NativeEndian.Uint32(at.Value))
				}
			}
		}
		if table == unix.RT_TABLE_LOCAL && dst.IsValid() && dstLen == dst.BitLen() {
			out[dst] = append(out[dst], oif)
		}
	}
	return out, nil
}

// dump sends a netlink dump request of typ for family on a NETLINK_ROUTE
// socket of the calling thread's namespace and returns the answers.
func dump(typ, family int) ([]syscall.NetlinkMessage, error) {
	b, err := syscall.NetlinkRIB(typ, family)
	if err != nil {
		return nil, fmt.Errorf("netlink dump %d: %w", typ, err)
	}
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return nil, fmt.Errorf("netlink dump %d: %w", typ, err)
	}
	return msgs, nil
}
