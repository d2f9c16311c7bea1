package main

import (
	"context"
	"net"
	"net/netip"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestRunProxyListenFails: `egressd run` says what the proxy actually
// listens on, not what it was asked to: a listener whose port is taken is
// a part not running (for the summary and /readyz), and no "proxy: ...
// on" line names it as listening.
func TestRunProxyListenFails(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	busy := taken.Addr().String()
	for _, c := range []struct{ name, transparent, explicit string }{
		{"transparent", busy, "127.0.0.1:0"},
		{"explicit", "127.0.0.1:0", busy},
		{"both free", "127.0.0.1:0", "127.0.0.1:0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			var out, errb lockedBuffer
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan int, 1)
			go func() {
				done <- cmdRun(ctx, []string{"--mode", "audit", "--lan", "lo", "--wan", "lo", "--no-firewall",
					"--dns-listen", "127.0.0.1:0", "--proxy-listen", c.transparent, "--explicit-proxy-listen", c.explicit,
					"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, &out, &errb)
			}()
			defer func() {
				cancel()
				select {
				case <-done:
				case <-time.After(20 * time.Second):
					t.Fatalf("egressd run did not stop within 20s\n%s", errb.String())
				}
			}()
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "admin: http://"); {
				if time.Now().After(deadline) {
					t.Fatalf("egressd run did not start in 10s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			got := out.String()
			if c.name == "both free" {
				if !regexp.MustCompile(`(?m)^proxy: transparent on 127\.0\.0\.1:[1-9]\d*, explicit on 127\.0\.0\.1:[1-9]\d*$`).MatchString(got) || strings.Contains(got, "NOT RUNNING: proxy") {
					t.Errorf("want the bound addresses and no failure:\n%s", got)
				}
				return
			}
			if strings.Contains(got, " on "+busy) {
				t.Errorf("the taken address %s is named as listening:\n%s", busy, got)
			}
			if c.name == "explicit" {
				// The transparent proxy, which enforce mode's redirect
				// needs, goes on without the explicit one.
				if !regexp.MustCompile(`(?m)^proxy: transparent on 127\.0\.0\.1:[1-9]\d*, explicit not listening$`).MatchString(got) ||
					!strings.Contains(got, "NOT RUNNING: explicit-proxy: proxy: explicit listener") || !strings.Contains(got, "address already in use") ||
					strings.Contains(got, "NOT RUNNING: proxy:") {
					t.Errorf("want the transparent proxy listening and the explicit one not running:\n%s", got)
				}
				return
			}
			if !strings.Contains(got, "NOT RUNNING: proxy: proxy: "+c.name+" listener") || !strings.Contains(got, "address already in use") {
				t.Errorf("no proxy failure in the summary:\n%s", got)
			}
			if !strings.Contains(got, "proxy: not listening") {
				t.Errorf("no proxy line saying nothing listens:\n%s", got)
			}
		})
	}
}

// TestRunAuditWANExposure: in audit mode nothing is installed, so the DNS
// forwarder (which never denies there) and the proxies answer clients on
// the WAN side too, an open resolver. `egressd run` says so once at start,
// on its output and in its log, and names --guard-wan; not when the
// forwarder listens only on addresses the WAN interface does not have.
func TestRunAuditWANExposure(t *testing.T) {
	const warn = "answer clients on the WAN side"
	for _, c := range []struct {
		name string
		args []string
		want bool
	}{
		// 127.0.0.1 is an address of the WAN interface (lo) here; the LAN
		// is an interface that does not exist (capture does not run), so
		// that the two differ.
		{"wan-address", []string{"--lan", "egrtest0", "--wan", "lo", "--dns-listen", "127.0.0.1:0"}, true},
		// Every case runs with --no-firewall, where --guard-wan installs
		// nothing: the forwarder is still exposed.
		{"guard-wan-no-firewall", []string{"--lan", "egrtest0", "--wan", "lo", "--dns-listen", "127.0.0.1:0", "--guard-wan"}, true},
		// One interface for LAN and WAN: no WAN side apart from the LAN,
		// and --guard-wan would cut the LAN off.
		{"lan-is-wan", []string{"--wan", "lo", "--dns-listen", "127.0.0.1:0"}, false},
		// The interface of the default route, which 127.0.0.1 is not on.
		{"address-not-on-wan", []string{"--wan", "", "--dns-listen", "127.0.0.1:0"}, false},
		// Every address, the WAN interface's too: the socket filters
		// drop what arrives on it.
		{"filtered", []string{"--wan", "", "--dns-listen", "[::]:0"}, false},
		{"enforce", []string{"--lan", "egrtest0", "--wan", "lo", "--dns-listen", "127.0.0.1:0", "--mode", "enforce"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			var out, errb lockedBuffer
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan int, 1)
			args := append([]string{"--mode", "audit", "--lan", "lo", "--no-firewall", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
				"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, c.args...)
			go func() { done <- cmdRun(ctx, args, &out, &errb) }()
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "admin: http://"); {
				if time.Now().After(deadline) {
					cancel()
					<-done
					t.Fatalf("egressd run did not start in 10s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			cancel()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("egressd run did not stop within 20s\n%s", errb.String())
			}
			got, log := out.String(), errb.String()
			if n := strings.Count(got, warn); n != map[bool]int{true: 1, false: 0}[c.want] {
				t.Errorf("%d warnings on the output, want it %v:\n%s", n, c.want, got)
			}
			if c.want && (!strings.Contains(got, "--guard-wan") || !strings.Contains(log, warn) || strings.Count(log, warn) != 1) {
				t.Errorf("the warning does not name --guard-wan or is not logged once:\nstdout:\n%s\nstderr:\n%s", got, log)
			}
		})
	}
}

// TestAuditWANExposureWANOpen: --wan-open listing the forwarder's port
// opens it to the WAN side, filtered or guarded: egressd says so, in
// audit mode (every name answered) and in enforce mode (what the policy
// allows).
func TestAuditWANExposureWANOpen(t *testing.T) {
	wanAddrs := []netip.Addr{netip.MustParseAddr("198.51.100.2")}
	for _, c := range []struct {
		open, listen string
		want         string // "": no warning
	}{
		{"53/udp", ":53", "--wan-open 53/udp "},
		{"53/tcp,53/udp", "[::]:53", "--wan-open 53/udp,53/tcp "},
		{"50-60/tcp", ":53", "--wan-open 53/tcp "},
		{"22/tcp,53/udp", "198.51.100.2:53", "--wan-open 53/udp "},
		{"22/tcp", ":53", ""},
		{"5353/udp", ":53", ""},
		{"53/udp", "192.168.50.1:53", "--wan-open 53/udp "}, // a WAN neighbour can route to the LAN address
		{"53/udp", "127.0.0.1:53", ""},
	} {
		open, err := parsePortProtos(c.open)
		if err != nil {
			t.Fatal(err)
		}
		for _, fg := range [][2]bool{{true, false}, {false, true}, {true, true}} {
			got := auditWANExposure([]string{"lan0"}, "wan0", fg[1], fg[0], splitList(c.listen), open, wanAddrs)
			if c.want == "" && got != "" || c.want != "" && (!strings.Contains(got, c.want) || !strings.Contains(got, "open resolver")) {
				t.Errorf("--wan-open %s --dns-listen %s filtered %v guarded %v: %q, want %q", c.open, c.listen, fg[0], fg[1], got, c.want)
			}
		}
		// In enforce mode the forwarder answers what the policy allows.
		got := enforceWANExposure([]string{"lan0"}, "wan0", splitList(c.listen), open, wanAddrs)
		if c.want == "" && got != "" || c.want != "" && (!strings.Contains(got, "enforce mode: "+c.want) || !strings.Contains(got, "every name the policy allows")) {
			t.Errorf("enforce: --wan-open %s --dns-listen %s: %q, want %q", c.open, c.listen, got, c.want)
		}
		if got := enforceWANExposure([]string{"wan0"}, "wan0", splitList(c.listen), open, wanAddrs); got != "" {
			t.Errorf("enforce, one interface: --wan-open %s --dns-listen %s: %q", c.open, c.listen, got)
		}
	}
}

// TestWANDropFor: which listeners drop what arrives on the WAN interface.
func TestWANDropFor(t *testing.T) {
	for _, c := range []struct {
		lan, wan, open, dns, transparent, explicit string
		want                                       wanDrop
	}{
		{"lan0", "wan0", "", ":53", "[::]:15001", "198.18.1.1:3128", wanDrop{dnsUDP: true, dnsTCP: true, transparent: true, explicit: true}},
		{"lan0", "wan0", "", ":53", "[::]:15001", "", wanDrop{dnsUDP: true, dnsTCP: true, transparent: true}},
		{"lan0", "wan0", "53/udp,22/tcp", ":53", "[::]:15001", "198.18.1.1:3128", wanDrop{dnsTCP: true, transparent: true, explicit: true, open: []string{"53/udp"}}},
		{"lan0", "wan0", "53/udp,53/tcp,3128/tcp", ":53,[::1]:53", "[::]:15001", "[::]:3128", wanDrop{transparent: true, open: []string{"53/udp", "53/tcp", "3128/tcp"}}},
		{"lan0", "wan0", "15000-15002/tcp", "127.0.0.1:5353,:53", "[::]:15001", "", wanDrop{dnsUDP: true, dnsTCP: true, open: []string{"15001/tcp"}}},
		{"lan0", "wan0", "5353/udp", "127.0.0.1:5353,:53", "", "", wanDrop{dnsTCP: true, open: []string{"5353/udp"}}},
		{"eth0", "eth0", "", ":53", "[::]:15001", "", wanDrop{}}, // one interface: no WAN side
		{"lan0.10,lan0.20", "wan0", "", ":53", "[::]:15001", "198.18.10.1:3128", wanDrop{dnsUDP: true, dnsTCP: true, transparent: true, explicit: true}},
		{"lan0", "", "", ":53", "[::]:15001", "", wanDrop{}},
	} {
		open, err := parsePortProtos(c.open)
		if err != nil {
			t.Fatal(err)
		}
		got := wanDropFor(splitList(c.lan), c.wan, open, splitList(c.dns), c.transparent, c.explicit)
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("lan %s wan %s --wan-open %q dns %s proxies %q %q: %+v, want %+v", c.lan, c.wan, c.open, c.dns, c.transparent, c.explicit, got, c.want)
		}
	}
}

// TestAuditWANExposure: which DNS listen addresses WAN-side clients reach.
func TestAuditWANExposure(t *testing.T) {
	wanAddrs := []netip.Addr{netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("2001:db8::2")}
	for _, c := range []struct {
		wan     string
		guarded bool
		listen  string
		want    bool
	}{
		{"wan0", false, ":53", true},
		{"wan0", false, "[::]:53", true},
		{"wan0", false, "0.0.0.0:53", true},
		{"wan0", false, "gateway.lan:53", true}, // a name: may be any address
		{"wan0", false, "198.51.100.2:53", true},
		{"wan0", false, "[::ffff:198.51.100.2]:53", true},
		{"wan0", false, "[2001:db8::2]:53", true},
		{"wan0", false, "192.168.50.1:53,[fd00::1]:53", false},
		{"wan0", false, "192.168.50.1:53,:53", true},
		{"wan0", false, "127.0.0.1:53", false},
		{"wan0", true, ":53", false},
		{"", false, ":53", false},
		{"lan0", false, ":53", false}, // one interface for LAN and WAN: no other side
	} {
		got := auditWANExposure([]string{"lan0"}, c.wan, c.guarded, false, splitList(c.listen), nil, wanAddrs)
		if (got != "") != c.want || c.want && !strings.Contains(got, "--guard-wan") {
			t.Errorf("wan %q guarded %v listen %q: %q", c.wan, c.guarded, c.listen, got)
		}
		// With the socket filters on the WAN interface (any interface
		// but loopback), the forwarder answers no one there.
		if got := auditWANExposure([]string{"lan0"}, c.wan, c.guarded, true, splitList(c.listen), nil, wanAddrs); got != "" {
			t.Errorf("wan %q guarded %v listen %q, filtered: %q", c.wan, c.guarded, c.listen, got)
		}
	}
}

// TestWANDropSayListening: the start-up line on the WAN filter names the
// listeners that listen, not those asked for (wanDrop.listening), with
// the verb agreeing.
func TestWANDropSayListening(t *testing.T) {
	all := wanDrop{dnsUDP: true, dnsTCP: true, transparent: true, explicit: true}
	for _, c := range []struct {
		dns, transparent, explicit bool
		want                       string
	}{
		{true, true, true, "wan: the DNS forwarder, the transparent proxy, the explicit proxy drop what arrives on wan0 (socket filter)"},
		{true, true, false, "wan: the DNS forwarder, the transparent proxy drop what arrives on wan0 (socket filter)"},
		{true, false, false, "wan: the DNS forwarder drops what arrives on wan0 (socket filter)"},
		{false, false, true, "wan: the explicit proxy drops what arrives on wan0 (socket filter)"},
		{false, false, false, "wan: no listener drops what arrives on wan0"},
	} {
		if got := wanDropSay("wan0", all.listening(c.dns, c.transparent, c.explicit), 7, false); got != c.want {
			t.Errorf("%v %v %v: %q, want %q", c.dns, c.transparent, c.explicit, got, c.want)
		}
	}
	// Not listening never adds a filter the configuration had not.
	if got := (wanDrop{dnsUDP: true}).listening(true, true, true); !reflect.DeepEqual(got, wanDrop{dnsUDP: true}) {
		t.Errorf("listening added filters: %+v", got)
	}
}
