package testnet

import (
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestWaitAddr: an IPv6 address in duplicate address detection (about
// a second) is tentative, with no local route, and a bind to it fails;
// waitUsable says so after its timeout. WaitAddr returns once detection
// is done, and the bind works. An address never added times out.
func TestWaitAddr(t *testing.T) {
	a := New(t, "tnwa")
	b := New(t, "tnwb")
	Link(t, a, "eth0", []string{"198.18.100.1/24", "2001:db8:100::1/64"}, b, "eth0", []string{"198.18.100.2/24", "2001:db8:100::2/64"})
	// Link waited: usable at once.
	for _, s := range []string{"198.18.100.1", "2001:db8:100::1"} {
		if _, err := a.waitUsable(netip.MustParseAddr(s), 0, 0); err != nil {
			t.Errorf("after Link: %v", err)
		}
	}

	a.MustRun("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1")
	a.MustRun("ip", "-6", "addr", "add", "2001:db8:101::1/64", "dev", "eth0")
	addr := netip.MustParseAddr("2001:db8:101::1")
	_, err := a.waitUsable(addr, 0, 100*time.Millisecond)
	if !errors.Is(err, errTentative) {
		t.Fatalf("address in duplicate address detection: %v, want %v", err, errTentative)
	}
	if err := a.Do(func() error {
		ln, err := net.Listen("tcp", "[2001:db8:101::1]:0")
		if err == nil {
			ln.Close()
		}
		return err
	}); err == nil {
		t.Errorf("bind to the tentative address worked")
	}
	a.WaitAddr(t, "2001:db8:101::1/64")
	if err := a.Do(func() error {
		ln, err := net.Listen("tcp", "[2001:db8:101::1]:0")
		if err == nil {
			ln.Close()
		}
		return err
	}); err != nil {
		t.Errorf("bind after WaitAddr: %v", err)
	}

	for _, s := range []string{"2001:db8:102::1", "198.18.102.1"} {
		_, err = a.waitUsable(netip.MustParseAddr(s), 0, 100*time.Millisecond)
		if !errors.Is(err, errNoAddr) || !strings.Contains(err.Error(), s) {
			t.Errorf("an address never added: %v, want %v naming %s", err, errNoAddr, s)
		}
	}
	// AddAddr adds and waits.
	a.AddAddr(t, "eth0", "198.18.103.1/24", "2001:db8:103::1/64")
	for _, s := range []string{"198.18.103.1", "2001:db8:103::1"} {
		if _, err := a.waitUsable(netip.MustParseAddr(s), 0, 0); err != nil {
			t.Errorf("after AddAddr: %v", err)
		}
	}
}

// TestWaitAddrDADFailed: an address the peer holds fails duplicate
// address detection and is never usable.
func TestWaitAddrDADFailed(t *testing.T) {
	a := New(t, "tnda")
	b := New(t, "tndb")
	Link(t, a, "eth0", nil, b, "eth0", []string{"2001:db8:104::2/64"})
	a.MustRun("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1")
	a.MustRun("ip", "-6", "addr", "add", "2001:db8:104::2/64", "dev", "eth0")
	_, err := a.waitUsable(netip.MustParseAddr("2001:db8:104::2"), 0, 3*time.Second)
	if !errors.Is(err, errDADFailed) {
		t.Fatalf("duplicate address: %v, want %v", err, errDADFailed)
	}
}

// TestLinkLocal: the link-local address of a linked interface, not
// tentative, with the interface's index; none on an interface without
// carrier, which times out.
func TestLinkLocal(t *testing.T) {
	a := New(t, "tnla")
	b := New(t, "tnlb")
	Link(t, a, "eth0", nil, b, "eth0", nil)
	ll, zone := a.LinkLocal(t, "eth0")
	if !ll.IsLinkLocalUnicast() || ll.Zone() != "" || zone != a.IfIndex(t, "eth0") {
		t.Errorf("LinkLocal = %v, %q; want a link-local address without zone and eth0's index %s", ll, zone, a.IfIndex(t, "eth0"))
	}
	if out := a.MustRun("ip", "-6", "addr", "show", "dev", "eth0"); !strings.Contains(out, ll.String()+"/64") {
		t.Errorf("%s is not eth0's: %s", ll, out)
	}
	a.MustRun("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
	a.MustRun("ip", "link", "set", "v0", "up") // v1 down: no carrier, no link-local address yet
	n, _ := strconv.Atoi(a.IfIndex(t, "v0"))
	if _, err := a.waitUsable(netip.Addr{}, n, 200*time.Millisecond); !errors.Is(err, errNoAddr) {
		t.Errorf("v0 without carrier: %v, want %v", err, errNoAddr)
	}
}
