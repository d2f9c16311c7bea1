package audit

import (
	"fmt"
	"slices"
	"testing"
)

// TestSuggestFromMACNotARouter: a MAC that stands for more than one
// device — a LAN router's, which capture records for each client behind
// it (the frames of a forwarded flow carry it), or a box with more than
// 16 addresses — is not suggested in from:, even where each address was
// seen with that one MAC: it would let every host behind the router out
// through the forward chain in enforce mode, and the proxies deny such
// clients (no neighbour entry) all the same. Its clients stay addresses.
// A MAC with one IPv4 address and at most 16 in all (README: a device)
// is still named.
func TestSuggestFromMACNotARouter(t *testing.T) {
	const camMAC, routerMAC, hostMAC = "aa:bb:cc:00:00:0a", "aa:bb:cc:00:00:fe", "aa:bb:cc:00:00:1f"
	l := NewLedger(nil, LedgerOptions{})
	deny := captureDenials(l)
	deny("cam.example", "192.168.50.23", camMAC)
	deny("cam.example", "fd00::23", camMAC)
	// Three hosts behind a LAN router, each to its own destination:
	// within each entry the address had one MAC, the router's.
	deny("a.example", "10.20.0.5", routerMAC)
	deny("b.example", "10.20.0.6", routerMAC)
	deny("c.example", "10.20.0.7", routerMAC)
	// A host with 17 IPv6 addresses, one of them to v.example.
	for i := range 17 {
		name := "w.example"
		if i == 0 {
			name = "v.example"
		}
		deny(name, fmt.Sprintf("fd00::1:%x", i+1), hostMAC)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	sugs, _ := r.Suggest()
	from := map[string][]string{}
	for _, s := range sugs {
		from[s.To[0]] = s.From
	}
	for to, want := range map[string][]string{
		"cam.example": {camMAC},
		"a.example":   {"10.20.0.5"},
		"b.example":   {"10.20.0.6"},
		"c.example":   {"10.20.0.7"},
		"v.example":   {"fd00::1:1"},
	} {
		if !slices.Equal(from[to], want) {
			t.Errorf("%s: from %q, want %q", to, from[to], want)
		}
	}
}
