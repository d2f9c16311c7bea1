package netutil

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestHostAddrsHeld: an IPv6 address in duplicate address detection
// (tentative: its link has no carrier) or that failed it (dadfailed:
// the peer has it) is not one of the host's addresses, nor of its
// interface's; those held are, IPv4 and IPv6.
// Before, every address was: the proxies' guard and capture counted the
// peer's address as the gateway's own (a LAN host whose address the
// gateway took in vain had its flows left out of the egress record as
// the gateway's), and the explicit listener chose a tentative or a failed
// address over a held one.
func TestHostAddrsHeld(t *testing.T) {
	const dup, held, held2, tentative, held4 = "fd00:6::5", "fd00:6::9", "fd00:6::10", "fd00:7::1", "198.18.40.1"
	peer := testnet.New(t, "r3hap")
	host := testnet.New(t, "r3hah")
	testnet.Link(t, peer, "eth0", []string{dup + "/64"}, host, "lan", []string{held4 + "/24"})
	testnet.Link(t, peer, "eth1", nil, host, "lan2", nil)
	peer.MustRun("ip", "link", "set", "eth1", "down") // lan2: no carrier
	for _, dev := range []string{"lan", "lan2"} {
		host.MustRun("sysctl", "-qw", "net.ipv6.conf."+dev+".accept_dad=1")
	}
	host.MustRun("ip", "-6", "addr", "add", dup+"/64", "dev", "lan") // the peer has it
	host.MustRun("ip", "-6", "addr", "add", held+"/64", "dev", "lan", "nodad")
	host.MustRun("ip", "-6", "addr", "add", held2+"/64", "dev", "lan", "nodad")
	host.MustRun("ip", "-6", "addr", "add", tentative+"/64", "dev", "lan2")
	for deadline := time.Now().Add(10 * time.Second); ; {
		out := host.MustRun("ip", "-6", "addr", "show")
		if strings.Contains(out, "dadfailed") && strings.Contains(out, "tentative") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("control: no dadfailed and tentative address after 10s: the test would prove nothing:\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}

	var all, lan []netip.Addr
	if err := host.Do(func() error {
		var err error
		if all, err = HostAddrs(); err != nil {
			return err
		}
		i, err := net.InterfaceByName("lan")
		if err != nil {
			return err
		}
		lan, err = InterfaceAddrs(i.Index)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{held4, held, held2, "127.0.0.1", "::1"} {
		if !slices.Contains(all, netip.MustParseAddr(a)) {
			t.Errorf("HostAddrs lacks %s, held: %v", a, all)
		}
	}
	for _, a := range []string{dup, tentative} {
		if slices.Contains(all, netip.MustParseAddr(a)) || slices.Contains(lan, netip.MustParseAddr(a)) {
			t.Errorf("%s, not held, is one of the host's addresses: %v, lan's %v", a, all, lan)
		}
	}
	var lan6 []netip.Addr
	for _, a := range lan {
		if a.Is6() && a.IsGlobalUnicast() {
			lan6 = append(lan6, a)
		}
	}
	slices.SortFunc(lan6, netip.Addr.Compare)
	if want := []netip.Addr{netip.MustParseAddr(held), netip.MustParseAddr(held2)}; !slices.Equal(lan6, want) {
		t.Errorf("lan's global IPv6 addresses %v, want %v", lan6, want)
	}
}
