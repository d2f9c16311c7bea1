package main

import (
	"bytes"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// TestAddrFollower: the check hands the gateway's addresses to its users
// at once, then only when they changed (an address gained, one lost), with
// one log line naming the change; a failed read keeps the last list and
// is logged once. No root: the addresses are the test's.
func TestAddrFollower(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	var logs bytes.Buffer
	var now []netip.Addr
	var readErr error
	var got [][]netip.Addr
	f := &addrFollower{
		read:  func() ([]netip.Addr, error) { return slices.Clone(now), readErr },
		users: []func([]netip.Addr){func(l []netip.Addr) { got = append(got, l) }},
		log:   slog.New(slog.NewTextHandler(&logs, nil)),
	}
	now = []netip.Addr{a("198.18.2.1"), a("127.0.0.1"), a("2001:db8:2::1")}
	f.check()
	if len(got) != 1 || len(got[0]) != 3 || logs.Len() != 0 {
		t.Fatalf("first read: handed %v, log %q; want the 3 addresses, no line", got, logs.String())
	}
	f.check()
	now = []netip.Addr{a("::ffff:198.18.2.1"), a("2001:db8:2::1"), a("127.0.0.1"), a("127.0.0.1")} // the same, otherwise written
	f.check()
	if len(got) != 1 {
		t.Errorf("unchanged: handed %d times, want once", len(got))
	}

	now = []netip.Addr{a("127.0.0.1"), a("198.18.2.77"), a("2001:db8:2::77"), a("2001:db8:2::1")}
	f.check()
	if len(got) != 2 || !slices.Contains(got[1], a("198.18.2.77")) || slices.Contains(got[1], a("198.18.2.1")) {
		t.Fatalf("after a reconnect: handed %v", got)
	}
	line := logs.String()
	for _, w := range []string{"own addresses changed", "+198.18.2.77", "+2001:db8:2::77", "-198.18.2.1"} {
		if !strings.Contains(line, w) {
			t.Errorf("log %q lacks %q", line, w)
		}
	}
	if strings.Count(line, "\n") != 1 || strings.Contains(line, "2001:db8:2::1 ") {
		t.Errorf("log %q: want one line naming only what changed", line)
	}

	logs.Reset()
	readErr = errors.New("netlink: no")
	f.check()
	f.check()
	if len(got) != 2 || strings.Count(logs.String(), "cannot list") != 1 {
		t.Errorf("failed reads: handed %d times, log %q; want nothing handed, one line", len(got), logs.String())
	}
	readErr = nil
	f.check()
	if len(got) != 2 || !strings.Contains(logs.String(), "listed again") {
		t.Errorf("read again, unchanged: handed %d times, log %q", len(got), logs.String())
	}
}

// TestExplicitListenAddrs: port 3128 of each address a LAN interface
// has, once each, none for the WAN interface or one without an address,
// and 127.0.0.1:3128 when no LAN interface has one.
func TestExplicitListenAddrs(t *testing.T) {
	p := netip.MustParseAddr
	addrs := map[string][]netip.Addr{"lan0": {p("198.18.1.1"), p("198.18.9.1"), p("2001:db8:1::1")}, "lan1": {p("2001:db8:5::1")},
		"lan2": {p("198.18.1.1")}, "wan0": {p("198.18.2.1")}}
	addr := func(n string) []netip.Addr { return addrs[n] }
	for _, c := range []struct {
		lans []string
		want string
	}{
		{[]string{"lan0", "lan1", "lan2", "gone"}, "198.18.1.1:3128 198.18.9.1:3128 [2001:db8:1::1]:3128 [2001:db8:5::1]:3128"},
		{[]string{"wan0"}, "127.0.0.1:3128"},
		{[]string{"gone"}, "127.0.0.1:3128"},
		{nil, "127.0.0.1:3128"},
	} {
		if got := strings.Join(explicitListenAddrs(c.lans, "wan0", addr), " "); got != c.want {
			t.Errorf("%v: %q, want %q", c.lans, got, c.want)
		}
	}
}

// TestExplicitAddrsOf: of an interface's addresses, each IPv4 one then
// each global or ULA IPv6 one, in the kernel's order; no link-local one,
// but for an IPv4 one where the interface has nothing else.
func TestExplicitAddrsOf(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"fe80::1 2001:db8:1::1 198.18.1.1 fd00:5::1 198.18.9.1", "198.18.1.1 198.18.9.1 2001:db8:1::1 fd00:5::1"},
		{"fe80::1 169.254.3.4 198.18.1.1", "198.18.1.1"},
		{"fe80::1 169.254.3.4 169.254.5.6", "169.254.3.4"},
		{"fe80::1", ""},
		{"169.254.3.4 fd00:5::1", "fd00:5::1"},
		{"", ""},
	} {
		var in []netip.Addr
		for _, f := range strings.Fields(c.in) {
			in = append(in, netip.MustParseAddr(f))
		}
		var got []string
		for _, a := range explicitAddrsOf(in) {
			got = append(got, a.String())
		}
		if strings.Join(got, " ") != c.want {
			t.Errorf("%s: %q, want %q", c.in, got, c.want)
		}
	}
}
