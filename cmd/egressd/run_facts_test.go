package main

import (
	"net/netip"
	"testing"
	"time"

	"egressd/dnsfilter"
)

// TestCaptureFactsHeld: capture asks the forwarder's table who was given
// an address for as long as the enforce firewall keeps it in its learned
// sets (at least a minute), not only for the answer's TTL. Before, an
// answer of a one-second TTL was gone from Given a second later, and
// audit mode reported a flow enforce mode forwards as would-be dropped.
func TestCaptureFactsHeld(t *testing.T) {
	tb := dnsfilter.NewTable(16)
	client, addr := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.7")
	tb.Learn(dnsfilter.Learned{Client: client, Name: "ntp.example.test", Addr: addr, Rule: "ntp", Expires: time.Now().Add(time.Second)})
	time.Sleep(1500 * time.Millisecond)
	if got := tb.NamesFor(client, addr); got != nil {
		t.Fatalf("NamesFor after the TTL: %v (the test would prove nothing)", got)
	}
	got := captureFacts{tb}.Given(addr)
	if len(got) != 1 || got[0].Client != client || got[0].Name != "ntp.example.test" {
		t.Errorf("Given after the TTL, within the firewall's minute: %v, want the answer", got)
	}
}
